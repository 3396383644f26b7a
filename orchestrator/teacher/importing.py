"""A teacher directory from files users own (``jobs.import_teacher``).

Layout (local path or object-store prefix)::

    backbone.pt | backbone.onnx   the source file, byte for byte (its sha256 is in the card)
    classifier/                   W from the Partial FC shards, when given (README "Formats")
    teacher.yaml                  the ``teacher:`` section that points at them
    model_card.json, model_card.md

The backbone is loaded and run once before anything is written (every key consumed, the
output width measured), so a directory exists only for a teacher that works.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import yaml

from orchestrator import classifier as clf
from orchestrator import storage
from orchestrator.config import TeacherConfig, TeacherFormat, to_dict
from orchestrator.data import format as fmt
from orchestrator.errors import UsageError
from orchestrator.teacher.classifiers import classifier_from_arcface_torch, find_arcface_shards
from orchestrator.teacher.models import (
    OnnxBackbone,
    TeacherInput,
    backbone_from_bytes,
)

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
TEACHER_YAML = "teacher.yaml"


@dataclass(frozen=True)
class SourceFile:
    path: str
    sha256: str
    bytes: int


def source_file(uri: str) -> tuple[SourceFile, bytes]:
    data = storage.read_bytes(uri)
    return SourceFile(uri, hashlib.sha256(data).hexdigest(), len(data)), data


def _input_card(teacher: TeacherConfig, model: torch.nn.Module, image_size: int) -> dict[str, Any]:
    inner = model.teacher if isinstance(model, TeacherInput) else model
    spec = teacher.input
    card: dict[str, Any] = {
        "student_side": f"{image_size}x{image_size} RGB, (x - 127.5) / 127.5",
        "teacher_side": {
            "size": list(spec.size),
            "crop": list(spec.crop) or "whole image",
            "channels": spec.channels.value,
        },
    }
    if isinstance(model, TeacherInput):
        card["teacher_side"]["mean"] = list(model.mean)
        card["teacher_side"]["std"] = list(model.std)
    else:
        card["teacher_side"]["mean"] = card["teacher_side"]["std"] = [127.5] * 3
    if isinstance(inner, OnnxBackbone):
        card["onnx_input"] = inner.input.name
    return card


def import_teacher(
    teacher: TeacherConfig,
    *,
    out: str,
    partial_fc: str | None = None,
    dataset: str | None = None,
    image_size: int = 112,
    dtype: str = "float16",
) -> dict[str, Any]:
    """Check ``teacher`` (its ``backbone`` in its ``format``), then write the directory;
    returns the model card."""
    if partial_fc and not dataset:
        raise UsageError("--partial-fc needs --dataset (the labels W's rows refer to)")
    # teacher.yaml names files by absolute paths (or URIs): it works from any directory.
    out = os.path.abspath(out) if storage.is_local(out) else out
    source, raw = source_file(teacher.backbone)
    model, chosen = backbone_from_bytes(raw, teacher, image_size=image_size)
    with torch.no_grad():
        width = int(model(torch.zeros(2, 3, image_size, image_size)).shape[1])
    if width != teacher.emb_dim:
        raise UsageError(
            f"{teacher.backbone}: the teacher gives {width}-d embeddings, teacher.emb_dim is "
            f"{teacher.emb_dim} (--emb-dim)"
        )
    name = "backbone.onnx" if chosen is TeacherFormat.ONNX else "backbone.pt"
    backbone_uri = storage.join(out, name)
    placed = replace(teacher, format=chosen, backbone=backbone_uri)
    sources = [source]
    classifier = None
    if partial_fc:
        assert dataset is not None
        sources += [source_file(path)[0] for path in find_arcface_shards(partial_fc)]
        classifier = import_partial_fc(partial_fc, dataset, out=out, dtype=dtype, width=width)
        placed = replace(placed, classifier=storage.join(out, "classifier"))
    storage.write_bytes_atomic(backbone_uri, raw)
    card = teacher_card(
        placed, model, raw, image_size=image_size, arch=teacher.arch, width=width,
        sources=[vars(s) for s in sources], classifier=classifier,
    )  # fmt: skip
    section = card["teacher_config"]
    storage.write_text_atomic(storage.join(out, TEACHER_YAML), _yaml({"teacher": section}))
    storage.write_text_atomic(storage.join(out, CARD_JSON), json.dumps(card, indent=2) + "\n")
    storage.write_text_atomic(storage.join(out, CARD_MD), card_markdown(card))
    return card


def import_partial_fc(
    partial_fc: str, dataset: str, *, out: str, dtype: str, width: int
) -> dict[str, Any]:
    """arcface_torch's Partial FC weights as ``out/classifier``, their width checked
    against the backbone's before anything is written; the card's classifier entry."""
    meta = fmt.read_meta(dataset)
    cmeta = classifier_from_arcface_torch(
        partial_fc,
        storage.join(out, "classifier"),
        num_classes=meta.num_classes,
        dataset_fingerprint=meta.label_map_fingerprint,
        dtype=dtype,
        emb_dim=width,
    )
    return {
        "num_classes": cmeta.num_classes,
        "world_size": cmeta.source.get("world_size"),
        "checksum": clf.checksum(cmeta),
        "dataset": dataset,
    }


def teacher_card(
    placed: TeacherConfig,
    model: torch.nn.Module,
    raw: bytes,
    *,
    image_size: int,
    arch: Any,
    width: int,
    sources: list[dict[str, Any]],
    classifier: dict[str, Any] | None,
) -> dict[str, Any]:
    """The model card of an imported teacher with its ``teacher:`` section: only the facts
    that were measured or given."""
    section = to_dict(placed)
    section.pop("dropout")
    if classifier is None:
        section.pop("classifier")
    known_arch = placed.format is TeacherFormat.INSIGHTFACE
    if not known_arch:
        section.pop("arch")  # known only for a state dict mapped onto our backbones
    return {
        "kind": "proxylesskd-imported-teacher",
        "format": placed.format.value,
        "arch": arch.value if known_arch else None,
        "emb_dim": width,
        "params": parameter_count(model, raw),
        "input": _input_card(placed, model, image_size),
        "sources": sources,
        "backbone": placed.backbone,
        "classifier": classifier,
        "teacher_config": section,
    }


def parameter_count(model: torch.nn.Module, raw: bytes) -> int:
    """Weights in the network: torch parameters, or an ONNX graph's initializers."""
    inner = model.teacher if isinstance(model, TeacherInput) else model
    if isinstance(inner, OnnxBackbone):
        # onnx: heavy, only for ONNX teachers
        import onnx

        graph = onnx.load_model_from_string(raw).graph
        return sum(math.prod(t.dims) for t in graph.initializer)
    return sum(p.numel() for p in inner.parameters())


def _yaml(data: dict[str, Any]) -> str:

    return yaml.safe_dump(data, sort_keys=False)


def card_markdown(card: dict[str, Any]) -> str:
    side = card["input"]["teacher_side"]
    lines = [
        f"# Teacher: {card['arch'] or card['format']} ({card['emb_dim']}-d embeddings)",
        "",
        f"- format: {card['format']}; {card['params']:,} parameters",
        f"- input: our {card['input']['student_side']} -> teacher {side['size'][0]}x"
        f"{side['size'][1]} {side['channels'].upper()}, crop {side['crop']}, "
        f"(x - {side['mean']}) / {side['std']}",
        f"- backbone: `{card['backbone']}`",
        f"- classifier: {card['classifier'] or 'none (build one: jobs.build_classifier mean-embedding)'}",
        "- sources (sha256):",
        *[f"  - `{s['path']}`: `{s['sha256']}` ({s['bytes']:,} bytes)" for s in card["sources"]],
        "",
        "Use it: put the `teacher:` section of teacher.yaml in your config.",
    ]
    return "\n".join(lines) + "\n"
