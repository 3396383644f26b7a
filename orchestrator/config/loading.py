"""Loading a config from YAML and ``--set`` overrides, with the keys of earlier releases
migrated (one ``warning:`` line per old key)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.config.experiment import ExperimentConfig
from orchestrator.typed_yaml import (
    ConfigError,
    apply_overrides,
    from_dict,
    parse_override,
    read_yaml_mapping,
)

# Old dotted key -> its new place. A config or --set that uses an old key still loads, with
# one "warning:" line per key on stderr saying what to write instead.
RENAMED_KEYS: dict[str, str] = {
    "data.endpoint_url": "storage.endpoint_url",
    "data.region": "storage.region",
    "loss.margin_type": "loss.margin.type",
    "loss.scale": "loss.margin.scale",
    "loss.m1": "loss.margin.m1",
    "loss.m2": "loss.margin.m2",
    "loss.m3": "loss.margin.m3",
    "tune.margin_type_values": "tune.space.margin_type",
    "tune.margin_values": "tune.space.margin.values",
    "tune.margin_range": "tune.space.margin.range",
    "tune.scale_values": "tune.space.scale.values",
    "tune.scale_range": "tune.space.scale.range",
    "tune.arch_values": "tune.space.arch",
    "tune.lr_values": "tune.space.lr.values",
    "tune.lr_range": "tune.space.lr.range",
    "tune.l2_weight_values": "tune.space.l2_weight",
    "tune.seed_values": "tune.space.seed",
}


def _deprecated(source: str, old: str, new: str) -> None:
    print(f"warning: {source}: {old} is deprecated; write {new}", file=sys.stderr)


def new_key(path: Sequence[str], value: Any) -> list[str] | None:
    """Where an old key now lives; None when ``path`` is current. ``loss.margin`` was the
    margin's value (a number) before it became the margin section."""
    dotted = ".".join(path)
    if dotted == "loss.margin" and not isinstance(value, dict):
        return ["loss", "margin", "m"]
    if dotted in RENAMED_KEYS:
        return RENAMED_KEYS[dotted].split(".")
    return None


def migrate(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with every old key moved to its new place (a key given both ways is an
    error); the old values ``val_<metric>`` of ``tune.metric`` lose their prefix."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, body in list(out.items()):
        if not isinstance(body, dict):
            continue
        for key in list(body):
            target = new_key([section, key], body[key])
            if target is None:
                continue
            value = body.pop(key)
            node = out
            for part in target[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{source}: {'.'.join(target)}: its section is not a mapping")
            if target[-1] in node:
                raise ConfigError(
                    f"{source}: {section}.{key} and {'.'.join(target)} are the same setting; "
                    "give it once"
                )
            node[target[-1]] = value
            _deprecated(source, f"{section}.{key}", ".".join(target))
    tune = out.get("tune")
    if isinstance(tune, dict) and str(tune.get("metric", "")).startswith("val_"):
        _deprecated(source, f"tune.metric: {tune['metric']}", f"tune.metric: {tune['metric'][4:]}")
        tune["metric"] = tune["metric"][4:]
    return out


def migrate_overrides(overrides: Sequence[str]) -> list[str]:
    """``--set`` overrides with old keys rewritten to their new place."""
    out = []
    for text in overrides:
        path, value = parse_override(text)
        target = new_key(path, value)
        if target is not None:
            _deprecated("--set", ".".join(path), ".".join(target))
            text = ".".join(target) + "=" + text.partition("=")[2]
        out.append(text)
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load ``path`` (YAML) into an :class:`ExperimentConfig` and apply ``--set`` overrides.

    With no path, the defaults plus overrides. Errors name the file, or ``--set`` when the
    offending key came from an override.
    """
    source = "<defaults>" if path is None else str(path)
    data = {} if path is None else migrate(read_yaml_mapping(path), source)
    # Check the file alone first, so an error in it is blamed on the file, not on --set.
    config = from_dict(ExperimentConfig, data, source)
    if not overrides:
        return config
    merged = migrate(apply_overrides(data, migrate_overrides(overrides)), f"{source} with --set")
    return from_dict(ExperimentConfig, merged, f"{source} with --set")
