"""A search's space: Tune domains keyed by the experiment config key each sets, and a
trial's config from the base config and the trial's values."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from orchestrator.config import (
    ConfigError,
    ExperimentConfig,
    FloatSearch,
    SearchAlgorithm,
    SearchSpace,
    TuneConfig,
    from_dict,
)

# Stage depths travel through Tune (and Optuna, whose choices must be plain scalars) as
# text, e.g. "1-2-2-1".
DEPTHS_KEY = "student.depths"


def plain(value: Any) -> Any:
    """A search value as Tune and the tables hold it: an enum's value, depths as text."""
    if hasattr(value, "value"):
        return value.value
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value)
    return value


def param_space(tune: TuneConfig) -> dict[str, Any]:
    """Tune domains keyed by the experiment config key each one sets (``loss.margin.m``,
    ...: the ``sets`` metadata of :class:`SearchSpace`'s fields)."""
    # ray.tune: heavy (about a second to import), imported where it is used
    from ray import tune as rt

    grid = tune.search is SearchAlgorithm.GRID
    space: dict[str, Any] = {}
    for f in dataclasses.fields(SearchSpace):
        entry, key = getattr(tune.space, f.name), f.metadata["sets"]
        values = entry.values if isinstance(entry, FloatSearch) else entry
        if values:
            choices = [plain(v) for v in values]
            space[key] = rt.grid_search(choices) if grid else rt.choice(choices)
        elif isinstance(entry, FloatSearch) and entry.range:
            low, high = entry.range
            space[key] = rt.loguniform(low, high) if f.metadata["log"] else rt.uniform(low, high)
    if not space:
        raise ConfigError(
            "tune.space: nothing to search; give at least one entry values or a range"
        )
    return space


def config_value(key: str, value: Any) -> Any:
    """A trial's value as the experiment config takes it."""
    if key == DEPTHS_KEY and isinstance(value, str):
        return [int(d) for d in value.split("-")]
    return value


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config ``base`` (plain data) with each dotted key set."""
    data = json.loads(json.dumps(base))  # a deep copy of plain data
    for key, value in params.items():
        node = data
        *sections, last = key.split(".")
        for section in sections:
            node = node[section]
        node[last] = config_value(key, value)
    return from_dict(ExperimentConfig, data, "tune trial")
