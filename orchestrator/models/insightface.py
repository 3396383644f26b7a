"""insightface arcface_torch backbone state dicts onto our backbones.

arcface_torch saves a backbone as a plain state dict in its own module names (``conv1``,
``bn1``, ``prelu``, ``layer1..4``, ``bn2``, ``fc``, ``features``). Our :mod:`iresnet` and :mod:`mobilefacenet` compute the same functions with
other names, so an import is a renaming plus checks: every key of the file is consumed,
every key of our model is filled, every shape agrees, or the error lists what is missing,
unexpected and mismatched.

The layouts, derived from insightface's published definitions:

- iResNet (``backbones/iresnet.py``): stem ``conv1``, ``bn1``, ``prelu``; stages
  ``layer1..4``, block ``j`` of stage ``i`` is ``layer{i}.{j}`` with ``bn1``, ``conv1``,
  ``bn2``, ``prelu``, ``conv2``, ``bn3`` in forward order and, in the first block of each
  stage (stride 2), ``downsample.0`` (1x1 conv) and ``downsample.1`` (BN); head ``bn2``,
  ``fc``, ``features``. Its dropout sits after the flatten, ours before: the same in eval.
- MobileFaceNet "mbf" (``backbones/mobilefacenet.py``, scale 2, blocks 1-4-6-2): a
  ``layers`` list of ``ConvBlock`` (``layers.{0,1,2}``: conv, BN, PReLU), ``DepthWise``
  (``layers.{0,1,2}`` of two ConvBlocks and a ``LinearBlock``: conv, BN) and ``Residual``
  (``layers.k`` a DepthWise each); ``conv_sep`` (a ConvBlock); ``features`` the GDC
  (``layers.0`` a LinearBlock, ``layers.2`` the bias-free linear, ``layers.3`` the BN1d).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.config import NAMED_SHAPES, Arch

IRESNETS = (Arch.IRESNET18, Arch.IRESNET34, Arch.IRESNET50, Arch.IRESNET100, Arch.IRESNET200)
MBF_DEPTHS = (1, 4, 6, 2)
SUPPORTED = (*IRESNETS, Arch.MOBILEFACENET)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class InsightfaceKeyError(ValueError):
    """A state dict that does not fit the named architecture key for key."""


def iresnet_modules(depths: tuple[int, ...]) -> dict[str, str]:
    """Our module name -> insightface's, for an iResNet with these stage depths."""
    names = {"stem.0": "conv1", "stem.1": "bn1", "stem.2": "prelu"}
    block = ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3")  # our body.0 .. body.5
    for stage, depth in enumerate(depths):
        for j in range(depth):
            ours, theirs = f"stages.{stage}.{j}", f"layer{stage + 1}.{j}"
            names.update({f"{ours}.body.{k}": f"{theirs}.{name}" for k, name in enumerate(block)})
            if j == 0:  # stride 2: the projection shortcut
                names[f"{ours}.shortcut.0"] = f"{theirs}.downsample.0"
                names[f"{ours}.shortcut.1"] = f"{theirs}.downsample.1"
    names.update({"head.bn": "bn2", "head.fc": "fc", "head.features": "features"})
    return names


def mobilefacenet_modules(depths: tuple[int, ...] = MBF_DEPTHS) -> dict[str, str]:
    """Our module name -> insightface's, for the mbf MobileFaceNet (our ``body`` is one flat
    sequence; insightface nests the stride-1 blocks of a stage in a ``Residual``)."""
    names: dict[str, str] = {}

    def conv_block(ours: str, theirs: str, parts: int = 3) -> None:
        names.update({f"{ours}.{k}": f"{theirs}.layers.{k}" for k in range(parts)})

    def depthwise(ours: str, theirs: str) -> None:
        conv_block(f"{ours}.body.0", f"{theirs}.layers.0")
        conv_block(f"{ours}.body.1", f"{theirs}.layers.1")
        conv_block(f"{ours}.body.2", f"{theirs}.layers.2", parts=2)  # linear: no PReLU

    conv_block("body.0", "layers.0")  # the 3x3 stride-2 stem
    conv_block("body.1", "layers.1")  # the stem's depthwise 3x3 (blocks[0] == 1)
    ours = 2
    for stage, depth in enumerate(depths[1:]):
        depthwise(f"body.{ours}", f"layers.{2 + 2 * stage}")  # the stride-2 block
        ours += 1
        for k in range(depth):
            depthwise(f"body.{ours}", f"layers.{3 + 2 * stage}.layers.{k}")
            ours += 1
    conv_block(f"body.{ours}", "conv_sep")
    names.update({"gdc.0": "features.layers.0.layers.0", "gdc.1": "features.layers.0.layers.1"})
    names.update({"fc": "features.layers.2", "features": "features.layers.3"})
    return names


