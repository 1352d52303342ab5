"""Dataclass settings from nested mappings (YAML, ``--set key=value``), and back.

Values are coerced to each field's type, recursing into nested dataclasses, tuples and dicts, and
a key or value that does not fit is a :class:`ConfigError` naming its dotted key; ``--set`` pairs
become nested mappings (their values YAML: :mod:`gcm_core.data.yamlio`); settings are merged,
compared and written back as plain data. The stages' own dataclasses are in :mod:`workflows.config`.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

import yaml

from gcm_core.data.yamlio import loads

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that does not fit the stage's dataclass."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` (from YAML) as type ``tp``, recursing into dataclasses, tuples and dicts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(options) == 1:   # X | None: X's own message (``graph.k_sur: expected int, got 2.5``)
            return _coerce(options[0], value, key)
        for option in options:
            try:
                return _coerce(option, value, key)
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(f"{key}: {value!r} is not a {tp}")
    if _is_dataclass_type(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, dict) and _holds_pairs(tp):   # {rgb: 2, flow: 3} for ((rgb, 2), (flow, 3))
            value = list(value.items())
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return tuple(_coerce(inner, v, key) for v in value)
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {k: _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp in (int, float) and isinstance(value, bool):   # YAML's true is an int to Python, not a count
        raise ConfigError(f"{key}: expected {'a number' if tp is float else 'int'}, got {value!r}")
    if tp is float:
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _holds_pairs(tp: Any) -> bool:
    """Whether ``tp`` is a tuple of 2-tuples (such as ``InferenceConfig.fusion``), given as a mapping in YAML."""
    args = typing.get_args(tp)
    return len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is tuple \
        and len(typing.get_args(args[0])) == 2


def _nested_homes(cls: type, name: str, prefix: str) -> list[str]:
    """Dotted paths inside dataclass ``cls`` where a field called ``name`` lives: a key given at the
    wrong level (``train.lr`` to ``gcm tune``, whose trial settings sit under ``base``)."""
    homes = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            if name in {g.name for g in dataclasses.fields(tp)}:
                homes.append(f"{prefix}{f.name}.{name}")
            homes += _nested_homes(tp, name, f"{prefix}{f.name}.")
    return homes


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """An instance of dataclass ``cls`` from a (possibly partial) nested mapping."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        homes = [home for name in sorted(unknown) for home in _nested_homes(cls, name, f"{where}." if where else "")]
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {sorted(unknown)} in "
                          f"{where or cls.__name__} (known: {sorted(names)})"
                          + (f"; did you mean {' or '.join(homes)}?" if homes else ""))
    defaults = cls()
    values = {}
    for name in names:
        key = f"{where}.{name}" if where else name
        if name in data:
            current = getattr(defaults, name)
            if dataclasses.is_dataclass(current) and isinstance(data[name], dict):
                merged = {**to_dict(current), **data[name]}
                values[name] = from_dict(type(current), merged, key)
            else:
                values[name] = _coerce(hints[name], data[name], key)
    try:
        return dataclasses.replace(defaults, **values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def value_at(config: Any, key: str) -> Any:
    """The setting at dotted ``key`` of ``config`` (``config`` itself for an empty key)."""
    return functools.reduce(getattr, key.split("."), config) if key else config


def without_key(settings: dict[str, Any], key: str) -> dict[str, Any]:
    """``settings`` (a nested mapping) less the setting at dotted ``key``, where it has one."""
    head, _, rest = key.partition(".")
    if not rest:
        return {name: value for name, value in settings.items() if name != head}
    if isinstance(settings.get(head), dict):
        return {**settings, head: without_key(settings[head], rest)}
    return settings


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def changed_settings(earlier: Any, now: Any, key: str = "") -> dict[str, tuple[Any, Any]]:
    """The settings that differ between two configurations (dataclasses or their mappings), by
    dotted key, with the earlier and the present value."""
    a, b = to_dict(earlier), to_dict(now)
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return {} if a == b else {key: (a, b)}
    return {changed: values for name in sorted(set(a) | set(b))
            for changed, values in changed_settings(a.get(name), b.get(name), f"{key}.{name}" if key else name).items()}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``changed_settings`` for a message: ``graph.l_sem 2 -> 5; train.lr 0.01 -> 0.02``."""
    return "; ".join(f"{key} {a!r} -> {b!r}" for key, (a, b) in changes.items())


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "graph.k_sur=3"]`` -> nested mapping, values parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        node = out
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):   # --set train=3 --set train.epochs=1
                raise ConfigError(f"--set {pair}: {'.'.join(parts[:depth + 1])} is given a value ({node!r}) "
                                  "and settings inside it")
        node[parts[-1]] = loads(raw)
    return out


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
