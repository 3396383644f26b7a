from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from orchestrator.config import Arch
from orchestrator.models import build_backbone, profile_model

# insightface model zoo figures (512-d embedding, 112x112 input): (M params, GMACs).
ZOO = {
    Arch.IRESNET18: (24.0, 2.61),
    Arch.IRESNET34: (34.1, 4.46),
    Arch.IRESNET50: (43.6, 6.31),
    Arch.IRESNET100: (65.2, 12.09),
    Arch.MOBILEFACENET: (2.06, 0.44),
}


@pytest.mark.parametrize("arch", list(ZOO), ids=lambda a: a.value)
def test_standard_shapes_match_model_zoo_within_5_percent(arch: Arch) -> None:
    profile = profile_model(build_backbone(arch, 512))
    params, gmacs = ZOO[arch]
    assert profile.mparams == pytest.approx(params, rel=0.05)
    assert profile.gmacs == pytest.approx(gmacs, rel=0.05)


def test_profile_counts_a_hand_computed_model() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),  # 112*112*4 outputs x 27 MACs
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 112 * 112, 5),
    )
    p = profile_model(model)
    assert p.macs == 112 * 112 * 4 * 27 + 5 * 4 * 112 * 112
    assert p.params == 4 * 27 + 5 * 4 * 112 * 112 + 5


@pytest.mark.parametrize(
    "arch", [Arch.TINY_IRESNET, Arch.TINY_MOBILEFACENET], ids=lambda a: a.value
)
@pytest.mark.parametrize("emb_dim", [64, 128])
def test_tiny_variants_run_and_embedding_size_is_configurable(arch: Arch, emb_dim: int) -> None:
    model = build_backbone(arch, emb_dim)
    model.train()
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, emb_dim)
    out.sum().backward()
    assert profile_model(model).params < 4e6


def test_input_size_other_than_112() -> None:
    model = build_backbone(Arch.TINY_IRESNET, 32, input_size=64).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 32)
    with pytest.raises(ValueError, match=r"multiple of 16.*found 56"):
        build_backbone(Arch.TINY_IRESNET, 32, input_size=56)


def test_model_code_never_imports_torch_distributed() -> None:
    root = Path(__file__).parent.parent / "orchestrator" / "models"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any("distributed" in n for n in names), f"{path.name} imports {names}"
