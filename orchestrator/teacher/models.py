"""Teacher networks in every format users own, behind one call (README "Bring your own
teacher"): :func:`load_teacher_backbone` gives an ``nn.Module`` mapping our student input,
(B, 3, S, S) in [-1, 1] RGB with S = ``data.image_size``, to (B, d) embeddings, whatever
the file and whatever the network expects.

Formats (:class:`TeacherFormat`): this project's teacher checkpoint, a TorchScript module,
an insightface arcface_torch backbone state dict (:mod:`orchestrator.models.insightface`),
an ONNX graph run with onnxruntime. Nothing loaded runs code: checkpoints and state dicts go
through ``torch.load(weights_only=True)``; ONNX graphs are data to onnxruntime; a
TorchScript module is compiled graph code the user chose to run, as today.

The input convention (:class:`TeacherInputConfig`) is applied by :class:`TeacherInput`
on the teacher's side only, on the input's device.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.config import ChannelOrder, TeacherConfig, TeacherFormat, TeacherInputConfig
from orchestrator.formats.loading import ArtifactError, load_data, model_from
from orchestrator.models import build_backbone
from orchestrator.models.insightface import InsightfaceKeyError, load_insightface
from orchestrator.teacher.checkpoint import (
    TEACHER_KIND,
    archive_kind,
    read_teacher_bytes,
    teacher_from_data,
)

OUR_MEAN = 127.5
OUR_STD = 127.5


@dataclass(frozen=True)
class Normalization:
    """``(x - mean) / std`` per channel, in the teacher's channel order."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _three(values: tuple[float, ...]) -> tuple[float, float, float]:
    return (values[0],) * 3 if len(values) == 1 else (values[0], values[1], values[2])


def normalization(spec: TeacherInputConfig, *, inside_graph: bool) -> Normalization:
    """The configured mean/std, or the default: ours, or 0/1 for a graph that normalises."""
    mean = spec.mean if spec.mean is not None else (0.0 if inside_graph else OUR_MEAN,)
    std = spec.std if spec.std is not None else (1.0 if inside_graph else OUR_STD,)
    return Normalization(_three(mean), _three(std))


class TeacherInput(nn.Module):
    """Our student input -> what the teacher expects, then the teacher.

    ``x`` (B, 3, S, S) in [-1, 1] RGB -> pixels ``x * 127.5 + 127.5`` -> ``crop`` -> bilinear
    resize to ``size`` when it differs -> channel order -> ``(x - mean) / std`` -> teacher."""

    def __init__(self, teacher: nn.Module, spec: TeacherInputConfig, norm: Normalization) -> None:
        super().__init__()
        self.teacher = teacher
        self.size = (int(spec.size[0]), int(spec.size[1]))
        self.crop = tuple(int(c) for c in spec.crop)
        self.bgr = spec.channels is ChannelOrder.BGR
        self.mean, self.std = norm.mean, norm.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * OUR_STD + OUR_MEAN  # (B, 3, S, S), RGB
        if self.crop:
            left, top, right, bottom = self.crop
            if right > x.shape[3] or bottom > x.shape[2]:
                raise ValueError(
                    f"teacher.input.crop {list(self.crop)} reaches outside the "
                    f"{x.shape[2]}x{x.shape[3]} input"
                )
            pixels = pixels[:, :, top:bottom, left:right]
        if tuple(pixels.shape[2:]) != self.size:
            pixels = nn.functional.interpolate(
                pixels, size=self.size, mode="bilinear", align_corners=False
            )
        if self.bgr:
            pixels = pixels.flip(1)
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return self.teacher((pixels - mean) / std)


# --- ONNX -----------------------------------------------------------------------------------


def normalizes_inside(graph_bytes: bytes) -> bool:
    """insightface's test for an MXNet-converted graph that normalises its input itself: a
    Sub and a Mul among the first 8 nodes (it reads node names, ``Sub*``/``_minus*`` and
    ``Mul*``/``_mul*``; we also read op types, since other exporters name nodes otherwise,
    and skip Identity and Constant nodes, which torch's exporter puts first)."""
    # onnx: heavy, only for ONNX teachers
    import onnx

    model = onnx.load_model_from_string(graph_bytes)
    compute = [n for n in model.graph.node if n.op_type not in ("Identity", "Constant")]
    sub = mul = False
    for node in compute[:8]:
        name, op = node.name, node.op_type
        sub |= name.startswith(("Sub", "_minus")) or op == "Sub"
        mul |= name.startswith(("Mul", "_mul")) or op in ("Mul", "Div")
    return sub and mul


def looks_like_onnx(data: bytes) -> bool:
    """A protobuf ModelProto with a graph that has nodes and an input."""
    try:
        # onnx: heavy, only for ONNX teachers
        import onnx

        model = onnx.load_model_from_string(data)
    except Exception:  # any parse failure: not ONNX (protobuf raises its own DecodeError)
        return False
    return len(model.graph.node) > 0 and len(model.graph.input) > 0


