"""Statistical downscaling: coarse global fields, interpolated to the fine grid, → fine fields.

The setting of the WeatherPEFT paper (ERA5 5.625° → 1.40625°, a factor 4, lead time 0; inputs
interpolated bilinearly to the target grid; loss 0.25·MSE(surface) + MSE(atmosphere) on
normalised fields). In the built-in world the coarse fields are the downstream 5.625° store
conservatively coarsened by the paper's factor 4 (22.5°, :func:`weatherpeft.data.grids.coarsen`;
on real data the same factor gives 1.40625° → 5.625°), or by ``coarse_factor=2`` (11.25°, the
first form of this task, kept as an option and as the task ``downscaling-x2``), or read from a
separate ``coarse_store`` at the coarse resolution.

Why ×4 by default: at ×2 a coarse cell is a quarter of one of aurora-tiny's 4 × 4 patches, so
the patch encoder and decoder alone recover most of what can be recovered, and fine-tuning
the backbone adds little over training them (2t RMSE 6.5 % better at 200 steps). At ×4 a
coarse cell is a whole patch; the detail must come from neighbouring patches, which only the
backbone mixes (measured in ``docs/results/tasks/``).

A sample (lead 0) pairs, for a time t:

* input: every dynamic variable at t − 6 h and t (Aurora's history of 2), both read from the
  *coarse* data and interpolated bilinearly to the fine grid (the model never sees a fine
  dynamic field); the static fields (land–sea mask, orography) at the fine resolution;
  metadata time t.
* target: the fine fields at t.

The backbone runs on the fine grid, so a model pretrained there (aurora-tiny on 64 × 32)
needs no change. Aurora always conditions on a lead time (its ``timestep``, 6 h for
aurora-tiny) and stamps its output t + 6 h; this task ignores that stamp and scores the
output against the fields at t. The lead-time embedding is then just a constant
conditioning input, and fine-tuning teaches the model the lead-0 mapping "smooth state →
sharp state" (the absolute-time embedding sees the true time t). The bilinear input at t is
the reference every model must beat.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import torch
import xarray as xr
from aurora import Batch, Metadata
from aurora.normalisation import level_to_str
from torch.utils.data import Dataset

from weatherpeft.data.grids import coarsen
from weatherpeft.data.stats import NormalisationStats, compute_stats
from weatherpeft.data.wb2 import (
    SOURCE_ATTR,
    SampleSpec,
    WB2Dataset,
    canonicalise,
    open_store,
    select,
)
from weatherpeft.metrics import latitude_weights, spatial_bias, spatial_mse
from weatherpeft.tasks.base import SPLITS, Task, TaskVariables
from weatherpeft.tasks.grid import AURORA_TINY_GRID, PatchGrid
from weatherpeft.tasks.scoring import (
    accumulate,
    channel_name,
    channel_values,
    crop_rows,
    first_dynamic,
    match_rows,
    module_device,
    scale_tensors,
)

__all__ = [
    "PAPER_CHANNELS",
    "BilinearInterpolator",
    "DownscalingPairs",
    "DownscalingTask",
    "coarse_coordinates",
    "coarsen_fields",
    "complete_stats",
    "default_periods",
    "interpolation_matrix",
]

log = logging.getLogger(__name__)

_DEFAULT_SPEC = SampleSpec()
#: The channels of the paper's downscaling table (Aurora names + hPa).
PAPER_CHANNELS = ("2t", "10u", "10v", "t850", "z500")
#: What :meth:`DownscalingTask.evaluate` scores: the model and bilinear interpolation.
SOURCES = ("model", "bilinear")


# --------------------------------------------------------------------------------------
# Periods and statistics shared by the downstream tasks
# --------------------------------------------------------------------------------------


def default_periods(source: str | os.PathLike | xr.Dataset | np.ndarray,
                    names: Mapping[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """Train / val / test periods from a store's times: its last calendar year split
    Jan–Sep (plus every earlier year) / Oct–Nov / Dec.

    For the built-in downstream and regional stores (2003) this is train Jan–Sep, val
    Oct–Nov, test December 2003. A store whose last year ends before December cannot be
    split so: pass ``periods`` explicitly. ``source`` may also be an array of times.
    """
    if isinstance(source, np.ndarray):
        times = source.astype("datetime64[ns]")
        name = "the given times"
    else:
        ds = canonicalise(source, names) if isinstance(source, xr.Dataset) else open_store(source, names)
        if "time" not in ds.dims or ds.sizes["time"] == 0:
            raise ValueError(f"store {ds.attrs.get(SOURCE_ATTR, '<in-memory dataset>')} has no times")
        times = ds["time"].values.astype("datetime64[ns]")
        name = str(ds.attrs.get(SOURCE_ATTR, "<in-memory dataset>"))
    first, last = pd.Timestamp(times.min()), pd.Timestamp(times.max())
    year = last.year
    bounds = {"train": (first, pd.Timestamp(f"{year}-09-30T23:59:59")),
              "val": (pd.Timestamp(f"{year}-10-01"), pd.Timestamp(f"{year}-11-30T23:59:59")),
              "test": (pd.Timestamp(f"{year}-12-01"), last)}
    stamps = pd.DatetimeIndex(times)
    for split, (start, end) in bounds.items():
        if not ((stamps >= start) & (stamps <= end)).any():
            raise ValueError(f"cannot split {name} ({first} – {last}) into Jan–Sep / Oct–Nov / Dec "
                             f"of {year}: no times for '{split}'; pass periods explicitly")
    return {split: (start.isoformat(), min(end, last).isoformat())
            for split, (start, end) in bounds.items()}


def _stat_keys(selection) -> list[str]:
    keys = list(selection.surf.values()) + list(selection.static.values())
    keys += [f"{name}_{level_to_str(level)}" for name in selection.atmos.values()
             for level in selection.levels]
    return list(dict.fromkeys(keys))


def complete_stats(stats: NormalisationStats | None, source: str | os.PathLike | xr.Dataset,
                   spec: SampleSpec) -> NormalisationStats:
    """``stats`` plus statistics for every key of ``spec`` they lack, measured on
    [spec.start, spec.end] (the task's training period) only.

    ``None`` measures everything. Given statistics are never changed: a pretrained
    backbone's normalisation stays what its weights were fit with, only new variables
    (e.g. precipitation) get statistics of the task's own training data.
    """
    if stats is None:
        return compute_stats(source, spec)
    ds = canonicalise(source, spec.names) if isinstance(source, xr.Dataset) else open_store(source, spec.names)
    missing = [key for key in _stat_keys(select(ds, spec)) if key not in stats.locations]
    if not missing:
        return stats
    measured = compute_stats(source, spec)
    log.info("normalisation statistics for %s measured on the task's training period", missing)
    added = ", ".join(missing)
    return NormalisationStats(
        locations={**stats.locations, **{k: measured.locations[k] for k in missing}},
        scales={**stats.scales, **{k: measured.scales[k] for k in missing}},
        period=stats.period, latitude_weighted=stats.latitude_weighted, n_times=stats.n_times,
        source=f"{stats.source or 'given'} + {measured.source} {measured.period} ({added})")


# --------------------------------------------------------------------------------------
# Coarsening and bilinear interpolation
# --------------------------------------------------------------------------------------


def coarsened_rows(height: int, factor: int) -> int:
    """How many of ``height`` fine rows are coarsened: all, or all but the last when one is
    over (a grid with both poles, 33 or 721 rows: Aurora drops that row too)."""
    return height - 1 if height % factor == 1 else height


def coarse_coordinates(lat: np.ndarray, lon: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres of the grid :func:`coarsen_fields` produces: the mean of each block's
    fine centres (exact for equiangular grids). Order follows the fine grid's."""
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    lat = lat[:coarsened_rows(len(lat), factor)]
    if len(lat) % factor or len(lon) % factor:
        raise ValueError(f"a {len(lat)} × {len(lon)} (lat × lon) grid is not divisible by the "
                         f"coarsening factor {factor} (nor one row more, a grid with both poles)")
    return lat.reshape(-1, factor).mean(axis=1), lon.reshape(-1, factor).mean(axis=1)


def coarsen_fields(values: torch.Tensor, factor: int, lat: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Conservative ``factor`` × ``factor`` block means of fields shaped (..., H=lat, W=lon).

    :func:`weatherpeft.data.grids.coarsen` (area-weighted, cos(latitude) weights) applied in
    Aurora's (lat, lon) layout; ``lat`` are the H fine cell centres in the rows' order. A
    grid with one row over a multiple of ``factor`` leaves its last row out (:func:`coarsened_rows`).
    """
    lat = lat.detach().cpu().numpy() if isinstance(lat, torch.Tensor) else np.asarray(lat)
    rows = coarsened_rows(len(lat), factor)  # the last row of a grid with both poles is left out
    lat, values = lat[:rows], values[..., :rows, :]
    array = values.detach().cpu().numpy().swapaxes(-1, -2)  # (..., lon, lat): grids' order
    coarse = coarsen(array.astype(np.float64), factor, lat).swapaxes(-1, -2)
    return torch.from_numpy(np.ascontiguousarray(coarse)).to(values.dtype)


def interpolation_matrix(source: np.ndarray, target: np.ndarray, *, periodic: bool) -> np.ndarray:
    """(n_target, n_source) matrix of 1-D linear interpolation between cell centres.

    ``periodic``: coordinates in degrees on a circle (longitude on a global grid), so a
    target between the last and the first source centre mixes those two. Otherwise targets
    beyond the first or last source centre take that centre's value (constant
    extrapolation: on a global grid without poles the fine rows poleward of the outermost
    coarse row copy it). ``source`` may be in any strictly monotonic order.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    n = len(source)
    order = np.argsort(source)
    ordered = source[order]
    if n > 1 and np.any(np.diff(ordered) == 0):
        raise ValueError("interpolation source coordinates must not repeat")
    matrix = np.zeros((len(target), n))
    if n == 1:
        matrix[:, 0] = 1.0
        return matrix
    rows = np.arange(len(target))
    if periodic:
        x = np.mod(target - ordered[0], 360.0) + ordered[0]  # in [ordered[0], ordered[0] + 360)
        left = np.clip(np.searchsorted(ordered, x, side="right") - 1, 0, n - 1)
        right = (left + 1) % n
        span = np.mod(ordered[right] - ordered[left], 360.0)
        span = np.where(span == 0, 360.0, span)
        weight = np.mod(x - ordered[left], 360.0) / span
    else:
        x = np.clip(target, ordered[0], ordered[-1])
        left = np.clip(np.searchsorted(ordered, x, side="right") - 1, 0, n - 2)
        right = left + 1
        weight = (x - ordered[left]) / (ordered[right] - ordered[left])
    np.add.at(matrix, (rows, order[left]), 1.0 - weight)
    np.add.at(matrix, (rows, order[right]), weight)
    return matrix


def _is_global(lon: np.ndarray) -> bool:
    """Whether equally spaced longitudes close the circle (n · spacing = 360°)."""
    lon = np.sort(np.mod(np.asarray(lon, dtype=np.float64), 360.0))
    if len(lon) < 2:
        return False
    spacing = np.diff(lon)
    return bool(np.allclose(spacing, spacing[0]) and math.isclose(spacing[0] * len(lon), 360.0,
                                                                   rel_tol=1e-6))


class BilinearInterpolator:
    """Bilinear interpolation of fields (..., H_src, W_src) to (..., H_dst, W_dst).

    Separable: one linear interpolation in latitude (rows), one in longitude (columns),
    ``M_lat @ field @ M_lonᵀ``. Longitude is periodic when the source grid is global, and
    latitudes outside the source rows are clamped to the outermost row (see
    :func:`interpolation_matrix`). Exact for fields linear in latitude and longitude
    between source centres.
    """

    def __init__(self, src_lat, src_lon, dst_lat, dst_lon):
        as_np = lambda v: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)  # noqa: E731
        self.src_shape = (len(src_lat), len(src_lon))
        self.dst_shape = (len(dst_lat), len(dst_lon))
        self.periodic = _is_global(as_np(src_lon))
        self.lat_matrix = torch.from_numpy(
            interpolation_matrix(as_np(src_lat), as_np(dst_lat), periodic=False))
        self.lon_matrix = torch.from_numpy(
            interpolation_matrix(as_np(src_lon), as_np(dst_lon), periodic=self.periodic))
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, field: torch.Tensor) -> torch.Tensor:
        if tuple(field.shape[-2:]) != self.src_shape:
            raise ValueError(f"field shaped {tuple(field.shape)} does not end in the source grid "
                             f"{self.src_shape} (lat, lon)")
        key = (field.dtype, field.device)
        if key not in self._cast:
            self._cast[key] = (self.lat_matrix.to(device=field.device, dtype=field.dtype),
                               self.lon_matrix.to(device=field.device, dtype=field.dtype))
        lat_matrix, lon_matrix = self._cast[key]
        return lat_matrix @ field @ lon_matrix.T


