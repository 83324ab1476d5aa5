"""Typed YAML: a YAML mapping read into (nested, frozen) dataclasses, each value checked against
its field's annotation and each unknown key named, with a did-you-mean hint. Nothing here knows
the experiment's fields; ``config`` declares them and checks their values."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from cifarcam.errors import ConfigError, did_you_mean


class YamlLoader(yaml.SafeLoader):
    """Safe YAML that reads ``1e-3`` and ``3e10`` as numbers, as YAML 1.2 does: PyYAML follows
    YAML 1.1, where a float needs a dot and a signed exponent, so it would make them strings."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """Coerce YAML scalars to ``annotation`` (ints to floats, lists to tuples) or raise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {annotation}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1]
        return tuple(check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, list):
        if not isinstance(value, origin):
            raise ConfigError(f"{where}: expected a {origin.__name__}, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected a {annotation.__name__}, got {value!r}")
    return value


def unknown_key_error(key: str, known: Iterable[str], where: str) -> ConfigError:
    known = list(known)
    hint = did_you_mean(key, known) or f"expected one of {', '.join(known)}"
    return ConfigError(f"{where}: unknown key; {hint}")


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise unknown_key_error(str(key), names, path)
        if dataclasses.is_dataclass(hints[key]):
            values[key] = from_dict(hints[key], value, path)
        else:
            values[key] = check_type(value, hints[key], path)
    return cls(**values)


def load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a missing file or a syntax error is one ConfigError line."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.load(path.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
