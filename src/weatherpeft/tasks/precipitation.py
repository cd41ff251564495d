"""Regional precipitation forecasting: 6-hour totals at leads 12, 24 and 36 h from the current state.

The WeatherPEFT paper's third task (ERA5 over China at 0.25°, SEEPS / ACC at 12–36 h). The
built-in default is the ``regional.zarr`` store (2.8125°, South and East Asia with the
Indian Ocean, the Bay of Bengal, the Tibetan plateau and the South China Sea — land and
sea, like the paper's domain), cropped to the 16 × 20 cells of :data:`DEFAULT_REGION`
(see "Grid" below). Any region of any WB2-layout store with ``total_precipitation_6hr``
works (``region=(south, north, west, east)`` in degrees; cells whose centres lie inside).

Precipitation ("tp", the total of the previous 6 h) is an input — the last 6-h total is part
of the current state — and a *new output variable* of a backbone pretrained without it, so
it is a task head (:attr:`TaskVariables.new_surf_vars`), trainable under every method.

Designs (``design=``). ``"direct"`` (the default) is the authors': the inputs are the state
at t − 12 h and t (tp among them), and one forward pass predicts tp at every lead through its
own head — new output variables ``tp_12h``, ``tp_24h``, ``tp_36h`` (:func:`lead_head`), each
fed the observed tp history as its input — trained with an L1 loss on normalised tp, only tp
in the loss. ``head_form="residual"`` (the default) reads each head as the change from
persistence (total = last observed total + the head's normalised output × tp's scale);
``"absolute"`` as the total itself (the authors'). ``"rollout"`` (the first form of this task)
steps 6 h at a time as described next; it is kept as an option (task
``precipitation-rollout``).

Why: in this world 6-h totals are so persistent (76–85 % of grid points keep their SEEPS
category from t to t + 12…36 h) that SEEPS punishes any smoothing — persistence smoothed over
3 × 3 cells or scaled by 0.8 already scores worse than persistence. Direct heads with L1
(a median, sharper than the roll-out's mean) and the residual form (which keeps the sharp
persistence field unless the model has reason to change it) gave the best SEEPS of the forms
measured, and a 4.9 % gap between fine-tuning the backbone and training only the
encoder/decoder (mean SEEPS, 500 steps, 2 seeds; absolute heads −4 %, the roll-out 4 % at
12 h in issue 15 at 200 steps): still short of a clear separation
(``docs/results/tasks/README.md``). No form measured beat persistence on SEEPS; every trained
model beats it on ACC at 12–36 h.

Leads (roll-out design). The model steps 6 h at a time (the accumulation window of the data
and aurora-tiny's ``timestep``); the 12/24/36-h forecasts are autoregressive roll-outs of 2/4/6 steps, each
prediction fed back with its precipitation clipped at 0. Training rolls out
``train_steps`` = 2 steps (12 h, back-propagating through both) and averages the loss over
both: 12 h is the headline lead (the paper's first column and the acceptance test), the
6-h step it contains is the step every longer roll-out repeats, and each extra training
step costs another forward and backward pass.

Loss (roll-out design). Precipitation is skewed and zero-inflated: most 6-h totals are 0, a
few are tens of mm. A plain MSE on normalised totals is dominated by the rare
heavy events and is minimised by the conditional mean — a light drizzle wherever rain is
possible, which SEEPS punishes in its dry category. The default compares
``g(x) = sign(x)·log(1 + |x| / 1 mm)`` of prediction and truth instead (WeatherBench's
``log(ε + tp) − log(ε)`` with ε = 1 mm; the sign keeps negative predictions penalised and
differentiable), divided by the standard deviation of g over the training period, so dry
and light totals count as much as heavy ones. ``tp_loss="mse"`` selects a linear MSE and
``"l1"`` the authors' L1 on normalised totals (the direct design's default). Every other
variable is predicted too (a roll-out needs the whole state) with the
forecasting task's normalised, latitude-weighted MSE, and precipitation weighted up
(``variable_weights``, default {"tp": 5}; the others 1): the other variables keep the
rolled-out state on track for 24 and 36 h, and setting their weights to 0 gives a
precipitation-only loss.

Grid. The region must fit the backbone's patches and Swin windows (the rule and its check:
:mod:`weatherpeft.tasks.grid`). The full 20 × 20 store gives 5 × 5 tokens for aurora-tiny:
its window (4, 8) covers all 5 longitude tokens but not the 5 latitude tokens, and Aurora
fails. 16 × 20 cells (4 × 5 tokens, then 2 × 3) fit: the default region drops the two
southernmost and two northernmost rows of the store (7.0–49.2°N, 70.3–123.8°E). A region
with one latitude row over a multiple of the patch size (a grid with both poles) loses its
southernmost row, as Aurora would.

Metrics (:meth:`evaluate`), for the model and two references — persistence (the last
observed 6-h total) and the training-period climatology — at each lead, in mm:

* SEEPS (WeatherBench2's ½-scaled matrix, dry threshold ``dry_threshold_mm`` = 0.1 mm for
  6-h totals as in the paper's code; dry fraction p1 and wet threshold per grid point from
  the training period; points with p1 outside [0.1, 0.85] excluded), per forecast then
  averaged;
* ACC against the climatology: the mean 6-h total of the training period per grid point
  and time of day of the valid time (00/06/12/18 UTC: the diurnal cycle is large in 6-h
  totals; months outside the training period, such as a December test, could not have a
  month-specific climatology), per forecast then averaged (WeatherBench2);
  not reported for the climatology itself (zero anomaly);
* latitude-weighted RMSE (sqrt of the mean over forecasts of the spatial MSE).

Keys ``"{source}/{seeps|acc|rmse}/tp/{hours}h"``, e.g. ``"model/seeps/tp/12h"``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import torch
import xarray as xr
from aurora import Batch
from torch.utils.data import Dataset

from weatherpeft import metrics
from weatherpeft.data.grids import crop_indices
from weatherpeft.data.stats import NormalisationStats
from weatherpeft.data.wb2 import (
    SOURCE_ATTR,
    STORE_NAMES,
    SampleSpec,
    WB2Dataset,
    canonicalise,
    check_finite,
    open_store,
    read_fields,
    select,
)
from weatherpeft.metrics import latitude_weights, spatial_mse
from weatherpeft.tasks.base import SPLITS, Task, TaskVariables
from weatherpeft.tasks.downscaling import complete_stats, default_periods
from weatherpeft.tasks.forecasting import RolloutWindows, _time_slice, advance_history, metric_key
from weatherpeft.tasks.grid import AURORA_TINY_GRID, PatchGrid
from weatherpeft.tasks.scoring import first_dynamic, module_device, scale_tensors

__all__ = ["DEFAULT_REGION", "DESIGNS", "DirectHeadSamples", "PrecipitationClimatology",
           "PrecipitationTask", "crop_region", "lead_head", "signed_log"]

log = logging.getLogger(__name__)

_DEFAULT_SPEC = SampleSpec()
#: (south, north, west, east) in degrees: 16 × 20 cells of the built-in regional store.
DEFAULT_REGION = (5.0, 50.0, 70.0, 125.0)
#: The forecasts :meth:`PrecipitationTask.evaluate` scores.
SOURCES = ("model", "persistence", "climatology")
PRECIPITATION = "tp"
#: How the leads are predicted: one pass with a head per lead (default), or a 6-h roll-out.
DESIGNS = ("direct", "rollout")
#: What a direct head's output is: the total itself, or its change from persistence.
HEAD_FORMS = ("absolute", "residual")
#: The loss on precipitation each ``tp_loss`` names.
TP_LOSSES = ("l1", "log", "mse")
_MM_PER_M = 1000.0
#: Millimetres per unit of the store's precipitation, by its ``units`` attribute.
_MM_PER_UNIT = {"m": 1000.0, "mm": 1.0, "kg m-2": 1.0, "kg m**-2": 1.0, "kg/m2": 1.0,
                "kg/m^2": 1.0}


def signed_log(values: torch.Tensor, scale: float) -> torch.Tensor:
    """g(x) = sign(x)·log(1 + |x| / scale): linear near 0, logarithmic for large totals."""
    return torch.sign(values) * torch.log1p(values.abs() / scale)


def lead_head(hours: float) -> str:
    """The direct design's output variable for ``hours`` of lead: ``"tp_12h"``."""
    return f"{PRECIPITATION}_{hours:g}h"


