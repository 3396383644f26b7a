"""Deployable forms of a distilled student: TorchScript and ONNX (dynamic batch), checked
against the PyTorch model with onnxruntime, plus a model card."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator import storage
from orchestrator.config.family import as_dict
from orchestrator.data import format as fmt
from orchestrator.formats.student import StudentExport

# Parity tolerance, float32 on CPU: the exported graph computes the same operations.
MAX_ABS_DIFF = 1e-4
MIN_COSINE = 1.0 - 1e-6
PARITY_BATCHES = (1, 5)  # different batch sizes exercise the dynamic batch axis


class ExportError(RuntimeError):
    """An exported model that does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class Parity:
    format: str
    batch: int
    max_abs_diff: float
    min_cosine: float


def to_torchscript(model: nn.Module, image_size: int) -> bytes:
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def to_onnx(model: nn.Module, image_size: int, opset: int = 17) -> bytes:
    example = torch.zeros(2, 3, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            model.eval(),
            (example,),
            buffer,  # type: ignore[arg-type]  # a file object works; the stub says path
            input_names=["image"],
            output_names=["embedding"],
            dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


def compare(fmt: str, batch: int, got: np.ndarray, want: np.ndarray) -> Parity:
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return Parity(fmt, batch, float(np.abs(got - want).max()), float(cos.min()))


class NonFiniteStudentError(ValueError):
    """The student gives NaN or infinite embeddings: nothing is exported."""


def check_finite(model: nn.Module, *, image_size: int, where: str, batch: int = 16) -> None:
    """Embed a probe batch of random faces in eval mode; refuse a student whose embeddings
    are not all finite (a diverged run, or BatchNorm statistics that overflowed)."""
    x = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.eval()(x * 2 - 1)
    bad = (~torch.isfinite(out)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteStudentError(
            f"{where}: the student's embeddings are not finite for {len(bad)} of {batch} probe "
            f"images (rows {bad[:8]}): it is not exported. Check its run's loss and "
            "val_nonfinite, and export another checkpoint (e.g. <run>/best/student.pt)"
        )


def check_parity(
    model: nn.Module, *, torchscript: bytes, onnx: bytes, image_size: int
) -> list[Parity]:
    """Run the PyTorch model, the TorchScript module and the ONNX graph (onnxruntime, CPU)
    on the same random faces at several batch sizes; raise if any output differs."""
    # onnxruntime: heavy, only for ONNX models
    import onnxruntime

    scripted = torch.jit.load(io.BytesIO(torchscript))
    session = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in PARITY_BATCHES:
        x = torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1
        with torch.no_grad():
            want = model.eval()(x).numpy()
            from_script = scripted(x).numpy()
        from_onnx = session.run(None, {"image": x.numpy()})[0]
        results += [
            compare("torchscript", batch, from_script, want),
            compare("onnx", batch, from_onnx, want),
        ]
    bad = [p for p in results if p.max_abs_diff > MAX_ABS_DIFF or p.min_cosine < MIN_COSINE]
    if bad:
        raise ExportError(
            f"exported model differs from PyTorch beyond max |diff| {MAX_ABS_DIFF} / cosine "
            f"{MIN_COSINE}: {[asdict(p) for p in bad]}"
        )
    return results


def model_card(
    student_uri: str,
    export: StudentExport,
    *,
    parity: list[Parity],
    metrics: dict[str, Any] | None,
) -> dict[str, Any]:
    """What the model is and where it came from: data fingerprint, teacher classifier
    checksum, metrics, the training config."""
    config = export.config
    train_uri = (config.get("data") or {}).get("train")
    fingerprint = None
    if train_uri and storage.exists(storage.join(train_uri, fmt.META_FILE)):
        fingerprint = fmt.read_meta(train_uri).label_map_fingerprint
    return {
        "student": student_uri,
        "arch": export.arch.value,
        "shape": None if export.shape is None else as_dict(export.shape),
        "emb_dim": export.emb_dim,
        "input": {
            "shape": ["batch", 3, export.image_size, export.image_size],
            "range": "[-1, 1], RGB, (pixel / 127.5) - 1",
        },
        "training_data": {"uri": train_uri, "label_map_fingerprint": fingerprint},
        "teacher_classifier": None if export.classifier is None else asdict(export.classifier),
        "epochs_done": list(export.epochs_done),
        "metrics": metrics,
        "parity": {
            "tolerance": {"max_abs_diff": MAX_ABS_DIFF, "min_cosine": MIN_COSINE},
            "checks": [asdict(p) for p in parity],
        },
        "config": config,
    }


def card_markdown(card: dict[str, Any]) -> str:
    lines = [
        f"# Model card: {card['arch']} ({card['emb_dim']}-d embeddings)",
        "",
        f"- family point: {card.get('shape')}",
        f"- exported from: `{card['student']}`",
        f"- input: {card['input']['shape']}, {card['input']['range']}",
        f"- training data: `{card['training_data']['uri']}`, label map "
        f"`{card['training_data']['label_map_fingerprint']}`",
        f"- teacher classifier: {card['teacher_classifier']}",
        f"- epochs: {card['epochs_done']}",
        f"- metrics: {json.dumps(card['metrics']) if card['metrics'] else 'not given (--report)'}",
        "- parity (max |diff|, min cosine vs PyTorch): "
        + ", ".join(
            f"{p['format']}@{p['batch']}: {p['max_abs_diff']:.2e}, {p['min_cosine']:.8f}"
            for p in card["parity"]["checks"]
        ),
    ]
    return "\n".join(lines) + "\n"
