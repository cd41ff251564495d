"""Configuration dataclasses from a YAML file plus command-line overrides.

Every field of a config dataclass becomes a ``--flag`` (underscores → dashes); a YAML file
given with ``--config`` sets fields first, then flags override it. A YAML file that does not
parse, unknown keys and values of the wrong type (a non-integral or non-finite number, a list
for a scalar, a list of the wrong length) are rejected with ``ValueError`` naming the file
and the key. A field's ``metadata`` may give its flag a help text (``"help"``) and allowed
values (``"choices"``); ``"json": True`` marks a string field holding a JSON object, which a
YAML file may also give as a mapping.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import typing
from pathlib import Path

import yaml


def _without_none(annotation):
    """``X`` for an ``X | None`` annotation; any other annotation as it is."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return [a for a in typing.get_args(annotation) if a is not type(None)][0]
    return annotation


def _field_parser(annotation) -> tuple[type, bool]:
    """(element type, is_sequence) for a dataclass field annotation."""
    annotation = _without_none(annotation)
    if typing.get_origin(annotation) in (tuple, list):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _fixed_length(annotation) -> int | None:
    """How many values a ``tuple[X, Y]`` field holds; None for ``tuple[X, ...]`` and the rest."""
    annotation = _without_none(annotation)
    args = typing.get_args(annotation)
    return len(args) if typing.get_origin(annotation) is tuple and Ellipsis not in args else None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, with_config_flag: bool = True) -> None:
    """Add ``--config`` and one flag per field of dataclass ``cls`` (default: unset).

    Several dataclasses can share one parser (and one ``--config`` file): add the flag once.
    """
    if with_config_flag:
        parser.add_argument("--config", type=Path, help="YAML file with any of the options below")
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        element, is_sequence = _field_parser(hints[spec.name])
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        flag = "--" + spec.name.replace("_", "-")
        kwargs = dict(dest=spec.name, default=None, help=f"(default: {default})")
        if "help" in spec.metadata:  # field(metadata={"help": ..., "choices": ...})
            kwargs["help"] = f"{spec.metadata['help']} (default: {default})".replace("%", "%%")
        if "choices" in spec.metadata:
            kwargs["choices"] = spec.metadata["choices"]
        if element is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif is_sequence:
            parser.add_argument(flag, type=element, nargs="+", **kwargs)
        else:
            parser.add_argument(flag, type=element, **kwargs)


def _scalar(element: type, value):
    """``value`` as one ``element`` (bool, int, float, str or Path); TypeError/ValueError if not."""
    if isinstance(value, bool) and element is not bool:
        raise TypeError("expected a value, not true/false")
    if element is bool:
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if element is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        if not isinstance(value, (int, float, str)):
            raise TypeError("expected an integer")
        return int(value)
    if element is float:
        if not isinstance(value, (int, float, str)):
            raise TypeError("expected a number")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    if not isinstance(value, (str, int, float, dt.date)):  # YAML reads 2003-01-01 as a date
        raise TypeError(f"expected a single value, got {type(value).__name__}")
    return element(str(value))


def _coerce(cls, key: str, value, hints: dict):
    annotation = hints[key]
    element, is_sequence = _field_parser(annotation)
    optional = type(None) in typing.get_args(annotation)
    metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}[key]
    try:
        if value is None and optional:
            return None
        if metadata.get("json") and isinstance(value, dict):  # a YAML mapping for a JSON field
            return json.dumps(value, default=str)
        if not is_sequence:
            return _scalar(element, value)
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list")
        length = _fixed_length(annotation)
        if length is not None and len(value) != length:
            raise ValueError(f"expected a list of {length} values")
        return tuple(_scalar(element, v) for v in value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{cls.__name__}: bad value for '{key}': {value!r} ({error})") from error


def _read_yaml(path: Path) -> dict:
    """The mapping in YAML file ``path`` (empty: {}); FileNotFoundError or ValueError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(path.read_bytes())
    except (yaml.YAMLError, RecursionError) as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(content).__name__}")
    return content


def build_config(cls, args: argparse.Namespace, shared_keys: tuple[str, ...] = ()):
    """Instantiate ``cls`` from ``args.config`` (YAML) overridden by explicitly given flags.

    ``shared_keys`` are keys of other dataclasses that share the YAML file (not errors here).
    Raises FileNotFoundError for a missing YAML file and ValueError naming the key otherwise.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    if getattr(args, "config", None) is not None:
        path = Path(args.config)
        content = _read_yaml(path)
        unknown = sorted(map(repr, set(content) - names - set(shared_keys)))
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; "
                             f"known: {sorted(names | set(shared_keys))}")
        try:
            values.update({k: _coerce(cls, k, v, hints) for k, v in content.items() if k in names})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
    for name in names:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = _coerce(cls, name, given, hints)
    return cls(**values)
