"""A config dataclass built from its nested mapping, every value checked against its field's annotation.

Only lossless conversions are made (an int where a float is expected, a YAML 1.1 string such as "5e-7"
for a float); anything else is a ConfigError naming the dotted key, the expected type and the value.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

from dpokit.config.errors import ConfigError, excerpt


def build_dataclass(cls, raw: dict, prefix: str):
    """An instance of the dataclass `cls` from `raw` (every field present, as the schema's defaults merged with the
    user's settings): sections built recursively, values checked by _coerce; prefix names the key in errors."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = raw[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} must be a mapping of {f.name} settings, got {excerpt(value)}")
            kwargs[f.name] = build_dataclass(hints[f.name], value, prefix=f"{key}.")
        else:
            kwargs[f.name] = _coerce(value, hints[f.name], key)
    return cls(**kwargs)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`; allow only lossless conversions (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            f"config key {key!r} must be {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {excerpt(value)}"
        )
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key!r}: expected null, got {excerpt(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {excerpt(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {excerpt(value)}")
        return {str(k): _coerce(v, typing.get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "5e-7" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key {key!r} must be a finite number, got {excerpt(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {excerpt(value)} ({type(value).__name__})")
