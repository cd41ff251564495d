"""WB2's canonical form of a dataset (:func:`canonicalise`): names, units of the level axis,
longitude in [0, 360), ascending axes, a checked grid. Every reader ends in it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import xarray as xr

from weatherpeft.data.layout import CANONICAL_DIMS, STORE_NAMES, DataError, format_coordinate, source_of

__all__ = ["canonicalise", "rename_table"]


def rename_table(ds: xr.Dataset, names: Mapping[str, str] | None) -> dict[str, str]:
    """What to rename in ``ds``; a name whose canonical form already exists is left alone."""
    table = {**STORE_NAMES, **(names or {})}
    present = set(ds.variables) | set(ds.dims)
    renames: dict[str, str] = {}
    for source, target in table.items():
        if source not in present or source == target:
            continue
        # ERA5 single-level files call the orography "z" too: no level dim → static.
        if target == "geopotential" and source in ds.data_vars and \
                not any(table.get(dim, dim) == "level" for dim in ds[source].dims):
            target = "geopotential_at_surface"
        if target in present or target in renames.values():
            continue
        renames[source] = target
    return renames


def _sorted_ascending(ds: xr.Dataset, dim: str) -> xr.Dataset:
    """Make coordinate ``dim`` strictly ascending (lazy: a reversed slice or a sort); raise
    if a value repeats."""
    values = ds[dim].values
    if values.size < 2:
        return ds
    steps = np.diff(values)
    if np.all(steps < 0):
        return ds.isel({dim: slice(None, None, -1)})
    if np.all(steps > 0):
        return ds
    index = pd.Index(values)
    if index.has_duplicates:
        repeats = "; ".join(f"{format_coordinate(v)} at indices {np.nonzero(index == v)[0].tolist()}"
                            for v in index[index.duplicated()].unique()[:3])
        raise DataError(f"'{dim}' of {source_of(ds)} repeats values: {repeats}")
    return ds.sortby(dim)


def _check_monotonic(steps: np.ndarray, dim: str, values: np.ndarray, source: str) -> None:
    if steps.size == 0 or np.all(steps > 0) or np.all(steps < 0):
        return
    direction = np.sign(steps[0]) or 1.0
    at = int(np.argmax(steps * direction <= 0))
    raise DataError(f"{dim} of {source} is not strictly monotonic: {values[at]:g} at index {at}, "
                    f"then {values[at + 1]:g} at index {at + 1}")


def _check_grid(ds: xr.Dataset) -> None:
    """Raise unless latitude is finite, within [-90, 90] and strictly monotonic, and longitude
    finite and strictly monotonic around the circle (one wrap allowed), covering < 360°."""
    source = source_of(ds)
    lat = ds["latitude"].values.astype(np.float64)
    lon = ds["longitude"].values.astype(np.float64)
    for dim, values in (("latitude", lat), ("longitude", lon)):
        bad = np.nonzero(~np.isfinite(values))[0]
        if bad.size:
            raise DataError(f"{dim} of {source} is {values[bad[0]]} at index {bad[0]}")
    outside = np.nonzero(np.abs(lat) > 90)[0]
    if outside.size:
        raise DataError(f"latitude of {source} is {lat[outside[0]]:g} at index {outside[0]}, "
                        "outside [-90, 90]")
    _check_monotonic(np.diff(lat), "latitude", lat, source)
    around = (np.diff(lon) + 180.0) % 360.0 - 180.0
    _check_monotonic(around, "longitude", lon, source)
    if np.abs(around).sum() >= 360.0:
        raise DataError(f"longitude of {source} runs {lon[0]:g} … {lon[-1]:g}, 360° or more: "
                        "a meridian appears twice")


def canonicalise(ds: xr.Dataset, names: Mapping[str, str] | None = None) -> xr.Dataset:
    """Put a dataset into WB2's canonical form (idempotent, lazy).

    Renames via :data:`STORE_NAMES` (+ ``names``); level in hPa; longitude in [0, 360);
    time, level, longitude, latitude ascending; variables transposed to
    (time, level, longitude, latitude) by name, whatever their order on disk.
    """
    ds = ds.rename(rename_table(ds, names))
    for dim in ("latitude", "longitude"):
        if dim not in ds.dims:
            raise DataError(f"{source_of(ds)} has no '{dim}' dimension; it has dims "
                            f"{sorted(map(str, ds.dims))} (add the mapping to `names`)")
        if ds[dim].ndim != 1:
            raise DataError(f"'{dim}' of {source_of(ds)} must be a 1-D coordinate, got dims {ds[dim].dims}")
    _check_grid(ds)
    if "level" in ds.dims:
        level = ds["level"]
        bad = np.nonzero(~np.isfinite(level.values.astype(np.float64)))[0]
        if bad.size:
            raise DataError(f"level of {source_of(ds)} is {level.values[bad[0]]} at index {bad[0]}")
        units = str(level.attrs.get("units", "")).strip().lower()
        if units == "pa" or (not units and float(np.max(level.values)) > 1100):
            ds = ds.assign_coords(level=level.values / 100.0)
            ds["level"].attrs["units"] = "hPa"
    lon = ds["longitude"].values
    if np.any(lon < 0) or np.any(lon >= 360):
        ds = ds.assign_coords(longitude=np.mod(lon, 360.0))
    if "time" in ds.dims:
        ds = _ensure_datetime64(ds)
    for dim in CANONICAL_DIMS:
        if dim in ds.dims:
            ds = _sorted_ascending(ds, dim)
    return ds.transpose(..., *CANONICAL_DIMS, missing_dims="ignore")


def _ensure_datetime64(ds: xr.Dataset) -> xr.Dataset:
    index = ds.indexes["time"]
    if isinstance(index, pd.DatetimeIndex):
        if index.hasnans:
            at = int(np.argmax(index.isna()))
            raise DataError(f"time of {source_of(ds)} holds no date (NaT) at index {at}")
        return ds
    if isinstance(index, xr.CFTimeIndex):
        try:  # non-standard calendars convert with xarray's warning; gaps then drop samples
            try:
                converted = index.to_datetimeindex(time_unit="ns")
            except TypeError:  # xarray before the time_unit keyword
                converted = index.to_datetimeindex()
            return ds.assign_coords(time=converted)
        except ValueError as error:
            raise DataError(f"time of {source_of(ds)} uses calendar '{index.calendar}', which has no "
                            f"numpy datetime64 equivalent: {error}") from error
    raise DataError(f"time coordinate of {source_of(ds)} must hold dates, got dtype {ds['time'].dtype}")
