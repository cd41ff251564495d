"""Store inspection for ``weatherpeft data check|info``: validate a whole store, describe it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import xarray as xr

from weatherpeft.data import wb2
from weatherpeft.data.layout import AURORA_NAMES, plausible_range

__all__ = ["check_store", "describe_store", "spec_for_store"]


def _forecast_layout(ds: xr.Dataset) -> bool:
    return "prediction_timedelta" in ds.dims or "number" in ds.dims


def spec_for_store(ds: xr.Dataset) -> tuple[wb2.SampleSpec, list[str]]:
    """A SampleSpec of every variable of a canonical analysis store that a sample can hold (one
    with an Aurora name, on time, level, latitude, longitude), and the names of the others."""
    usable = {n: v for n, v in ds.data_vars.items()
              if n in AURORA_NAMES and set(v.dims) <= {"time", "level", "latitude", "longitude"}}
    surface = tuple(n for n, v in usable.items() if "time" in v.dims and "level" not in v.dims)
    atmospheric = tuple(n for n, v in usable.items() if "time" in v.dims and "level" in v.dims)
    static = tuple(n for n, v in usable.items() if "time" not in v.dims)
    spec = wb2.SampleSpec(surf_vars=surface, atmos_vars=atmospheric, static_vars=static, history=1,
                          lead=timedelta(0), in_memory=False)
    return spec, sorted(set(map(str, ds.data_vars)) - set(usable))


def _check_forecast_store(ds: xr.Dataset, path: Path) -> str:
    """Every field of an ensemble forecast store, init by init: readable and plausible."""
    for name, variable in ds.data_vars.items():
        bounds = plausible_range(name, variable.attrs.get("units"))
        timed = "time" in variable.dims
        for index in range(ds.sizes["time"] if timed else 1):
            field = variable.isel(time=index) if timed else variable
            init = f"init {str(ds.time.values[index])[:16]} (time index {index})" if timed else "its field"
            found = wb2.find_bad_value(wb2.read_array(field, str(path), init), bounds)
            if found is not None:
                where, what = found
                raise wb2.DataError(f"{what} in variable '{name}' at {init}, "
                                    f"{wb2.describe_index(field, where)}, in {path}")
    return f"{ds.sizes['time']} inits, {ds.sizes.get('number', 1)} members, all finite and plausible"


def check_store(path: Path) -> str:
    """Validate one store (files, grid, times, finite and plausible values); returns a one-line
    summary, or raises :class:`~weatherpeft.data.layout.DataError`."""
    ds = wb2.open_store(path)
    if _forecast_layout(ds):
        return _check_forecast_store(ds, path)
    spec, ignored = spec_for_store(ds)
    report = wb2.validate(ds, spec)
    summary = (f"{report.n_times} times {str(report.first)[:16]} … {str(report.last)[:16]}, "
               f"step {report.step}, all finite and plausible")
    return summary + (f"; not checked (no Aurora name): {', '.join(ignored)}" if ignored else "")


def describe_store(path: Path) -> str:
    """Variables, levels, grid and time range of a store, a few lines."""
    ds = wb2.open_store(path)
    lines = [f"{path}"]
    if "time" in ds.dims:
        lines.append(f"  time: {ds.sizes['time']} × {str(ds.time.values[0])[:16]} … {str(ds.time.values[-1])[:16]}")
    if "level" in ds.dims:
        lines.append(f"  level (hPa): {[int(v) for v in ds.level.values]}")
    lat, lon = ds.latitude.values, ds.longitude.values
    lines.append(f"  grid: {len(lon)}×{len(lat)} lon×lat, lat {lat[0]:.4g}…{lat[-1]:.4g}, "
                 f"lon {lon[0]:.4g}…{lon[-1]:.4g}")
    for dim in ("prediction_timedelta", "number"):
        if dim in ds.dims:
            lines.append(f"  {dim}: {ds.sizes[dim]}")
    lines.append("  variables: " + ", ".join(sorted(ds.data_vars)))
    return "\n".join(lines)
