"""Tasks: what a model is trained and scored on (see :mod:`weatherpeft.tasks.base`).

:func:`build_task` makes a task by name on a data path (default: its store in the built-in
world), normalised with the backbone's statistics, with task options (periods by date,
variables, static fields, levels, leads, region; ``weatherpeft tasks`` lists them); a task
measures statistics only for the variables it adds, on its training period.
``downscaling-x2`` and ``precipitation-rollout`` are the first forms of two benchmark tasks,
kept beside the defaults (×4 downscaling, direct precipitation heads) that replaced them.
Outside tasks: :func:`register_task` or an entry point (:mod:`weatherpeft.tasks.registry`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from weatherpeft.data.stats import NormalisationStats
from weatherpeft.tasks.base import SPLITS, Task, TaskVariables
from weatherpeft.tasks.grid import PatchGrid
from weatherpeft.tasks.registry import (
    ENTRY_POINT_GROUP,
    TASKS,
    build_task,
    describe_tasks,
    parse_task_options,
    periods_option,
    register_task,
    task_names,
)

__all__ = ["ENTRY_POINT_GROUP", "SPLITS", "TASKS", "Task", "TaskVariables", "build_task",
           "describe_tasks", "parse_task_options", "register_task", "task_names"]

#: Forecasting on the built-in downstream year: fine-tune on Jan–Sep, validate Oct–Nov, test Dec.
FORECASTING_PERIODS = {"train": ("2003-01-01", "2003-09-30T18:00"),
                       "val": ("2003-10-01", "2003-11-30T18:00"),
                       "test": ("2003-12-01", "2003-12-31T18:00")}

Region = tuple[float, float, float, float]
Periods = dict[str, tuple[str, str]]
Names = tuple[str, ...]


def _given(**options: Any) -> dict[str, Any]:
    """The options that were given (not None): the task's own defaults stay for the rest."""
    return {key: value for key, value in options.items() if value is not None}


def _store(data: str, default: str, region: Region | None):
    """The data path (default: the built-in store ``default``), cropped to ``region`` if given.
    A relative path resolves when the store is opened (:func:`~weatherpeft.data.wb2.open_store`)."""
    from weatherpeft.data.builtin import store_path

    path = data or store_path(default)
    if region is None:
        return path
    from weatherpeft.data.wb2 import open_store
    from weatherpeft.tasks.precipitation import crop_region

    return crop_region(open_store(path), region)


def _forecasting(data: str, stats: NormalisationStats | None, *, grid: PatchGrid | None,
                 periods: Periods | None = None, surf_vars: Names | None = None,
                 atmos_vars: Names | None = None, static_vars: Names | None = None,
                 levels: tuple[float, ...] | None = None, lead_steps: tuple[int, ...] = (1,),
                 region: Region | None = None) -> Task:
    """6-h forecasting, scored by roll-out at lead_steps × 6 h (built-in: the downstream year)."""
    from weatherpeft.tasks.downscaling import default_periods
    from weatherpeft.tasks.forecasting import ForecastingTask

    store = _store(data, "downstream", region)
    periods = periods_option(periods) or (default_periods(store) if data else FORECASTING_PERIODS)
    return ForecastingTask(store, periods, stats, lead_steps=lead_steps, grid=grid,
                           **_given(surf_vars=surf_vars, atmos_vars=atmos_vars,
                                    static_vars=static_vars, levels=levels))


def _downscaling(data: str, stats: NormalisationStats | None, *, grid: PatchGrid | None,
                 periods: Periods | None = None, surf_vars: Names | None = None,
                 atmos_vars: Names | None = None, static_vars: Names | None = None,
                 levels: tuple[float, ...] | None = None, coarse_factor: int = 4,
                 region: Region | None = None) -> Task:
    """Downscaling from coarse_factor × coarser fields (built-in: 22.5° → 5.625°)."""
    from weatherpeft.tasks.downscaling import DownscalingTask

    return DownscalingTask(_store(data, "downstream", region), periods_option(periods), stats,
                           coarse_factor=coarse_factor, grid=grid,
                           **_given(surf_vars=surf_vars, atmos_vars=atmos_vars,
                                    static_vars=static_vars, levels=levels))


