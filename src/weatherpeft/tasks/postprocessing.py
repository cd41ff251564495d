"""Ensemble post-processing: a Gaussian forecast from the mean and spread of a raw ensemble.

Input: the mean and spread (standard deviation, ddof = 1 as WeatherBench2's
``EnsembleStddev``) over the members of a medium-range ensemble forecast at one lead (48 h
in the built-in world), read from a store in WeatherBench2's forecast layout (dims time =
initialisation, ``prediction_timedelta``, ``number`` = member, level, longitude, latitude).
Target: the verifying truth at init + lead from an analysis store (WB2 layout). Output: a
Gaussian N(μ, σ²) per variable and grid point; loss: its closed-form CRPS.

How σ comes out of an Aurora backbone: every forecast variable ``v`` gets a companion
variable ``v_spread`` (surface for surface variables, atmospheric for atmospheric ones). It
is an *input* — the raw ensemble spread, in physical units — and an *output* — the raw
σ head r — so the backbone adds a new patch embedding and a new output head for it
(:attr:`TaskVariables.new_surf_vars`/``new_atmos_vars``: task-head parameters, trainable
under every method). The mean μ is the prediction of ``v``'s own pretrained head: the
ensemble mean fills both history steps (a state with no tendency), Aurora predicts the
state. σ is kept positive by a softplus whose sharpness is the spread's own scale plus a
floor (:meth:`PostprocessingTask.sigma`). That is ``head_form="state"`` (the default).
``head_form="residual"`` is the authors' parameterisation: with o_v and o_s the normalised
outputs of ``v``'s and ``v_spread``'s heads, μ = μ_ens + o_v·σ_ens and σ = exp(o_s)·σ_ens
(plus the floor), so the heads predict a correction in units of the ensemble's own spread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import xarray as xr
from aurora import Batch, Metadata
from aurora.normalisation import level_to_str
from torch.utils.data import Dataset

from weatherpeft import metrics
from weatherpeft.data.builtin import store_path
from weatherpeft.data.forecast import ForecastStore, as_analysis
from weatherpeft.data.layout import AURORA_NAMES, canonical_name, level_positions, level_value, source_of
from weatherpeft.data.stats import NormalisationStats, compute_stats
from weatherpeft.data.wb2 import SampleSpec, open_source, read_fields, read_static
from weatherpeft.metrics import latitude_weights
from weatherpeft.tasks.base import SPLITS, Task, TaskVariables
from weatherpeft.tasks.grid import AURORA_TINY_GRID, PatchGrid
from weatherpeft.tasks.scoring import channel_name, crop_rows, module_device

__all__ = [
    "PostprocessingDataset",
    "PostprocessingTask",
    "default_periods",
    "spread_name",
]

log = logging.getLogger(__name__)

SPREAD_SUFFIX = "_spread"
#: How the heads become (μ, σ): see the module docstring.
HEAD_FORMS = ("state", "residual")


def spread_name(variable: str, suffix: str = SPREAD_SUFFIX) -> str:
    """The companion variable carrying ``variable``'s spread in and its σ out: "2t_spread"."""
    return f"{variable}{suffix}"


def default_periods(init_times: Sequence) -> dict[str, tuple[str, str]]:
    """Train Jan–Sep, val Oct–Nov, test Dec of the last year the inits reach.

    For a one-year store (the built-in 2003) that is the calendar split; for a longer one,
    train runs from the first init through September of the last year. Ends are inclusive.
    """
    times = pd.DatetimeIndex(list(init_times))
    if times.empty:
        raise ValueError("the forecast store holds no initialisation times")
    year = times.max().year
    first = min(times.min(), pd.Timestamp(f"{year}-01-01"))
    return {"train": (str(first), f"{year}-09-30T23:59:59"),
            "val": (f"{year}-10-01", f"{year}-11-30T23:59:59"),
            "test": (f"{year}-12-01", f"{year}-12-31T23:59:59")}


# --------------------------------------------------------------------------------------
# Names (the forecast store is read by weatherpeft.data.forecast)
# --------------------------------------------------------------------------------------


def _aurora_name(canonical: str) -> str:
    if canonical not in AURORA_NAMES:
        raise ValueError(f"no Aurora name for variable '{canonical}'")
    return AURORA_NAMES[canonical]