class DirectHeadSamples(Dataset):
    """(input, truth) pairs of the direct design from roll-out windows (history + leads).

    The input's tp is replaced by one companion per head (:func:`lead_head`), each holding
    the observed tp history: what a head reads is persistence, what it predicts is the total
    at its lead. The truth keeps ``tp`` at every lead time, truth[:, k − 1] k steps ahead.
    """

    def __init__(self, windows: RolloutWindows, heads: Sequence[str]):
        self.windows = windows
        self.heads = tuple(heads)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[Batch, Batch]:
        inputs, truth = self.windows[index]
        surf = {k: v for k, v in inputs.surf_vars.items() if k != PRECIPITATION}
        observed = inputs.surf_vars[PRECIPITATION]
        surf.update({head: observed.clone() for head in self.heads})
        return dataclasses.replace(inputs, surf_vars=surf), truth


def crop_region(ds: xr.Dataset, region: Sequence[float] | None) -> xr.Dataset:
    """The cells of canonical ``ds`` whose centres lie in (south, north, west, east) (degrees).

    ``None`` keeps the whole grid. West must not exceed east (regions across 0° longitude are
    not supported); a region with no cell of the store is an error naming the store's extent.
    """
    if region is None:
        return ds
    if len(region) != 4:
        raise ValueError(f"region must be (south, north, west, east) in degrees, got {region!r}")
    south, north, west, east = (float(v) for v in region)
    if south > north or west > east:
        raise ValueError(f"region {tuple(region)}: need south ≤ north and west ≤ east (regions "
                         "across 0° longitude are not supported)")
    lat, lon = ds["latitude"].values, ds["longitude"].values
    source = ds.attrs.get(SOURCE_ATTR, "<in-memory dataset>")
    try:
        lat_index = crop_indices(lat, south, north)
        lon_index = crop_indices(lon, west, east)
    except ValueError as error:
        raise ValueError(f"region (south, north, west, east) = {tuple(region)} lies outside store "
                         f"{source}, whose cell centres span latitude {lat.min():g}…{lat.max():g}, "
                         f"longitude {lon.min():g}…{lon.max():g}") from error
    return ds.isel(latitude=lat_index, longitude=lon_index)