def _downscaling_x2(data: str, stats: NormalisationStats | None, *, grid: PatchGrid | None,
                    periods: Periods | None = None, region: Region | None = None) -> Task:
    """Downscaling ×2, the first form (11.25° → 5.625° on the built-in world)."""
    return _downscaling(data, stats, grid=grid, periods=periods, region=region, coarse_factor=2)


def _postprocessing(data: str, stats: NormalisationStats | None, *, grid: PatchGrid | None,
                    periods: Periods | None = None, surf_vars: Names | None = None,
                    atmos_vars: Names | None = None, static_vars: Names | None = None,
                    levels: tuple[float, ...] | None = None, lead_hours: float = 48,
                    truth_member: int | None = None, region: Region | None = None,
                    head_form: str = "state", truth_offset_hours: float = 0) -> Task:
    """Ensemble post-processing at lead_hours; data 'ENSEMBLE,TRUTH' (truth: analyses);
    head_form "state" or "residual" (the authors' μ/σ); truth_offset_hours: verify that much
    after the ensemble's valid time."""
    from weatherpeft.tasks.postprocessing import PostprocessingTask

    ensemble, truth = "", ""
    if data:
        ensemble, _, truth = data.partition(",")
        if not truth:
            raise ValueError("post-processing data is 'ENSEMBLE,TRUTH': the ensemble forecast store "
                             f"and the analysis store that verifies it; got {data!r}")
    if lead_hours <= 0:
        raise ValueError(f"task option 'lead_hours' must be positive, got {lead_hours}")
    return PostprocessingTask(
        _store(ensemble, "ensemble", region), periods_option(periods), stats,
        truth_store=_store(truth, "downstream", region), lead=timedelta(hours=lead_hours),
        truth_member=truth_member, grid=grid, head_form=head_form,
        truth_offset=timedelta(hours=truth_offset_hours),
        **_given(surf_vars=surf_vars, atmos_vars=atmos_vars, static_vars=static_vars,
                 levels=levels))


def _precipitation(data: str, stats: NormalisationStats | None, *, grid: PatchGrid | None,
                   periods: Periods | None = None, surf_vars: Names | None = None,
                   atmos_vars: Names | None = None, static_vars: Names | None = None,
                   levels: tuple[float, ...] | None = None,
                   lead_hours: tuple[float, ...] = (12, 24, 36),
                   region: Region | None = (5.0, 50.0, 70.0, 125.0),
                   design: str = "direct") -> Task:
    """Regional 6-h precipitation at lead_hours (region null: the whole store)."""
    from weatherpeft.tasks.precipitation import PrecipitationTask

    return PrecipitationTask(_store(data, "regional", None), periods_option(periods), stats,
                             region=region, design=design, lead_hours=lead_hours, grid=grid,
                             **_given(surf_vars=surf_vars, atmos_vars=atmos_vars,
                                      static_vars=static_vars, levels=levels))


def _precipitation_rollout(data: str, stats: NormalisationStats | None, *, grid: PatchGrid | None,
                           periods: Periods | None = None,
                           region: Region | None = (5.0, 50.0, 70.0, 125.0)) -> Task:
    """Precipitation by 6-h roll-out, the first form."""
    return _precipitation(data, stats, grid=grid, periods=periods, region=region, design="rollout")


for _name, _builder in (("forecasting", _forecasting), ("downscaling", _downscaling),
                        ("downscaling-x2", _downscaling_x2), ("postprocessing", _postprocessing),
                        ("precipitation", _precipitation),
                        ("precipitation-rollout", _precipitation_rollout)):
    register_task(_name, _builder)
