from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import SyntheticConfig
from orchestrator.data.prepare import SyntheticDatasets, write_synthetic

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def tiny_synthetic_config(out: Path, seed: int = 0) -> SyntheticConfig:
    return SyntheticConfig(
        out=str(out),
        num_identities=6,
        eval_identities=20,
        images_per_identity=3,
        pairs_per_fold=4,
        seed=seed,
        shard_bytes=40_000,  # several shards even for this tiny set
    )


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDatasets:
    return write_synthetic(tiny_synthetic_config(tmp_path_factory.mktemp("synthetic")))