def module_names(arch: Arch) -> dict[str, str]:
    if arch in IRESNETS:
        return iresnet_modules(NAMED_SHAPES[arch.value].depths)
    if arch is Arch.MOBILEFACENET:
        return mobilefacenet_modules()
    raise InsightfaceKeyError(
        f"teacher.arch {arch.value} has no insightface layout; insightface backbones are "
        f"{', '.join(a.value for a in SUPPORTED)}"
    )


def key_map(model: nn.Module, arch: Arch) -> dict[str, str]:
    """insightface key -> our key, for every entry of ``model``'s state dict."""
    modules = module_names(arch)
    out: dict[str, str] = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        out[f"{modules[module]}.{leaf}"] = key  # a KeyError here is a bug in the tables
    return out


@dataclass(frozen=True)
class KeyReport:
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]  # "key: file (shape) vs model (shape)"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def unwrap(state: Mapping[str, object]) -> dict[str, object]:
    """The backbone's own entries: a resume checkpoint's ``state_dict_backbone``, and no
    DDP ``module.`` prefix."""
    inner = state.get("state_dict_backbone")
    flat = dict(inner) if isinstance(inner, Mapping) else dict(state)
    if flat and all(str(k).startswith("module.") for k in flat):
        flat = {str(k)[len("module.") :]: v for k, v in flat.items()}
    return flat


def compare_keys(state: Mapping[str, object], expected: Mapping[str, torch.Size]) -> KeyReport:
    # BatchNorm's step counter is not used in eval; files written without it are fine.
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = []
    for key, shape in expected.items():
        value = state.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            mismatched.append(
                f"{key}: file holds {type(value).__name__}, model a {tuple(shape)} tensor"
            )
        elif value.shape != shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(shape)}")
    return KeyReport(tuple(missing), tuple(unexpected), tuple(mismatched))


def stage_depths(state: Mapping[str, object]) -> tuple[int, ...]:
    """The iResNet stage depths a state dict's ``layer{i}.{j}.`` keys imply (a hint)."""
    depths: dict[int, int] = {}
    for key in state:
        if m := re.match(r"^layer(\d+)\.(\d+)\.", str(key)):
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    return tuple(depths[s] for s in sorted(depths))


def _hint(state: Mapping[str, object], arch: Arch) -> str:
    depths = stage_depths(state)
    if not depths:
        return ""
    for named in IRESNETS:
        known, name = NAMED_SHAPES[named.value].depths, named.value
        if known == depths and name != arch.value:
            return f"; its layers look like {name} (stage depths {'-'.join(map(str, depths))})"
    return f"; its layers have stage depths {'-'.join(map(str, depths))}"


def describe(report: KeyReport, limit: int = 8) -> str:
    parts = []
    for what, keys in (
        ("missing", report.missing),
        ("unexpected", report.unexpected),
        ("mismatched", report.mismatched),
    ):
        if keys:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def load_insightface(
    model: nn.Module, state: Mapping[str, object], *, arch: Arch, emb_dim: int, where: str
) -> nn.Module:
    """``model`` (built for ``arch``) with an insightface state dict's weights, in eval mode.

    Raises :class:`InsightfaceKeyError` naming ``where`` and listing every missing,
    unexpected and mismatched key when the file is not exactly that architecture."""
    flat = unwrap(state)
    mapping = key_map(model, arch)
    ours = model.state_dict()
    expected = {theirs: ours[key].shape for theirs, key in mapping.items()}
    report = compare_keys(flat, expected)
    if not report.ok:
        raise InsightfaceKeyError(
            f"{where}: not an insightface {arch.value} state dict with emb_dim {emb_dim} "
            f"(teacher.arch, teacher.emb_dim): {describe(report)}{_hint(flat, arch)}"
        )
    weights = {}
    for theirs, key in mapping.items():
        value = flat.get(theirs)
        # compare_keys checked every present value is a tensor of the right shape.
        weights[key] = value.to(ours[key].dtype) if isinstance(value, torch.Tensor) else ours[key]
    model.load_state_dict(weights)
    return model.eval()
