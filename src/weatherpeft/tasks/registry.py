"""Tasks by name: the built-in ones, tasks registered with :func:`register_task`, and plugins.

A task builder is a function ``builder(data, stats, *, grid, **options) -> Task``: ``data``
is the ``--data`` string ("" = its default store), ``stats`` the backbone's normalisation
statistics, ``grid`` the backbone's :class:`~weatherpeft.tasks.grid.PatchGrid` (None for a
backbone that is not Aurora), and ``options`` the task options (``--task-options`` JSON or
the YAML key ``task_options``): every keyword-only parameter of the builder other than
``grid`` is one, its annotation the type a value must have. Unknown names and values of the
wrong type are refused before any data are read.

Plugins: a distribution that declares an entry point in the group :data:`ENTRY_POINT_GROUP`
(``[project.entry-points."weatherpeft.tasks"] my-task = "my_package.tasks:build"``) makes the
task ``my-task`` known to ``finetune``, ``evaluate`` and ``benchmark``, loaded on first use.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from weatherpeft.data.stats import NormalisationStats
from weatherpeft.tasks.base import SPLITS, Task
from weatherpeft.tasks.grid import AURORA_TINY_GRID, PatchGrid

__all__ = ["ENTRY_POINT_GROUP", "TASKS", "TaskEntry", "build_task", "describe_tasks",
           "parse_task_options", "register_task", "task_entry", "task_names"]

#: The entry-point group plugins declare their task builders in.
ENTRY_POINT_GROUP = "weatherpeft.tasks"


@dataclass(frozen=True)
class TaskEntry:
    """A named task: its builder, a one-line summary and its options {name: (type, default)}."""

    name: str
    builder: Callable[..., Task]
    summary: str
    options: dict[str, tuple[Any, Any]]


#: Task name → entry (built-ins, then :func:`register_task` calls; plugins when first asked).
TASKS: dict[str, TaskEntry] = {}
_plugins_loaded = False


def _options_of(builder: Callable[..., Task]) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(builder)
    return {name: (hints.get(name, Any), parameter.default)
            for name, parameter in inspect.signature(builder).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "grid"}


def register_task(name: str, builder: Callable[..., Task], *, summary: str = "",
                  replace: bool = False) -> TaskEntry:
    """Make ``builder`` (see the module docstring) the task ``name``; returns its entry.

    Registering a taken name is a ValueError unless ``replace``.
    """
    if not name or not isinstance(name, str) or name != name.strip() or "," in name:
        raise ValueError(f"a task name is a non-empty string without spaces at its ends or "
                         f"commas, got {name!r}")
    if name in TASKS and not replace:
        raise ValueError(f"task '{name}' is already registered (pass replace=True to replace it)")
    parameters = list(inspect.signature(builder).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 or "grid" not in {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}:
        raise TypeError(f"task builder {builder!r} must take (data, stats, *, grid, **options)")
    doc = inspect.getdoc(builder) or ""
    entry = TaskEntry(name, builder, summary or doc.split("\n")[0], _options_of(builder))
    TASKS[name] = entry
    return entry


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in TASKS:
            continue  # a registered name wins
        try:
            builder = point.load()
        except Exception as error:  # a broken plugin names itself, it does not hide the others
            raise ImportError(f"task plugin '{point.name}' ({point.value}) failed to load: "
                              f"{type(error).__name__}: {error}") from error
        register_task(point.name, builder)


def task_names() -> list[str]:
    """Every known task name, plugins included."""
    _load_plugins()
    return sorted(TASKS)


def task_entry(name: str) -> TaskEntry:
    """The entry of task ``name``; ValueError listing the known ones."""
    if name not in TASKS:
        _load_plugins()
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; known: {task_names()} (register one with "
                         f"weatherpeft.tasks.register_task or an entry point in the group "
                         f"'{ENTRY_POINT_GROUP}')")
    return TASKS[name]


# -- option values ------------------------------------------------------------------------


# Above radon C on purpose: one branch per supported annotation form (Any, unions, tuples, lists, mappings, scalars).
def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` (as JSON/YAML gives it) as ``annotation`` says; ValueError naming ``where``
    (the option, with the index or key inside it)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"task option '{where}': expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"task option '{where}': expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"task option '{where}': expected an object, got {value!r}")
        key_type, value_type = args or (str, Any)
        return {_check_value(k, key_type, where): _check_value(v, value_type, f"{where}.{k}")
                for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"task option '{where}': expected true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (annotation is int and float(value) != int(value)):
            raise ValueError(f"task option '{where}': expected {'an integer' if annotation is int else 'a number'}, "
                             f"got {value!r}")
        return annotation(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"task option '{where}': expected a string, got {value!r}")
        return value
    return value


def parse_task_options(name: str, options: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Task options from a JSON object (or mapping), checked against task ``name``'s builder."""
    if isinstance(options, str):
        try:
            options = json.loads(options or "{}")
        except json.JSONDecodeError as error:
            raise ValueError(f"--task-options must be a JSON object, e.g. "
                             f"'{{\"lead_hours\": 24}}': {error}") from error
    options = dict(options or {}) if isinstance(options, Mapping) or options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"task options must be a JSON object, got {type(options).__name__}")
    entry = task_entry(name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise ValueError(f"task '{name}' has no option(s) {unknown}; its options: "
                         f"{sorted(entry.options) or 'none'} (`weatherpeft tasks` lists them)")
    return {key: _check_value(value, entry.options[key][0], key)
            for key, value in options.items()}


def build_task(name: str, stats: NormalisationStats | None, data: str = "",
               options: str | Mapping[str, Any] | None = None,
               grid: PatchGrid | None = AURORA_TINY_GRID) -> Task:
    """The task ``name`` on ``data`` (default: its built-in store) with the backbone's ``stats``,
    ``options`` (checked first) and the backbone's grid rule ``grid``."""
    options = parse_task_options(name, options)
    if "periods" in options:
        options["periods"] = periods_option(options["periods"])
    if grid is not None:  # an Aurora backbone: its variable needs, before any data are read
        for key, kind in (("surf_vars", "surface variable"), ("atmos_vars", "atmospheric variable"),
                          ("static_vars", "static field")):
            if key in options and options[key] is not None and not options[key]:
                raise ValueError(f"task '{name}': option '{key}' is empty, but an Aurora backbone "
                                 f"needs at least one {kind} (it embeds each kind; without one it "
                                 "fails inside its encoder)")
    return task_entry(name).builder(data, stats, grid=grid, **options)


def describe_tasks() -> list[dict[str, Any]]:
    """For ``weatherpeft tasks``: name, summary and options (type, default) of every task."""
    rows = []
    for name in task_names():
        entry = TASKS[name]
        options = {key: (_type_name(kind), default) for key, (kind, default) in entry.options.items()}
        rows.append({"name": name, "summary": entry.summary, "options": options})
    return rows


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) if not typing.get_args(annotation) \
        else str(annotation).replace("typing.", "")


def periods_option(periods: Mapping[str, tuple[str, str]] | None) -> dict[str, tuple[str, str]] | None:
    """The ``periods`` task option checked: every split, (start, end) dates, start ≤ end."""
    if periods is None:
        return None
    import pandas as pd

    missing = [split for split in SPLITS if split not in periods]
    extra = sorted(set(periods) - set(SPLITS))
    if missing or extra:
        raise ValueError(f"task option 'periods' needs exactly {list(SPLITS)}; missing {missing}, "
                         f"unknown {extra}")
    for split, (start, end) in periods.items():
        try:
            first, last = pd.Timestamp(start), pd.Timestamp(end)
        except ValueError as error:
            raise ValueError(f"task option 'periods.{split}': not a date: {error}") from error
        if first > last:
            raise ValueError(f"task option 'periods.{split}': {start} is after {end}")
    return {split: tuple(periods[split]) for split in SPLITS}