@dataclasses.dataclass
class PrecipitationClimatology:
    """Training-period precipitation climatology of a region, in mm per 6 h.

    ``by_hour[h]`` (H, W) is the mean total of the training times at hour h (UTC) — present
    for the hours the training period has; ``mean`` (H, W) is the mean over all of it (used
    for hours it lacks). ``dry_fraction`` and ``wet_threshold`` (H, W) are SEEPS's p1 and
    light/heavy threshold per grid point (:func:`weatherpeft.metrics.seeps_climatology`;
    the threshold in metres, as :func:`weatherpeft.metrics.seeps` takes precipitation).
    Latitude decreasing, as in the task's batches.
    """

    by_hour: dict[int, torch.Tensor]
    mean: torch.Tensor
    dry_fraction: torch.Tensor
    wet_threshold: torch.Tensor
    dry_threshold_mm: float

    @classmethod
    def from_training(cls, totals_mm: torch.Tensor, times: Sequence, dry_threshold_mm: float,
                      ) -> PrecipitationClimatology:
        """From the training period's totals (T, H, W) in mm at ``times``."""
        hours = pd.DatetimeIndex(list(times)).hour.to_numpy()
        totals64 = totals_mm.double()
        by_hour = {int(h): totals64[torch.from_numpy(hours == h)].mean(dim=0).float()
                   for h in np.unique(hours)}
        dry_fraction, wet_threshold = metrics.seeps_climatology(totals64 / _MM_PER_M,
                                                                dry_threshold_mm)
        return cls(by_hour=by_hour, mean=totals64.mean(dim=0).float(),
                   dry_fraction=torch.as_tensor(dry_fraction).float(),
                   wet_threshold=torch.as_tensor(wet_threshold).float(),
                   dry_threshold_mm=float(dry_threshold_mm))

    def forecast(self, valid_times: Sequence[datetime], device: torch.device | str | None = None,
                 ) -> torch.Tensor:
        """The climatological total (B, H, W) for each valid time (its hour of day)."""
        fields = [self.by_hour.get(pd.Timestamp(t).hour, self.mean) for t in valid_times]
        stacked = torch.stack(fields)
        return stacked if device is None else stacked.to(device)

    def to(self, device: torch.device | str) -> PrecipitationClimatology:
        return dataclasses.replace(self, by_hour={h: v.to(device) for h, v in self.by_hour.items()},
                                   mean=self.mean.to(device), dry_fraction=self.dry_fraction.to(device),
                                   wet_threshold=self.wet_threshold.to(device))