# --------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------


class DownscalingPairs(Dataset):
    """(input, target) Batch pairs for downscaling, lead 0 (see the module docstring).

    ``fine`` serves (history, lead 0) windows of the fine store. The coarse fields come
    from ``coarse`` (a dataset of the same variables and times on a coarser grid) or, when
    it is ``None``, from coarsening the fine fields by ``coarse_factor``. Either way they
    are interpolated bilinearly to the fine grid.
    """

    def __init__(self, fine: WB2Dataset, coarse: WB2Dataset | None = None, coarse_factor: int = 4):
        if fine.spec.lead != timedelta(0):
            raise ValueError(f"downscaling pairs need lead 0, got {fine.spec.lead}")
        self.fine = fine
        self.coarse = coarse
        self.coarse_factor = int(coarse_factor)
        fine_lat, fine_lon = fine.selection.lat, fine.selection.lon
        if coarse is None:
            if self.coarse_factor < 2:
                raise ValueError(f"coarse_factor must be at least 2, got {coarse_factor}")
            coarse_lat, coarse_lon = coarse_coordinates(fine_lat, fine_lon, self.coarse_factor)
            self._coarse_index = None
        else:
            coarse_lat, coarse_lon = coarse.selection.lat, coarse.selection.lon
            if len(coarse_lat) * len(coarse_lon) >= len(fine_lat) * len(fine_lon):
                raise ValueError(f"the coarse store's grid ({len(coarse_lat)} × {len(coarse_lon)}) is "
                                 f"not coarser than the fine one ({len(fine_lat)} × {len(fine_lon)})")
            if tuple(coarse.selection.levels) != tuple(fine.selection.levels):
                raise ValueError(f"coarse store levels {coarse.selection.levels} differ from the fine "
                                 f"store's {fine.selection.levels}")
            index = {coarse.sample_times(i)[0]: i for i in range(len(coarse))}
            self._coarse_index = [index.get(fine.sample_times(i)[0]) for i in range(len(fine))]
            missing = [i for i, j in enumerate(self._coarse_index) if j is None]
            if missing:
                times = fine.sample_times(missing[0])[0]
                raise ValueError(f"the coarse store has no fields at {[str(t) for t in times]} "
                                 f"(needed by {len(missing)} of {len(fine)} samples)")
        self.coarse_lat = np.asarray(coarse_lat)
        self.coarse_lon = np.asarray(coarse_lon)
        self.interpolator = BilinearInterpolator(coarse_lat, coarse_lon, fine_lat, fine_lon)

    def __len__(self) -> int:
        return len(self.fine)

    def sample_times(self, index: int) -> tuple[tuple[datetime, ...], datetime]:
        """(input times, target time) of sample ``index``; the target time is the last input's."""
        return self.fine.sample_times(index)

    def coarse_sample(self, index: int, window: Batch | None = None) -> Batch:
        """The coarse input of sample ``index`` on the coarse grid, before interpolation
        (dynamic variables only; no static fields). ``window``: the fine input of that
        sample when already read."""
        if self.coarse is None:
            if window is None:
                window, _ = self.fine[index]
            lat = window.metadata.lat
            surf = {k: coarsen_fields(v, self.coarse_factor, lat) for k, v in window.surf_vars.items()}
            atmos = {k: coarsen_fields(v, self.coarse_factor, lat) for k, v in window.atmos_vars.items()}
            time = window.metadata.time
        else:
            window, _ = self.coarse[self._coarse_index[index]]
            surf = {k: window.surf_vars[k] for k in self.fine.selection.surf.values()}
            atmos = {k: window.atmos_vars[k] for k in self.fine.selection.atmos.values()}
            time = window.metadata.time
        metadata = Metadata(lat=torch.from_numpy(self.coarse_lat.astype(np.float32)),
                            lon=torch.from_numpy(self.coarse_lon.astype(np.float32)), time=time,
                            atmos_levels=self.fine.selection.levels)
        return Batch(surf_vars=surf, static_vars={}, atmos_vars=atmos, metadata=metadata)

    def __getitem__(self, index: int) -> tuple[Batch, Batch]:
        window, target = self.fine[index]
        coarse = self.coarse_sample(index, window)
        interpolate = self.interpolator
        inputs = dataclasses.replace(
            window,
            surf_vars={k: interpolate(v) for k, v in coarse.surf_vars.items()},
            atmos_vars={k: interpolate(v) for k, v in coarse.atmos_vars.items()})
        return inputs, target


# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------


class DownscalingTask(Task):
    """Global downscaling at lead 0, scored per variable against bilinear interpolation.

    Args:
        store: the fine-resolution WB2-layout store (default: the built-in downstream store,
            64 × 32 at 5.625°, 2003).
        periods: ``{"train"|"val"|"test": (start, end)}``, inclusive; default
            :func:`default_periods` (Jan–Sep / Oct–Nov / Dec of the store's last year).
        stats: normalisation statistics (pass the backbone's); keys they lack are measured
            on the training period (all of them when ``None``), see :func:`complete_stats`.
        coarse_factor: derive the coarse input by conservative ``factor`` × ``factor``
            block means of the fine fields (default 4, the paper's: 5.625° → 22.5° here,
            1.40625° → 5.625° on WeatherBench; 2: 5.625° → 11.25°, the first form).
        coarse_store: instead, read the coarse fields from this store (same variables,
            levels and times on a coarser grid, e.g. WeatherBench's 5.625° files for a
            1.40625° target); ``coarse_factor`` is then unused.
        surf_vars, atmos_vars, static_vars, levels, names: what samples hold (any names the
            reader understands; ``levels=None``: every level of the store).
        history: input times (Aurora's history; 2 for aurora-tiny), all from coarse data.
        surface_weight, atmos_weight: the loss's weights (0.25 and 1, the paper's).
        in_memory: passed to the reader (``None``: load when it fits 2 GiB).
        grid: the backbone's grid rule (:mod:`weatherpeft.tasks.grid`), checked on the fine
            grid (None: unchecked).

    Loss: with e = (prediction − target) / σ per variable and level (σ: the statistics'
    standard deviation, so fields are compared normalised), each surface variable and
    each (atmospheric variable, level) contributes the latitude-weighted spatial mean of e²
    averaged over the batch (as in forecasting). The loss is
    ``surface_weight · mean over surface variables + atmos_weight · mean over atmospheric
    (variable, level) channels`` = 0.25·MSE(surface) + MSE(atmosphere), the authors' loss.

    Metrics (:meth:`evaluate`), physical units, for sources ``model`` and ``bilinear``:
    latitude-weighted RMSE (WeatherBench2: sqrt of the mean over samples of the spatial
    MSE) and mean bias (forecast − truth) for every channel, keys
    ``"{source}/{rmse|bias}/{channel}"`` with channels as :func:`channel_name` writes them
    ("2t", "10u", "t850", "z500"; :data:`PAPER_CHANNELS` are the paper's table).
    """

    name = "downscaling"

    def __init__(self, store: str | os.PathLike | xr.Dataset | None = None,
                 periods: Mapping[str, tuple[datetime | str, datetime | str]] | None = None,
                 stats: NormalisationStats | None = None, *,
                 coarse_factor: int = 4,
                 coarse_store: str | os.PathLike | xr.Dataset | None = None,
                 surf_vars: Sequence[str] = _DEFAULT_SPEC.surf_vars,
                 atmos_vars: Sequence[str] = _DEFAULT_SPEC.atmos_vars,
                 static_vars: Sequence[str] = _DEFAULT_SPEC.static_vars,
                 levels: Sequence[float] | None = None,
                 history: int = 2,
                 surface_weight: float = 0.25,
                 atmos_weight: float = 1.0,
                 names: Mapping[str, str] | None = None,
                 in_memory: bool | None = None,
                 grid: PatchGrid | None = AURORA_TINY_GRID):
        if store is None or (isinstance(store, str) and not store):  # "": the default too
            from weatherpeft.data.builtin import store_path
            store = store_path("downstream")
        if surface_weight < 0 or atmos_weight < 0 or surface_weight + atmos_weight == 0:
            raise ValueError(f"loss weights must be ≥ 0 and not both 0, got surface {surface_weight}, "
                             f"atmosphere {atmos_weight}")
        self.store = store
        self.coarse_store = coarse_store
        self.coarse_factor = int(coarse_factor)
        self.history = int(history)
        self.surface_weight, self.atmos_weight = float(surface_weight), float(atmos_weight)
        if periods is None:
            periods = default_periods(store, names)
        missing = [split for split in SPLITS if split not in periods]
        if missing:
            raise ValueError(f"periods must give {list(SPLITS)}; missing {missing}")
        self.periods = {split: tuple(periods[split]) for split in SPLITS}
        self._base_spec = SampleSpec(surf_vars=tuple(surf_vars), atmos_vars=tuple(atmos_vars),
                                     static_vars=tuple(static_vars),
                                     levels=None if levels is None else tuple(levels),
                                     history=self.history, lead=timedelta(0),
                                     names=dict(names or {}), in_memory=in_memory)
        ds = canonicalise(store, self._base_spec.names) if isinstance(store, xr.Dataset) else \
            open_store(store, self._base_spec.names)
        self.source = str(ds.attrs.get(SOURCE_ATTR, "<in-memory dataset>"))
        self._selection = select(ds, self.spec("train"))
        sel = self._selection
        if coarse_store is None:
            coarse_coordinates(sel.lat, sel.lon, self.coarse_factor)  # divisibility, early
        if grid is not None:  # the backbone runs on the fine grid
            grid.check(len(sel.lat), len(sel.lon), f"store {self.source}")
        self._variables = TaskVariables.from_selection(sel)
        self.stats = complete_stats(stats, store, self.spec("train"))
        self._datasets: dict[str, Dataset] | None = None
        self._scales: dict[tuple, dict[str, torch.Tensor]] = {}

    # -- contract -----------------------------------------------------------------------

    @property
    def variables(self) -> TaskVariables:
        return self._variables

    @property
    def channels(self) -> list[str]:
        """Every scored channel in the task's order ("2t", …, "z500", "z850", …)."""
        sel = self._selection
        return list(sel.surf.values()) + [channel_name(name, level) for name in sel.atmos.values()
                                          for level in sel.levels]

    def spec(self, split: str) -> SampleSpec:
        """The fine store's :class:`SampleSpec` of ``split`` (history times, lead 0)."""
        start, end = self.periods[split]
        return dataclasses.replace(self._base_spec, start=start, end=end)

    def datasets(self) -> dict[str, Dataset]:
        """train / val / test: :class:`DownscalingPairs` over each split's period."""
        if self._datasets is None:
            self._datasets = {split: self._pairs(split) for split in SPLITS}
        return self._datasets

    def _pairs(self, split: str) -> DownscalingPairs:
        fine = WB2Dataset(self.store, self.spec(split))
        coarse = None
        if self.coarse_store is not None:
            coarse = WB2Dataset(self.coarse_store, dataclasses.replace(self.spec(split), static_vars=()))
        return DownscalingPairs(fine, coarse, self.coarse_factor)

    def loss(self, prediction: Batch, target: Batch) -> torch.Tensor:
        """0.25·MSE(surface) + MSE(atmosphere), normalised and latitude-weighted (class docstring)."""
        target = crop_rows(target, prediction.spatial_shape[0])
        device = first_dynamic(prediction).device
        scales = self._scale_tensors(target.metadata.atmos_levels, device)
        weights = latitude_weights(target.metadata.lat).to(device=device, dtype=torch.float32)[:, None]
        terms: dict[str, list[torch.Tensor]] = {"surf_vars": [], "atmos_vars": []}
        for group in terms:
            truths, predictions = getattr(target, group), getattr(prediction, group)
            for name, truth in truths.items():
                if name not in predictions:
                    raise KeyError(f"prediction has no {group[:-5]} variable '{name}'")
                predicted = predictions[name]
                if predicted.shape != truth.shape:
                    raise ValueError(f"'{name}': prediction shape {tuple(predicted.shape)} differs "
                                     f"from target shape {tuple(truth.shape)}")
                error = (predicted.float() - truth.to(device).float()) / scales[name]
                spatial = (error.square() * weights).mean(dim=(-2, -1))  # (B, T[, C])
                if group == "atmos_vars":  # one term per level
                    terms[group].extend(spatial.mean(dim=(0, 1)).unbind())
                else:
                    terms[group].append(spatial.mean())
        total = torch.zeros((), device=device)
        if terms["surf_vars"]:
            total = total + self.surface_weight * torch.stack(terms["surf_vars"]).mean()
        if terms["atmos_vars"]:
            total = total + self.atmos_weight * torch.stack(terms["atmos_vars"]).mean()
        return total

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Iterable[tuple[Batch, Batch]],
                 *, references: bool = True) -> dict[str, float]:
        """Latitude-weighted RMSE and mean bias per channel of the model (and, when
        ``references``, of the bilinear input), physical units; see the class docstring.

        ``loader`` yields collated :class:`DownscalingPairs` samples. Empty loader → ``{}``.
        """
        was_training = model.training
        model.eval()
        device = module_device(model)
        sums: dict[tuple[str, str, str], torch.Tensor] = {}
        count = 0
        try:
            for inputs, target in loader:
                inputs, target = inputs.to(device), target.to(device)
                forecasts = {"model": model(inputs)}
                if references:
                    forecasts["bilinear"] = _last_time(inputs)
                count += first_dynamic(target).shape[0]
                for source, forecast in forecasts.items():
                    self._accumulate(sums, source, forecast, target)
        finally:
            model.train(was_training)
        if count == 0:
            return {}
        return self._results(sums, count)

    # -- helpers ------------------------------------------------------------------------

    def _scale_tensors(self, levels: tuple, device: torch.device) -> dict[str, torch.Tensor]:
        """σ per variable, broadcastable to its field (cached per levels and device)."""
        key = (tuple(levels), str(device))
        if key not in self._scales:
            self._scales[key] = scale_tensors(self.stats.scales, self._selection.surf.values(),
                                              self._selection.atmos.values(), levels, device)
        return self._scales[key]

    def _accumulate(self, sums: dict, source: str, forecast: Batch, truth: Batch) -> None:
        """Add Σ over the batch of spatial MSE and spatial bias per channel (float64)."""
        forecast, truth = match_rows(forecast, truth)
        lat = truth.metadata.lat
        for group in ("surf_vars", "atmos_vars"):
            predicted = getattr(forecast, group)
            for name, observed in getattr(truth, group).items():
                if name not in predicted:
                    raise KeyError(f"the {source} forecast has no variable '{name}'")
                f, o = predicted[name].float()[:, -1], observed.float()[:, -1]  # (B, [C,] H, W)
                accumulate(sums, (source, "mse", name), spatial_mse(f, o, lat))
                accumulate(sums, (source, "bias", name), spatial_bias(f, o, lat))

    def _results(self, sums: dict, count: int) -> dict[str, float]:
        results: dict[str, float] = {}
        for source in SOURCES:
            for metric in ("rmse", "bias"):
                for name in self._selection.dynamic.values():
                    key = (source, "mse" if metric == "rmse" else "bias", name)
                    if key not in sums:
                        continue
                    mean = sums[key] / count
                    value = torch.sqrt(mean) if metric == "rmse" else mean
                    for channel, item in channel_values(name, value, self._selection.levels):
                        results[f"{source}/{metric}/{channel}"] = item
        return results


def _last_time(batch: Batch) -> Batch:
    """The batch at its newest time (time axis kept, length 1): the bilinear reference."""
    return dataclasses.replace(batch,
                               surf_vars={k: v[:, -1:] for k, v in batch.surf_vars.items()},
                               atmos_vars={k: v[:, -1:] for k, v in batch.atmos_vars.items()})
