"""Readers for the real data sets' on-disk layouts → WB2 canonical datasets, lazily.

:func:`weatherpeft.data.wb2.open_store` opens WeatherBench2-layout zarr and netCDF itself and
hands everything else to :func:`open_special`, so every consumer (``WB2Dataset``, the tasks,
``weatherpeft data info``) opens these layouts transparently:

* **WeatherBench (1)** (Rasp et al. 2020, https://github.com/pangeo-data/WeatherBench; the
  layout the WeatherPEFT paper used) — :func:`open_weatherbench1`. A resolution directory
  (``5.625deg/``, ``1.40625deg/``, …) with one sub-directory per variable, each holding yearly
  files ``{folder}_{year}_{res}deg.nc`` (``geopotential_500hPa_1979_5.625deg.nc`` in the
  single-level folders), written by the repository's ``src/regrid.py``: ERA5 CDS short names
  (``t2m``, ``u10``, ``v10``, ``z``, ``t``, ``q``, ``r``, ``u``, ``v``, ``pv``, ``vo``,
  ``tisr``, ``tcc``, ``tp``), dims ``time, [level,] lat, lon``, latitude ascending
  ``arange(-90 + d/2, 90, d)``, longitude ``arange(0, 360, d)``, hourly times. The
  ``constants/`` folder (``scripts/download_and_regrid_constants.sh``,
  ``src/add_lat_lon_2d.py``) holds ``orography`` (m: ERA5 ``z`` / 9.80665), ``lsm``, ``slt``
  and ``lat2d``/``lon2d`` (dropped: they repeat the coordinates). Detected by a directory
  holding at least one sub-directory whose name is a known variable folder. WeatherBench is
  hourly: give ``SampleSpec.step`` (the tasks do) or samples are one hour apart.
* **ENS-10-style ensemble netCDF** (Ashkboos et al. 2022, https://github.com/spcl/ens10 and
  the CliMetLab plugin ``spcl/climetlab-maelstrom-ens10``) — :func:`open_ensemble`. ENS-10 is
  distributed as GRIB, one file per day of year and type (``output.pl.2018MMDD``,
  ``output.sfc.2018MMDD``), each with the 20 years' initialisations at that date, steps
  0/24/48 h and 10 members; read here after conversion to netCDF (``cfgrib`` then
  ``to_netcdf``, or ``cdo -t ecmwf``, as ENS-10's baselines do): dims ``number``, ``time`` (the
  initialisation), ``step``, ``isobaricInhPa``, ``latitude``, ``longitude`` and the 2-D
  ``valid_time`` (cfgrib; single-valued ones as scalar coordinates), or CDO's upper-case names
  (``T2M``, ``U10M``, ``Z``, …, ``plev`` in Pa, ``lat``/``lon``). Mapped to WB2's forecast
  layout as in ``data/builtin/ensemble.zarr``: ``time`` (initialisation),
  ``prediction_timedelta``, ``number``, ``level``, ``longitude``, ``latitude``. Files may be
  split by variable, by member (ECMWF's control and perturbed forecasts) and by
  initialisation (ENS-10's per-day-of-year files interleave in time: they are concatenated
  and sorted). Detected by a netCDF file, or a directory of them, with
  a member (``number``, ``member``, ``realization``, ``ensemble_member``) or lead-time
  (``step``, ``prediction_timedelta``, ``lead_time``) dimension.
* **GRIB** (ERA5 and ECMWF ENS as MARS and the CDS deliver them, ENS-10's original files) —
  :func:`open_grib`, through xarray's ``cfgrib`` engine (``pip install weatherpeft[grib]``;
  without it a clear :class:`DataError`). cfgrib splits a file into hypercubes (one per level
  type, …) with dims ``number``, ``time``, ``step``, ``isobaricInhPa``, ``latitude``
  (90 … −90), ``longitude``, ECMWF short names (``t``, ``z``, ``2t`` as ``t2m``, ``10u`` as
  ``u10``, ``msl``, ``tp``) and a derived ``valid_time``. An analysis (every step 0, one
  member or none) becomes a WB2 store with the netCDF path's names (:data:`STORE_NAMES`; a
  surface ``z`` is the orography, a constant field given at one time only loses its time
  axis); anything with members or leads goes the ENS-10 way below. Detected by the suffix
  (``.grib``, ``.grib2``, ``.grb``, ``.grb2``) or the first bytes ``GRIB``. cfgrib writes no
  index file beside the data; a truncated or corrupt message is an error naming the file.
* **Remote stores** (fsspec URLs: ``gs://weatherbench2/datasets/era5/….zarr``, ``s3://``,
  ``https://``, ``memory://``) — :func:`open_remote`: zarr through ``xr.open_zarr`` with
  ``storage_options`` (e.g. ``{"token": "anon"}`` for WB2's public bucket; ``gs://`` needs
  ``gcsfs`` installed), a ``.nc`` URL through an fsspec file object (h5netcdf or scipy). Only
  fsspec's in-memory filesystem can be exercised offline; cloud buckets are untested here.

WeatherBench2 ERA5 zarr at any resolution (64×32 … 1440×721 with poles) stays with
``wb2.open_store``'s own code.

Conventions and unit conversions (every variable ends in WB2's canonical name and unit,
:data:`UNITS`; a ``units`` attribute that is not recognised is an error, a missing one is
taken to be the canonical unit):

* ``total_precipitation_6hr`` (m) from WeatherBench's hourly ``tp``: ERA5 hourly ``tp`` is the
  accumulation over the hour ending at the time stamp (ECMWF Confluence's table of ERA5
  accumulated variables: "accumulations are over the hour ending at the validity date/time"),
  so the 6-h total at t is the sum of the hourly values at t−5 h … t, the accumulation over
  (t − 6 h, t] — WB2's meaning of ``total_precipitation_6hr`` and exactly WeatherBench's own
  evaluation (``tp.rolling(time=6).sum()`` in ``notebooks/4-evaluation.ipynb``). Times whose
  window is incomplete (the first five hours, or any crossing a gap) are dropped — and with them those
  times of every variable, since the store's times are the intersection over variables.
  Needs hourly ``tp``; pass ``names={"tp": "total_precipitation_6hr"}`` for files that
  already hold 6-h totals.
* ``orography`` (m) → ``geopotential_at_surface`` (m² s⁻²) × g = 9.80665 (the inverse of
  WeatherBench's ``convert_z_to_orography``); any geopotential given in m (``gpm``) likewise.
* ``tp``/``cp`` in ENS-10 files are accumulated since initialisation (ECMWF GRIB convention)
  and become ``total_precipitation``/``convective_precipitation`` (m), not 6-h totals.
* Temperatures in °C → K; pressures in hPa → Pa; precipitation in mm or kg m⁻² → m; specific
  humidity in g kg⁻¹ → kg kg⁻¹; fractions in % → (0 − 1).
* Single-level folders (``geopotential_500``, ``temperature_850``) become that variable at that
  level; with a multi-level folder of the same variable the multi-level one wins at shared
  levels. The level axis is the union over variables (a variable lacking a level is NaN
  there, which ``WB2Dataset`` reports by name when a sample reads it); the time axis is the
  intersection.

Laziness: every array of these layouts is dask-backed (``xr.open_mfdataset`` for the yearly
files, time-chunked to about 8 MiB; one chunk per initialisation and lead for ensembles); only
coordinates are read on opening. ``dask`` must be installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from weatherpeft.data.canonical import canonicalise, rename_table
from weatherpeft.data.layout import (
    GRAVITY,
    PLAUSIBLE_RANGES,
    SOURCE_ATTR,
    STORE_NAMES,
    UNITS,
    DataError,
    convert_units,
    is_zarr_dir,
    looks_like_netcdf,
    plausible_range,
)

__all__ = [
    "ENSEMBLE_DIMS",
    "ENSEMBLE_NAMES",
    "GRAVITY",
    "PLAUSIBLE_RANGES",
    "UNITS",
    "WEATHERBENCH1_CONSTANTS",
    "convert_units",
    "detect_layout",
    "is_grib",
    "is_url",
    "open_ensemble",
    "open_grib",
    "open_remote",
    "open_special",
    "open_weatherbench1",
    "plausible_range",
]

#: WeatherBench (1) ``constants/`` variables → canonical (``orography`` is converted, m → m² s⁻²).
WEATHERBENCH1_CONSTANTS: dict[str, str] = {
    "orography": "geopotential_at_surface",
    "lsm": "land_sea_mask",
    "slt": "soil_type",
}
#: WeatherBench's hourly precipitation folder; its ``tp`` becomes ``total_precipitation_6hr``.
_WB1_PRECIP_FOLDER = "total_precipitation"

#: Ensemble files' names that differ from analyses: ECMWF forecast accumulations run from the
#: initialisation (cfgrib and CDO spellings).
ENSEMBLE_NAMES: dict[str, str] = {
    "tp": "total_precipitation", "TP": "total_precipitation",
    "cp": "convective_precipitation", "CP": "convective_precipitation",
}
#: Ensemble dimension spellings → WB2 forecast layout.
ENSEMBLE_DIMS: dict[str, str] = {
    "step": "prediction_timedelta", "lead_time": "prediction_timedelta",
    "leadtime": "prediction_timedelta",
    "member": "number", "realization": "number", "ensemble_member": "number",
    "ensemble": "number",
    "init_time": "time", "forecast_reference_time": "time",
}
_MEMBER = "number"
_LEAD = "prediction_timedelta"

#: Variables that only describe others (bounds, 2-D coordinates, projections): dropped.
_AUXILIARY = re.compile(r"(_bnds|_bounds)$|^(lat2d|lon2d|crs|spatial_ref)$")
_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")
_GRIB_SUFFIXES = (".grib", ".grib2", ".grb", ".grb2")
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+)://?(?P<rest>.*)$")
_CHUNK_BYTES = 8 * 2**20


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------


def is_url(path: str | os.PathLike) -> str | None:
    """The fsspec URL ``path`` names (``scheme://…``), or None for a local path.

    ``pathlib.Path`` turns ``gs://bucket/x`` into ``gs:/bucket/x``; that form is repaired.
    A one-letter scheme is a Windows drive, not a URL.
    """
    match = _URL.match(os.fspath(path))
    if match is None:
        return None
    scheme, rest = match["scheme"], match["rest"]
    if scheme.lower() == "file":  # file:///abs/path, or pathlib's file:/abs/path
        return f"{scheme}:///{rest.lstrip('/')}"
    return f"{scheme}://{rest}"


def _ensemble_dims(dims: Iterable[str], names: Mapping[str, str] | None) -> bool:
    table = {**ENSEMBLE_DIMS, **(names or {})}
    return any(table.get(d, d) in (_MEMBER, _LEAD) for d in dims)


def _netcdf_files(folder: Path, recursive: bool = False) -> list[Path]:
    walk = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in walk if p.is_file() and p.suffix.lower() in _NETCDF_SUFFIXES)


def _peek_dims(path: Path) -> set[str]:
    """A netCDF file's dimension and coordinate names (metadata only); empty if unreadable."""
    try:
        with xr.open_dataset(path, decode_times=False, decode_timedelta=False, cache=False) as ds:
            return set(map(str, ds.dims)) | set(map(str, ds.coords))
    except Exception:  # let wb2.open_store report unreadable files its own way
        return set()


def detect_layout(path: str | os.PathLike, names: Mapping[str, str] | None = None) -> str | None:
    """Which reader opens ``path``: ``"remote"``, ``"weatherbench1"``, ``"ensemble"``,
    ``"grib"`` or None.

    None means WB2 layout (a zarr directory or a plain netCDF file) or nothing at all: left to
    :func:`weatherpeft.data.wb2.open_store`. Only directory listings, netCDF headers and a
    file's first bytes are read.
    """
    if is_url(path):
        return "remote"
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        if is_zarr_dir(path):
            return None
        if _weatherbench1_folders(path, names):
            return "weatherbench1"
        files = _netcdf_files(path, recursive=True)
        if files and _ensemble_dims(_peek_dims(files[0]), names):
            return "ensemble"
        return "weatherbench1"  # it reports that no variable folder was recognised
    if is_grib(path):
        return "grib"
    if looks_like_netcdf(path) and _ensemble_dims(_peek_dims(path), names):
        return "ensemble"
    return None


def open_special(path: str | os.PathLike, names: Mapping[str, str] | None = None, *,
                 storage_options: Mapping | None = None) -> xr.Dataset | None:
    """Open ``path`` if it is a remote URL, a WeatherBench (1) directory, ensemble netCDF or
    a GRIB file.

    Returns the canonical dataset, or None when ``path`` is for ``wb2.open_store``'s own code.
    """
    layout = detect_layout(path, names)
    if layout == "remote":
        return open_remote(is_url(path), names, storage_options=storage_options)
    if layout == "weatherbench1":
        return open_weatherbench1(path, names)
    if layout == "ensemble":
        return open_ensemble(path, names)
    if layout == "grib":
        return open_grib(path, names)
    return None


def _require_dask() -> None:
    if importlib.util.find_spec("dask") is None:  # pragma: no cover - dask is a dependency
        raise ImportError("reading WeatherBench (1), ensemble netCDF and GRIB lazily needs dask "
                          "(pip install dask)")


# --------------------------------------------------------------------------------------
# Names and units
# --------------------------------------------------------------------------------------



def _table(names: Mapping[str, str] | None, *extra: Mapping[str, str]) -> dict[str, str]:
    table = dict(STORE_NAMES)
    for more in extra:
        table.update(more)
    table.update(names or {})
    return table


def _rename_coords(ds: xr.Dataset, table: Mapping[str, str]) -> xr.Dataset:
    """Rename dimensions and coordinates (not data variables) through ``table``."""
    present = set(map(str, ds.dims)) | set(map(str, ds.coords))
    renames = {}
    for name in present:
        target = table.get(name, name)
        if target != name and target not in present and target not in renames.values():
            renames[name] = target
    return ds.rename(renames) if renames else ds


def _drop_auxiliary(ds: xr.Dataset) -> xr.Dataset:
    return ds.drop_vars([v for v in ds.data_vars if _AUXILIARY.search(str(v))])


# --------------------------------------------------------------------------------------
# Grids, times and combining
# --------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """One file's contribution: where from, its grid and its times (for error messages)."""

    source: str
    lat: np.ndarray
    lon: np.ndarray
    times: np.ndarray | None

    @property
    def span(self) -> str:
        if self.times is None or self.times.size == 0:
            return "no times"
        return f"{pd.Timestamp(self.times.min())} – {pd.Timestamp(self.times.max())}"


def _grid_of(ds: xr.Dataset, source: str) -> tuple[np.ndarray, np.ndarray]:
    for dim in ("latitude", "longitude"):
        if dim not in ds.dims:
            raise DataError(f"{source} has no latitude/longitude dimension '{dim}'; it has dims "
                            f"{sorted(map(str, ds.dims))} (add the mapping to `names`)")
    return ds["latitude"].values, ds["longitude"].values


def _describe_grid(lat: np.ndarray, lon: np.ndarray) -> str:
    return (f"{lon.size}×{lat.size} lon×lat (lat {lat.min():g}…{lat.max():g}, "
            f"lon {lon.min():g}…{lon.max():g})")


def _same_grid(a: _Piece, b: _Piece) -> bool:
    return (a.lat.shape == b.lat.shape and a.lon.shape == b.lon.shape
            and np.allclose(a.lat, b.lat, atol=1e-6) and np.allclose(a.lon, b.lon, atol=1e-6))


def _grid_error(a: _Piece, b: _Piece) -> DataError:
    return DataError(f"files on different grids: {a.source} is on "
                     f"{_describe_grid(a.lat, a.lon)}, {b.source} on {_describe_grid(b.lat, b.lon)}")


def _ensure_datetimes(times: np.ndarray, source: str) -> np.ndarray:
    try:
        return pd.DatetimeIndex(times).values.astype("datetime64[ns]")
    except (TypeError, ValueError) as error:
        raise DataError(f"time coordinate of {source} does not hold dates: {error}") from error


def _check_times(pieces: list[_Piece], index: pd.Index, what: str) -> None:
    """Raise on a time present twice (within a file or in two files), naming the files.

    Files whose ranges interleave without sharing a time (ENS-10's per-day-of-year files) are
    fine: :func:`canonicalise` sorts the time axis (lazily).
    """
    if index.is_monotonic_increasing and index.is_unique:
        return
    timed = [p for p in pieces if p.times is not None and p.times.size]
    times = np.concatenate([p.times for p in timed])
    owners = np.repeat(np.arange(len(timed)), [p.times.size for p in timed])
    order = np.argsort(times, kind="stable")
    repeated = np.nonzero(times[order][1:] == times[order][:-1])[0]
    if repeated.size:
        first, second = owners[order[repeated[0]]], owners[order[repeated[0] + 1]]
        when = pd.Timestamp(times[order[repeated[0]]])
        if first == second:
            raise DataError(f"duplicate time {when} in {timed[first].source}")
        a, b = timed[first], timed[second]
        raise DataError(f"overlapping times in {what}: {a.source} covers {a.span} and "
                        f"{b.source} covers {b.span} (both hold {when})")


def _intersect_times(arrays: Mapping[str, xr.DataArray], what: str) -> dict[str, xr.DataArray]:
    """Every time-dependent array restricted to the times all of them have."""
    timed = {k: a for k, a in arrays.items() if "time" in a.dims}
    if not timed:
        return dict(arrays)
    common = None
    for array in timed.values():
        values = array["time"].values
        common = values if common is None else np.intersect1d(common, values)
    if common.size == 0:
        spans = "; ".join(f"{k}: {pd.Timestamp(a['time'].values.min())} – "
                          f"{pd.Timestamp(a['time'].values.max())}" for k, a in timed.items())
        raise DataError(f"the variables of {what} share no time: {spans}")
    out = dict(arrays)
    for key, array in timed.items():
        if array.sizes["time"] != common.size:
            out[key] = _take(array, array.indexes["time"].get_indexer(common))
    return out


def _take(array: xr.DataArray, positions: np.ndarray) -> xr.DataArray:
    """``array`` at time positions: a slice where they are one contiguous run (cheap for dask)."""
    if positions.size and np.all(np.diff(positions) == 1):
        return array.isel(time=slice(int(positions[0]), int(positions[-1]) + 1))
    return array.isel(time=positions)


def _merge(arrays: Mapping[str, xr.DataArray], what: str) -> xr.Dataset:
    """One dataset from canonical arrays on one grid: times intersected, levels (and members,
    leads) united, missing combinations NaN."""
    arrays = _intersect_times(arrays, what)
    named = [array.rename(name) for name, array in arrays.items()]
    return xr.merge(named, join="outer", compat="override", combine_attrs="drop_conflicts")


def _check_grids(pieces: Mapping[str, _Piece]) -> None:
    items = list(pieces.values())
    for other in items[1:]:
        if not _same_grid(items[0], other):
            raise _grid_error(items[0], other)


def _on_grid(array: xr.DataArray, reference: _Piece) -> xr.DataArray:
    """Use the reference's exact coordinate values (grids equal within 1e-6°)."""
    return array.assign_coords(latitude=reference.lat, longitude=reference.lon)


# --------------------------------------------------------------------------------------
# WeatherBench (1)
# --------------------------------------------------------------------------------------

_LEVEL_SUFFIX = re.compile(r"^(?P<base>.+?)_(?P<level>\d+(?:\.\d+)?)(?:hpa)?$", re.IGNORECASE)


def _folder_variable(name: str, names: Mapping[str, str] | None) -> tuple[str, float | None] | None:
    """(canonical variable, single level or None) of a WeatherBench folder name, or None."""
    table = {**(names or {})}
    candidates = [(name, None)]
    match = _LEVEL_SUFFIX.match(name)
    if match:
        candidates.append((match["base"], float(match["level"])))
    for base, level in candidates:
        base = table.get(base, base)
        if base in ("constants", _WB1_PRECIP_FOLDER) and level is None:
            return base, None
        if base in UNITS and base != "total_precipitation":
            return base, level
    return None


def _weatherbench1_folders(root: Path, names: Mapping[str, str] | None) -> dict[Path, tuple[str, float | None]]:
    folders = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and not is_zarr_dir(child):
            parsed = _folder_variable(child.name, names)
            if parsed is not None:
                folders[child] = parsed
    return folders


def _resolution_hint(root: Path, names: Mapping[str, str] | None) -> str:
    nested = [c.name for c in sorted(root.iterdir())
              if c.is_dir() and not is_zarr_dir(c) and _weatherbench1_folders(c, names)]
    return f"; open one resolution directory instead: {nested}" if nested else ""


def _time_chunk(first_file: Path, table: Mapping[str, str], target_bytes: int) -> int:
    with xr.open_dataset(first_file, decode_times=False, cache=False) as ds:
        ds = _rename_coords(ds, table)
        per_time = 0
        for variable in ds.data_vars.values():
            shape = [size for dim, size in variable.sizes.items() if dim != "time"]
            per_time += int(np.prod(shape, dtype=np.int64)) * variable.dtype.itemsize
        length = ds.sizes.get("time", 1)
    return int(min(max(length, 1), max(6, target_bytes // max(per_time, 1))))


def _open_folder(folder: Path, files: list[Path], level: float | None, table: Mapping[str, str],
                 constants: bool, target_bytes: int) -> tuple[xr.Dataset, list[_Piece]]:
    """A folder's yearly files as one lazy dataset; checks grids, time and overlaps."""
    pieces: list[_Piece] = []

    def prepare(ds: xr.Dataset) -> xr.Dataset:
        source = str(ds.encoding.get("source", folder))
        ds = _drop_auxiliary(_rename_coords(ds, table))
        lat, lon = _grid_of(ds, source)
        if constants:
            ds = ds.isel({d: 0 for d in ("time",) if d in ds.dims}, drop=True)
            ds = ds.drop_vars([c for c in ("time",) if c in ds.coords])
            times = None
        else:
            if "time" not in ds.dims:
                raise DataError(f"{source} has no 'time' coordinate (dims "
                                f"{sorted(map(str, ds.dims))}); every file outside constants/ "
                                "needs one")
            times = _ensure_datetimes(ds["time"].values, source)
        piece = _Piece(source, lat, lon, times)
        if pieces and not _same_grid(pieces[0], piece):
            raise _grid_error(pieces[0], piece)
        if pieces:
            ds = ds.assign_coords(latitude=pieces[0].lat, longitude=pieces[0].lon)
        pieces.append(piece)
        if "level" in ds.coords and ds["level"].ndim == 0:
            scalar = float(ds["level"].values)
            if level is not None and not np.isclose(scalar, level):
                raise DataError(f"{source} is at level {scalar:g} but its folder "
                                f"'{folder.name}' says {level:g}")
            ds = ds.expand_dims("level")
        elif "level" not in ds.dims and level is not None:
            ds = ds.expand_dims(level=[level])
        return ds

    chunks = {} if constants else {"time": _time_chunk(files[0], table, target_bytes)}
    try:
        ds = xr.open_mfdataset(
            files, combine="nested", concat_dim=None if constants else "time",
            preprocess=prepare, chunks=chunks, data_vars="minimal", coords="minimal",
            compat="override", join="exact", combine_attrs="drop_conflicts", parallel=False,
            decode_timedelta=False)
    except DataError:
        raise  # the checks in prepare()
    except Exception as error:  # xarray's combine errors; netCDF4/h5netcdf raise OSError, ...
        raise DataError(f"cannot read the netCDF files in {folder}: {error}") from error
    if not constants:
        _check_times(pieces, ds.indexes["time"], str(folder))
        if not ds.indexes["time"].is_monotonic_increasing:
            ds = ds.sortby("time")  # before the 6-h sums, which need time order
    return ds, pieces


def _folder_arrays(folder: Path, ds: xr.Dataset, variable: str, names: Mapping[str, str] | None,
                   table: Mapping[str, str]) -> dict[str, xr.DataArray]:
    """Canonical name → array for one folder's variables (before unit conversion)."""
    data_vars = [str(v) for v in ds.data_vars]
    if not data_vars:
        raise DataError(f"the files in {folder} hold no data variables")
    if variable == "constants":
        out = {}
        for name in data_vars:
            canonical = (names or {}).get(name) or WEATHERBENCH1_CONSTANTS.get(name) or table.get(name, name)
            if canonical not in UNITS:
                raise DataError(f"unknown variable '{name}' in {folder}: known constants are "
                                f"{sorted(WEATHERBENCH1_CONSTANTS)}; map it with `names`")
            out[canonical] = ds[name]
        return out
    if variable == _WB1_PRECIP_FOLDER:
        if len(data_vars) != 1:
            raise DataError(f"{folder} should hold one variable (hourly 'tp'), found {data_vars}")
        return {_WB1_PRECIP_FOLDER: ds[data_vars[0]]}
    if len(data_vars) == 1:
        name = data_vars[0]
        claimed = table.get(name, name)
        if claimed != name and claimed in UNITS and claimed != variable:
            raise DataError(f"{folder} should hold {variable} but its variable '{name}' is "
                            f"{claimed}; fix the folder or map the name with `names`")
        return {variable: ds[name]}
    out = {}
    for name in data_vars:
        canonical = table.get(name, name)
        if canonical not in UNITS:
            raise DataError(f"unknown variable '{name}' in {folder} (it holds {data_vars}); "
                            "map it with `names`")
        out[canonical] = ds[name]
    return out


def _six_hour_totals(tp: xr.DataArray, folder: Path) -> xr.DataArray:
    """6-h totals (accumulation over (t − 6 h, t]) from hourly ERA5 ``tp``, lazily."""
    times = tp["time"].values.astype("datetime64[ns]")
    hour = np.timedelta64(1, "h")
    steps = np.diff(times)
    if times.size < 6 or np.any(steps % hour != np.timedelta64(0)) or not np.any(steps == hour):
        spacing = pd.Timedelta(np.median(steps)) if steps.size else "one time"
        raise DataError(f"{folder}: total_precipitation must be hourly ERA5 'tp' (accumulation "
                        f"over the hour ending at the time stamp) to form 6-h totals; its times "
                        f"are spaced {spacing}. For files that already hold 6-h totals pass "
                        "names={'tp': 'total_precipitation_6hr'}")
    complete = np.zeros(times.size, dtype=bool)
    complete[5:] = (times[5:] - times[:-5]) == 5 * hour
    totals = _take(tp.rolling(time=6).sum(), np.nonzero(complete)[0])
    return totals.assign_attrs({**tp.attrs, "long_name": "Total precipitation over the "
                                "6 hours ending at the time stamp (sum of hourly ERA5 tp)"})


# Above radon C on purpose: folder discovery, variable naming and levels of the WeatherBench 1 layout.
def open_weatherbench1(root: str | os.PathLike, names: Mapping[str, str] | None = None, *,
                       variables: Iterable[str] | None = None,
                       chunk_bytes: int = _CHUNK_BYTES) -> xr.Dataset:
    """Open a WeatherBench (1) resolution directory lazily, in WB2 canonical form.

    ``variables`` (folder names or canonical names) limits which folders are read; folders
    that are not WeatherBench variable folders are ignored. ``chunk_bytes`` sizes the dask
    time chunks. See the module docstring for names, units and the 6-h precipitation.
    """
    _require_dask()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"WeatherBench directory not found: {root}")
    table = _table(names)
    folders = _weatherbench1_folders(root, names)
    if not folders:
        seen = sorted(c.name for c in root.iterdir())
        raise DataError(f"cannot open {root}: a directory, but not a zarr store nor a "
                        "WeatherBench directory (no recognised variable folder such as "
                        f"2m_temperature/, geopotential_500/ or constants/; it holds {seen})"
                        f"{_resolution_hint(root, names)}")
    if variables is not None:
        wanted = set(variables)
        folders = {f: v for f, v in folders.items()
                   if f.name in wanted or v[0] in wanted
                   or (v[0] == _WB1_PRECIP_FOLDER and "total_precipitation_6hr" in wanted)}
        if not folders:
            raise DataError(f"none of {sorted(wanted)} is a variable folder of {root}")

    arrays: dict[str, list[tuple[xr.DataArray, bool]]] = {}
    grids: dict[str, _Piece] = {}
    for folder, (variable, level) in folders.items():
        files = _netcdf_files(folder)
        if not files:
            zipped = sorted(p.name for p in folder.glob("*.zip"))
            hint = f" (unzip {zipped} first)" if zipped else ""
            raise DataError(f"variable folder {folder} holds no netCDF files{hint}")
        constants = variable == "constants"
        ds, pieces = _open_folder(folder, files, level, table, constants, chunk_bytes)
        grids[folder.name] = pieces[0]
        for canonical, array in _folder_arrays(folder, ds, variable, names, table).items():
            if canonical == _WB1_PRECIP_FOLDER:
                own = (names or {}).get(array.name) == "total_precipitation_6hr"
                array = array if own else _six_hour_totals(array, folder)
                canonical = "total_precipitation_6hr"
            array = convert_units(array, canonical, str(folder))
            multi = "level" in array.dims and level is None
            arrays.setdefault(canonical, []).append((array, multi))
    _check_grids(grids)
    reference = next(iter(grids.values()))
    combined = {name: _on_grid(_combine_levels(name, parts), reference)
                for name, parts in arrays.items()}
    ds = _merge(combined, str(root))
    ds.attrs = {SOURCE_ATTR: str(root), "source_layout": "WeatherBench (1)"}
    return canonicalise(ds, names)


def _combine_levels(name: str, parts: list[tuple[xr.DataArray, bool]]) -> xr.DataArray:
    """One array per variable: multi-level folder first, single-level folders add new levels."""
    if len(parts) == 1:
        return parts[0][0]
    parts = sorted(parts, key=lambda p: not p[1])
    if any("level" not in array.dims for array, _ in parts):
        raise DataError(f"variable '{name}' comes from several folders, not all with levels")
    kept, seen = [], set()
    for array, _ in parts:
        new = [lv for lv in array["level"].values.tolist() if lv not in seen]
        if new:
            kept.append(array.sel(level=new))
            seen.update(new)
    if len(kept) == 1:
        return kept[0]
    kept = list(_intersect_times(dict(enumerate(kept)), f"variable '{name}'").values())
    return xr.concat(kept, dim="level", join="exact", coords="minimal",
                     compat="override").sortby("level")


# --------------------------------------------------------------------------------------
# ENS-10-style ensemble netCDF
# --------------------------------------------------------------------------------------


def _lead_as_timedelta(ds: xr.Dataset, source: str) -> xr.Dataset:
    lead = ds[_LEAD]
    if np.issubdtype(lead.dtype, np.timedelta64):
        return ds
    units = str(lead.attrs.get("units", "hours")).strip().lower()  # ENS-10 steps are hours
    unit = {"hours": "h", "hour": "h", "h": "h", "hr": "h", "days": "D", "day": "D", "d": "D",
            "minutes": "min", "minute": "min", "min": "min", "seconds": "s", "second": "s",
            "s": "s", "nanoseconds": "ns", "ns": "ns", "microseconds": "us",
            "milliseconds": "ms"}.get(units)
    if unit is None or not np.issubdtype(lead.dtype, np.number):
        raise DataError(f"lead time '{_LEAD}' in {source} has units '{units}' and dtype "
                        f"{lead.dtype}: cannot read it as a duration")
    values = pd.to_timedelta(lead.values, unit=unit).values.astype("timedelta64[ns]")
    return ds.assign_coords({_LEAD: values})


def _open_ensemble_file(path: Path, names: Mapping[str, str] | None) -> tuple[dict[str, xr.DataArray], _Piece]:
    try:
        ds = xr.open_dataset(path, decode_timedelta=False, cache=False)
    except Exception as error:
        raise DataError(f"cannot read netCDF file {path}: {error}") from error
    return _ensemble_arrays(ds, str(path), names)


def _ensemble_arrays(ds: xr.Dataset, source: str,
                     names: Mapping[str, str] | None) -> tuple[dict[str, xr.DataArray], _Piece]:
    """Canonical name → array (time, prediction_timedelta, number, level, … lazily) of one
    opened ensemble netCDF file or GRIB hypercube, and its grid and times."""
    table = _table(names, ENSEMBLE_NAMES)
    dims_table = {**table, **ENSEMBLE_DIMS, **(names or {})}
    # One dask chunk per initialisation and lead, chunked before anything reshapes the data.
    chunks = {dim: (1 if dims_table.get(str(dim), str(dim)) in ("time", _LEAD) else -1)
              for dim in ds.dims}
    ds = _drop_auxiliary(ds.chunk(chunks))
    dims_table.pop("valid_time", None)  # cfgrib's time + step: derived, never the init time
    ds = _rename_coords(ds.drop_vars([c for c in ("valid_time",) if c in ds.variables]), dims_table)
    if "time" not in ds.coords:
        raise DataError(f"{source} has no 'time' coordinate (initialisation time); it has "
                        f"{sorted(map(str, set(ds.dims) | set(ds.coords)))}")
    if _LEAD not in ds.coords:
        raise DataError(f"{source} has no lead-time coordinate (step, prediction_timedelta or "
                        "lead_time)")
    for dim in ("time", _LEAD, _MEMBER, "level"):
        if dim in ds.coords and ds[dim].ndim == 0:
            ds = ds.expand_dims(dim)
    ds = ds.reset_coords(drop=True)  # valid_time, surface, heightAboveGround, ...: derived
    ds = _lead_as_timedelta(ds, source)
    times = _ensure_datetimes(ds["time"].values, source)
    ds = ds.assign_coords(time=times)
    lat, lon = _grid_of(ds, source)
    arrays = {}
    for name in map(str, ds.data_vars):
        canonical = table.get(name, name)
        if canonical not in UNITS:
            raise DataError(f"unknown variable '{name}' in {source}: not an ERA5/ECMWF short "
                            f"name this reader knows (known variables: {sorted(UNITS)}); map "
                            "it with `names`")
        if canonical in arrays:
            raise DataError(f"{source} holds '{canonical}' twice")
        arrays[canonical] = convert_units(ds[name], canonical, source)
    return arrays, _Piece(source, lat, lon, times)


def _same_coords(a: xr.DataArray, b: xr.DataArray, dim: str) -> bool:
    if (dim in a.dims) != (dim in b.dims):
        return False
    return dim not in a.dims or (a.sizes[dim] == b.sizes[dim]
                                 and np.array_equal(a[dim].values, b[dim].values))


def open_ensemble(path: str | os.PathLike, names: Mapping[str, str] | None = None) -> xr.Dataset:
    """Open ENS-10-style ensemble netCDF (a file or a directory of them) lazily, in WB2's
    forecast layout: ``time`` (initialisation), ``prediction_timedelta``, ``number``,
    ``level``, ``longitude``, ``latitude``. See the module docstring.
    """
    _require_dask()
    path = Path(path)
    files = _netcdf_files(path, recursive=True) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no netCDF files in {path}")
    return _combine_ensemble((_open_ensemble_file(file, names) for file in files), path,
                             "ensemble netCDF", names)


def _join_members(parts: list[tuple[xr.DataArray, _Piece]]) -> list[tuple[xr.DataArray, _Piece]]:
    """One variable's pieces with other members of the same initialisations, leads and levels
    (ECMWF's control and perturbed forecasts: two GRIB hypercubes) joined along ``number``."""
    joined: list[tuple[xr.DataArray, _Piece]] = []
    for array, piece in parts:
        for k, (other, first_piece) in enumerate(joined):
            if (_MEMBER in array.dims and _MEMBER in other.dims
                    and all(_same_coords(other, array, dim) for dim in ("time", _LEAD, "level"))
                    and not np.intersect1d(other[_MEMBER].values, array[_MEMBER].values).size):
                both = xr.concat([other, array], dim=_MEMBER, coords="minimal", compat="override",
                                 join="exact")
                joined[k] = (both.sortby(_MEMBER), first_piece)
                break
        else:
            joined.append((array, piece))
    return joined


def _combine_ensemble(parts: Iterable[tuple[dict[str, xr.DataArray], _Piece]], path: Path,
                      layout: str, names: Mapping[str, str] | None) -> xr.Dataset:
    """One canonical forecast-layout dataset from the pieces' arrays (files or hypercubes on
    one grid, split by initialisation time, member and variable only)."""
    by_variable: dict[str, list[tuple[xr.DataArray, _Piece]]] = {}
    pieces: list[_Piece] = []
    for arrays, piece in parts:
        if pieces and not _same_grid(pieces[0], piece):
            raise _grid_error(pieces[0], piece)
        pieces.append(piece)
        for name, array in arrays.items():
            by_variable.setdefault(name, []).append((_on_grid(array, pieces[0]), piece))
    combined = {}
    for name, parts_of_name in by_variable.items():
        parts_of_name = _join_members(parts_of_name)
        first = parts_of_name[0][0]
        for array, piece in parts_of_name[1:]:
            for dim in (_LEAD, _MEMBER, "level"):
                if not _same_coords(first, array, dim):
                    raise DataError(f"'{name}' in {piece.source} has other {dim} values than in "
                                    f"{parts_of_name[0][1].source}: files may split an ensemble "
                                    "by initialisation time, member and variable only")
        if len(parts_of_name) == 1:
            array = first
        else:
            array = xr.concat([a for a, _ in parts_of_name], dim="time", coords="minimal",
                              compat="override", join="exact")
        _check_times([p for _, p in parts_of_name], array.indexes["time"], f"'{name}' of {path}")
        combined[name] = array.transpose("time", *[d for d in (_LEAD, _MEMBER, "level")
                                                   if d in array.dims], ...)
    ds = _merge(combined, str(path))
    ds.attrs = {SOURCE_ATTR: str(path), "source_layout": layout}
    return canonicalise(ds, names)


# --------------------------------------------------------------------------------------
# GRIB (through xarray's cfgrib engine)
# --------------------------------------------------------------------------------------


def is_grib(path: Path) -> bool:
    """Whether a local file is GRIB: by its suffix or its first bytes (``GRIB``)."""
    if path.suffix.lower() in _GRIB_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        return handle.read(4) == b"GRIB"


def _grib_hypercubes(path: Path) -> list[xr.Dataset]:
    """The GRIB file's hypercubes as cfgrib builds them (one per level type, step range, …),
    lazily; a truncated or corrupt message raises :class:`DataError` naming the file."""
    try:
        import cfgrib
    except (ImportError, RuntimeError) as error:  # RuntimeError: the ecCodes library missing
        raise DataError(f"cannot read GRIB file {path}: reading GRIB needs cfgrib and eccodes "
                        f"(pip install weatherpeft[grib]); {type(error).__name__}: {error}") from error
    try:
        # cfgrib's message index goes to a scratch folder, not beside the data (read-only
        # folders); it is in memory once opened. Without one, cfgrib rescans the file for
        # every variable and level type: 7× slower on 280 messages.
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
            warnings.simplefilter("ignore", FutureWarning)  # cfgrib merges with old defaults
            options = {"indexpath": os.path.join(scratch, "{short_hash}.idx"), "errors": "raise"}
            cubes = cfgrib.open_datasets(str(path), backend_kwargs=options, cache=False)
    except Exception as error:  # eccodes' GribInternalError family, cfgrib's DatasetBuildError
        raise DataError(f"cannot read GRIB file {path} (a truncated or corrupt file?): "
                        f"{type(error).__name__}: {error}") from error
    if not cubes:
        raise DataError(f"GRIB file {path} holds no messages cfgrib can read")
    return cubes


def _is_forecast_cube(cube: xr.Dataset) -> bool:
    """Several members or leads, or a lead other than 0: not an analysis."""
    if "number" in cube.dims or "step" in cube.dims:
        return True
    step = cube.coords.get("step")
    return step is not None and bool(np.any(step.values.astype("timedelta64[ns]").astype(np.int64)))


def _analysis_arrays(cube: xr.Dataset, source: str,
                     names: Mapping[str, str] | None) -> tuple[dict[str, xr.DataArray], _Piece]:
    """Name → array of one analysis hypercube (step 0, one member or none) with WB2's
    names (:data:`STORE_NAMES`, as for netCDF), dims and units, lazily. A constant field
    (land-sea mask, orography, soil type) given at one time only has no time axis."""
    cube = _rename_coords(cube.drop_vars([c for c in ("valid_time",) if c in cube.variables]),
                          _table(names))
    if "level" in cube.coords and cube["level"].ndim == 0:
        cube = cube.expand_dims("level")
    cube = cube.rename(rename_table(cube, names))
    if "time" not in cube.coords:
        raise DataError(f"a hypercube of GRIB file {source} has no time; it has "
                        f"{sorted(map(str, cube.coords))}")
    single = np.atleast_1d(cube["time"].values) if cube["time"].ndim == 0 else None
    times = _ensure_datetimes(np.atleast_1d(cube["time"].values), source)
    lat, lon = _grid_of(cube, source)
    arrays = {}
    for name, array in cube.reset_coords(drop=True).data_vars.items():  # step, number, surface, …
        if single is not None and name not in WEATHERBENCH1_CONSTANTS.values():
            array = array.expand_dims(time=single)
        array = array.chunk({dim: (1 if dim == "time" else -1) for dim in array.dims})
        arrays[str(name)] = convert_units(array, name, source) if name in UNITS else array
    return arrays, _Piece(source, lat, lon, times)


def open_grib(path: str | os.PathLike, names: Mapping[str, str] | None = None) -> xr.Dataset:
    """Open a GRIB file through xarray's cfgrib engine (``pip install weatherpeft[grib]``),
    lazily, in canonical form: an analysis (step 0, one member or none) as a WB2 store, a
    forecast (several members or leads) in WB2's forecast layout, as :func:`open_ensemble`.
    ECMWF short names go through :data:`STORE_NAMES` (+ ``names``) as in netCDF files.
    """
    _require_dask()
    path = Path(path)
    source = str(path)
    cubes = _grib_hypercubes(path)
    if any(_is_forecast_cube(cube) for cube in cubes):
        return _combine_ensemble((_ensemble_arrays(cube, source, names) for cube in cubes), path,
                                 "ensemble GRIB", names)
    arrays: dict[str, xr.DataArray] = {}
    pieces: dict[str, _Piece] = {}
    for index, cube in enumerate(cubes):
        named, pieces[str(index)] = _analysis_arrays(cube, source, names)
        repeated = sorted(set(named) & set(arrays))
        if repeated:
            raise DataError(f"GRIB file {path} holds {repeated} on two kinds of level; keep one "
                            "or rename one with `names`")
        arrays.update(named)
    _check_grids(pieces)
    reference = pieces["0"]
    ds = _merge({name: _on_grid(array, reference) for name, array in arrays.items()}, source)
    ds.attrs = {SOURCE_ATTR: source, "source_layout": "GRIB analysis"}
    return canonicalise(ds, names)


# --------------------------------------------------------------------------------------
# Remote stores
# --------------------------------------------------------------------------------------


def open_remote(url: str, names: Mapping[str, str] | None = None, *,
                storage_options: Mapping | None = None) -> xr.Dataset:
    """Open a zarr store (or a netCDF file) behind an fsspec URL lazily, in canonical form.

    ``storage_options`` go to fsspec (e.g. ``{"token": "anon"}`` for the public
    ``gs://weatherbench2`` bucket, which also needs ``gcsfs``). Errors name the URL.
    """
    options = dict(storage_options or {})
    try:
        if url.rstrip("/").lower().endswith(_NETCDF_SUFFIXES):
            import fsspec

            handle = fsspec.open(url, mode="rb", **options).open()
            ds = xr.open_dataset(handle, chunks={})  # h5netcdf or scipy, by magic number
        else:
            try:
                ds = xr.open_zarr(url, storage_options=options, consolidated=True, chunks=None)
            except (KeyError, FileNotFoundError, ValueError):
                ds = xr.open_zarr(url, storage_options=options, consolidated=False, chunks=None)
    except Exception as error:  # fsspec/zarr/network errors come in many types
        raise DataError(f"cannot open remote store {url}: {type(error).__name__}: {error}") from error
    if not ds.data_vars:
        raise DataError(f"cannot read {url}: it holds no data variables")
    ds.attrs[SOURCE_ATTR] = url
    return canonicalise(ds, names)