class PrecipitationTask(Task):
    """Regional 6-h precipitation at leads 12/24/36 h; see the module docstring for choices.

    Args:
        store: WB2-layout store with ``total_precipitation_6hr`` (default: the built-in
            ``regional.zarr``).
        periods: ``{"train"|"val"|"test": (start, end)}``, inclusive; default
            :func:`~weatherpeft.tasks.downscaling.default_periods` (Jan–Sep / Oct–Nov / Dec
            of the store's last year). Every climatology comes from the training period.
        stats: normalisation statistics (pass the backbone's); what they lack (``tp``) is
            measured on the training period over the region.
        region: (south, north, west, east) in degrees, or ``None`` for the whole store;
            default :data:`DEFAULT_REGION`.
        design: "direct" (default: a head per lead, one pass, the authors') or "rollout"
            (6-h steps fed back); see the module docstring.
        lead_hours: evaluated leads, multiples of ``timestep`` (default 12, 24, 36); in the
            direct design, one head each.
        train_steps: roll-out steps trained (loss averaged over them); default 2 = 12 h.
            Roll-out design only.
        variable_weights: loss weight per variable (Aurora names); default {"tp": 5},
            others 1. 0 drops a variable from the loss (tp must keep a positive weight).
            Roll-out design only (the direct design's loss is on tp alone).
        tp_loss: "l1" (L1 of normalised totals; the direct design's default), "log" (MSE of
            the signed log transform; the roll-out design's default) or "mse" (normalised,
            linear).
        tp_log_scale_mm: the transform's scale ε (1 mm).
        dry_threshold_mm: SEEPS's dry threshold (0.1 mm for 6-h totals).
        surf_vars, atmos_vars, static_vars, levels, names: the state (precipitation is
            added to the surface variables if absent); ``levels=None``: every store level.
        history, timestep: input times and their spacing, which is also the leads' unit:
            12 h in the direct design (t − 12 h and t, the authors'), 6 h in the roll-out
            design (the accumulation window, the model's step).
        grid: the backbone's grid rule, checked on the region (None: unchecked).
        in_memory: passed to the reader.
    """

    name = "precipitation"

    # Above radon C on purpose: validates every task option (design, heads, region, leads) before reading data.
    def __init__(self, store: str | os.PathLike | xr.Dataset | None = None,
                 periods: Mapping[str, tuple[datetime | str, datetime | str]] | None = None,
                 stats: NormalisationStats | None = None, *,
                 region: Sequence[float] | None = DEFAULT_REGION,
                 design: str = "direct",
                 head_form: str = "residual",
                 lead_hours: Sequence[float] = (12, 24, 36),
                 train_steps: int | None = None,
                 variable_weights: Mapping[str, float] | None = None,
                 tp_loss: str | None = None,
                 tp_log_scale_mm: float = 1.0,
                 dry_threshold_mm: float = 0.1,
                 surf_vars: Sequence[str] = _DEFAULT_SPEC.surf_vars,
                 atmos_vars: Sequence[str] = _DEFAULT_SPEC.atmos_vars,
                 static_vars: Sequence[str] = _DEFAULT_SPEC.static_vars,
                 levels: Sequence[float] | None = None,
                 history: int = 2,
                 timestep: timedelta | None = None,
                 grid: PatchGrid | None = AURORA_TINY_GRID,
                 names: Mapping[str, str] | None = None,
                 in_memory: bool | None = None):
        if store is None or (isinstance(store, str) and not store):  # "": the default too
            from weatherpeft.data.builtin import store_path
            store = store_path("regional")
        if design not in DESIGNS:
            raise ValueError(f"unknown precipitation design {design!r}; known: {list(DESIGNS)}")
        direct = design == "direct"
        if direct and (train_steps is not None or variable_weights is not None):
            raise ValueError("train_steps and variable_weights belong to the roll-out design; "
                             "the direct design trains every lead in one pass on tp alone")
        tp_loss = tp_loss or ("l1" if direct else "log")
        if tp_loss not in TP_LOSSES:
            raise ValueError(f"tp_loss must be one of {list(TP_LOSSES)}, got {tp_loss!r}")
        train_steps = 2 if train_steps is None else train_steps
        if tp_log_scale_mm <= 0 or dry_threshold_mm <= 0:
            raise ValueError(f"tp_log_scale_mm and dry_threshold_mm must be positive, got "
                             f"{tp_log_scale_mm}, {dry_threshold_mm}")
        if train_steps < 1:
            raise ValueError(f"train_steps must be at least 1, got {train_steps}")
        self.design = design
        if head_form not in HEAD_FORMS:
            raise ValueError(f"head_form must be one of {list(HEAD_FORMS)}, got {head_form!r}")
        self.head_form = head_form
        if timestep is None:
            timestep = timedelta(hours=12 if direct else 6)
        self.timestep = pd.Timedelta(timestep).to_pytimedelta()
        lead_steps = []
        for hours in lead_hours:
            steps = timedelta(hours=float(hours)) / self.timestep
            if steps < 1 or not float(steps).is_integer():
                raise ValueError(f"lead {hours} h is not a positive multiple of the {self.timestep} step")
            lead_steps.append(int(steps))
        if not lead_steps:
            raise ValueError("lead_hours must name at least one lead")
        self.lead_steps = tuple(sorted(set(lead_steps)))
        #: lead step → its head (direct design; empty for the roll-out).
        self.heads = {step: lead_head(step * self.timestep.total_seconds() / 3600)
                      for step in self.lead_steps} if direct else {}
        self.train_steps = int(train_steps)
        self.history = int(history)
        self.tp_loss = tp_loss
        self.dry_threshold_mm = float(dry_threshold_mm)
        self.region = None if region is None else tuple(float(v) for v in region)

        names = dict(names or {})
        table = {**STORE_NAMES, **names}
        precipitation = "total_precipitation_6hr"
        surf = [v for v in surf_vars if table.get(v, v) != precipitation] + [precipitation]
        ds = canonicalise(store, names) if isinstance(store, xr.Dataset) else open_store(store, names)
        self.source = str(ds.attrs.get(SOURCE_ATTR, "<in-memory dataset>"))
        if precipitation not in ds.data_vars:
            raise ValueError(f"the precipitation task needs '{precipitation}' (Aurora's 'tp') in store "
                             f"{self.source}; it has {sorted(map(str, ds.data_vars))} (map another "
                             "name to it with names=)")
        units = str(ds[precipitation].attrs.get("units", "")).strip()
        if units not in _MM_PER_UNIT:
            if units:
                raise ValueError(f"unknown precipitation units {units!r} in {self.source}; "
                                 f"known: {sorted(_MM_PER_UNIT)}")
            log.warning("%s: '%s' has no units attribute; assuming metres (WeatherBench2)",
                        self.source, precipitation)
        self.mm_per_unit = _MM_PER_UNIT.get(units, 1000.0)
        self.tp_log_scale = float(tp_log_scale_mm) / self.mm_per_unit  # store units

        self._ds = crop_region(ds, self.region)
        if grid is not None:
            height, width = self._ds.sizes["latitude"], self._ds.sizes["longitude"]
            grid.check(height, width, f"region {self.region} of {self.source}")
            # Aurora drops the southernmost row of a grid with one row over (both poles): so do
            # the samples, climatologies and scores (canonical stores run south to north).
            self._ds = self._ds.isel(latitude=slice(height - grid.used_rows(height), None))
        if periods is None:
            periods = default_periods(self._ds)
        missing = [split for split in SPLITS if split not in periods]
        if missing:
            raise ValueError(f"periods must give {list(SPLITS)}; missing {missing}")
        self.periods = {split: tuple(periods[split]) for split in SPLITS}
        self._base_spec = SampleSpec(surf_vars=tuple(surf), atmos_vars=tuple(atmos_vars),
                                     static_vars=tuple(static_vars),
                                     levels=None if levels is None else tuple(levels),
                                     history=self.history, lead=timedelta(0), step=self.timestep,
                                     names=names, in_memory=in_memory)
        self._selection = select(self._ds, self.spec("train"))
        sel = self._selection
        self.stats = complete_stats(stats, self._ds, self.spec("train"))
        new_surf = tuple(self.heads.values()) or (PRECIPITATION,)
        surf_names = [v for v in sel.surf.values() if not (direct and v == PRECIPITATION)]
        self._variables = TaskVariables(surf_vars=(*surf_names, *self.heads.values()),
                                        atmos_vars=tuple(sel.atmos.values()),
                                        static_vars=tuple(sel.static.values()),
                                        levels=tuple(sel.levels), new_surf_vars=new_surf)
        if direct:  # every head is normalised as tp is
            self.stats = dataclasses.replace(
                self.stats,
                locations={**self.stats.locations,
                           **dict.fromkeys(self.heads.values(), self.stats.locations[PRECIPITATION])},
                scales={**self.stats.scales,
                        **dict.fromkeys(self.heads.values(), self.stats.scales[PRECIPITATION])})

        weights = {PRECIPITATION: 5.0, **dict(variable_weights or {})}
        known = list(sel.dynamic.values())
        unknown = sorted(set(weights) - set(known))
        if unknown:
            raise ValueError(f"variable_weights names unknown variables {unknown}; the task has {known}")
        if any(w < 0 for w in weights.values()) or weights[PRECIPITATION] <= 0:
            raise ValueError(f"variable weights must be ≥ 0, and tp's positive; got {weights}")
        self.variable_weights = {v: float(weights.get(v, 1.0)) for v in known}

        # The training period's precipitation: climatologies and the log-loss scale.
        train = sel.positions
        totals = read_fields(self._ds, precipitation, train)
        check_finite(totals, precipitation, train, sel, self.source)
        self.tp_log_std = float(signed_log(torch.from_numpy(totals), self.tp_log_scale).std()) or 1.0
        self._training_totals = (_millimetres(torch.from_numpy(totals), self.mm_per_unit),
                                 sel.times[train])
        self._climatology: PrecipitationClimatology | None = None
        self._climatology_devices: dict[str, PrecipitationClimatology] = {}
        self._datasets: dict[str, Dataset] | None = None
        self._scales: dict[tuple, dict[str, torch.Tensor]] = {}

    # -- contract -----------------------------------------------------------------------

    @property
    def variables(self) -> TaskVariables:
        return self._variables

    @property
    def lead_hours(self) -> tuple[float, ...]:
        return tuple(step * self.timestep.total_seconds() / 3600 for step in self.lead_steps)

    @property
    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(latitudes decreasing, longitudes) of the region's cell centres."""
        return self._selection.lat, self._selection.lon

    def spec(self, split: str, *, history: int | None = None) -> SampleSpec:
        """The :class:`SampleSpec` of ``split``: ``history`` consecutive times, lead 0."""
        start, end = self.periods[split]
        return dataclasses.replace(self._base_spec, start=start, end=end,
                                   history=self.history if history is None else history)

    def datasets(self) -> dict[str, Dataset]:
        """Roll-out design: train / val :class:`RolloutWindows` with ``train_steps`` truth
        times, test with the longest lead's steps. Direct design: :class:`DirectHeadSamples`
        with every lead's truth in each split. Only initialisations whose whole window is in
        the period."""
        if self._datasets is None:
            def windows(split: str, steps: int) -> Dataset:
                dataset = WB2Dataset(self._ds, self.spec(split, history=self.history + steps))
                pairs = RolloutWindows(dataset, self.history)
                return DirectHeadSamples(pairs, self.heads.values()) if self.heads else pairs

            train_steps = max(self.lead_steps) if self.heads else self.train_steps
            self._datasets = {"train": windows("train", train_steps),
                              "val": windows("val", train_steps),
                              "test": windows("test", max(self.lead_steps))}
        return self._datasets

    def training_loss(self, model: torch.nn.Module, batch: tuple[Batch, Batch]) -> torch.Tensor:
        """Direct design: :meth:`loss` of one pass. Roll-out design: roll out as many steps as
        the truth holds; the mean of :meth:`loss` over them."""
        inputs, truth = batch
        if self.heads:
            return self.loss(self._head_totals(model(inputs), inputs), truth)
        steps = first_dynamic(truth).shape[1]
        total = 0.0
        for step, prediction in enumerate(self.rollout(model, inputs, steps)):
            total = total + self.loss(prediction, _time_slice(truth, step))
        return total / steps

    def loss(self, prediction: Batch, target: Batch) -> torch.Tensor:
        """Direct design (``prediction`` with its heads as totals, as :meth:`training_loss`
        passes it): the mean over heads of the latitude-weighted penalty (``tp_loss``)
        of each head's error against tp at its lead (target[:, k − 1]). Roll-out design, one
        step: weighted mean of per-variable latitude-weighted MSEs of normalised fields; tp
        compared under ``tp_loss``."""
        if self.heads:
            return self._direct_loss(prediction, target)
        device = first_dynamic(prediction).device
        scales = self._scale_tensors(target.metadata.atmos_levels, device)
        weights = latitude_weights(target.metadata.lat).to(device=device, dtype=torch.float32)[:, None]
        total, weight_sum = 0.0, 0.0
        for group in ("surf_vars", "atmos_vars"):
            truths, predictions = getattr(target, group), getattr(prediction, group)
            for name, truth in truths.items():
                weight = self.variable_weights[name]
                if weight == 0:
                    continue
                if name not in predictions:
                    raise KeyError(f"prediction has no {group[:-5]} variable '{name}'")
                predicted, truth = predictions[name].float(), truth.to(device).float()
                if predicted.shape != truth.shape:
                    raise ValueError(f"'{name}': prediction shape {tuple(predicted.shape)} differs "
                                     f"from target shape {tuple(truth.shape)}")
                if name == PRECIPITATION:
                    penalty = self._tp_penalty(predicted, truth, scales[name])
                else:
                    penalty = ((predicted - truth) / scales[name]).square()
                term = (penalty * weights).mean(dim=(-2, -1)).mean()
                total = total + weight * term
                weight_sum += weight
        return total / weight_sum

    def _tp_penalty(self, predicted: torch.Tensor, truth: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
        """Pointwise penalty of tp errors: |e| (``l1``) or e² on normalised totals, e in the
        signed log transform (``log``) or linear (``l1``, ``mse``)."""
        if self.tp_loss == "log":
            error = (signed_log(predicted, self.tp_log_scale)
                     - signed_log(truth, self.tp_log_scale)) / self.tp_log_std
        else:
            error = (predicted - truth) / scale
        return error.abs() if self.tp_loss == "l1" else error.square()

    def _direct_loss(self, prediction: Batch, target: Batch) -> torch.Tensor:
        device = first_dynamic(prediction).device
        scale = torch.tensor(self.stats.scales[PRECIPITATION], dtype=torch.float32, device=device)
        weights = latitude_weights(target.metadata.lat).to(device=device, dtype=torch.float32)[:, None]
        truth = target.surf_vars[PRECIPITATION].to(device).float()
        terms = []
        for step, head in self.heads.items():
            if head not in prediction.surf_vars:
                raise KeyError(f"prediction has no head '{head}' (build the backbone with the "
                               "task's new surface variables)")
            predicted = prediction.surf_vars[head].float()
            observed = truth[:, step - 1:step]
            if predicted.shape != observed.shape:
                raise ValueError(f"'{head}': prediction shape {tuple(predicted.shape)} differs "
                                 f"from target shape {tuple(observed.shape)}")
            penalty = self._tp_penalty(predicted, observed, scale)
            terms.append((penalty * weights).mean(dim=(-2, -1)).mean())
        return torch.stack(terms).mean()

    def forecasts(self, model: torch.nn.Module, inputs: Batch,
                  steps: Sequence[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(step, forecast tp (B, H, W) in store units) for each lead step in ``steps``: from
        the heads of one pass (direct) or a roll-out to the longest (roll-out design)."""
        if self.heads:
            prediction = self._head_totals(model(inputs), inputs)
            for step in steps:
                yield step, prediction.surf_vars[self.heads[step]][:, -1]
            return
        for step, prediction in enumerate(self.rollout(model, inputs, max(steps)), start=1):
            if step in steps:
                yield step, prediction.surf_vars[PRECIPITATION][:, -1]

    def _head_totals(self, prediction: Batch, inputs: Batch) -> Batch:
        """The heads as totals: as predicted (``absolute``), or persistence plus the head's
        normalised output times tp's scale (``residual``: the head predicts the change)."""
        if self.head_form == "absolute":
            return prediction
        now = self.observed_now(inputs)[:, None].to(first_dynamic(prediction).device)
        location = self.stats.locations[PRECIPITATION]
        surf = dict(prediction.surf_vars)
        surf.update({head: now + (surf[head] - location) for head in self.heads.values()})
        return dataclasses.replace(prediction, surf_vars=surf)

    def observed_now(self, inputs: Batch) -> torch.Tensor:
        """The last observed 6-h total of an input batch (B, H, W), store units: persistence."""
        name = next(iter(self.heads.values())) if self.heads else PRECIPITATION
        return inputs.surf_vars[name][:, -1]

    def sample_prediction(self, model: torch.nn.Module, split: str,
                          index: int) -> tuple[Batch, Batch]:
        """(prediction, truth) at the first lead, tp under its own name (for maps)."""
        inputs, truth = self.collated_sample(split, index)
        step = self.lead_steps[0]
        _, forecast = next(self.forecasts(model, inputs.to(module_device(model)), [step]))
        truth = _time_slice(truth, step - 1)
        prediction = dataclasses.replace(truth, surf_vars={PRECIPITATION: forecast[:, None]},
                                         atmos_vars={})
        return prediction, dataclasses.replace(truth, surf_vars={
            PRECIPITATION: truth.surf_vars[PRECIPITATION]}, atmos_vars={})

    def rollout(self, model: torch.nn.Module, inputs: Batch, steps: int) -> Iterator[Batch]:
        """``steps`` predictions 6 h apart; each fed back with its precipitation clipped at 0."""
        batch = inputs
        for _ in range(steps):
            prediction = model(batch)
            yield prediction
            batch = advance_history(batch, _clip_precipitation(prediction), self.timestep)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Iterable[tuple[Batch, Batch]],
                 *, references: bool = True) -> dict[str, float]:
        """SEEPS, ACC and RMSE of tp (mm) per lead for the model (and, when ``references``,
        persistence and climatology); see the module docstring. ``loader`` yields (input,
        truth) with truth[:, k − 1] the state k steps after the input's last time; leads
        the truth does not reach are skipped. Empty loader → ``{}``.

        Every total is clipped at 0 before scoring: the model's (a negative total is
        unphysical; clipping can only bring it closer to the truth) and the data's (packed
        reanalysis totals can be a rounding error below 0, which SEEPS refuses).
        """
        was_training = model.training
        model.eval()
        device = module_device(model)
        climatology = self._climatology_on(device)
        lat = torch.from_numpy(self._selection.lat.copy())
        sums: dict[tuple[str, str, int], float] = {}
        counts: dict[int, int] = {}
        try:
            for inputs, truth in loader:
                inputs, truth = inputs.to(device), truth.to(device)
                available = first_dynamic(truth).shape[1]
                steps = [s for s in self.lead_steps if s <= available]
                if not steps:
                    continue
                size = first_dynamic(inputs).shape[0]
                persistence = _millimetres(self.observed_now(inputs), self.mm_per_unit)
                for step, predicted in self.forecasts(model, inputs, steps):
                    counts[step] = counts.get(step, 0) + size
                    observed = _millimetres(truth.surf_vars[PRECIPITATION][:, step - 1], self.mm_per_unit)
                    valid = [t + step * self.timestep for t in inputs.metadata.time]
                    normal = climatology.forecast(valid, device)
                    forecasts = {"model": _millimetres(predicted, self.mm_per_unit)}
                    if references:
                        forecasts["persistence"] = persistence
                        forecasts["climatology"] = normal
                    for source, forecast in forecasts.items():
                        scores = self._scores(forecast, observed, normal, climatology, lat,
                                              with_acc=source != "climatology")
                        for metric, value in scores.items():
                            key = (source, metric, step)
                            sums[key] = sums.get(key, 0.0) + value * size
        finally:
            model.train(was_training)
        return self._results(sums, counts)

    # -- helpers ------------------------------------------------------------------------

    def climatology(self) -> PrecipitationClimatology:
        """The training period's precipitation climatology (computed once)."""
        if self._climatology is None:
            totals, times = self._training_totals
            self._climatology = PrecipitationClimatology.from_training(totals, times,
                                                                       self.dry_threshold_mm)
        return self._climatology

    def _climatology_on(self, device: torch.device) -> PrecipitationClimatology:
        key = str(device)
        if key not in self._climatology_devices:
            self._climatology_devices[key] = self.climatology().to(device)
        return self._climatology_devices[key]

    def _scores(self, forecast: torch.Tensor, observed: torch.Tensor, normal: torch.Tensor,
                climatology: PrecipitationClimatology, lat: torch.Tensor, *, with_acc: bool,
                ) -> dict[str, float]:
        """Batch means of SEEPS, ACC and spatial MSE for (B, H, W) fields in mm."""
        scores = {"seeps": float(metrics.seeps(forecast / _MM_PER_M, observed / _MM_PER_M,
                                               climatology.dry_fraction,
                                               climatology.wet_threshold, lat,
                                               dry_threshold=self.dry_threshold_mm, dim=None))}
        if with_acc:
            scores["acc"] = float(metrics.acc(forecast, observed, normal, lat, dim=None))
        scores["mse"] = float(spatial_mse(forecast.double(), observed.double(), lat).mean())
        return scores

    def _results(self, sums: dict, counts: dict[int, int]) -> dict[str, float]:
        results: dict[str, float] = {}
        for step in sorted(counts):
            lead = step * self.timestep
            for source in SOURCES:
                for metric in ("seeps", "acc", "mse"):
                    key = (source, metric, step)
                    if key not in sums:
                        continue
                    value = sums[key] / counts[step]
                    if metric == "mse":
                        metric, value = "rmse", float(np.sqrt(value))
                    results[metric_key(source, metric, PRECIPITATION, lead)] = float(value)
        return results

    def _scale_tensors(self, levels: tuple, device: torch.device) -> dict[str, torch.Tensor]:
        """σ per variable, broadcastable to its field (cached per levels and device)."""
        key = (tuple(levels), str(device))
        if key not in self._scales:
            self._scales[key] = scale_tensors(self.stats.scales, self._selection.surf.values(),
                                              self._selection.atmos.values(), levels, device)
        return self._scales[key]


def _millimetres(totals: torch.Tensor, mm_per_unit: float) -> torch.Tensor:
    """Totals in mm (float32), negative values set to 0."""
    return totals.float().clamp(min=0) * mm_per_unit


def _clip_precipitation(prediction: Batch) -> Batch:
    """The prediction with its precipitation clipped at 0 (what a roll-out feeds back)."""
    if PRECIPITATION not in prediction.surf_vars:
        return prediction
    surf = dict(prediction.surf_vars)
    surf[PRECIPITATION] = surf[PRECIPITATION].clamp(min=0)
    return dataclasses.replace(prediction, surf_vars=surf)
