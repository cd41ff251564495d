"""Medium-range forecasting, the pretraining task (Aurora-style): predict t + 6 h from t − 6 h, t.

Training pairs come from a WeatherBench2-layout store. The loss is a latitude-weighted MSE
on normalised fields. Evaluation rolls the model out autoregressively and scores it, and
two reference forecasts (persistence and a training-period climatology), with WeatherBench2's
latitude-weighted RMSE per variable and level at each lead time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from aurora import Batch, Metadata
from aurora.normalisation import level_to_str
from torch.utils.data import Dataset

from weatherpeft.atomic import torch_save
from weatherpeft.data.stats import NormalisationStats, compute_stats
from weatherpeft.data.wb2 import (
    SOURCE_ATTR,
    SampleSpec,
    StoreSelection,
    WB2Dataset,
    canonicalise,
    check_finite,
    open_period,
    open_store,
    read_fields,
    select,
    time_blocks,
)
from weatherpeft.metrics import latitude_weights
from weatherpeft.tasks.base import SPLITS, Task, TaskVariables
from weatherpeft.tasks.grid import AURORA_TINY_GRID, PatchGrid
from weatherpeft.tasks.scoring import (
    accumulate,
    batch_device,
    channel_name,
    channel_values,
    crop_rows,
    first_dynamic,
    match_rows,
    module_device,
    scale_tensors,
)

__all__ = [
    "Climatology",
    "ForecastingTask",
    "RolloutWindows",
    "advance_history",
    "channel_name",
    "compute_climatology",
    "metric_key",
    "rollout",
]

log = logging.getLogger(__name__)

_DEFAULT_SPEC = SampleSpec()
_CLIMATOLOGY_FORMAT = "weatherpeft.climatology/1"
#: The forecasts :meth:`ForecastingTask.evaluate` scores.
SOURCES = ("model", "persistence", "climatology")


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def metric_key(source: str, metric: str, channel: str, lead: timedelta) -> str:
    """``"{source}/{metric}/{channel}/{hours}h"``, e.g. ``"model/rmse/z500/72h"``."""
    hours = lead.total_seconds() / 3600
    return f"{source}/{metric}/{channel}/{int(hours) if float(hours).is_integer() else hours}h"


# --------------------------------------------------------------------------------------
# Roll-out for any Batch → Batch module
# --------------------------------------------------------------------------------------


def advance_history(batch: Batch, prediction: Batch, timestep: timedelta | None = None) -> Batch:
    """The next roll-out input: drop the oldest history step, append the prediction.

    Every dynamic variable of ``batch`` must be in ``prediction`` (output-only variables of
    the prediction are dropped). Static fields come from ``batch``. The new time is the old
    one plus ``timestep`` when given (so a module that leaves metadata alone still rolls
    forward correctly), else the prediction's; ``rollout_step`` goes up by one.
    """
    height = prediction.spatial_shape[0]
    batch = crop_rows(batch, height)

    def advance(previous: dict[str, torch.Tensor], new: dict[str, torch.Tensor], kind: str):
        missing = sorted(set(previous) - set(new))
        if missing:
            raise KeyError(f"cannot roll out: the prediction has no {kind} variable(s) {missing}")
        return {k: torch.cat([v[:, 1:], new[k].to(v.dtype)], dim=1) for k, v in previous.items()}

    meta = batch.metadata
    time = tuple(t + timestep for t in meta.time) if timestep is not None \
        else tuple(prediction.metadata.time)
    return Batch(surf_vars=advance(batch.surf_vars, prediction.surf_vars, "surface"),
                 static_vars=dict(batch.static_vars),
                 atmos_vars=advance(batch.atmos_vars, prediction.atmos_vars, "atmospheric"),
                 metadata=Metadata(lat=meta.lat, lon=meta.lon, time=time,
                                   atmos_levels=meta.atmos_levels,
                                   rollout_step=meta.rollout_step + 1))


def rollout(model: torch.nn.Module, batch: Batch, steps: int,
            timestep: timedelta | None = None) -> Iterator[Batch]:
    """Yield the predictions of an autoregressive roll-out of ``steps`` steps.

    Like ``aurora.rollout`` for any module whose forward maps a Batch to a Batch: each
    prediction is fed back as the newest history step (:func:`advance_history`). A module
    with Aurora's ``apply_rollout_input_clipping`` gets its predictions clipped before
    they are fed back (the yielded prediction is unclipped).
    """
    clip = getattr(model, "apply_rollout_input_clipping", None)
    for _ in range(steps):
        prediction = model(batch)
        yield prediction
        fed_back = clip(prediction) if callable(clip) else prediction
        batch = advance_history(batch, fed_back, timestep)


# --------------------------------------------------------------------------------------
# Roll-out windows: initial conditions with the truth at every step
# --------------------------------------------------------------------------------------


class RolloutWindows(Dataset):
    """(input, truth) pairs for roll-out evaluation from one window dataset.

    ``windows`` must serve ``history + steps`` consecutive times with lead 0. Input: the
    first ``history`` times (metadata time = the last of them, the initialisation). Truth:
    the next ``steps`` times, shaped (1, steps, …): truth[:, k − 1] verifies step k. One
    store read per window, and only initialisations whose whole window exists.
    """

    def __init__(self, windows: WB2Dataset, history: int):
        if windows.spec.lead != timedelta(0) or windows.spec.history <= history:
            raise ValueError("RolloutWindows needs a WB2Dataset with lead 0 and history "
                             f"> {history} (input history + roll-out steps)")
        self.windows = windows
        self.history = history
        self.steps = windows.spec.history - history

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[Batch, Batch]:
        window, _ = self.windows[index]
        times, _ = self.windows.sample_times(index)
        h = self.history

        def part(times_slice: slice, time: datetime) -> Batch:
            return Batch(surf_vars={k: v[:, times_slice] for k, v in window.surf_vars.items()},
                         static_vars=dict(window.static_vars),
                         atmos_vars={k: v[:, times_slice] for k, v in window.atmos_vars.items()},
                         metadata=dataclasses.replace(window.metadata, time=(time,)))

        return part(slice(0, h), times[h - 1]), part(slice(h, None), times[h])


# --------------------------------------------------------------------------------------
# Climatology
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Climatology:
    """Mean field per (calendar month, hour of day) over a training period.

    ``fields[name]`` is (R, H, W) for surface and (R, C, H, W) for atmospheric variables
    (Aurora names, levels ``levels``, latitude decreasing), float32. ``table[m − 1, h]``
    is the row for month m, hour h: the mean of the training times in that month at that
    hour; where the period has none, the mean of that hour over all its months, and where
    it has none of that hour either, the mean over the whole period. ``counts[r]`` is how
    many times went into row r.
    """

    fields: dict[str, torch.Tensor]
    table: torch.Tensor  # (12, 24) int64
    counts: torch.Tensor  # (R,) int64
    levels: tuple[int | float, ...]
    period: tuple[str, str]
    source: str = ""

    def rows(self, times: Sequence[datetime | np.datetime64 | pd.Timestamp]) -> torch.Tensor:
        """Row index of each valid time."""
        stamps = pd.DatetimeIndex(list(times))
        months = np.array(stamps.month, dtype=np.int64) - 1
        hours = np.array(stamps.hour, dtype=np.int64)
        return self.table[torch.from_numpy(months), torch.from_numpy(hours)]

    def forecast(self, name: str, times: Sequence, device: torch.device | str | None = None,
                 ) -> torch.Tensor:
        """Climatological forecast of ``name`` for each valid time: (B, [C,] H, W)."""
        field = self.fields[name]
        rows = self.rows(times)
        if device is not None and field.device != torch.device(device):
            field = field.to(device)
        return field[rows.to(field.device)]

    def to(self, device: torch.device | str) -> Climatology:
        """A copy with the fields on ``device``."""
        return dataclasses.replace(self, fields={k: v.to(device) for k, v in self.fields.items()})

    # -- files -------------------------------------------------------------------------

    def _describe(self) -> dict:
        return {"format": _CLIMATOLOGY_FORMAT, "period": list(self.period),
                "levels": [float(x) for x in self.levels], "source": self.source,
                "variables": sorted(self.fields),
                "shapes": {k: list(v.shape) for k, v in sorted(self.fields.items())}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write tensors + description with ``torch.save`` atomically (temp file, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {"description": self._describe(), "fields": dict(self.fields),
                   "table": self.table, "counts": self.counts,
                   "levels": list(self.levels)}
        return torch_save(path, content)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Climatology:
        """Read a file written by :meth:`save` (tensors only: ``weights_only=True``)."""
        path = Path(path)
        try:
            content = torch.load(path, weights_only=True, map_location="cpu")
            description = content["description"]
            if description.get("format") != _CLIMATOLOGY_FORMAT:
                raise ValueError(f"format is {description.get('format')!r}")
            return cls(fields=dict(content["fields"]), table=content["table"],
                       counts=content["counts"], levels=tuple(content["levels"]),
                       period=tuple(description["period"]), source=description["source"])
        except Exception as error:  # a truncated or foreign file raises many types
            raise ValueError(f"{path} is not a readable weatherpeft climatology: {error}") from error

    def matches(self, selection: StoreSelection, source: str) -> bool:
        """Whether this climatology was computed for this selection (period, vars, grid)."""
        period = (str(pd.Timestamp(selection.start)), str(pd.Timestamp(selection.end)))
        names = set(selection.dynamic.values())
        height, width = len(selection.lat), len(selection.lon)
        return (tuple(self.period) == period and self.source == source
                and set(self.fields) == names
                and tuple(float(x) for x in self.levels) == tuple(float(x) for x in selection.levels)
                and all(v.shape[-2:] == (height, width) for v in self.fields.values()))


def compute_climatology(source: str | os.PathLike | xr.Dataset, spec: SampleSpec,
                        block_bytes: int = 64 * 2**20) -> Climatology:
    """Mean of ``spec``'s dynamic variables per (month, hour of day) over [spec.start, spec.end].

    Every store time in the (inclusive) period counts; nothing outside it is read, so a
    climatology of the training period never sees evaluation years. Reads block by block
    with float64 sums. See :class:`Climatology` for the fallbacks of empty slots.
    """
    ds, selection, name_of_source = open_period(source, spec, "compute_climatology")
    positions = selection.positions
    stamps = pd.DatetimeIndex(selection.times[positions])
    slot_of_time = (stamps.month.to_numpy() - 1) * 24 + stamps.hour.to_numpy()
    slots, slot_index = np.unique(slot_of_time, return_inverse=True)
    hours = np.unique(slots % 24)
    slot_counts = np.bincount(slot_index, minlength=len(slots)).astype(np.float64)

    # Rows: one per (month, hour) present, one per hour present, one overall.
    table = np.full((12, 24), len(slots) + len(hours), dtype=np.int64)
    for position, hour in enumerate(hours):
        table[:, hour] = len(slots) + position
    for position, slot in enumerate(slots):
        table[slot // 24, slot % 24] = position
    hour_counts = np.array([slot_counts[slots % 24 == h].sum() for h in hours])
    counts = np.concatenate([slot_counts, hour_counts, [slot_counts.sum()]]).astype(np.int64)

    fields: dict[str, torch.Tensor] = {}
    for name, aurora_name in selection.dynamic.items():
        sums = None
        offset = 0
        for chunk in time_blocks(selection, positions, block_bytes):
            values = read_fields(ds, name, chunk, selection.level_index)
            check_finite(values, name, chunk, selection, name_of_source)
            if sums is None:
                sums = np.zeros((len(slots),) + values.shape[1:], dtype=np.float64)
            np.add.at(sums, slot_index[offset:offset + len(chunk)], values.astype(np.float64))
            offset += len(chunk)
        shape = (1,) * (sums.ndim - 1)
        by_hour = np.stack([sums[slots % 24 == h].sum(axis=0) for h in hours])
        totals = np.concatenate([sums, by_hour, sums.sum(axis=0, keepdims=True)])
        means = totals / counts.reshape(-1, *shape)
        fields[aurora_name] = torch.from_numpy(means.astype(np.float32))
    period = (str(pd.Timestamp(selection.start)), str(pd.Timestamp(selection.end)))
    return Climatology(fields=fields, table=torch.from_numpy(table),
                       counts=torch.from_numpy(counts), levels=tuple(selection.levels),
                       period=period, source=name_of_source)


def tendency_scales(source: str | os.PathLike | xr.Dataset, spec: SampleSpec,
                    block_bytes: int = 64 * 2**20) -> dict[str, float]:
    """Latitude-weighted RMS of the one-step change of each variable (and level) over [start, end].

    Keys as in :class:`NormalisationStats` ("2t", "z_500"). Dividing forecast errors by
    these instead of the state's standard deviation weights each variable by how hard it
    is to beat persistence (as GraphCast normalises its residual targets): slowly changing
    fields such as temperature are no longer drowned by fast ones such as wind.
    """
    ds, selection, name_of_source = open_period(source, spec, "tendency_scales")
    weights = latitude_weights(selection.lat).numpy()
    scales: dict[str, float] = {}
    for name, aurora_name in selection.dynamic.items():
        squares, count = None, 0
        for chunk in time_blocks(selection, selection.positions, block_bytes):
            values = read_fields(ds, name, chunk, selection.level_index).astype(np.float64)
            check_finite(values, name, chunk, selection, name_of_source)
            consecutive = np.diff(selection.times[chunk].astype(np.int64)) == selection.step_ns
            change = np.diff(values, axis=0)[consecutive]
            if values.ndim == 3:
                change = change[:, None]
            term = np.einsum("nchw,h->c", change**2, weights) / (change.shape[-1] * change.shape[-2])
            squares = term if squares is None else squares + term
            count += int(consecutive.sum())
        if not count:
            raise ValueError(f"no consecutive time steps of '{name}' in the period of {name_of_source}")
        rms = np.sqrt(squares / count)
        if name in selection.atmos:
            for level, value in zip(selection.levels, rms):
                scales[f"{aurora_name}_{level_to_str(level)}"] = float(value)
        else:
            scales[aurora_name] = float(rms[0])
    return scales


# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------


class ForecastingTask(Task):
    """6-hour-ahead forecasting of every variable from two input times (Aurora pretraining).

    ``periods`` maps "train", "val" and "test" to inclusive (start, end) date ranges; every
    time a sample touches lies inside its split's range. ``stats`` normalises the loss (if
    omitted, computed from the training period). ``lead_steps`` are the roll-out lengths
    evaluated (1, 4, 12 steps = 6, 24, 72 h). ``climatology_path`` caches the climatology
    on disk (recomputed when it does not match the store, period, variables or grid).
    ``grid``: the backbone's grid rule, checked on the store's grid (None: unchecked).

    Loss: with e = (prediction − target) / scale (per variable and per level; the
    location cancels; ``loss_scales`` = the statistics' standard deviations by default, or
    ``"tendency"`` for the RMS one-step change, see :func:`tendency_scales`), the
    latitude-weighted spatial mean of e² averaged over batch and time gives one term per surface
    variable and per (atmospheric variable, level). An
    atmospheric variable's term is the mean over its levels; the loss is the mean over
    variables (weighted by ``variable_weights``, default 1 each). So every variable
    counts equally whatever its number of levels, and within it every level counts equally.
    """

    name = "forecasting"

    def __init__(self, store: str | os.PathLike | xr.Dataset,
                 periods: Mapping[str, tuple[datetime | str, datetime | str]],
                 stats: NormalisationStats | None = None, *,
                 surf_vars: Sequence[str] = _DEFAULT_SPEC.surf_vars,
                 atmos_vars: Sequence[str] = _DEFAULT_SPEC.atmos_vars,
                 static_vars: Sequence[str] = _DEFAULT_SPEC.static_vars,
                 levels: Sequence[float] | None = None,
                 history: int = 2,
                 timestep: timedelta = timedelta(hours=6),
                 lead_steps: Sequence[int] = (1, 4, 12),
                 variable_weights: Mapping[str, float] | None = None,
                 names: Mapping[str, str] | None = None,
                 in_memory: bool | None = None,
                 climatology_path: str | os.PathLike | None = None,
                 loss_scales: Mapping[str, float] | str | None = None,
                 grid: PatchGrid | None = AURORA_TINY_GRID):
        missing = [split for split in SPLITS if split not in periods]
        if missing:
            raise ValueError(f"periods must give {list(SPLITS)}; missing {missing}")
        if not lead_steps or min(lead_steps) < 1:
            raise ValueError(f"lead_steps must be positive roll-out step counts, got {lead_steps}")
        self.store = store
        self.periods = {split: tuple(periods[split]) for split in SPLITS}
        self.history = int(history)
        self.timestep = pd.Timedelta(timestep).to_pytimedelta()
        self.lead_steps = tuple(sorted({int(s) for s in lead_steps}))
        self.climatology_path = Path(climatology_path) if climatology_path else None
        self._base_spec = SampleSpec(surf_vars=tuple(surf_vars), atmos_vars=tuple(atmos_vars),
                                     static_vars=tuple(static_vars),
                                     levels=None if levels is None else tuple(levels),
                                     history=self.history, lead=self.timestep, step=self.timestep,
                                     names=dict(names or {}), in_memory=in_memory)
        ds = canonicalise(store, self._base_spec.names) if isinstance(store, xr.Dataset) else \
            open_store(store, self._base_spec.names)
        self.source = str(ds.attrs.get(SOURCE_ATTR, "<in-memory dataset>"))
        self._selection = select(ds, self.spec("train"))
        sel = self._selection
        if grid is not None:
            grid.check(len(sel.lat), len(sel.lon), f"store {self.source}")
        self._variables = TaskVariables.from_selection(sel)
        self.stats = stats if stats is not None else compute_stats(store, self.spec("train"))
        if loss_scales == "tendency":
            loss_scales = tendency_scales(store, self.spec("train"))
        elif isinstance(loss_scales, str):
            raise ValueError(f"loss_scales must be 'tendency', a mapping or None, got {loss_scales!r}")
        self.loss_scales = dict(loss_scales) if loss_scales is not None else dict(self.stats.scales)
        self._check_stats()
        weights = dict(variable_weights or {})
        unknown = set(weights) - set(sel.dynamic.values())
        if unknown:
            raise ValueError(f"variable_weights names unknown variables {sorted(unknown)}; "
                             f"the task has {list(sel.dynamic.values())}")
        self.variable_weights = {v: float(weights.get(v, 1.0)) for v in sel.dynamic.values()}
        self._datasets: dict[str, Dataset] | None = None
        self._climatology: Climatology | None = None
        self._climatology_devices: dict[str, Climatology] = {}
        self._scales: dict[tuple, dict[str, torch.Tensor]] = {}

    # -- contract -----------------------------------------------------------------------

    @property
    def variables(self) -> TaskVariables:
        return self._variables

    def spec(self, split: str, *, history: int | None = None,
             lead: timedelta | None = None) -> SampleSpec:
        """The :class:`SampleSpec` of ``split`` (optionally with another history or lead)."""
        start, end = self.periods[split]
        return dataclasses.replace(self._base_spec, start=start, end=end,
                                   history=self.history if history is None else history,
                                   lead=self.timestep if lead is None else lead)

    def datasets(self) -> dict[str, Dataset]:
        """train/val: (input, +6 h target) pairs; test: :class:`RolloutWindows` for the
        longest lead (only initialisations whose whole roll-out lies in the test period)."""
        if self._datasets is None:
            windows = WB2Dataset(self.store, self.spec(
                "test", history=self.history + max(self.lead_steps), lead=timedelta(0)))
            self._datasets = {"train": WB2Dataset(self.store, self.spec("train")),
                              "val": WB2Dataset(self.store, self.spec("val")),
                              "test": RolloutWindows(windows, self.history)}
        return self._datasets

    def loss(self, prediction: Batch, target: Batch) -> torch.Tensor:
        """Latitude-weighted MSE on normalised fields; see the class docstring for weights."""
        target = crop_rows(target, prediction.spatial_shape[0])
        device = batch_device(prediction)
        scales = self._scale_tensors(target.metadata.atmos_levels, device)
        weights = latitude_weights(target.metadata.lat).to(device=device, dtype=torch.float32)
        total, weight_sum = 0.0, 0.0
        for group in ("surf_vars", "atmos_vars"):
            truths, predictions = getattr(target, group), getattr(prediction, group)
            for name, truth in truths.items():
                if name not in predictions:
                    raise KeyError(f"prediction has no {group[:-5]} variable '{name}'")
                if predictions[name].shape != truth.shape:
                    raise ValueError(f"'{name}': prediction shape {tuple(predictions[name].shape)} "
                                     f"differs from target shape {tuple(truth.shape)}")
                error = (predictions[name].float() - truth.to(device).float()) / scales[name]
                term = (error.square() * weights[:, None]).mean(dim=(-2, -1)).mean()
                total = total + self.variable_weights[name] * term
                weight_sum += self.variable_weights[name]
        return total / weight_sum

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Iterable[tuple[Batch, Batch]],
                 *, references: bool = True) -> dict[str, float]:
        """Roll out and score: latitude-weighted RMSE per channel and lead, physical units.

        ``loader`` yields (input, truth) where truth[:, k − 1] is the state k steps after
        the input's last time (the test split, or the (input, +6 h) val pairs); each lead
        in ``lead_steps`` that the truth covers is scored. RMSE follows WeatherBench2:
        spatial MSE per initialisation, mean over initialisations, then the root. Keys:
        ``metric_key(source, "rmse", channel, lead)`` for source model, persistence
        (the last input) and climatology (:meth:`climatology`) when ``references``.
        Returns an empty dict for an empty loader.
        """
        was_training = model.training
        model.eval()
        device = module_device(model)
        climatology = self._climatology_on(device) if references else None
        sums: dict[tuple[str, str, int], torch.Tensor] = {}
        counts: dict[int, int] = {}
        try:
            for inputs, truth in loader:
                inputs, truth = inputs.to(device), truth.to(device)
                available = first_dynamic(truth).shape[1]  # truth times after the input
                steps = [s for s in self.lead_steps if s <= available]
                if not steps:
                    continue
                batch_size = first_dynamic(inputs).shape[0]
                predictions = rollout(model, inputs, max(steps), self.timestep)
                for step, prediction in enumerate(predictions, start=1):
                    if step not in steps:
                        continue
                    counts[step] = counts.get(step, 0) + batch_size
                    forecasts = {"model": prediction}
                    if references:
                        forecasts["persistence"] = _last_input(inputs)
                        valid = [t + step * self.timestep for t in inputs.metadata.time]
                        forecasts["climatology"] = _climatology_batch(climatology, valid, inputs)
                    verifying = _time_slice(truth, step - 1)
                    for source, forecast in forecasts.items():
                        self._accumulate(sums, source, step, forecast, verifying)
        finally:
            model.train(was_training)
        return self._results(sums, counts)

    def sample_prediction(self, model: torch.nn.Module, split: str,
                          index: int) -> tuple[Batch, Batch]:
        """(one-step prediction, truth 6 h later) for sample ``index`` of ``split``."""
        inputs, truth = self.collated_sample(split, index)
        prediction = model(inputs.to(module_device(model)))
        return prediction, _time_slice(truth, 0)

    # -- helpers ------------------------------------------------------------------------

    def climatology(self) -> Climatology:
        """The training-period climatology (computed once; cached on disk if configured)."""
        if self._climatology is not None:
            return self._climatology
        path = self.climatology_path
        if path is not None and path.exists():
            try:
                cached = Climatology.load(path)
                if cached.matches(self._selection, self.source):
                    self._climatology = cached
                    return cached
                log.info("climatology cache %s is for another selection; recomputing", path)
            except ValueError as error:
                log.warning("ignoring climatology cache: %s", error)
        climatology = compute_climatology(self.store, self.spec("train"))
        if path is not None:
            climatology.save(path)
        self._climatology = climatology
        return climatology

    def _climatology_on(self, device: torch.device) -> Climatology:
        """The climatology with its fields on ``device`` (copied once per device)."""
        key = str(device)
        if key not in self._climatology_devices:
            self._climatology_devices[key] = self.climatology().to(device)
        return self._climatology_devices[key]

    def _check_stats(self) -> None:
        keys = list(self._selection.surf.values())
        keys += [f"{name}_{level_to_str(level)}" for name in self._selection.atmos.values()
                 for level in self._selection.levels]
        for scales, what in ((self.stats.scales, "normalisation statistics"), (self.loss_scales, "loss scales")):
            missing = [key for key in keys if key not in scales]
            if missing:
                raise ValueError(f"{what} lack {missing} (they have {sorted(scales)[:20]}…)")

    def _scale_tensors(self, levels: tuple, device: torch.device) -> dict[str, torch.Tensor]:
        """Loss scale per variable, broadcastable to its field (cached per levels and device)."""
        key = (tuple(levels), str(device))
        if key not in self._scales:
            self._scales[key] = scale_tensors(self.loss_scales, self._selection.surf.values(),
                                              self._selection.atmos.values(), levels, device)
        return self._scales[key]

    def _accumulate(self, sums: dict, source: str, step: int, forecast: Batch,
                    truth: Batch) -> None:
        """Add Σ over the batch of the spatial MSE per channel into ``sums`` (float64)."""
        forecast, truth = match_rows(forecast, truth)
        weights = latitude_weights(truth.metadata.lat)[:, None]
        for group in ("surf_vars", "atmos_vars"):
            predicted = getattr(forecast, group)
            for name, observed in getattr(truth, group).items():
                if name not in predicted:
                    raise KeyError(f"the {source} forecast has no variable '{name}'")
                # (B, 1, [C,] H, W) → (B, [C]) spatial MSE, summed over the batch.
                error = predicted[name].float()[:, -1] - observed.float()[:, 0]
                accumulate(sums, (source, name, step),
                           (error.square() * weights.to(error)).mean(dim=(-2, -1)))

    def _results(self, sums: dict, counts: dict[int, int]) -> dict[str, float]:
        results: dict[str, float] = {}
        names = list(self._selection.dynamic.values())  # the task's variable order
        order = sorted(sums, key=lambda key: (key[2], SOURCES.index(key[0]), names.index(key[1])))
        for source, name, step in order:
            rmse = torch.sqrt(sums[(source, name, step)] / counts[step])
            for channel, value in channel_values(name, rmse, self._selection.levels):
                results[metric_key(source, "rmse", channel, step * self.timestep)] = value
        return results


def _time_slice(batch: Batch, index: int) -> Batch:
    """The batch at one time index (negative counts from the end), time axis kept (length 1)."""
    return dataclasses.replace(
        batch,
        surf_vars={k: v.narrow(1, index % v.shape[1], 1) for k, v in batch.surf_vars.items()},
        atmos_vars={k: v.narrow(1, index % v.shape[1], 1) for k, v in batch.atmos_vars.items()})


def _last_input(inputs: Batch) -> Batch:
    """Persistence: the newest input time as the forecast for every lead."""
    return _time_slice(inputs, -1)


def _climatology_batch(climatology: Climatology, valid: Sequence[datetime], like: Batch) -> Batch:
    """The climatological forecast for each valid time, as a Batch shaped like ``like``."""
    device = batch_device(like)
    return dataclasses.replace(
        like,
        surf_vars={k: climatology.forecast(k, valid, device)[:, None] for k in like.surf_vars},
        atmos_vars={k: climatology.forecast(k, valid, device)[:, None] for k in like.atmos_vars})