class OnnxBackbone(nn.Module):
    """An ONNX graph as a frozen module: onnxruntime with the CUDA provider when this worker
    has a GPU and onnxruntime offers it, else the CPU provider with torch's thread count.

    ``forward`` takes (B, 3, H, W) on any device and returns float32 (B, d) on that device."""

    def __init__(self, graph: bytes, where: str) -> None:
        super().__init__()
        # onnxruntime: heavy, only for ONNX models
        import onnxruntime

        self.where = where
        providers = ["CPUExecutionProvider"]
        if torch.cuda.is_available() and "CUDAExecutionProvider" in (
            onnxruntime.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(graph, options, providers=providers)
        except Exception as err:  # onnxruntime raises its own types for a bad graph
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ArtifactError(f"{where}: onnxruntime cannot load it ({first})") from None
        (self.input,) = self.session.get_inputs()[:1]
        self.output = self.session.get_outputs()[0].name

    @property
    def input_hw(self) -> tuple[int, int] | None:
        """The graph's fixed (height, width), or None where it declares them symbolic."""
        shape = self.input.shape
        if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
            return shape[2], shape[3]
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run([self.output], {self.input.name: feed})[0]
        return torch.from_numpy(out).float().to(x.device)


# --- detection and loading -------------------------------------------------------------------


def detect_format(raw: bytes, where: str) -> tuple[TeacherFormat, Any]:
    """What ``raw`` is, looking at its container and (for torch.save files) its data only:
    (the format, the data of a torch.save file, read once here, else None)."""
    kind = archive_kind(raw)
    if kind == "torchscript":
        return TeacherFormat.TORCHSCRIPT, None
    if kind is None and looks_like_onnx(raw):
        return TeacherFormat.ONNX, None
    data = _torch_data(raw, where)  # a zip archive, or the legacy (pre-1.6) torch.save format
    if isinstance(data, dict) and data.get("kind") == TEACHER_KIND:
        return TeacherFormat.CHECKPOINT, data
    if isinstance(data, dict) and data:
        return TeacherFormat.INSIGHTFACE, data
    raise ArtifactError(
        f"{where}: neither a {TEACHER_KIND} checkpoint, a TorchScript module, an insightface "
        f"state dict nor an ONNX graph (found {type(data).__name__}); set teacher.format"
    )


def _torch_data(raw: bytes, where: str) -> Any:
    try:
        return load_data(raw, where, "a teacher backbone")
    except ArtifactError as err:
        if archive_kind(raw) is None:
            raise ArtifactError(
                f"{where}: neither a PyTorch file (checkpoint, TorchScript, insightface state "
                "dict) nor an ONNX graph"
            ) from None
        raise err


def _torchscript(raw: bytes, where: str) -> nn.Module:
    try:
        return torch.jit.load(io.BytesIO(raw), map_location="cpu").eval()
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"{where}: unreadable TorchScript module ({first})") from None


def _insightface(data: Any, teacher: TeacherConfig, where: str) -> nn.Module:

    if not isinstance(data, dict):
        raise ArtifactError(
            f"{where}: expected an insightface backbone state dict, found {type(data).__name__}"
        )
    height, width = teacher.input.size
    if height != width or height % 16:
        raise ArtifactError(
            f"{where}: an insightface {teacher.arch.value} takes square inputs, a multiple of "
            f"16 (112): teacher.input.size is {list(teacher.input.size)}"
        )
    model = build_backbone(teacher.arch, teacher.emb_dim, input_size=height)
    try:
        return load_insightface(
            model, data, arch=teacher.arch, emb_dim=teacher.emb_dim, where=where
        )
    except InsightfaceKeyError as err:
        raise ArtifactError(str(err)) from None


def _onnx(raw: bytes, teacher: TeacherConfig, where: str) -> tuple[nn.Module, bool]:
    if not looks_like_onnx(raw):
        raise ArtifactError(f"{where}: not an ONNX graph (teacher.format is onnx)")
    backbone = OnnxBackbone(raw, where)
    declared = backbone.input_hw
    if declared is not None and declared != tuple(teacher.input.size):
        raise ArtifactError(
            f"{where}: the graph takes {declared[0]}x{declared[1]} inputs, teacher.input.size "
            f"is {list(teacher.input.size)}"
        )
    return backbone, normalizes_inside(raw)


def load_teacher_backbone(teacher: TeacherConfig | str, *, image_size: int = 112) -> nn.Module:
    """The teacher ``teacher.backbone`` in eval mode, taking our (B, 3, S, S) [-1, 1] RGB
    input (S = ``image_size``): a :class:`TeacherConfig`, or a bare path/URI (format
    detected, our input convention). Any unusable file is an :class:`ArtifactError` naming it.
    """
    config = TeacherConfig(backbone=teacher) if isinstance(teacher, str) else teacher
    model, _ = backbone_from_bytes(
        read_teacher_bytes(config.backbone), config, image_size=image_size
    )
    return model


def backbone_from_bytes(
    raw: bytes, config: TeacherConfig, *, image_size: int
) -> tuple[nn.Module, TeacherFormat]:
    """:func:`load_teacher_backbone` of the file's bytes ``raw`` (read once, unpickled at
    most once); also returns the format it was read as."""
    where = config.backbone
    chosen, data = (
        detect_format(raw, where) if config.format is TeacherFormat.AUTO else (config.format, None)
    )
    inside = False
    match chosen:
        case TeacherFormat.TORCHSCRIPT:
            if archive_kind(raw) != "torchscript":
                raise ArtifactError(f"{where}: not a TorchScript module (teacher.format)")
            model = _torchscript(raw, where)
        case TeacherFormat.CHECKPOINT:
            if data is None:
                data = load_data(raw, where, "a teacher checkpoint")
            saved = teacher_from_data(data, where)
            model = model_from(
                where,
                saved.backbone,
                arch=saved.arch,
                emb_dim=saved.emb_dim,
                image_size=saved.image_size,
            )
        case TeacherFormat.INSIGHTFACE:
            if data is None:
                data = load_data(raw, where, "an insightface backbone state dict")
            model = _insightface(data, config, where)
        case TeacherFormat.ONNX:
            model, inside = _onnx(raw, config, where)
        case TeacherFormat.AUTO:  # detect_format never answers auto
            raise AssertionError(where)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if config.input.is_ours(image_size) and not inside:
        return model, chosen
    adapted = TeacherInput(model, config.input, normalization(config.input, inside_graph=inside))
    return adapted.eval(), chosen
