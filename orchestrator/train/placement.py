"""Where the teacher classifier goes: into the object store once (dense: every worker of a
node maps the one copy), or left in storage for each rank to read its own rows (sharded)."""

from __future__ import annotations

import sys

import ray

from orchestrator import classifier as clf
from orchestrator.config import (
    ClassifierMode,
    ExperimentConfig,
)
from orchestrator.formats.loading import ClassifierRef
from orchestrator.train.spec import (
    ClassifierSource,
    DenseClassifier,
    ShardedClassifier,
)


def place_classifier(config: ExperimentConfig, cmeta: clf.ClassifierMeta) -> ClassifierSource:
    """Either ``ray.put`` the (checked) classifier once (dense: each node holds one shared
    copy and workers get read-only views) or leave it in storage for each worker to read
    its own rows."""
    uri = config.teacher.classifier
    ref = ClassifierRef(uri, clf.checksum(cmeta))
    if use_sharded(config, cmeta):
        print(
            f"classifier {cmeta.num_classes} x {cmeta.emb_dim}: sharded over "
            f"{config.scaling.describe()} workers (each reads its own rows, re-read at a resize)",
            flush=True,
        )
        return ShardedClassifier(ref, cmeta, config.sharding.sample_rate)
    if config.sharding.sample_rate < 1.0:
        print(
            f"warning: sharding.sample_rate {config.sharding.sample_rate} has no effect: "
            f"sharding.mode auto chose the dense layout for W of {cmeta.num_classes} x "
            f"{cmeta.emb_dim} (set sharding.mode: sharded to sample negatives)",
            file=sys.stderr,
            flush=True,
        )
    # Unit fp32 rows (the reader normalises), so workers use the node's copy as it is.
    return DenseClassifier(ref, ray.put(clf.load_full(uri, cmeta)))


def use_sharded(config: ExperimentConfig, meta: clf.ClassifierMeta) -> bool:
    """The rule of ShardingConfig: explicit mode, or auto by worker count and W's size."""
    match config.sharding.mode:
        case ClassifierMode.SHARDED:
            return True
        case ClassifierMode.DENSE:
            return False
        case ClassifierMode.AUTO:
            fp32_bytes = meta.num_classes * meta.emb_dim * 4
            return (
                config.loss.method.shardable
                and config.scaling.max_workers > 1
                and fp32_bytes >= config.sharding.auto_min_bytes
            )
