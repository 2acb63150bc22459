"""Typed settings with their help text and checks, declared once where they are used.

A setting is a dataclass field made by `setting(default, help, key=..., **checks)`. The run
config (config.py) and each federated method (federated/methods/) declare theirs this way, so
one parser (`coerce`, `check`) validates a TOML value or a `key=value` override for all of
them. This module imports nothing of the package: every layer may use it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import field
from typing import Any


class InputError(ValueError):
    """Something the user gave (a file, data, a mask, a checkpoint) cannot be used; the message
    is one line saying what and why. The command line prints it and exits with code 2."""


class ConfigError(InputError):
    """A config key or value is wrong; the message is one line naming it."""


def setting(default: Any, help: str, *, key: str = "", **check: Any) -> Any:
    """A dataclass field with its help text and checks (choices, min, max, gt, lt). `key` is
    its name in config files when it differs from the field name (e.g. a method's `alpha` read
    from `feddyn_alpha`)."""
    meta = {"help": help, "key": key, **check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def keys_of(cls: type) -> dict[str, dataclasses.Field]:
    """Config key -> field of a dataclass of settings."""
    return {f.metadata.get("key") or f.name: f for f in dataclasses.fields(cls)}


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def coerce(key: str, value: Any, default: Any) -> Any:
    """Turn a TOML value or an override string into the key's type, or say why not."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if kind is list:
                parsed = tomllib.loads(f"v = {text}")["v"] if text.startswith("[") else [
                    s for s in text.split(",") if s]
                return list(parsed)
            return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
        except (ValueError, OverflowError, tomllib.TOMLDecodeError):
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


_BOUNDS = {
    "min": (">=", lambda v, b: v >= b),
    "max": ("<=", lambda v, b: v <= b),
    "gt": (">", lambda v, b: v > b),
    "lt": ("<", lambda v, b: v < b),
}


def check(key: str, value: Any, meta: Any) -> None:
    """Raise ConfigError unless `value` meets the field metadata's choices and bounds."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
    for op, (sign, ok) in _BOUNDS.items():
        if op in meta and not ok(value, meta[op]):
            raise ConfigError(f"{key}: must be {sign} {meta[op]}, got {value!r}")


def build(cls: type, raw: dict[str, Any]) -> Any:
    """An instance of the settings dataclass `cls` from {config key: value}, each checked; the
    class's own cross-key checks (__post_init__ raising ValueError) become ConfigError."""
    fields = keys_of(cls)
    values = {}
    for key, value in raw.items():
        f = fields[key]
        v = coerce(key, value, default_of(f))
        check(key, v, f.metadata)
        values[f.name] = v
    try:
        return cls(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def to_keys(obj: Any) -> dict[str, Any]:
    """{config key: value} of a settings dataclass instance (the inverse of `build`)."""
    return {key: getattr(obj, f.name) for key, f in keys_of(type(obj)).items()}
