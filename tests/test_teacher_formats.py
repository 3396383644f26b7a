"""Teachers in the formats users own: insightface state dicts, ONNX graphs, other input
geometry (orchestrator.teacher.models). Each against a reference written here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config import (
    Arch,
    ChannelOrder,
    ConfigError,
    TeacherConfig,
    TeacherFormat,
    TeacherInputConfig,
    load_config,
)
from orchestrator.data.images import to_model_input
from orchestrator.export import to_onnx
from orchestrator.formats.loading import ArtifactError
from orchestrator.models import build_backbone
from orchestrator.teacher.models import OnnxBackbone, load_teacher_backbone, normalizes_inside

onnxruntime = pytest.importorskip("onnxruntime")

State = dict[str, torch.Tensor]


# --- insightface's layouts, written from its published definitions (not from our tables) ---


class Weights:
    """Random weights under insightface's names, and the functional pieces that use them."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.state: State = {}

    def _rand(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale

    def conv(self, name: str, out_c: int, in_c: int, k: int, groups: int = 1) -> None:
        fan_in = in_c // groups * k * k
        self.state[f"{name}.weight"] = self._rand(
            out_c, in_c // groups, k, k, scale=(2 / fan_in) ** 0.5
        )

    def bn(self, name: str, c: int) -> None:
        u = torch.rand(4, c, generator=self.g, dtype=torch.float64)
        self.state[f"{name}.weight"] = 0.5 + u[0]
        self.state[f"{name}.bias"] = 0.1 * (u[1] - 0.5)
        self.state[f"{name}.running_mean"] = 0.1 * (u[2] - 0.5)
        self.state[f"{name}.running_var"] = 0.5 + u[3]
        self.state[f"{name}.num_batches_tracked"] = torch.tensor(7)

    def prelu(self, name: str, c: int) -> None:
        self.state[f"{name}.weight"] = 0.25 * torch.rand(c, generator=self.g, dtype=torch.float64)

    def linear(self, name: str, out_f: int, in_f: int, bias: bool) -> None:
        self.state[f"{name}.weight"] = self._rand(out_f, in_f, scale=in_f**-0.5)
        if bias:
            self.state[f"{name}.bias"] = self._rand(out_f, scale=0.1)

    # functional forward pieces
    def f_conv(self, x: torch.Tensor, name: str, stride: int = 1, groups: int = 1) -> torch.Tensor:
        w = self.state[f"{name}.weight"]
        return F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)

    def f_bn(self, x: torch.Tensor, name: str) -> torch.Tensor:
        s = self.state
        return F.batch_norm(
            x,
            s[f"{name}.running_mean"],
            s[f"{name}.running_var"],
            s[f"{name}.weight"],
            s[f"{name}.bias"],
            training=False,
            eps=1e-5,
        )

    def f_prelu(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.prelu(x, self.state[f"{name}.weight"])


IRESNET18 = (2, 2, 2, 2)


def insightface_iresnet(depths: tuple[int, ...], emb_dim: int, seed: int = 0) -> Weights:
    """arcface_torch's iresnet.py: conv1/bn1/prelu, layer1..4 of IBasicBlock (bn1, conv1,
    bn2, prelu, conv2 with the stride, bn3; downsample.0/1 on each stage's first block),
    bn2, fc (512*7*7 -> emb), features (BN1d)."""
    w = Weights(seed)
    w.conv("conv1", 64, 3, 3)
    w.bn("bn1", 64)
    w.prelu("prelu", 64)
    in_c = 64
    for i, (depth, c) in enumerate(zip(depths, (64, 128, 256, 512), strict=True), 1):
        for j in range(depth):
            p = f"layer{i}.{j}"
            w.bn(f"{p}.bn1", in_c)
            w.conv(f"{p}.conv1", c, in_c, 3)
            w.bn(f"{p}.bn2", c)
            w.prelu(f"{p}.prelu", c)
            w.conv(f"{p}.conv2", c, c, 3)
            w.bn(f"{p}.bn3", c)
            if j == 0:
                w.conv(f"{p}.downsample.0", c, in_c, 1)
                w.bn(f"{p}.downsample.1", c)
            in_c = c
    w.bn("bn2", 512)
    w.linear("fc", emb_dim, 512 * 7 * 7, bias=True)
    w.bn("features", emb_dim)
    return w


def iresnet_forward(w: Weights, depths: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    x = w.f_prelu(w.f_bn(w.f_conv(x, "conv1"), "bn1"), "prelu")
    for i, depth in enumerate(depths, 1):
        for j in range(depth):
            p = f"layer{i}.{j}"
            out = w.f_conv(w.f_bn(x, f"{p}.bn1"), f"{p}.conv1")
            out = w.f_prelu(w.f_bn(out, f"{p}.bn2"), f"{p}.prelu")
            out = w.f_bn(w.f_conv(out, f"{p}.conv2", stride=2 if j == 0 else 1), f"{p}.bn3")
            identity = x
            if j == 0:
                identity = w.f_bn(w.f_conv(x, f"{p}.downsample.0", stride=2), f"{p}.downsample.1")
            x = out + identity
    x = torch.flatten(w.f_bn(x, "bn2"), 1)
    x = F.linear(x, w.state["fc.weight"], w.state["fc.bias"])
    return w.f_bn(x, "features")


# mbf: (kind, name, in_c, out_c, groups (hidden width for DepthWise), stride)
def mbf_layers() -> list[tuple[str, str, int, int, int, int]]:
    """arcface_torch's mobilefacenet.py with scale 2, blocks (1, 4, 6, 2)."""
    layers = [("conv", "layers.0", 3, 128, 1, 2), ("conv", "layers.1", 128, 128, 64, 1)]
    layers.append(("dw", "layers.2", 128, 128, 128, 2))
    layers += [("dw", f"layers.3.layers.{k}", 128, 128, 128, 1) for k in range(4)]
    layers.append(("dw", "layers.4", 128, 256, 256, 2))
    layers += [("dw", f"layers.5.layers.{k}", 256, 256, 256, 1) for k in range(6)]
    layers.append(("dw", "layers.6", 256, 256, 512, 2))
    layers += [("dw", f"layers.7.layers.{k}", 256, 256, 256, 1) for k in range(2)]
    layers.append(("conv1x1", "conv_sep", 256, 512, 1, 1))
    return layers


def insightface_mbf(emb_dim: int, seed: int = 0) -> Weights:
    w = Weights(seed)

    def conv_block(name: str, in_c: int, out_c: int, k: int, groups: int, act: bool) -> None:
        w.conv(f"{name}.layers.0", out_c, in_c, k, groups)
        w.bn(f"{name}.layers.1", out_c)
        if act:
            w.prelu(f"{name}.layers.2", out_c)

    for kind, name, in_c, out_c, groups, _stride in mbf_layers():
        if kind == "conv":
            conv_block(name, in_c, out_c, 3, groups, act=True)
        elif kind == "conv1x1":
            conv_block(name, in_c, out_c, 1, 1, act=True)
        else:  # DepthWise: ConvBlock 1x1 -> ConvBlock 3x3 depthwise -> LinearBlock 1x1
            conv_block(f"{name}.layers.0", in_c, groups, 1, 1, act=True)
            conv_block(f"{name}.layers.1", groups, groups, 3, groups, act=True)
            conv_block(f"{name}.layers.2", groups, out_c, 1, 1, act=False)
    conv_block("features.layers.0", 512, 512, 7, 512, act=False)  # GDC's LinearBlock
    w.linear("features.layers.2", emb_dim, 512, bias=False)
    w.bn("features.layers.3", emb_dim)
    return w


def mbf_forward(w: Weights, x: torch.Tensor) -> torch.Tensor:
    def block(x: torch.Tensor, name: str, stride: int, groups: int, act: bool) -> torch.Tensor:
        weight = w.state[f"{name}.layers.0.weight"]
        pad = 0 if name.startswith("features") else weight.shape[-1] // 2
        x = F.conv2d(x, weight, stride=stride, padding=pad, groups=groups)
        x = w.f_bn(x, f"{name}.layers.1")
        return w.f_prelu(x, f"{name}.layers.2") if act else x

    for kind, name, in_c, out_c, groups, stride in mbf_layers():
        if kind == "conv":
            x = block(x, name, stride, groups, act=True)
        elif kind == "conv1x1":
            x = block(x, name, 1, 1, act=True)
        else:
            y = block(x, f"{name}.layers.0", 1, 1, act=True)
            y = block(y, f"{name}.layers.1", stride, groups, act=True)
            y = block(y, f"{name}.layers.2", 1, 1, act=False)
            x = x + y if (stride == 1 and in_c == out_c) else y
    x = torch.flatten(block(x, "features.layers.0", 1, 512, act=False), 1)
    x = F.linear(x, w.state["features.layers.2.weight"])
    return w.f_bn(x, "features.layers.3")


def save(state: object, path: Path) -> str:
    torch.save(state, path)
    return str(path)


def as_float32(state: State) -> State:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize(
    ("arch", "build", "forward"),
    [
        (
            Arch.IRESNET18,
            lambda: insightface_iresnet(IRESNET18, 64),
            lambda w, x: iresnet_forward(w, IRESNET18, x),
        ),
        (Arch.MOBILEFACENET, lambda: insightface_mbf(64), mbf_forward),
    ],
    ids=["iresnet18", "mobilefacenet"],
)
def test_an_insightface_state_dict_imports_and_computes_insightfaces_function(
    tmp_path: Path,
    arch: Arch,
    build: Callable[[], Weights],
    forward: Callable[[Weights, torch.Tensor], torch.Tensor],
) -> None:
    w = build()
    path = save(as_float32(w.state), tmp_path / "backbone.pth")
    for fmt in (TeacherFormat.INSIGHTFACE, TeacherFormat.AUTO):
        teacher = TeacherConfig(arch=arch, emb_dim=64, backbone=path, format=fmt)
        model = load_teacher_backbone(teacher).double()
        x = torch.rand(2, 3, 112, 112, dtype=torch.float64) * 2 - 1
        want = forward(w, x)
        got = model(x)
        assert got.shape == (2, 64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_insightface_wrappers_are_unwrapped(tmp_path: Path) -> None:
    """DDP's ``module.`` prefix and a resume checkpoint's ``state_dict_backbone``."""
    w = insightface_iresnet(IRESNET18, 32, seed=1)
    x = torch.rand(1, 3, 112, 112, dtype=torch.float64) * 2 - 1
    want = iresnet_forward(w, IRESNET18, x)
    for i, wrapped in enumerate(
        [
            {f"module.{k}": v for k, v in as_float32(w.state).items()},
            {"state_dict_backbone": as_float32(w.state), "epoch": 3},
        ]
    ):
        path = save(wrapped, tmp_path / f"w{i}.pt")
        config = TeacherConfig(
            arch=Arch.IRESNET18, emb_dim=32, backbone=path, format=TeacherFormat.INSIGHTFACE
        )
        got = load_teacher_backbone(config).double()(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_insightface_key_errors_list_missing_unexpected_and_mismatched(tmp_path: Path) -> None:
    state = as_float32(insightface_iresnet(IRESNET18, 32).state)
    state.pop("layer2.1.conv1.weight")
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(16, 512 * 49)
    path = save(state, tmp_path / "bad.pt")
    config = TeacherConfig(
        arch=Arch.IRESNET18, emb_dim=32, backbone=path, format=TeacherFormat.INSIGHTFACE
    )
    with pytest.raises(ArtifactError) as caught:
        load_teacher_backbone(config)
    text = str(caught.value)
    assert "bad.pt: not an insightface iresnet18 state dict with emb_dim 32" in text
    assert "1 missing: layer2.1.conv1.weight" in text
    assert "1 unexpected: layer5.0.conv1.weight" in text
    assert "1 mismatched: fc.weight: file (16, 25088) vs model (32, 25088)" in text

    # A deeper file under a shallower name: every extra block is unexpected, and the hint
    # names the depth the keys imply.
    deeper = save(as_float32(insightface_iresnet((3, 4, 6, 3), 32).state), tmp_path / "r34.pt")
    with pytest.raises(ArtifactError, match=r"looks? like iresnet34 \(stage depths 3-4-6-3\)"):
        load_teacher_backbone(TeacherConfig(arch=Arch.IRESNET18, emb_dim=32, backbone=deeper))
    with pytest.raises(ArtifactError, match="tiny_iresnet has no insightface layout"):
        load_teacher_backbone(TeacherConfig(arch=Arch.TINY_IRESNET, emb_dim=32, backbone=deeper))


def test_an_insightface_file_that_runs_code_is_refused(tmp_path: Path) -> None:
    from tests.test_safe_loading import crafted

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(crafted("insightface", marker))
    config = TeacherConfig(
        arch=Arch.IRESNET18, backbone=str(path), format=TeacherFormat.INSIGHTFACE
    )
    for fmt in (TeacherFormat.INSIGHTFACE, TeacherFormat.AUTO):
        with pytest.raises(ArtifactError, match="refusing to load it"):
            load_teacher_backbone(replace(config, format=fmt))
    assert not marker.exists(), "the payload ran"


# --- ONNX ----------------------------------------------------------------------------------


class Normalizing(nn.Module):
    """A graph that takes 0..255 pixels and normalises inside, as MXNet-converted ones do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - 127.5) * (1.0 / 127.5))


def images(n: int, seed: int = 0, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=1)


def test_onnx_teachers_with_and_without_normalisation_inside_match_pytorch(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = build_backbone(Arch.TINY_IRESNET, 16).eval()
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(to_onnx(model, 112))
    inside = tmp_path / "inside.onnx"
    inside.write_bytes(to_onnx(Normalizing(model), 112))
    assert not normalizes_inside(plain.read_bytes())
    assert normalizes_inside(inside.read_bytes())

    x = to_model_input(images(6))
    with torch.no_grad():
        want = model(x)
    for path in (plain, inside):
        teacher = load_teacher_backbone(str(path))  # auto: detected as ONNX
        got = teacher(x)
        assert got.shape == want.shape
        assert float(cosines(got, want).min()) >= 0.9999, path.name
    # Fed the other way round (a plain graph told that it normalises inside) it is wrong:
    # the check above can fail.
    wrong = TeacherConfig(backbone=str(plain), input=TeacherInputConfig(mean=(0.0,), std=(1.0,)))
    assert float(cosines(load_teacher_backbone(wrong)(x), want).min()) < 0.99


def test_an_onnx_graph_of_another_size_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(to_onnx(build_backbone(Arch.TINY_IRESNET, 8).eval(), 112))
    config = TeacherConfig(backbone=str(path), input=TeacherInputConfig(size=(96, 96)))
    with pytest.raises(
        ArtifactError, match=r"takes 112x112 inputs, teacher.input.size is \[96, 96\]"
    ):
        load_teacher_backbone(config)
    assert isinstance(load_teacher_backbone(str(path)), OnnxBackbone)
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_bytes(b"\x08\x07junk")
    with pytest.raises(ArtifactError, match="not an ONNX graph"):
        load_teacher_backbone(TeacherConfig(backbone=str(not_onnx), format=TeacherFormat.ONNX))


# --- input geometry ------------------------------------------------------------------------


class Narrow(nn.Module):
    """A 112x96 network whose output depends on every pixel's place and channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.fc = nn.Linear(4 * 27 * 23, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.tanh(self.conv(x)), 1))


def sphereface_by_hand(net: nn.Module, pixels: np.ndarray) -> torch.Tensor:
    """Crop columns 8..104 (112x96), BGR, (x - mean) / 128 with a per-channel mean."""
    crop = pixels[:, 0:112, 8:104, ::-1].astype(np.float64)  # (B, 112, 96, 3) BGR
    mean = np.array([104.0, 117.0, 123.0])  # in B, G, R order
    x = torch.from_numpy(((crop - mean) / 128.0).transpose(0, 3, 1, 2).copy()).float()
    with torch.no_grad():
        return net(x)


SPHEREFACE = TeacherInputConfig(
    size=(112, 96),
    crop=(8, 0, 104, 112),
    mean=(104.0, 117.0, 123.0),
    std=(128.0,),
    channels=ChannelOrder.BGR,
)


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_a_112x96_bgr_teacher_is_fed_through_teacher_input(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(1)
    net = Narrow().eval()
    example = torch.zeros(2, 3, 112, 96)
    path = tmp_path / f"narrow.{kind}"
    if kind == "torchscript":
        torch.jit.trace(net, example).save(str(path))
    else:
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["data"],
            dynamic_axes={"data": {0: "n"}},
            dynamo=False,
        )
    pixels = images(4, seed=2)
    want = sphereface_by_hand(net, pixels)
    teacher = load_teacher_backbone(TeacherConfig(backbone=str(path), input=SPHEREFACE))
    got = teacher(to_model_input(pixels))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # RGB instead of BGR changes the embeddings: the channel swap is really applied.
    rgb = TeacherConfig(
        backbone=str(path),
        input=TeacherInputConfig(**{**SPHEREFACE.__dict__, "channels": ChannelOrder.RGB}),
    )
    assert not torch.allclose(load_teacher_backbone(rgb)(to_model_input(pixels)), want, atol=1e-3)


def test_a_resize_is_bilinear_from_the_crop() -> None:
    """size != crop: the crop is resized (bilinear, align_corners=False) before the teacher."""
    from orchestrator.teacher.models import Normalization, TeacherInput

    seen: list[torch.Tensor] = []

    class Record(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x.flatten(1)[:, :4]

    spec = TeacherInputConfig(size=(56, 56), crop=(0, 0, 112, 112))
    adapter = TeacherInput(Record(), spec, Normalization((127.5,) * 3, (127.5,) * 3))
    pixels = images(1, seed=3)
    adapter(to_model_input(pixels))
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32))
    want = (F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False) - 127.5) / 127.5
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)


def test_teacher_input_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  input:\n    crop: [8, 0, 104]\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml: teacher.input.crop: expected \[\] or \[left, top"
    ):
        load_config(path)
    with pytest.raises(
        ConfigError, match=r"teacher.input.crop: \[0, 0, 120, 112\] reaches outside the 112x112"
    ):
        load_config(None, ["teacher.input.crop=[0, 0, 120, 112]"])
    with pytest.raises(ConfigError, match=r"teacher.input.std: must be > 0"):
        load_config(None, ["teacher.input.std=[0]"])
    with pytest.raises(ConfigError, match=r"teacher.format: expected one of"):
        load_config(None, ["teacher.format=mxnet"])
    config = load_config(
        None, ["teacher.format=onnx", "teacher.input.size=[112, 96]", "teacher.input.channels=bgr"]
    )
    assert config.teacher.format is TeacherFormat.ONNX
    assert (
        config.teacher.input.size == (112, 96) and config.teacher.input.channels is ChannelOrder.BGR
    )


def test_an_imported_onnx_teachers_yaml_loads_the_same_teacher_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jobs.import_teacher with a relative --out: teacher.yaml names the files by absolute
    paths and leaves out an arch it does not know; read from another working directory it
    gives the same embeddings as the ONNX file it came from."""
    import json

    import yaml

    from jobs import import_teacher
    from orchestrator.config import from_dict

    torch.manual_seed(0)
    onnx_file = tmp_path / "mbf.onnx"
    onnx_file.write_bytes(to_onnx(build_backbone(Arch.TINY_MOBILEFACENET, 8).eval(), 112))
    monkeypatch.chdir(tmp_path)
    argv = ["--backbone", "mbf.onnx", "--format", "onnx", "--emb-dim", "8", "--out", "teachers/mbf"]
    assert import_teacher.main(argv) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    section = yaml.safe_load((tmp_path / "teachers" / "mbf" / "teacher.yaml").read_text())[
        "teacher"
    ]
    assert "arch" not in section and Path(section["backbone"]).is_absolute()
    card = json.loads((tmp_path / "teachers" / "mbf" / "model_card.json").read_text())
    assert card["arch"] is None and card["format"] == "onnx"
    imported = load_teacher_backbone(from_dict(TeacherConfig, section, "teacher.yaml"))
    direct = load_teacher_backbone(
        TeacherConfig(emb_dim=8, backbone=str(onnx_file), format=TeacherFormat.ONNX)
    )
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    torch.testing.assert_close(imported(x), direct(x))
