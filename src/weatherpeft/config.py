"""Configuration dataclasses from a YAML file plus command-line overrides.

Every field of a config dataclass becomes a ``--flag`` (underscores → dashes); a YAML file
given with ``--config`` sets fields first, then flags override it. Unknown keys in the
YAML file and values of the wrong type are rejected with the key named.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import yaml


def _field_parser(annotation) -> tuple[type, bool]:
    """(element type, is_sequence) for a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return typing.get_args(annotation)[0], True
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _field_parser(args[0])
    return annotation, False


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
        if element is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif is_sequence:
            parser.add_argument(flag, type=element, nargs="+", **kwargs)
        else:
            parser.add_argument(flag, type=element, **kwargs)


def _coerce(cls, key: str, value, hints: dict):
    element, is_sequence = _field_parser(hints[key])
    try:
        if is_sequence:
            if not isinstance(value, (list, tuple)):
                raise TypeError("expected a list")
            return tuple(element(v) for v in value)
        if element is bool and not isinstance(value, bool):
            raise TypeError("expected true or false")
        return element(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{cls.__name__}: bad value for '{key}': {value!r} ({error})") from error


def build_config(cls, args: argparse.Namespace, shared_keys: tuple[str, ...] = ()):
    """Instantiate ``cls`` from ``args.config`` (YAML) overridden by explicitly given flags.

    ``shared_keys`` are keys of other dataclasses that share the YAML file (not errors here).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    if getattr(args, "config", None) is not None:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        content = yaml.safe_load(path.read_text()) or {}
        if not isinstance(content, dict):
            raise ValueError(f"{path}: expected a mapping of option: value, got {type(content).__name__}")
        unknown = sorted(set(content) - names - set(shared_keys))
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {unknown}; known: {sorted(names | set(shared_keys))}")
        values.update({k: _coerce(cls, k, v, hints) for k, v in content.items() if k in names})
    for name in names:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = _coerce(cls, name, given, hints)
    return cls(**values)
