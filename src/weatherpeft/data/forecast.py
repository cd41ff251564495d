"""The forecast-store reader: ensemble forecasts in WeatherBench2's forecast layout (dims time =
initialisation, ``prediction_timedelta``, ``number`` = member, level, longitude, latitude),
opened through :func:`~weatherpeft.data.wb2.open_store` (so ENS-10-style netCDF and GRIB too)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import timedelta

import numpy as np
import pandas as pd
import xarray as xr

from weatherpeft.data.layout import canonical_name, level_positions, source_of
from weatherpeft.data.wb2 import open_source

__all__ = ["LEAD_DIMS", "MEMBER_DIMS", "ForecastStore", "as_analysis"]

#: Names a forecast store may give its member and lead-time dimensions (first found wins).
MEMBER_DIMS = ("number", "member", "realization", "ensemble", "ensemble_member")
LEAD_DIMS = ("prediction_timedelta", "lead_time", "step", "lead")


class ForecastStore:
    """An ensemble forecast store in WB2's forecast layout, opened lazily and canonicalised.

    ``member_dim``/``lead_dim`` default to the first of :data:`MEMBER_DIMS`/:data:`LEAD_DIMS`
    the store has. :meth:`members` reads one variable at one lead for some inits as
    (n, M, H, W) or (n, M, C, H, W) float32 with latitude decreasing (Aurora's order).
    """

    def __init__(self, source: str | os.PathLike | xr.Dataset, lead: timedelta, *,
                 names: Mapping[str, str] | None = None, member_dim: str | None = None,
                 lead_dim: str | None = None):
        self.names = dict(names or {})
        self.ds = open_source(source, self.names)
        self.source = source_of(self.ds)
        dims = sorted(map(str, self.ds.dims))
        self.member_dim = member_dim or next((d for d in MEMBER_DIMS if d in self.ds.dims), None)
        self.lead_dim = lead_dim or next((d for d in LEAD_DIMS if d in self.ds.dims), None)
        if self.member_dim not in self.ds.dims or self.lead_dim not in self.ds.dims \
                or "time" not in self.ds.dims:
            raise ValueError(
                f"{self.source} is not in WeatherBench2's forecast layout: it needs an "
                f"initialisation 'time', a lead-time dimension (one of {list(LEAD_DIMS)}) and a "
                f"member dimension (one of {list(MEMBER_DIMS)}); it has dims {dims}")
        self.n_members = int(self.ds.sizes[self.member_dim])
        if self.n_members < 2:
            raise ValueError(f"{self.source} has {self.n_members} member(s) along "
                             f"'{self.member_dim}': an ensemble spread needs at least 2")
        leads = pd.to_timedelta(self.ds[self.lead_dim].values)
        self.lead = pd.Timedelta(lead).to_pytimedelta()
        matches = np.nonzero(leads == pd.Timedelta(self.lead))[0]
        if matches.size == 0:
            raise ValueError(f"lead {self.lead} not in {self.source}; its '{self.lead_dim}' "
                             f"holds {[str(x) for x in leads]}")
        self.lead_index = int(matches[0])
        self.times = self.ds["time"].values.astype("datetime64[ns]")
        self.lat = self.ds["latitude"].values.astype(np.float64)[::-1].copy()  # decreasing
        self.lon = self.ds["longitude"].values.astype(np.float64)

    def resolve(self, name: str, kind: str) -> str:
        """Canonical name of forecast variable ``name`` (surface "surf" or "atmos"); checks dims."""
        canonical = canonical_name(name, self.names)
        if canonical not in self.ds.data_vars:
            asked = f" (asked as '{name}')" if canonical != name else ""
            raise ValueError(f"variable '{canonical}'{asked} not in forecast store {self.source}; "
                             f"it has: {sorted(map(str, self.ds.data_vars))}")
        dims = set(self.ds[canonical].dims)
        needed = {"time", self.lead_dim, self.member_dim, "latitude", "longitude"}
        if kind == "atmos":
            needed.add("level")
        if not needed <= dims or (kind == "surf" and "level" in dims):
            raise ValueError(f"{kind} forecast variable '{canonical}' in {self.source} has dims "
                             f"{self.ds[canonical].dims}; expected {sorted(needed)}")
        return canonical

    def level_index(self, levels: Sequence[float]) -> np.ndarray:
        return level_positions(self.ds["level"].values, levels, f"forecast store {self.source}")

    def members(self, name: str, positions: np.ndarray,
                level_index: np.ndarray | None = None) -> np.ndarray:
        """Members of ``name`` at init indices ``positions``: (n, M, [C,] H, W) float32."""
        array = self.ds[name]
        index = {"time": np.asarray(positions), self.lead_dim: self.lead_index}
        order = ["time", self.member_dim, "latitude", "longitude"]
        if "level" in array.dims:
            index["level"] = np.asarray(level_index)
            order.insert(2, "level")
        extra = {d: 0 for d in array.dims if d not in (*order, "level", self.lead_dim)}
        values = array.isel({**index, **extra}).transpose(*order).values
        values = np.ascontiguousarray(values[..., ::-1, :], dtype=np.float32)
        if not np.all(np.isfinite(values)):
            bad = int(np.argwhere(~np.isfinite(values))[0][0])
            raise ValueError(f"NaN/inf in forecast variable '{name}' for the init "
                             f"{pd.Timestamp(self.times[positions[bad]])} in {self.source}")
        return values


def as_analysis(truth: xr.Dataset, member: int | None) -> xr.Dataset:
    """The truth store as an analysis: as it is, or one ``member`` at lead 0 of an ensemble
    store; an ensemble store without a chosen member is refused."""
    member_dim = next((d for d in MEMBER_DIMS if d in truth.dims), None)
    lead_dim = next((d for d in LEAD_DIMS if d in truth.dims), None)
    source = source_of(truth)
    if member_dim is None and lead_dim is None:
        if member is not None:
            raise ValueError(f"truth_member={member} given, but truth store {source} is an "
                             "analysis (no member dimension)")
        return truth
    if member is None:
        raise ValueError(f"truth store {source} is an ensemble forecast (dims "
                         f"{sorted(map(str, truth.dims))}), not an analysis: give the analyses "
                         "that verify the forecasts, or choose a member explicitly (task option "
                         "truth_member) to use its lead-0 fields as the truth")
    if member_dim is not None:
        members = [int(m) for m in truth[member_dim].values]
        if member not in members:
            raise ValueError(f"truth_member {member} not in truth store {source}; its "
                             f"'{member_dim}' holds {members}")
        truth = truth.sel({member_dim: member}, drop=True)
    if lead_dim is not None:
        leads = pd.to_timedelta(truth[lead_dim].values)
        if not (leads == pd.Timedelta(0)).any():
            raise ValueError(f"truth store {source} has no lead 0 along '{lead_dim}' (it holds "
                             f"{[str(x) for x in leads]}): a member's truth is its lead-0 field")
        truth = truth.isel({lead_dim: int(np.nonzero(leads == pd.Timedelta(0))[0][0])}, drop=True)
    return truth
