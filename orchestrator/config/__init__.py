"""Typed experiment configuration.

One frozen dataclass per concern, nested in :class:`ExperimentConfig`. YAML files in
``configs/`` are plain data loaded into it; ``--set section.key=value`` overrides go through
the same type checks. Every error names the key and the file it came from::

    configs/demo.yaml: loss.margn: unknown key in LossConfig (did you mean 'margin'?)

Validation of single values and of combinations lives in each dataclass's
``__post_init__`` so that a config built in Python is checked exactly like one from YAML.

The package's rooms: :mod:`~orchestrator.config.method` (the methods and their facts, a
leaf), the sections (:mod:`~orchestrator.config.data`, :mod:`~orchestrator.config.models` with the student
family of :mod:`~orchestrator.config.family`,
:mod:`~orchestrator.config.loss`, :mod:`~orchestrator.config.training`), the sections one
job each reads (:mod:`~orchestrator.config.jobs`), the experiment and its cross-section
checks (:mod:`~orchestrator.config.experiment`) and loading with migration
(:mod:`~orchestrator.config.loading`). Every name is importable from
``orchestrator.config`` itself, as before the package was split.
"""

from __future__ import annotations

from orchestrator.config.data import DataConfig, DecodeAt, OnCorrupt, StorageConfig
from orchestrator.config.experiment import ExperimentConfig, val_targets
from orchestrator.config.family import NAMED_SHAPES, BackboneShape, Family, Head
from orchestrator.config.jobs import (
    CompareConfig,
    Constraint,
    FloatSearch,
    Goal,
    LatencyConfig,
    Objective,
    RetrainConfig,
    SearchAlgorithm,
    SearchSpace,
    SyntheticConfig,
    TuneConfig,
)
from orchestrator.config.loading import (
    RENAMED_KEYS,
    load_config,
    migrate,
    migrate_overrides,
    new_key,
)
from orchestrator.config.loss import (
    FINAL_TEACHER,
    TEACHER_EPOCH_PREFIX,
    CckdConfig,
    LossConfig,
    MarginConfig,
    MarginType,
    MultistepConfig,
    MultistepStage,
    started_by,
)
from orchestrator.config.method import METHOD_LOSS_SETTINGS, Method
from orchestrator.config.models import (
    Arch,
    ChannelOrder,
    StudentConfig,
    TeacherConfig,
    TeacherFormat,
    TeacherInputConfig,
)
from orchestrator.config.tracking import TrackingConfig, redact_uri
from orchestrator.config.training import (
    ClassifierMode,
    OptimConfig,
    Precision,
    RunConfig,
    ScalingConfig,
    ShardingConfig,
    uneven_world_size,
)
from orchestrator.config.values import MAX_SEED, is_single_component, seed_problem
from orchestrator.metric_names import (
    BENCHMARK_METRIC,
    IJB_FAR_KEYS,
    IJB_SETS,
    Metric,
    validation_key,
)
from orchestrator.typed_yaml import ConfigError, dump_yaml, from_dict, to_dict

__all__ = [
    "BENCHMARK_METRIC",
    "FINAL_TEACHER",
    "IJB_FAR_KEYS",
    "IJB_SETS",
    "MAX_SEED",
    "METHOD_LOSS_SETTINGS",
    "NAMED_SHAPES",
    "RENAMED_KEYS",
    "TEACHER_EPOCH_PREFIX",
    "Arch",
    "BackboneShape",
    "CckdConfig",
    "ChannelOrder",
    "ClassifierMode",
    "CompareConfig",
    "ConfigError",
    "Constraint",
    "DataConfig",
    "DecodeAt",
    "ExperimentConfig",
    "Family",
    "FloatSearch",
    "Goal",
    "Head",
    "LatencyConfig",
    "LossConfig",
    "MarginConfig",
    "MarginType",
    "Method",
    "Metric",
    "MultistepConfig",
    "MultistepStage",
    "Objective",
    "OnCorrupt",
    "OptimConfig",
    "Precision",
    "RetrainConfig",
    "RunConfig",
    "ScalingConfig",
    "SearchAlgorithm",
    "SearchSpace",
    "ShardingConfig",
    "StorageConfig",
    "StudentConfig",
    "SyntheticConfig",
    "TeacherConfig",
    "TeacherFormat",
    "TeacherInputConfig",
    "TrackingConfig",
    "TuneConfig",
    "dump_yaml",
    "from_dict",
    "is_single_component",
    "load_config",
    "migrate",
    "migrate_overrides",
    "new_key",
    "redact_uri",
    "seed_problem",
    "started_by",
    "to_dict",
    "uneven_world_size",
    "val_targets",
    "validation_key",
]
