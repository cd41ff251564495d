"""Tasks: what a model is trained and scored on (see :mod:`weatherpeft.tasks.base`).

:func:`build_task` makes a task by name on a data path (default: its store in the built-in
world), normalised with the backbone's statistics; a task measures statistics only for the
variables it adds, on its training period. ``downscaling-x2`` and ``precipitation-rollout``
are the first forms of two benchmark tasks, kept beside the defaults (×4 downscaling, direct
precipitation heads) that replaced them.
"""

from __future__ import annotations

from collections.abc import Callable

from weatherpeft.data.stats import NormalisationStats
from weatherpeft.tasks.base import SPLITS, Task, TaskVariables

__all__ = ["SPLITS", "TASKS", "Task", "TaskVariables", "build_task"]

#: Forecasting on the built-in downstream year: fine-tune on Jan–Sep, validate Oct–Nov, test Dec.
FORECASTING_PERIODS = {"train": ("2003-01-01", "2003-09-30T18:00"),
                       "val": ("2003-10-01", "2003-11-30T18:00"),
                       "test": ("2003-12-01", "2003-12-31T18:00")}


def _forecasting(data: str, stats: NormalisationStats | None) -> Task:
    from weatherpeft.data.builtin import store_path
    from weatherpeft.tasks.forecasting import ForecastingTask

    return ForecastingTask(data or store_path("downstream"), FORECASTING_PERIODS, stats,
                           lead_steps=(1,))


def _downscaling(data: str, stats: NormalisationStats | None, coarse_factor: int = 4) -> Task:
    from weatherpeft.tasks.downscaling import DownscalingTask

    return DownscalingTask(data or None, None, stats, coarse_factor=coarse_factor)


def _downscaling_x2(data: str, stats: NormalisationStats | None) -> Task:
    return _downscaling(data, stats, coarse_factor=2)


def _postprocessing(data: str, stats: NormalisationStats | None) -> Task:
    from weatherpeft.tasks.postprocessing import PostprocessingTask

    if not data:
        return PostprocessingTask(None, None, stats)
    ensemble, _, truth = data.partition(",")
    if not truth:
        raise ValueError("post-processing data is 'ENSEMBLE,TRUTH': the ensemble forecast store and "
                         f"the analysis store that verifies it; got {data!r}")
    return PostprocessingTask(ensemble, None, stats, truth_store=truth)


def _precipitation(data: str, stats: NormalisationStats | None, design: str = "direct") -> Task:
    from weatherpeft.tasks.precipitation import PrecipitationTask

    return PrecipitationTask(data or None, None, stats, design=design)


def _precipitation_rollout(data: str, stats: NormalisationStats | None) -> Task:
    return _precipitation(data, stats, design="rollout")


#: Task name → builder (data path, backbone statistics) → Task.
TASKS: dict[str, Callable[[str, NormalisationStats | None], Task]] = {
    "forecasting": _forecasting,
    "downscaling": _downscaling,
    "downscaling-x2": _downscaling_x2,
    "postprocessing": _postprocessing,
    "precipitation": _precipitation,
    "precipitation-rollout": _precipitation_rollout,
}


def build_task(name: str, stats: NormalisationStats | None, data: str = "") -> Task:
    """The task ``name`` on ``data`` (default: its built-in store) with the backbone's ``stats``."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; known: {sorted(TASKS)}")
    return TASKS[name](data, stats)
