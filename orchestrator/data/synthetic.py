"""Deterministic synthetic face-like identities.

Each identity is a set of parameters drawn from its own random stream (seed, identity):
head shape, skin tone and texture, hair, the layout and size of eyes, brows, nose and mouth,
and a few marks. Each image of it draws a second stream (seed, identity, image) for the
nuisance: a pose-like warp (roll, yaw squeeze, scale, shift), illumination (direction,
strength, brightness, tint), expression (mouth, eyes, brows), blur, occlusion, background
and sensor noise. Nothing is held per identity between calls, so a dataset of 100k+
identities is generated as a stream.

Rendering works in normalised face coordinates (x right, y down, face about [-0.7, 0.7] x
[-0.9, 0.9]) with soft-edged masks, then the image is JPEG-encoded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from orchestrator.data.images import Uint8Image

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Identity:
    """The stable structure of one synthetic person."""

    face_w: float
    face_h: float
    jaw_power: float
    skin: Array  # (3,) RGB in [0, 1]
    texture: Array  # (6, 6) smooth relief, upsampled per image
    hair: Array  # (3,)
    hairline: float
    hair_volume: float
    hair_part: float
    eye_y: float
    eye_dx: float
    eye_rx: float
    eye_ry: float
    iris: Array  # (3,)
    brow_gap: float
    brow_tilt: float
    brow_thickness: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lips: Array  # (3,)
    marks: Array  # (k, 3): x, y, radius
    beard: float  # 0 = none


@dataclass(frozen=True)
class Nuisance:
    """What changes from one photo of a person to the next."""

    roll: float
    yaw: float
    scale: float
    shift: Array  # (2,)
    light_dir: float
    light_strength: float
    brightness: float
    tint: Array  # (3,)
    mouth_open: float
    smile: float
    squint: float
    brow_raise: float
    blur: float
    occlusion: Array | None  # x0, y0, x1, y1 in face coordinates, then grey level
    background: Array  # (3,)
    noise: float


def identity_rng(seed: int, identity: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, identity, 0]))


def image_rng(seed: int, identity: int, image: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, identity, 1, image]))


def sample_identity(rng: np.random.Generator) -> Identity:
    tone = rng.uniform(0.0, 1.0)
    light_skin, dark_skin = np.array([0.96, 0.80, 0.69]), np.array([0.36, 0.24, 0.17])
    skin = np.clip((1 - tone) * light_skin + tone * dark_skin + rng.normal(0, 0.03, 3), 0, 1)
    hair_palette = np.array(
        [
            [0.08, 0.06, 0.05],
            [0.30, 0.18, 0.10],
            [0.75, 0.60, 0.35],
            [0.55, 0.22, 0.10],
            [0.6, 0.6, 0.6],
        ]
    )
    hair = np.clip(hair_palette[rng.integers(len(hair_palette))] + rng.normal(0, 0.04, 3), 0, 1)
    num_marks = int(rng.integers(0, 4))
    marks = np.column_stack(
        [
            rng.uniform(-0.45, 0.45, num_marks),
            rng.uniform(-0.3, 0.6, num_marks),
            rng.uniform(0.015, 0.035, num_marks),
        ]
    )
    return Identity(
        face_w=rng.uniform(0.52, 0.74),
        face_h=rng.uniform(0.74, 0.92),
        jaw_power=rng.uniform(1.7, 2.8),
        skin=skin,
        texture=rng.normal(0, 1, (6, 6)),
        hair=hair,
        hairline=rng.uniform(-0.78, -0.45),
        hair_volume=rng.uniform(0.0, 0.18),
        hair_part=rng.uniform(-0.3, 0.3),
        eye_y=rng.uniform(-0.22, -0.04),
        eye_dx=rng.uniform(0.2, 0.34),
        eye_rx=rng.uniform(0.07, 0.12),
        eye_ry=rng.uniform(0.03, 0.06),
        iris=np.clip(rng.uniform(0.05, 0.6, 3) * np.array([0.8, 0.9, 1.0]), 0, 1),
        brow_gap=rng.uniform(0.07, 0.15),
        brow_tilt=rng.uniform(-0.25, 0.25),
        brow_thickness=rng.uniform(0.015, 0.04),
        nose_len=rng.uniform(0.14, 0.3),
        nose_w=rng.uniform(0.05, 0.12),
        mouth_y=rng.uniform(0.34, 0.52),
        mouth_w=rng.uniform(0.13, 0.3),
        lips=np.clip(skin * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 0.03, 3), 0, 1),
        marks=marks,
        beard=float(rng.uniform(0.3, 0.8)) if rng.random() < 0.25 else 0.0,
    )


def sample_nuisance(rng: np.random.Generator) -> Nuisance:
    occlusion = None
    if rng.random() < 0.25:
        x0, y0 = rng.uniform(-0.8, 0.4), rng.uniform(-0.8, 0.5)
        w, h = rng.uniform(0.25, 0.7), rng.uniform(0.15, 0.45)
        occlusion = np.array([x0, y0, x0 + w, y0 + h, rng.uniform(0.05, 0.9)])
    return Nuisance(
        roll=rng.normal(0, 0.12),
        yaw=rng.uniform(-0.35, 0.35),
        scale=rng.uniform(0.88, 1.1),
        shift=rng.normal(0, 0.05, 2),
        light_dir=rng.uniform(0, 2 * math.pi),
        light_strength=rng.uniform(0.0, 0.65),
        brightness=rng.uniform(0.65, 1.25),
        tint=rng.normal(1.0, 0.06, 3),
        mouth_open=max(0.0, rng.normal(0.0, 0.03)),
        smile=rng.normal(0.0, 0.04),
        squint=rng.uniform(0.45, 1.1),
        brow_raise=rng.normal(0.0, 0.025),
        blur=rng.uniform(0.0, 1.4),
        occlusion=occlusion,
        background=rng.uniform(0.1, 0.9, 3),
        noise=rng.uniform(0.005, 0.05),
    )


def _soft(distance: Array, softness: float) -> Array:
    """1 inside (distance < 1), 0 outside, with a smooth edge of width ~softness."""
    return 1.0 / (1.0 + np.exp(np.clip((distance - 1.0) / softness, -30, 30)))


def _ellipse(
    x: Array, y: Array, cx: float, cy: float | Array, rx: float, ry: float, power: float = 2.0
) -> Array:
    return (np.abs((x - cx) / rx) ** power + np.abs((y - cy) / ry) ** power) ** (1.0 / power)


def _upsample(grid: Array, size: int) -> Array:
    """Bilinear upsampling of a small grid to (size, size)."""
    n = grid.shape[0]
    pos = np.linspace(0, n - 1, size)
    i0 = np.clip(np.floor(pos).astype(int), 0, n - 2)
    t = pos - i0
    rows = grid[i0] * (1 - t)[:, None] + grid[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def _blur(image: Array, sigma: float) -> Array:
    if sigma < 0.3:
        return image
    radius = math.ceil(2.5 * sigma)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    image = sum(k[i] * padded[i : i + image.shape[0]] for i in range(k.size))
    padded = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(k[i] * padded[:, i : i + image.shape[1]] for i in range(k.size))


@dataclass(frozen=True)
class FaceGrid:
    """Face coordinates of every pixel (after pose) and one pixel's size in them."""

    x: Array
    y: Array
    v: Array  # the image's own vertical coordinate, for the background gradient
    px: float