def _mean_and_spread(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble mean and unbiased standard deviation (ddof = 1) over axis 1, float32."""
    values = members.astype(np.float64)
    return values.mean(axis=1).astype(np.float32), values.std(axis=1, ddof=1).astype(np.float32)


# --------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _SplitArrays:
    """Everything one split's samples hold, per Aurora variable name, float32.

    mean/spread/truth: (N, H, W) surface or (N, C, H, W) atmospheric; static (H, W).
    """

    init_times: np.ndarray
    valid_times: np.ndarray
    mean: dict[str, np.ndarray]
    spread: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    static: dict[str, np.ndarray]


class PostprocessingDataset(Dataset):
    """(input, target) ``aurora.Batch`` pairs for ensemble post-processing.

    Input (metadata time = the valid time, init + lead): ``v`` = the ensemble mean and
    ``v_spread`` = the ensemble spread, each repeated over ``history`` steps, shaped
    (1, history, H, W) or (1, history, C, H, W); static fields (H, W). Target: the truth ``v``
    at the valid time, (1, 1, [C,] H, W). Physical units, latitude decreasing. With a
    ``truth_offset`` the truth is that much later than the ensemble's valid time, which stays
    the inputs' metadata time (the target's is the truth's time).
    """

    def __init__(self, arrays: _SplitArrays, surf_vars: Sequence[str], atmos_vars: Sequence[str],
                 levels: tuple, lat: np.ndarray, lon: np.ndarray, history: int, suffix: str,
                 truth_offset: timedelta = timedelta(0)):
        self.arrays = arrays
        self.truth_offset = truth_offset
        self.surf_vars, self.atmos_vars = tuple(surf_vars), tuple(atmos_vars)
        self.levels = tuple(levels)
        self.history = int(history)
        self.suffix = suffix
        self._lat = torch.from_numpy(lat.astype(np.float32))
        self._lon = torch.from_numpy(lon.astype(np.float32))
        self._static = {k: torch.from_numpy(v) for k, v in arrays.static.items()}

    def __len__(self) -> int:
        return len(self.arrays.init_times)

    def sample_times(self, index: int) -> tuple[datetime, datetime]:
        """(initialisation, valid time) of sample ``index``."""
        return (pd.Timestamp(self.arrays.init_times[index]).to_pydatetime(),
                pd.Timestamp(self.arrays.valid_times[index]).to_pydatetime())

    def __getitem__(self, index: int) -> tuple[Batch, Batch]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        a, h = self.arrays, self.history

        def repeated(values: np.ndarray) -> torch.Tensor:  # (…) → (1, h, …)
            tensor = torch.from_numpy(values[index])
            return tensor[None, None].expand(1, h, *tensor.shape).clone()

        def group(variables: Sequence[str]) -> tuple[dict, dict]:
            inputs, target = {}, {}
            for v in variables:
                inputs[v] = repeated(a.mean[v])
                inputs[spread_name(v, self.suffix)] = repeated(a.spread[v])
                target[v] = torch.from_numpy(a.truth[v][index])[None, None].clone()
            return inputs, target

        surf_in, surf_out = group(self.surf_vars)
        atmos_in, atmos_out = group(self.atmos_vars)
        _, valid = self.sample_times(index)
        metadata = Metadata(lat=self._lat, lon=self._lon, time=(valid - self.truth_offset,),
                            atmos_levels=self.levels)
        return (Batch(surf_vars=surf_in, static_vars=dict(self._static), atmos_vars=atmos_in,
                      metadata=metadata),
                Batch(surf_vars=surf_out, static_vars=dict(self._static), atmos_vars=atmos_out,
                      metadata=dataclasses.replace(metadata, time=(valid,))))


# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------


class PostprocessingTask(Task):
    """Ensemble post-processing: ensemble mean and spread in, a Gaussian per variable out.

    Args:
        store: the ensemble forecast store (WB2 forecast layout; path or ``xr.Dataset``);
            default: the built-in ``ensemble.zarr``.
        periods: inclusive (start, end) per split; a sample belongs to a split when its
            initialisation *and* its valid time lie inside. Default :func:`default_periods`
            (built-in: train Jan–Sep 2003 = 121 inits, val Oct–Nov = 26, test Dec = 13).
        stats: normalisation statistics for the pretrained variables (pass the backbone's);
            keys it lacks are computed from the training period: the truth variables and
            static fields from ``truth_store``, the new ``*_spread`` variables from the
            ensemble spread of the training inits (latitude-weighted mean and std).
        truth_store: the verifying analyses (WB2 layout, same grid); also gives the static
            fields. Default: the built-in ``downstream.zarr`` (required with a custom ``store``).
        lead: the forecast lead to post-process (default 48 h).
        surf_vars, atmos_vars, static_vars, levels: what to use (any of Aurora's, WB2's or
            ERA5's names; ``levels=None``: every level of the forecast store).
        history: how many times the ensemble mean (and spread) is repeated to fill Aurora's
            history (2: a state with no tendency; every history slot of the pretrained patch
            embeddings is used; at most the backbone's ``max_history_size``).
        sigma_floor: σ ≥ ``sigma_floor`` × the variable's normalisation scale.
        loss_scales: what each channel's CRPS is divided by in the loss: ``"ensemble_rmse"``
            (default: the RMSE of the raw ensemble mean over the training inits, per channel),
            ``"stats"`` (the normalisation scales) or a mapping with a key per channel in the
            statistics' naming ("2t", "z_500").
        names, member_dim, lead_dim: store name mappings and dimension names.
        head_form: ``"state"`` (μ = ``v``'s head, σ = softplus of the spread head) or
            ``"residual"`` (the authors': μ = μ_ens + o_v·σ_ens, σ = exp(o_s)·σ_ens, o the
            heads' normalised outputs); see the module docstring.
        truth_offset: verify against the truth this much later than the ensemble's valid
            time (default 0: post-processing proper; > 0: a probabilistic forecast beyond
            the ensemble's lead, a flow-dependent correction the backbone must supply).
        truth_member: which member of an ensemble store given as ``truth_store`` is the truth
            (at lead 0); without it such a store is refused (the truth must be an analysis).
        grid: the backbone's grid rule, checked on the forecast grid (None: unchecked).

    Variables of the built-in ensemble: 2t, 10u, 10v and z, t at 500/850 hPa. The backbone
    sees only these (plus their spreads and the static fields): Aurora embeds and decodes
    per variable present in the batch, so the pretrained msl, u, v and q are simply absent
    (their embeddings and heads are unused), never invented.
    """

    name = "postprocessing"

    # Above radon C on purpose: validates every task option before any data are read, each with its own message.
    def __init__(self, store: str | os.PathLike | xr.Dataset | None = None,
                 periods: Mapping[str, tuple] | None = None,
                 stats: NormalisationStats | None = None, *,
                 truth_store: str | os.PathLike | xr.Dataset | None = None,
                 lead: timedelta = timedelta(hours=48),
                 surf_vars: Sequence[str] = ("2t", "10u", "10v"),
                 atmos_vars: Sequence[str] = ("z", "t"),
                 static_vars: Sequence[str] = ("lsm", "z"),
                 levels: Sequence[float] | None = None,
                 history: int = 2,
                 sigma_floor: float = 1e-3,
                 loss_scales: str | Mapping[str, float] = "ensemble_rmse",
                 names: Mapping[str, str] | None = None,
                 member_dim: str | None = None,
                 lead_dim: str | None = None,
                 head_form: str = "state",
                 truth_offset: timedelta = timedelta(0),
                 truth_member: int | None = None,
                 grid: PatchGrid | None = AURORA_TINY_GRID):
        if store is None:
            store = store_path("ensemble")
            truth_store = store_path("downstream") if truth_store is None else truth_store
        elif truth_store is None:
            raise ValueError("a custom ensemble store needs truth_store= (the verifying analyses "
                             "in WeatherBench2 layout on the same grid)")
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        if not sigma_floor > 0:
            raise ValueError(f"sigma_floor must be positive, got {sigma_floor}")
        if head_form not in HEAD_FORMS:
            raise ValueError(f"head_form must be one of {list(HEAD_FORMS)}, got {head_form!r}")
        self.head_form = head_form
        self.truth_offset = pd.Timedelta(truth_offset).to_pytimedelta()
        if self.truth_offset < timedelta(0):
            raise ValueError(f"truth_offset must not be negative, got {self.truth_offset}")
        self.names = dict(names or {})
        self.store, self.truth_store = store, truth_store
        self.history = int(history)
        self.sigma_floor = float(sigma_floor)
        self.suffix = SPREAD_SUFFIX
        self.forecast = ForecastStore(store, lead, names=self.names, member_dim=member_dim,
                                      lead_dim=lead_dim)
        self.lead = self.forecast.lead
        self.truth = as_analysis(open_source(truth_store, self.names), truth_member)
        self.truth_source = source_of(self.truth)

        # Variables: canonical store name → Aurora name.
        self._surf = {c: _aurora_name(c) for c in (self.forecast.resolve(n, "surf") for n in surf_vars)}
        self._atmos = {c: _aurora_name(c) for c in (self.forecast.resolve(n, "atmos") for n in atmos_vars)}
        if not self._surf and not self._atmos:
            raise ValueError("postprocessing needs at least one surface or atmospheric variable")
        self._static = {}
        for n in static_vars:
            canonical = canonical_name(n, self.names, static=True)
            if canonical not in self.truth.data_vars:
                raise ValueError(f"static variable '{canonical}' not in truth store "
                                 f"{self.truth_source}; it has: {sorted(map(str, self.truth.data_vars))}")
            self._static[canonical] = _aurora_name(canonical)
        for canonical in (*self._surf, *self._atmos):
            if canonical not in self.truth.data_vars:
                raise ValueError(f"variable '{canonical}' not in truth store {self.truth_source}; "
                                 f"it has: {sorted(map(str, self.truth.data_vars))}")
        if self._atmos:
            wanted = self.forecast.ds["level"].values if levels is None else levels
            self._forecast_levels = self.forecast.level_index(wanted)
            self.levels = tuple(level_value(self.forecast.ds["level"].values[i])
                                for i in self._forecast_levels)
            self._truth_levels = self._truth_level_index(self.levels)
        else:
            self._forecast_levels = self._truth_levels = np.zeros(0, dtype=np.int64)
            self.levels = ()
        self._check_grids()
        if grid is not None:
            grid.check(len(self.forecast.lat), len(self.forecast.lon),
                       f"forecast store {self.forecast.source}")

        surf, atmos = tuple(self._surf.values()), tuple(self._atmos.values())
        new_surf = tuple(spread_name(v, self.suffix) for v in surf)
        new_atmos = tuple(spread_name(v, self.suffix) for v in atmos)
        self._variables = TaskVariables(surf_vars=surf + new_surf, atmos_vars=atmos + new_atmos,
                                        static_vars=tuple(self._static.values()),
                                        levels=self.levels, new_surf_vars=new_surf,
                                        new_atmos_vars=new_atmos)

        self.periods = {split: tuple(p) for split, p in
                        (periods or default_periods(self.forecast.times)).items()}
        missing = [split for split in SPLITS if split not in self.periods]
        if missing:
            raise ValueError(f"periods must give {list(SPLITS)}; missing {missing}")
        self._positions = {split: self._split_positions(split) for split in SPLITS}
        self._arrays: dict[str, _SplitArrays] = {}
        self._datasets: dict[str, Dataset] | None = None
        self.stats = self._complete_stats(stats)
        self.loss_scales = self._loss_scales(loss_scales)
        self._scale_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    # -- construction helpers -----------------------------------------------------------

    def _truth_level_index(self, levels: Sequence[float]) -> np.ndarray:
        if "level" not in self.truth.dims:
            raise ValueError(f"truth store {self.truth_source} has no 'level' dimension")
        return level_positions(self.truth["level"].values, levels, f"truth store {self.truth_source}")

    def _check_grids(self) -> None:
        lat = self.truth["latitude"].values[::-1]
        lon = self.truth["longitude"].values
        if lat.shape != self.forecast.lat.shape or lon.shape != self.forecast.lon.shape or \
                not np.allclose(lat, self.forecast.lat) or not np.allclose(lon, self.forecast.lon):
            raise ValueError(f"grids differ: forecast store {self.forecast.source} is "
                             f"{len(self.forecast.lon)}×{len(self.forecast.lat)} (lon×lat), truth store "
                             f"{self.truth_source} is {len(lon)}×{len(lat)} or at other coordinates")

    def _split_positions(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(forecast init indices, truth time indices) of the split's samples."""
        start, end = (np.datetime64(pd.Timestamp(t).value, "ns") for t in self.periods[split])
        if start > end:
            raise ValueError(f"period '{split}' starts after it ends: {self.periods[split]}")
        inits = self.forecast.times
        valid = inits + np.timedelta64(int(pd.Timedelta(self.lead + self.truth_offset).value), "ns")
        inside = (inits >= start) & (valid <= end)
        truth_times = self.truth["time"].values.astype("datetime64[ns]")
        found = np.clip(np.searchsorted(truth_times, valid), 0, len(truth_times) - 1)
        present = truth_times[found] == valid
        dropped = int(np.sum(inside & ~present))
        if dropped:
            log.warning("%s: %d %s init(s) skipped: truth at the valid time missing from %s",
                        self.name, dropped, split, self.truth_source)
        keep = inside & present
        return np.nonzero(keep)[0], found[keep]

    def _load(self, split: str) -> _SplitArrays:
        """Read the split's members (→ mean, spread), truth and static fields; cached."""
        if split in self._arrays:
            return self._arrays[split]
        positions, truth_positions = self._positions[split]
        if positions.size == 0:
            raise ValueError(f"no {split} samples in {self.periods[split]}: no init of "
                             f"{self.forecast.source} with init and init + {self.lead} inside "
                             f"that period and truth in {self.truth_source}")
        mean, spread, truth = {}, {}, {}
        for canonical, aurora_name in {**self._surf, **self._atmos}.items():
            atmos = canonical in self._atmos
            members = self.forecast.members(canonical, positions,
                                            self._forecast_levels if atmos else None)
            mean[aurora_name], spread[aurora_name] = _mean_and_spread(members)
            values = read_fields(self.truth, canonical, truth_positions,
                                 self._truth_levels if atmos else None)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"NaN/inf in truth variable '{canonical}' in {self.truth_source}")
            truth[aurora_name] = values
        static = {}
        for canonical, aurora_name in self._static.items():
            values = read_static(self.truth, canonical)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"NaN/inf in static variable '{canonical}' in {self.truth_source}")
            static[aurora_name] = values
        inits = self.forecast.times[positions]
        valid = self.truth["time"].values.astype("datetime64[ns]")[truth_positions]
        arrays = _SplitArrays(init_times=inits, valid_times=valid, mean=mean, spread=spread,
                              truth=truth, static=static)
        self._arrays[split] = arrays
        return arrays

    def _complete_stats(self, given: NormalisationStats | None) -> NormalisationStats:
        """``given`` plus whatever it lacks, computed from the training period only."""
        base_keys = self._keys(self._surf.values(), self._atmos.values()) + list(self._static.values())
        spread_keys = self._keys([spread_name(v, self.suffix) for v in self._surf.values()],
                                 [spread_name(v, self.suffix) for v in self._atmos.values()])
        locations = dict(given.locations) if given is not None else {}
        scales = dict(given.scales) if given is not None else {}
        sources = [given.source] if given is not None and given.source else []
        if any(key not in locations for key in base_keys):
            start, end = self.periods["train"]
            spec = SampleSpec(surf_vars=tuple(self._surf), atmos_vars=tuple(self._atmos),
                              static_vars=tuple(self._static), levels=self.levels or None,
                              start=start, end=end, names=self.names)
            truth_stats = compute_stats(self.truth, spec)
            for key in base_keys:
                if key not in locations:
                    locations[key], scales[key] = truth_stats.locations[key], truth_stats.scales[key]
            sources.append(f"{self.truth_source} {start} – {end}")
        if any(key not in locations for key in spread_keys):
            computed = self._spread_stats()
            for key in spread_keys:
                if key not in locations:
                    locations[key], scales[key] = computed[key]
            sources.append(f"ensemble spread of the {len(self._positions['train'][0])} training "
                           f"inits of {self.forecast.source}")
        period = given.period if given is not None else tuple(str(p) for p in self.periods["train"])
        return NormalisationStats(locations=locations, scales=scales, period=period,
                                  latitude_weighted=True,
                                  n_times=given.n_times if given is not None else 0,
                                  source=" + ".join(sources))

    def _loss_scales(self, choice: str | Mapping[str, float]) -> dict[str, float]:
        """One positive scale per channel (statistics' keys) for the loss; see the class doc."""
        keys = self._keys(self._surf.values(), self._atmos.values())
        if isinstance(choice, str):
            if choice == "stats":
                return {key: float(self.stats.scales[key]) for key in keys}
            if choice != "ensemble_rmse":
                raise ValueError(f"loss_scales must be 'ensemble_rmse', 'stats' or a mapping, "
                                 f"got {choice!r}")
            arrays = self._load("train")
            lat = torch.from_numpy(self.forecast.lat)
            scales = {}
            for v in self.forecast_variables:
                error = torch.from_numpy(arrays.mean[v]).double(), torch.from_numpy(arrays.truth[v]).double()
                if v in self._surf.values():
                    scales[v] = float(metrics.rmse(*error, lat))
                else:
                    for c, level in enumerate(self.levels):
                        scales[f"{v}_{level_to_str(level)}"] = float(
                            metrics.rmse(error[0][:, c], error[1][:, c], lat))
        else:
            scales = {key: float(value) for key, value in choice.items()}
        missing = [key for key in keys if key not in scales]
        bad = [key for key in keys if key in scales and not scales[key] > 0]
        if missing or bad:
            raise ValueError(f"loss_scales lack {missing} or are not positive for {bad}")
        return {key: scales[key] for key in keys}

    def _keys(self, surf: Iterable[str], atmos: Iterable[str]) -> list[str]:
        keys = list(surf)
        keys += [f"{v}_{level_to_str(level)}" for v in atmos for level in self.levels]
        return keys

    def _spread_stats(self) -> dict[str, tuple[float, float]]:
        """Latitude-weighted mean and std of each spread field over the training inits."""
        arrays = self._load("train")
        weights = latitude_weights(self.forecast.lat).numpy()[:, None]
        result: dict[str, tuple[float, float]] = {}

        def moments(values: np.ndarray) -> tuple[float, float]:  # (N, H, W)
            values = values.astype(np.float64)
            w = np.broadcast_to(weights, values.shape)
            mean = float((values * w).sum() / w.sum())
            std = float(np.sqrt(((values - mean) ** 2 * w).sum() / w.sum()))
            return mean, (std if std > 1e-12 * max(abs(mean), 1.0) else 1.0)  # constant: 1

        for v in self._surf.values():
            result[spread_name(v, self.suffix)] = moments(arrays.spread[v])
        for v in self._atmos.values():
            for c, level in enumerate(self.levels):
                key = f"{spread_name(v, self.suffix)}_{level_to_str(level)}"
                result[key] = moments(arrays.spread[v][:, c])
        return result

    # -- contract -----------------------------------------------------------------------

    @property
    def variables(self) -> TaskVariables:
        return self._variables

    @property
    def forecast_variables(self) -> tuple[str, ...]:
        """The post-processed variables (Aurora names), surface then atmospheric."""
        return tuple(self._surf.values()) + tuple(self._atmos.values())

    def inits(self, split: str) -> pd.DatetimeIndex:
        """Initialisation times of ``split``'s samples (nothing is read)."""
        if split not in self._positions:
            raise KeyError(f"task '{self.name}' has no split '{split}'; it has {list(SPLITS)}")
        return pd.DatetimeIndex(self.forecast.times[self._positions[split][0]])

    def datasets(self) -> dict[str, Dataset]:
        """train/val/test: :class:`PostprocessingDataset` of (input, target) pairs."""
        if self._datasets is None:
            self._datasets = {
                split: PostprocessingDataset(self._load(split), self._surf.values(),
                                             self._atmos.values(), self.levels, self.forecast.lat,
                                             self.forecast.lon, self.history, self.suffix,
                                             self.truth_offset)
                for split in SPLITS}
        return self._datasets

    def sigma(self, raw: torch.Tensor, variable: str, levels: Sequence[float] = ()) -> torch.Tensor:
        """σ from the raw output r of ``variable``'s spread head (physical units).

        σ = s·softplus(r / s) + floor, with s the normalisation scale of ``v_spread`` (the
        spread's variability over the training inits) and floor = ``sigma_floor`` × the
        scale of ``v``. Positive everywhere and ≈ r where r ≫ s, so "σ = the ensemble spread"
        stays representable; the floor keeps the CRPS gradient finite.
        """
        _, floor, sharpness = self._constants(variable, tuple(levels), raw.device)
        return sharpness * F.softplus(raw.float() / sharpness) + floor

    def gaussian(self, prediction: Batch, variables: Iterable[str] | None = None,
                 inputs: Batch | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{variable: (μ, σ)} of a prediction, each shaped like the prediction of the variable.

        ``variables``: which of the task's variables (default: all of them). ``inputs``: the
        batch the prediction was made from (the ensemble mean and spread); needed by
        ``head_form="residual"``.
        """
        if self.head_form == "residual" and inputs is None:
            raise ValueError("head_form='residual' needs the inputs (ensemble mean and spread) "
                             "to turn the heads into μ and σ")
        levels = tuple(prediction.metadata.atmos_levels)
        wanted = set(self.forecast_variables if variables is None else variables)
        unknown = wanted - set(self.forecast_variables)
        if unknown:
            raise KeyError(f"variables {sorted(unknown)} are not among the task's "
                           f"{list(self.forecast_variables)}")
        result = {}
        for group, names in (("surf_vars", self._surf.values()),
                             ("atmos_vars", self._atmos.values())):
            fields = getattr(prediction, group)
            var_levels = levels if group == "atmos_vars" else ()
            for v in (name for name in names if name in wanted):
                companion = spread_name(v, self.suffix)
                for name in (v, companion):
                    if name not in fields:
                        raise KeyError(f"prediction has no {group[:-5]} variable '{name}' (the "
                                       f"backbone needs the task head for {companion}; build it "
                                       "with extra_surf_vars/extra_atmos_vars from task.variables)")
                if self.head_form == "state":
                    result[v] = (fields[v].float(), self.sigma(fields[companion], v, var_levels))
                else:
                    given = getattr(inputs, group)
                    result[v] = self._residual_gaussian(
                        fields[v], fields[companion], given[v][:, -1:].to(fields[v].device),
                        given[companion][:, -1:].to(fields[v].device), v, var_levels)
        return result

    def _residual_gaussian(self, head: torch.Tensor, spread_head: torch.Tensor,
                           ens_mean: torch.Tensor, ens_spread: torch.Tensor, variable: str,
                           levels: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' form: μ = μ_ens + o_v·σ_ens, σ = exp(o_s)·σ_ens + floor, with o the
        heads' normalised outputs (exp capped at e^10 against overflow)."""
        _, floor, _ = self._constants(variable, levels, head.device)
        o_v = self._normalised(head, variable, levels)
        o_s = self._normalised(spread_head, spread_name(variable, self.suffix), levels)
        ens_spread = ens_spread.float()
        return (ens_mean.float() + o_v * ens_spread,
                torch.exp(o_s.clamp(max=10.0)) * ens_spread + floor)

    def _normalised(self, values: torch.Tensor, name: str, levels: tuple) -> torch.Tensor:
        """``values`` of ``name`` in the statistics' normalised units (per level if any)."""
        keys = [name] if not levels else [f"{name}_{level_to_str(lv)}" for lv in levels]
        shape = () if not levels else (len(levels), 1, 1)
        location, scale = (torch.tensor([table[k] for k in keys], dtype=torch.float32,
                                        device=values.device).reshape(shape)
                           for table in (self.stats.locations, self.stats.scales))
        return (values.float() - location) / scale

    def training_loss(self, model: torch.nn.Module, batch: tuple[Batch, Batch]) -> torch.Tensor:
        """:meth:`loss` of ``model(inputs)``, the inputs passed on for the residual form."""
        inputs, target = batch
        return self.loss(model(inputs), target, inputs)

    def sample_prediction(self, model: torch.nn.Module, split: str,
                          index: int) -> tuple[Batch, Batch]:
        """(prediction, truth) for maps; each ``v`` holds μ and each ``v_spread`` holds σ."""
        inputs, target = self.collated_sample(split, index)
        prediction = model(inputs.to(module_device(model)))
        gaussians = self.gaussian(prediction, inputs=inputs)
        surf, atmos = dict(prediction.surf_vars), dict(prediction.atmos_vars)
        for v, (mean, std) in gaussians.items():
            fields = surf if v in surf else atmos
            fields[v], fields[spread_name(v, self.suffix)] = mean, std
        return dataclasses.replace(prediction, surf_vars=surf, atmos_vars=atmos), target

    def loss(self, prediction: Batch, target: Batch, inputs: Batch | None = None) -> torch.Tensor:
        """Gaussian CRPS on normalised fields, latitude-weighted, mean over channels.

        ``inputs``: the batch the prediction was made from (needed by the residual form).

        Each channel's μ, σ and truth are divided by its loss scale (``loss_scales``; by
        default the raw ensemble mean's training RMSE) so that every channel counts equally:
        CRPS scales with its argument, CRPS(μ/s, σ/s; y/s) = CRPS(μ, σ; y)/s. With the
        climatological scale instead, the winds would dominate: their 48-h error is a larger
        share of their variability (≈ 0.25 of it, against ≈ 0.05 for z500 in the built-in world).
        """
        target = crop_rows(target, prediction.spatial_shape[0])  # Aurora drops a pole row
        lat = target.metadata.lat
        levels = tuple(target.metadata.atmos_levels)
        gaussians = self.gaussian(prediction, [*target.surf_vars, *target.atmos_vars], inputs)
        terms = []
        for group in ("surf_vars", "atmos_vars"):
            for v, truth in getattr(target, group).items():
                mean, std = gaussians[v]
                if mean.shape != truth.shape:
                    raise ValueError(f"'{v}': prediction shape {tuple(mean.shape)} differs from "
                                     f"target shape {tuple(truth.shape)}")
                atmos = group == "atmos_vars"
                scale = self._constants(v, levels if atmos else (), mean.device)[0]
                crps = metrics.crps_gaussian(mean / scale, std / scale,
                                             truth.to(mean.device).float() / scale, lat,
                                             dim=(0, 1) if atmos else None)
                terms.extend(crps.unbind(0) if atmos else [crps])  # one term per channel
        if not terms:
            raise ValueError("the target holds none of the task's variables")
        return torch.stack(terms).mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Iterable[tuple[Batch, Batch]],
                 *, references: bool = True) -> dict[str, float]:
        """CRPS, RMSE of the mean and spread–skill ratio per channel, physical units.

        Keys ``"{source}/{metric}/{channel}"`` (channels "2t", "z500", …). Source ``model``:
        the Gaussian CRPS of N(μ, σ²) (``crps``), RMSE of μ, spread–skill of σ against μ.
        With ``references``, source ``ensemble``, the raw members of the store: ``crps`` in
        ensemble form as WeatherBench2 computes it (the *fair* estimator, unbiased E|X − X'|:
        the score an ensemble of this spread would reach with infinitely many members),
        ``crps_ecdf`` the CRPS of the 10 members as issued (their empirical CDF, fair=False;
        the like-for-like score of the forecast that was actually given), RMSE of the
        ensemble mean and its spread (ddof = 1) against that mean. Every metric is
        latitude-weighted over space and averaged over all initialisations the loader yields
        (WeatherBench2: RMSE is the root of the space–time MSE; spread–skill = sqrt(mean σ²)
        / RMSE). Members are read from the store by valid time − lead − ``truth_offset``.
        Empty loader: {}.
        """
        was_training = model.training
        model.eval()
        device = module_device(model)
        collected: dict[str, list] = {"mean": [], "std": [], "truth": [], "times": []}
        try:
            for inputs, target in loader:
                inputs = inputs.to(device)
                prediction = model(inputs)
                gaussians = self.gaussian(prediction, inputs=inputs)
                collected["mean"].append({v: m[:, -1].cpu() for v, (m, _) in gaussians.items()})
                collected["std"].append({v: s[:, -1].cpu() for v, (_, s) in gaussians.items()})
                target = crop_rows(target, prediction.spatial_shape[0])  # Aurora drops a pole row
                truth = {**target.surf_vars, **target.atmos_vars}
                collected["truth"].append({v: truth[v][:, 0].float().cpu() for v in gaussians})
                collected["times"].extend(target.metadata.time)
        finally:
            model.train(was_training)
        if not collected["times"]:
            return {}
        joined = {key: {v: torch.cat([part[v] for part in collected[key]])
                        for v in self.forecast_variables} for key in ("mean", "std", "truth")}
        rows = joined["truth"][self.forecast_variables[0]].shape[-2]
        lat = torch.from_numpy(self.forecast.lat[:rows].copy())
        results: dict[str, float] = {}
        self._score("model", joined["mean"], joined["std"], joined["truth"], lat, results,
                    crps=lambda v, c, mean, std, truth: metrics.crps_gaussian(mean, std, truth, lat))
        if references:
            members = {v: m[..., :rows, :] for v, m in self.members(collected["times"]).items()}
            ens_mean = {v: m.double().mean(dim=1).float() for v, m in members.items()}
            ens_std = {v: m.double().std(dim=1, correction=1).float() for v, m in members.items()}

            def ensemble_crps(fair: bool):
                def crps(v, c, mean, std, truth):
                    field = members[v] if c is None else members[v][:, :, c]
                    return metrics.crps_ensemble(field, truth, lat, member_dim=1, fair=fair)
                return crps

            self._score("ensemble", ens_mean, ens_std, joined["truth"], lat, results,
                        crps=ensemble_crps(fair=True), ecdf=ensemble_crps(fair=False))
        return results

    def members(self, valid_times: Sequence) -> dict[str, torch.Tensor]:
        """The raw members of each variable for valid times: (B, M, [C,] H, W) float32."""
        wanted = (pd.DatetimeIndex(list(valid_times))
                  - pd.Timedelta(self.lead + self.truth_offset)).values
        wanted = wanted.astype("datetime64[ns]")
        inits = self.forecast.times
        found = np.clip(np.searchsorted(inits, wanted), 0, len(inits) - 1)
        absent = inits[found] != wanted
        if absent.any():
            raise ValueError(f"no forecast initialised at {pd.Timestamp(wanted[absent][0])} "
                             f"(valid time − {self.lead + self.truth_offset}) in "
                             f"{self.forecast.source}")
        result = {}
        for canonical, aurora_name in {**self._surf, **self._atmos}.items():
            atmos = canonical in self._atmos
            result[aurora_name] = torch.from_numpy(self.forecast.members(
                canonical, found, self._forecast_levels if atmos else None))
        return result

    # -- helpers ------------------------------------------------------------------------

    def _score(self, source: str, mean: dict, std: dict, truth: dict, lat: torch.Tensor,
               results: dict[str, float], crps, ecdf=None) -> None:
        """Add ``source``'s metrics per channel to ``results`` (``ecdf``: a second CRPS form)."""
        for v in self.forecast_variables:
            channels = [(None, channel_name(v))] if v in self._surf.values() else \
                [(c, channel_name(v, level)) for c, level in enumerate(self.levels)]
            for c, channel in channels:
                def pick(values: torch.Tensor, c: int | None = c) -> torch.Tensor:
                    return values if c is None else values[:, c]

                m, s, t = pick(mean[v]), pick(std[v]), pick(truth[v])
                results[f"{source}/crps/{channel}"] = float(crps(v, c, m, s, t))
                if ecdf is not None:
                    results[f"{source}/crps_ecdf/{channel}"] = float(ecdf(v, c, m, s, t))
                results[f"{source}/rmse/{channel}"] = float(metrics.rmse(m, t, lat))
                results[f"{source}/spread_skill/{channel}"] = float(
                    metrics.spread_skill_ratio(s, m, t, lat))

    def _constants(self, variable: str, levels: tuple,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss scale of v, σ floor of v, scale of v_spread): () or (C, 1, 1), float32."""
        key = (variable, levels, str(device))
        if key not in self._scale_cache:
            names = [variable] if not levels else [f"{variable}_{level_to_str(lv)}" for lv in levels]
            spreads = [spread_name(variable, self.suffix)] if not levels else \
                [f"{spread_name(variable, self.suffix)}_{level_to_str(lv)}" for lv in levels]
            missing = [k for k in names + spreads if k not in self.stats.scales]
            missing += [k for k in names if k not in self.loss_scales]
            if missing:
                raise ValueError(f"normalisation statistics or loss scales lack {missing}")

            def tensor(values: list[float]) -> torch.Tensor:
                t = torch.tensor(values, dtype=torch.float32, device=device)
                return t[0] if not levels else t[:, None, None]

            self._scale_cache[key] = (
                tensor([self.loss_scales[k] for k in names]),
                tensor([self.sigma_floor * self.stats.scales[k] for k in names]),
                tensor([self.stats.scales[k] for k in spreads]))
        return self._scale_cache[key]
