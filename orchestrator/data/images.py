"""Image encoding, decoding and fitting to the network's input size."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import simplejpeg
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where it is used: decode actors never need it
    import torch

Uint8Image = npt.NDArray[np.uint8]


class CorruptImageError(ValueError):
    """Image bytes that cannot be decoded; the message names where they came from."""


def encode_jpeg(image: Uint8Image, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 -> baseline JPEG bytes. Deterministic for a given Pillow build."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(
    data: bytes, where: str, out: Uint8Image | None = None, colorspace: str = "RGB"
) -> Uint8Image:
    """JPEG bytes -> (H, W, 3) uint8 with simplejpeg (about 2x Pillow's rate), written into
    ``out`` when given (it must have the image's exact shape). ``colorspace="BGR"`` gives
    the channels reversed (the decode pipeline's cheap mirror builds on it)."""
    try:
        if out is not None:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            if out.shape != (height, width, 3):
                raise ValueError(
                    f"image is {height}x{width}, expected {out.shape[0]}x{out.shape[1]}"
                )
            return np.asarray(simplejpeg.decode_jpeg(data, colorspace=colorspace, buffer=out))
        return np.asarray(simplejpeg.decode_jpeg(data, colorspace=colorspace))
    except (ValueError, RuntimeError) as err:
        raise CorruptImageError(f"{where}: cannot decode JPEG ({len(data)} bytes): {err}") from None


def decode_image(data: bytes, where: str) -> Uint8Image:
    """JPEG (simplejpeg) or any other format Pillow reads (PNG, ...) -> (H, W, 3) uint8 RGB."""
    if data[:2] == b"\xff\xd8":
        return decode_jpeg(data, where)
    try:
        with Image.open(io.BytesIO(data)) as raw:
            raw.load()
            return np.asarray(raw.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"{where}: cannot decode image ({len(data)} bytes): {err}"
        ) from None


def load_image_file(path: str, size: int) -> Uint8Image:
    """Any Pillow-readable file (JPEG/PNG/PGM...) -> (size, size, 3) uint8.

    Grey images are expanded to three channels. The image is scaled so its longer side is
    ``size`` (aspect kept) and centred on a black square.
    """
    try:
        with Image.open(path) as raw:
            raw.load()
            rgb = raw.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptImageError(f"{path}: cannot decode image: {err}") from None
    return fit_square(np.asarray(rgb), size)


def fit_square(image: Uint8Image, size: int) -> Uint8Image:
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def to_model_input(images: Uint8Image | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the backbones' input. A tensor
    stays on its device; a numpy array becomes a CPU tensor (never the default device)."""
    # torch: heavy (two seconds to import); Ray Data tasks import this module without it
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(images, device="cpu")
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
