"""Plain data (YAML, ``--set`` overrides) into frozen dataclasses, and back.

Generic: nothing here knows the experiment schema (:mod:`orchestrator.config`). Every error
names the source (a file, ``--set``) and the dotted key::

    configs/demo.yaml: loss.margn: unknown key in LossConfig (did you mean 'margin'?)

YAML is read with two corrections to PyYAML's YAML 1.1 rules: ``1e-4`` is a number (YAML
1.1 wants ``1.0e-4`` and reads ``1e-4`` as a string), and a key given twice in one mapping
is an error naming the key and both lines, never a silent override.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A config value is unknown, mistyped or contradicts another value."""


class FieldError(ValueError):
    """Raised by ``__post_init__``; ``key`` is relative to the dataclass that raised it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise FieldError(key, message)


T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from plain data, checking keys and types recursively.

    ``source`` (a file name or ``--set``) and the dotted key path appear in every error.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: {prefix.rstrip('.') or '<top level>'}: expected a mapping for "
            f"{cls.__name__}, found {type(data).__name__}"
        )
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            )
            raise ConfigError(f"{source}: {prefix}{key}: unknown key in {cls.__name__}{hint}")
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except FieldError as err:
        raise ConfigError(f"{source}: {prefix}{err.key}: {err.message}") from None


def describe_type(hint: Any) -> str:
    """How an error message names a field type: ``an integer``, ``a list``."""
    if typing.get_origin(hint) is tuple:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: {key}: expected {expected}, found {value!r} ({type(value).__name__})"
        )

    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_dict(hint, value, source, f"{key}.")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if value not in allowed:
            raise bad("one of " + ", ".join(repr(a) for a in allowed))
        return hint(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise bad("a list")
        return tuple(_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1:
            return _coerce(choices[0], value, source, key)
        # int | tuple[int, ...] and the like: a list is the tuple, anything else the rest.
        listed = isinstance(value, Sequence) and not isinstance(value, str)
        fitting = [c for c in choices if (typing.get_origin(c) is tuple) == listed]
        if len(fitting) != 1:
            raise bad(" or ".join(describe_type(c) for c in choices))
        return _coerce(fitting[0], value, source, key)
    raise TypeError(f"unsupported config field type {hint!r} at {key}")  # a bug in this module


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (enums as their values) that :func:`from_dict` accepts back."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return to_dict(value)
        return value

    assert dataclasses.is_dataclass(config) and not isinstance(config, type)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else plain(value)
    return out


# --- YAML ---------------------------------------------------------------------------------


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


@functools.cache
def _loader() -> Any:
    """SafeLoader with YAML 1.2-style floats (``1e-4``) and duplicate keys refused. Built on
    first use, so importing the schema needs no YAML library (bench/gpu_check.py)."""
    # yaml: optional where only the schema is needed (bench/gpu_check.py on a bare GPU box)
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))

    def mapping_without_duplicates(loader: Any, node: Any) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = line
        return dict(loader.construct_mapping(node))

    Loader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping_without_duplicates
    )
    return Loader


def parse_yaml(text: str) -> Any:
    # yaml: optional where only the schema is needed (bench/gpu_check.py on a bare GPU box)
    import yaml

    return yaml.load(text, Loader=_loader())


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that holds one mapping (empty file: empty mapping)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{source}: expected a YAML text file (UTF-8), found bytes that are not text "
            f"(at byte {err.start})"
        ) from None
    try:
        loaded = parse_yaml(text)
    except _yaml_error() as err:
        raise ConfigError(f"{source}: not valid YAML: {yaml_problem(err)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return loaded


def yaml_problem(err: Exception) -> str:
    """A YAML parse error on one line: what is wrong and where (line, column from 1)."""
    problem = getattr(err, "problem", None) or str(err)
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _yaml_error() -> type[Exception]:
    # yaml: optional where only the schema is needed (bench/gpu_check.py on a bare GPU box)
    import yaml

    return yaml.YAMLError


def dump_yaml(config: Any) -> str:
    # yaml: optional where only the schema is needed (bench/gpu_check.py on a bare GPU box)
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


# --- --set overrides ----------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'loss.margin.m=0.45'`` -> (['loss', 'margin', 'm'], 0.45); the value is YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except _yaml_error() as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {yaml_problem(err)}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``section.key=value`` applied."""
    merged = deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}
