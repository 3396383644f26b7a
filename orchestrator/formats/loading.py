"""Reading our files safely: ``torch.load`` restricted to data, and the checks every
format shares (its kind, its fields, its architecture)."""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.config import Arch, BackboneShape
from orchestrator.models import build_backbone


class ArtifactError(ValueError):
    """A checkpoint, export or teacher file that is unreadable, foreign or unsafe to load."""


@dataclass(frozen=True)
class ClassifierRef:
    """The inherited classifier a run trained against, by location and content."""

    uri: str
    checksum: str


def load_data(source: str | bytes, where: str, what: str) -> Any:
    """``torch.load`` restricted to data (``weights_only=True``), with every failure an
    :class:`ArtifactError` that names ``where`` and what it expected to find.

    torch's own message for a refused global advises loading with ``weights_only=False``;
    that advice is never passed on: a file that needs it is not one of ours.
    """
    handle: str | io.BytesIO = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        wanted = re.search(r"GLOBAL ([\w.]+)", text)
        if wanted:
            raise ArtifactError(
                f"{where}: refusing to load it as {what}: it asks for {wanted.group(1)}, and "
                f"{what} holds only tensors and plain data (nothing in it may run code)"
            ) from None
        reason = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        detail = reason.group(1) if reason else "unreadable pickle"
        raise ArtifactError(f"{where}: not {what} ({detail})") from None
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"{where}: not {what} ({first})") from None


def kind_checked(data: Any, kind: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(f"{where}: expected a {kind} file, found {found!r}")
    return data


def required_field(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ArtifactError(f"{where}: missing field {key!r}")
    return data[key]


def arch_of(value: Any, where: str) -> Arch:
    try:
        return Arch(value)
    except ValueError:
        known = ", ".join(a.value for a in Arch)
        raise ArtifactError(f"{where}: arch {value!r} is not one of {known}") from None


def classifier_ref(value: Any) -> ClassifierRef | None:
    return None if value is None else ClassifierRef(**value)


def model_from(
    where: str,
    weights: dict[str, torch.Tensor],
    *,
    arch: Arch,
    emb_dim: int,
    image_size: int,
    shape: BackboneShape | None = None,
) -> torch.nn.Module:
    """The backbone ``arch`` (or ``shape``, its point of the family) with ``weights``
    loaded, in eval mode; weights that do not fit are an :class:`ArtifactError` naming
    ``where``."""
    model = build_backbone(arch, emb_dim, input_size=image_size, shape=shape)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ArtifactError(
            f"{where}: its weights do not fit arch {arch.value}"
            f"{'' if shape is None else ' (' + shape.label() + ')'} emb_dim {emb_dim} "
            f"({str(err).splitlines()[0]})"
        ) from None
    return model.eval()