def face_grid(nuisance: Nuisance, size: int) -> FaceGrid:
    """Pixel grid -> face coordinates: inverse of roll, scale, shift, plus a yaw squeeze
    that compresses the side of the face turned away."""
    v, u = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    u, v = (u - nuisance.shift[0]) / nuisance.scale, (v - nuisance.shift[1]) / nuisance.scale
    c, s = math.cos(nuisance.roll), math.sin(nuisance.roll)
    x, y = c * u + s * v, -s * u + c * v
    x = x * (1 + nuisance.yaw * np.sign(x) * 0.5) - nuisance.yaw * 0.25
    return FaceGrid(x, y, v, 1.0 / size)  # px: one pixel, for edge softness


def _paint(img: Array, mask: Array, colour: Array | float) -> Array:
    return img * (1 - mask[..., None]) + np.asarray(colour) * mask[..., None]


def render(
    person: Identity, nuisance: Nuisance, size: int, noise_rng: np.random.Generator
) -> Uint8Image:
    """One (size, size, 3) uint8 photo of ``person`` under ``nuisance``."""
    g = face_grid(nuisance, size)
    img = np.broadcast_to(nuisance.background, (size, size, 3)).copy()
    img *= (0.85 + 0.15 * g.v)[..., None]  # background gradient
    img = _paint_head(img, person, g, size)
    img = _paint_eyes(img, person, nuisance, g)
    img = _paint_nose_and_mouth(img, person, nuisance, g)
    img = _illuminate(img, nuisance, g)
    img = _blur(img, nuisance.blur)
    img = img + noise_rng.normal(0, nuisance.noise, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _paint_head(img: Array, person: Identity, g: FaceGrid, size: int) -> Array:
    """Hair behind the head, then the face with its texture and marks, beard, fringe."""
    x, y, px = g.x, g.y, g.px
    hair_back = _soft(
        _ellipse(x, y, 0.0, -0.08, person.face_w + person.hair_volume, person.face_h + 0.08), 4 * px
    )
    img = _paint(img, hair_back * (y < 0.25), person.hair)
    face = _soft(_ellipse(x, y, 0.0, 0.0, person.face_w, person.face_h, person.jaw_power), 3 * px)
    relief = _upsample(person.texture, size)
    skin = person.skin[None, None, :] * (1 + 0.07 * relief[..., None])
    img = img * (1 - face[..., None]) + skin * face[..., None]
    for mx, my, mr in person.marks:
        img = _paint(img, _soft(_ellipse(x, y, mx, my, mr, mr), 2 * px) * face, person.skin * 0.45)
    if person.beard > 0:
        beard = (
            _soft(_ellipse(x, y, 0.0, 0.55, person.face_w * 0.9, 0.42), 6 * px) * face * (y > 0.2)
        )
        img = _paint(img, beard * person.beard, person.hair)
    # Fringe: hair above the hairline, inside the head, parted to one side.
    fringe = face * _soft(
        (person.hairline + 0.12 * np.tanh(4 * (x - person.hair_part)) - y + 1), 6 * px
    )
    fringe = np.where(y < person.hairline + 0.25, fringe, 0.0)
    return _paint(img, fringe, person.hair)


def _paint_eyes(img: Array, person: Identity, nuisance: Nuisance, g: FaceGrid) -> Array:
    """Eye whites, irises and brows."""
    x, y, px = g.x, g.y, g.px
    eye_ry = person.eye_ry * nuisance.squint
    for side in (-1.0, 1.0):
        ex = side * person.eye_dx
        white = _soft(_ellipse(x, y, ex, person.eye_y, person.eye_rx, eye_ry), 2 * px)
        img = _paint(img, white, np.array([0.93, 0.93, 0.9]))
        iris_r = min(person.eye_rx * 0.5, eye_ry * 1.2)
        iris = _soft(_ellipse(x, y, ex, person.eye_y, iris_r, iris_r), 2 * px) * white
        img = _paint(img, iris, person.iris)
        by = (
            person.eye_y
            - person.brow_gap
            - nuisance.brow_raise
            + side * person.brow_tilt * (x - ex)
        )
        brow = _soft(np.abs(x - ex) / (person.eye_rx * 1.3), 0.05)
        brow = brow * _soft(np.abs(y - by) / person.brow_thickness, 0.2)
        img = _paint(img, brow, person.hair * 0.8)
    return img


def _paint_nose_and_mouth(img: Array, person: Identity, nuisance: Nuisance, g: FaceGrid) -> Array:
    x, y, px = g.x, g.y, g.px
    nose_top, nose_bottom = person.eye_y + 0.05, person.eye_y + 0.05 + person.nose_len
    ridge = (
        _soft(np.abs(x - 0.04) / (person.nose_w * 0.25), 0.3) * (y > nose_top) * (y < nose_bottom)
    )
    img = _paint(img, ridge * 0.35, person.skin * 0.6)
    nostrils = _soft(_ellipse(x, y, 0.0, nose_bottom, person.nose_w, person.nose_w * 0.4), 2 * px)
    img = _paint(img, nostrils * 0.5, person.skin * 0.55)
    curve = person.mouth_y - nuisance.smile * (1 - (x / person.mouth_w) ** 2)
    mouth = _soft(_ellipse(x, y, 0.0, curve, person.mouth_w, 0.02 + nuisance.mouth_open), 2 * px)
    img = _paint(img, mouth, person.lips)
    if nuisance.mouth_open > 0.01:
        inside = _soft(
            _ellipse(x, y, 0.0, curve, person.mouth_w * 0.8, nuisance.mouth_open), 2 * px
        )
        img = _paint(img, inside, np.array([0.15, 0.05, 0.05]))
    return img


def _illuminate(img: Array, nuisance: Nuisance, g: FaceGrid) -> Array:
    """Directional shading over the head, global brightness and colour tint, occluder."""
    x, y = g.x, g.y
    shade = 1 + nuisance.light_strength * (
        math.cos(nuisance.light_dir) * x + math.sin(nuisance.light_dir) * y
    )
    img = img * np.clip(shade, 0.2, 2.0)[..., None] * nuisance.brightness * nuisance.tint
    if nuisance.occlusion is not None:
        x0, y0, x1, y1, grey = nuisance.occlusion
        block = _soft(
            np.maximum(
                np.abs(x - (x0 + x1) / 2) / ((x1 - x0) / 2),
                np.abs(y - (y0 + y1) / 2) / ((y1 - y0) / 2),
            ),
            2 * g.px,
        )
        img = _paint(img, block, grey)
    return img


def render_image(seed: int, identity: int, *, image: int, size: int) -> Uint8Image:
    """Photo ``image`` of identity ``identity``: a pure function of its arguments."""
    person = sample_identity(identity_rng(seed, identity))
    rng = image_rng(seed, identity, image)
    return render(person, sample_nuisance(rng), size, rng)


def iter_identity_images(
    seed: int, identity: int, *, images_per_identity: int, size: int
) -> Iterator[Uint8Image]:
    """The photos of one identity in order; equal to render_image for each index."""
    person = sample_identity(identity_rng(seed, identity))
    for image in range(images_per_identity):
        rng = image_rng(seed, identity, image)
        yield render(person, sample_nuisance(rng), size, rng)
