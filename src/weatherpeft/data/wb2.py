"""WeatherBench2-layout reader: zarr or netCDF stores of ERA5-like fields → ``aurora.Batch``.

A store is opened once and put into WB2's canonical form (canonical variable names; dims
(time, level, longitude, latitude); time, level, longitude and latitude ascending; longitude
in [0, 360)) — so the reader that opens the built-in world also opens real ERA5, whatever
its names, dimension order or latitude direction. :class:`WB2Dataset` then serves
(input, target) pairs of :class:`aurora.Batch` in physical units with latitude decreasing,
as Aurora requires.

Every problem with a store's content — unreadable or truncated files and chunks, a missing
variable or level, a broken grid, duplicate times, NaN/inf or implausible values (unmasked fill
values) — raises :class:`DataError`, naming the file, the variable and the time/level. With
samples cached in memory (the default for stores that fit) values are checked when the
dataset is built; lazily read samples are checked as they are read, and ``weatherpeft data
check`` / :func:`validate` scan a whole store ahead of training. Variables a sample does not
ask for are ignored.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from aurora import Batch, Metadata

from weatherpeft.data import readers
from weatherpeft.data.canonical import canonicalise
from weatherpeft.data.layout import (
    ANY_VALUE,
    AURORA_NAMES,
    CANONICAL_DIMS,
    SOURCE_ATTR,
    STORE_NAMES,
    DataError,
    canonical_name,
    format_coordinate,
    is_zarr_dir,
    level_value,
    looks_like_netcdf,
    plausible_range,
    source_of,
)
from weatherpeft.data.paths import resolve_path

__all__ = [
    "AURORA_NAMES",
    "DataError",
    "SOURCE_ATTR",
    "STORE_NAMES",
    "SampleSpec",
    "StoreReport",
    "StoreSelection",
    "WB2Dataset",
    "canonicalise",
    "check_finite",
    "check_static",
    "collate_batches",
    "describe_index",
    "describe_point",
    "find_bad_value",
    "open_period",
    "open_source",
    "open_store",
    "read_array",
    "read_fields",
    "read_static",
    "select",
    "time_blocks",
    "validate",
]


# --------------------------------------------------------------------------------------
# Opening and canonicalising a store
# --------------------------------------------------------------------------------------


def open_store(path: str | os.PathLike, names: Mapping[str, str] | None = None, *,
               storage_options: Mapping | None = None) -> xr.Dataset:
    """Open a local WB2-layout zarr directory or netCDF file lazily, in canonical form.

    ``names`` adds to (and overrides) :data:`STORE_NAMES`. Nothing is read but metadata and
    coordinates; see :func:`canonicalise` for what is changed. A relative path is found from
    the working folder, else the checkout (:func:`~weatherpeft.data.paths.resolve_path`). fsspec URLs (with
    ``storage_options``), WeatherBench (1) directories, ENS-10-style ensemble netCDF and
    GRIB files are opened by :mod:`weatherpeft.data.readers`.
    """
    if readers.is_url(path) is None:  # a local path: the working folder, else the checkout
        path = resolve_path(path, "store")
    special = readers.open_special(path, names, storage_options=storage_options)
    if special is not None:
        return special
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"store not found: {path}")
    if path.is_dir():
        if not is_zarr_dir(path):
            raise DataError(f"cannot open {path}: a directory, but not a zarr store "
                            "(no zarr.json, .zgroup or .zmetadata inside)")
        ds = _open_zarr(path)
    else:
        if not looks_like_netcdf(path):
            raise DataError(f"cannot open {path}: unsupported format (expected a zarr "
                            "directory, a netCDF or a GRIB file)")
        ds = _open_netcdf(path)
    if not ds.data_vars:
        raise DataError(f"cannot read {path}: it holds no data variables")
    ds.attrs[SOURCE_ATTR] = str(path)
    return canonicalise(ds, names)


def open_source(source: str | os.PathLike | xr.Dataset,
                names: Mapping[str, str] | None = None) -> xr.Dataset:
    """A store path opened by :func:`open_store`, or an in-memory dataset put in canonical form."""
    return canonicalise(source, names) if isinstance(source, xr.Dataset) else open_store(source, names)


def _open_zarr(path: Path) -> xr.Dataset:
    """A local zarr store, through its consolidated metadata where it has them."""
    _refuse_pickle_codec(path)
    try:
        try:
            return xr.open_zarr(path, consolidated=True, chunks=None)
        except (ValueError, KeyError, FileNotFoundError):  # no (or unreadable) consolidated metadata
            return xr.open_zarr(path, consolidated=False, chunks=None)
    except Exception as error:  # zarr and its codecs raise many types for a broken store
        raise DataError(f"cannot read zarr store {path}: {type(error).__name__}: {error}") from error


def _refuse_pickle_codec(path: Path) -> None:
    """Raise before opening a zarr (format 2) store with an array encoded by numcodecs' pickle
    codec: zarr 2 would unpickle its chunks, running whatever code a data file holds."""
    try:
        arrays = (path / ".zarray", *path.glob("*/.zarray"))
        records = [json.loads(array.read_text()) for array in arrays if array.is_file()]
        if (path / ".zmetadata").is_file():
            metadata = json.loads((path / ".zmetadata").read_text())["metadata"]
            records += [record for key, record in metadata.items() if key.endswith(".zarray")]
        codecs = [codec for record in records
                  for codec in (record.get("compressor"), *(record.get("filters") or []))]
    except (ValueError, KeyError, TypeError, AttributeError):
        return  # unreadable metadata: opening reports it
    if any(isinstance(codec, dict) and codec.get("id") == "pickle" for codec in codecs):
        raise DataError(f"refusing to open zarr store {path}: an array is encoded with the pickle "
                        "codec, which would run code from the store when read")


def _open_netcdf(path: Path) -> xr.Dataset:
    try:
        ds = xr.open_dataset(path, cache=False)
    except Exception as error:  # netCDF4/h5netcdf raise OSError, ValueError, ...
        raise DataError(f"cannot read netCDF file {path}: {error}") from error
    _check_classic_length(path, ds)
    return ds


def _check_classic_length(path: Path, ds: xr.Dataset) -> None:
    """Raise if a classic (netCDF-3) file is shorter than its variables' data: truncated.

    The netCDF library reads the missing part of such a file as zeros or fill values; a
    truncated netCDF-4 (HDF5) file fails in the library itself.
    """
    with open(path, "rb") as handle:
        if handle.read(3) != b"CDF":
            return
    needed = 0
    for variable in ds.variables.values():
        dtype = variable.encoding.get("dtype")
        if dtype is not None and np.dtype(dtype).kind in "biuf":
            needed += variable.size * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size < needed:
        raise DataError(f"netCDF file {path} is truncated: {size:,} bytes, but its variables "
                        f"hold {needed:,}")


#: How messages name a coordinate and an index along each dimension. Rows count from the
#: north (latitude decreasing, as in a sample: for ERA5 and GRIB files, the file's own rows).
_POINT_NAMES = {"time": ("time", "store time index"), "prediction_timedelta": ("lead", "lead index"),
                "number": ("member", "member index"), "level": ("level", "level index"),
                "latitude": ("latitude", "row"), "longitude": ("longitude", "column")}


def describe_point(coords: Mapping[str, np.ndarray], where: Mapping[str, int]) -> str:
    """A point's coordinate values and indices, for messages, e.g. ``time 2003-01-04 06:00:00
    (store time index 13), level 850 hPa (level index 1), latitude -87.1875 (row 31),
    longitude 354.375 (column 63)``. ``coords[dim][where[dim]]`` is the value along ``dim``."""
    order = list(_POINT_NAMES)
    parts = []
    for dim in sorted(where, key=lambda d: order.index(d) if d in order else len(order)):
        name, index_name = _POINT_NAMES.get(dim, (dim, f"{dim} index"))
        unit = " hPa" if dim == "level" else ""
        parts.append(f"{name} {format_coordinate(coords[dim][where[dim]])}{unit} "
                     f"({index_name} {where[dim]})")
    return ", ".join(parts)


def describe_index(array: xr.DataArray, where: Sequence[int]) -> str:
    """:func:`describe_point` for index ``where`` into a canonical ``array`` (latitude
    ascending); its row is counted from the north, as in samples."""
    coords = {str(dim): array[dim].values for dim in array.dims}
    at = {str(dim): int(i) for dim, i in zip(array.dims, where)}
    if "latitude" in at:
        coords["latitude"] = coords["latitude"][::-1]
        at["latitude"] = array.sizes["latitude"] - 1 - at["latitude"]
    return describe_point(coords, at)



# --------------------------------------------------------------------------------------
# What to read: the sample specification and its resolution against a store
# --------------------------------------------------------------------------------------


def _as_timestamp(value) -> np.datetime64 | None:
    if value is None:
        return None
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return np.datetime64(stamp.value, "ns")


@dataclass(frozen=True)
class SampleSpec:
    """What a sample holds and where it comes from.

    Variable names may be canonical WB2 names, store names or Aurora names (all go through
    the name table). ``levels=None`` takes every level in the store. Inputs are the times
    t − (history − 1)·step … t, the target is t + lead (lead 0: target = last input).
    ``start``/``end`` bound every time a sample touches (inclusive); ``None`` = store's ends.
    ``step=None`` infers the store's commonest time spacing. ``in_memory=None`` loads the
    selection into RAM when it needs at most ``max_memory_bytes``; otherwise reads lazily.
    """

    surf_vars: tuple[str, ...] = ("2m_temperature", "10m_u_component_of_wind",
                                  "10m_v_component_of_wind", "mean_sea_level_pressure")
    atmos_vars: tuple[str, ...] = ("geopotential", "temperature", "u_component_of_wind",
                                   "v_component_of_wind", "specific_humidity")
    static_vars: tuple[str, ...] = ("land_sea_mask", "geopotential_at_surface")
    levels: tuple[float, ...] | None = None
    history: int = 2
    lead: timedelta = timedelta(hours=6)
    step: timedelta | None = None
    start: datetime | str | None = None
    end: datetime | str | None = None
    names: Mapping[str, str] = field(default_factory=dict)
    aurora_names: Mapping[str, str] = field(default_factory=dict)
    in_memory: bool | None = None
    max_memory_bytes: int = 2 * 2**30

    def __post_init__(self) -> None:
        for name in ("surf_vars", "atmos_vars", "static_vars"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "lead", pd.Timedelta(self.lead).to_pytimedelta())
        if self.step is not None:
            object.__setattr__(self, "step", pd.Timedelta(self.step).to_pytimedelta())
            if self.step <= timedelta(0):
                raise ValueError(f"step must be positive, got {self.step}")
        if self.history < 1:
            raise ValueError(f"history must be at least 1, got {self.history}")
        if self.lead < timedelta(0):
            raise ValueError(f"lead must not be negative, got {self.lead}")
        if not self.surf_vars and not self.atmos_vars:
            raise ValueError("a sample needs at least one surface or atmospheric variable")


@dataclass(frozen=True, eq=False)
class StoreSelection:
    """A :class:`SampleSpec` resolved against one canonical store.

    ``surf``/``atmos``/``static`` map canonical store names to Aurora names. ``level_index``
    indexes the store's level axis in the order of ``levels``. ``positions`` are the store
    time indices inside [start, end]; ``times`` all store times (datetime64[ns]). ``bounds``:
    each variable's plausible range in the store's units (beyond it: a fill value).
    """

    surf: dict[str, str]
    atmos: dict[str, str]
    static: dict[str, str]
    levels: tuple[int | float, ...]
    level_index: np.ndarray
    times: np.ndarray
    positions: np.ndarray
    start: np.datetime64
    end: np.datetime64
    step_ns: int
    lat: np.ndarray  # decreasing, as Aurora wants
    lon: np.ndarray
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def dynamic(self) -> dict[str, str]:
        """Surface and atmospheric variables together (canonical → Aurora)."""
        return {**self.surf, **self.atmos}


def _resolve_variable(ds: xr.Dataset, name: str, kind: str, spec: SampleSpec, source: str) -> str:
    canonical = canonical_name(name, spec.names, static=kind == "static")  # static "z": Aurora's orography
    if canonical not in ds.data_vars:
        asked = f" (asked as '{name}')" if canonical != name else ""
        raise DataError(f"variable '{canonical}'{asked} not in store {source}; "
                        f"it has: {sorted(map(str, ds.data_vars))}")
    dims = set(ds[canonical].dims)
    needed = {"surf": {"time", "latitude", "longitude"},
              "atmos": {"time", "level", "latitude", "longitude"},
              "static": {"latitude", "longitude"}}[kind]
    if not needed <= dims or (kind == "surf" and "level" in dims):
        raise DataError(f"{kind} variable '{canonical}' in {source} has dims "
                        f"{ds[canonical].dims}; expected {sorted(needed)}")
    extra = dims - needed - {"time", "level"}
    big = [d for d in extra if ds.sizes[d] != 1]
    if big:
        raise DataError(f"variable '{canonical}' in {source} has extra dims {big} of size > 1")
    return canonical


def _aurora_name(canonical: str, spec: SampleSpec) -> str:
    table = {**AURORA_NAMES, **spec.aurora_names}
    if canonical not in table:
        raise ValueError(f"no Aurora name for variable '{canonical}'; add it to "
                         "SampleSpec.aurora_names")
    return table[canonical]



def _infer_step_ns(times: np.ndarray, spec: SampleSpec, source: str) -> int:
    if spec.step is not None:
        return int(pd.Timedelta(spec.step).value)
    if times.size < 2:
        raise DataError(f"store {source} has {times.size} time(s): cannot infer the time "
                        "step; set SampleSpec.step")
    diffs, counts = np.unique(np.diff(times.astype(np.int64)), return_counts=True)
    return int(diffs[np.argmax(counts)])


# Above radon C on purpose: checks variables, levels and the time range, each failure listing what the store has.
def select(ds: xr.Dataset, spec: SampleSpec) -> StoreSelection:
    """Resolve ``spec`` against a canonical dataset; raise a clear :class:`DataError` if it can't.

    Checks variables (listing what the store has), levels (listing what is available) and
    that [start, end] lies inside the store's time range (showing that range).
    """
    source = source_of(ds)
    surf = {v: _aurora_name(v, spec) for v in
            (_resolve_variable(ds, n, "surf", spec, source) for n in spec.surf_vars)}
    atmos = {v: _aurora_name(v, spec) for v in
             (_resolve_variable(ds, n, "atmos", spec, source) for n in spec.atmos_vars)}
    static = {v: _aurora_name(v, spec) for v in
              (_resolve_variable(ds, n, "static", spec, source) for n in spec.static_vars)}

    if atmos:
        available = ds["level"].values.astype(np.float64)
        wanted = available if spec.levels is None else np.asarray(spec.levels, dtype=np.float64)
        level_index = []
        for level in wanted:
            match = np.nonzero(np.isclose(available, level))[0]
            if match.size == 0:
                raise DataError(f"level {level_value(level)} hPa not in store {source}; "
                                f"available: {[level_value(a) for a in available]}")
            level_index.append(int(match[0]))
        level_index_arr = np.asarray(level_index, dtype=np.int64)
        levels = tuple(level_value(available[i]) for i in level_index_arr)
    else:
        level_index_arr = np.zeros(0, dtype=np.int64)
        levels = ()

    if "time" not in ds.dims:
        raise DataError(f"store {source} has no 'time' dimension")
    times = ds["time"].values.astype("datetime64[ns]")
    if times.size == 0:
        raise DataError(f"store {source} holds no times")
    first, last = times[0], times[-1]
    start = _as_timestamp(spec.start) if spec.start is not None else first
    end = _as_timestamp(spec.end) if spec.end is not None else last
    if start > end:
        raise ValueError(f"time range start {pd.Timestamp(start)} is after end {pd.Timestamp(end)}")
    if start < first or end > last:
        raise DataError(f"time range {pd.Timestamp(start)} – {pd.Timestamp(end)} is not inside "
                        f"store {source}, which covers {pd.Timestamp(first)} – {pd.Timestamp(last)}")
    positions = np.nonzero((times >= start) & (times <= end))[0]

    lat = ds["latitude"].values.astype(np.float64)[::-1].copy()
    lon = ds["longitude"].values.astype(np.float64)
    bounds = {name: plausible_range(name, ds[name].attrs.get("units"))
              for name in {**surf, **atmos, **static}}
    return StoreSelection(surf=surf, atmos=atmos, static=static, levels=levels,
                          level_index=level_index_arr, times=times, positions=positions,
                          start=start, end=end, step_ns=_infer_step_ns(times, spec, source),
                          lat=lat, lon=lon, bounds=bounds)


# --------------------------------------------------------------------------------------
# Reading fields
# --------------------------------------------------------------------------------------


def _indexer(index: np.ndarray) -> slice | np.ndarray:
    """A slice where the indices are a contiguous ascending run (cheaper for every backend)."""
    if index.size and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def read_fields(ds: xr.Dataset, name: str, positions: np.ndarray,
                level_index: np.ndarray | None = None) -> np.ndarray:
    """Read one variable at store time indices ``positions`` as float32, Aurora layout.

    Returns (n, H, W) for surface variables or (n, C, H, W) for atmospheric ones (levels in
    ``level_index`` order), latitude decreasing. Only the needed times and levels are read.
    """
    array = ds[name]
    extra = {d: 0 for d in array.dims if d not in CANONICAL_DIMS}
    positions = np.asarray(positions)
    index: dict = {"time": _indexer(positions), **extra}
    order = ["time", "latitude", "longitude"]
    if "level" in array.dims:
        index["level"] = _indexer(np.asarray(level_index))
        order.insert(1, "level")
    try:
        values = read_array(array.isel(index).transpose(*order), source_of(ds),
                            _describe_times(ds, positions))
    except DataError:
        if positions.size > 1:  # name the first unreadable time
            for position in positions:
                read_fields(ds, name, np.array([position]), level_index)
        raise
    return np.ascontiguousarray(values[..., ::-1, :], dtype=np.float32)


def _describe_times(ds: xr.Dataset, positions: np.ndarray) -> str:
    """The store times at ``positions``, for messages."""
    if positions.size == 0:
        return "no time"
    first, last = int(positions.min()), int(positions.max())
    start, end = (pd.Timestamp(ds["time"].values[p]) for p in (first, last))
    if first == last:
        return describe_point({"time": ds["time"].values}, {"time": first})
    return f"times {start} – {end} (store time indices {first}–{last})"


def read_static(ds: xr.Dataset, name: str) -> np.ndarray:
    """A static field (H, W) as float32, latitude decreasing; a time axis, if any, is dropped."""
    array = ds[name]
    array = array.isel({d: 0 for d in array.dims if d not in ("latitude", "longitude")})
    values = read_array(array.transpose("latitude", "longitude"), source_of(ds), "its static field")
    return np.ascontiguousarray(values[::-1, :], dtype=np.float32)


def read_array(array: xr.DataArray, source: str, where: str) -> np.ndarray:
    """``array``'s values; a failing read (a truncated or corrupt chunk or file) raises
    :class:`DataError` naming ``source``, the variable and ``where`` (e.g. its time indices)."""
    try:
        return array.values
    except MemoryError:
        raise
    except Exception as error:  # zarr codecs, HDF5 and dask raise many types
        raise DataError(f"cannot read variable '{array.name}' at {where} from {source} (a "
                        f"truncated or corrupt chunk or file?): {type(error).__name__}: {error}") from error


def find_bad_value(values: np.ndarray,
                   bounds: tuple[float, float]) -> tuple[tuple[int, ...], str] | None:
    """(index, description) of the first NaN, inf or value outside ``bounds`` in ``values``;
    None when there is none. Out of bounds means an unmasked fill value or other units."""
    low, high = bounds
    if values.size == 0 or (low <= values.min() and values.max() <= high):  # NaN fails both
        return None
    where = tuple(int(i) for i in np.argwhere(~((values >= low) & (values <= high)))[0])
    value = float(values[where])
    if math.isnan(value) or math.isinf(value):
        return where, str(value).replace("nan", "NaN")
    return where, (f"implausible value {value:.6g} (outside [{low:.6g}, {high:.6g}]: an unmasked "
                   "fill value, or other units than its units attribute says)")


def check_finite(values: np.ndarray, name: str, positions: np.ndarray,
                 selection: StoreSelection, source: str) -> None:
    """Raise :class:`DataError` at the first NaN, inf or implausible value (see
    :func:`find_bad_value`) of variable ``name``'s ``values`` (Aurora layout, at store times
    ``positions``), naming the variable, timestamp, level and grid point."""
    found = find_bad_value(values, selection.bounds.get(name, ANY_VALUE))
    if found is None:
        return
    where, what = found
    level = f" at level {selection.levels[where[1]]} hPa" if values.ndim == 4 else ""
    point = _grid_point(selection, where[-2:], time=int(positions[where[0]]))
    raise DataError(f"{what} in variable '{name}'{level} at {point}, in {source}")


def check_static(values: np.ndarray, name: str, selection: StoreSelection, source: str) -> None:
    """:func:`check_finite` for a static field (H, W), latitude decreasing."""
    found = find_bad_value(values, selection.bounds.get(name, ANY_VALUE))
    if found is not None:
        where, what = found
        raise DataError(f"{what} in static variable '{name}', {_grid_point(selection, where)}, "
                        f"in {source}")


def _grid_point(selection: StoreSelection, where: tuple[int, ...], time: int | None = None) -> str:
    """A point of a sample's grid (latitude decreasing), at store time index ``time`` if given."""
    coords = {"time": selection.times, "latitude": selection.lat, "longitude": selection.lon}
    at = {"latitude": where[0], "longitude": where[1], **({} if time is None else {"time": time})}
    return describe_point(coords, at)


def _bytes_per_step(selection: StoreSelection) -> int:
    height, width = len(selection.lat), len(selection.lon)
    fields = len(selection.surf) + len(selection.atmos) * len(selection.levels)
    return 4 * fields * height * width


def time_blocks(selection: StoreSelection, positions: np.ndarray,
                block_bytes: int = 64 * 2**20) -> Iterator[np.ndarray]:
    """Split store time indices into blocks whose fields take about ``block_bytes``."""
    steps = max(1, block_bytes // max(_bytes_per_step(selection), 1))
    for begin in range(0, len(positions), steps):
        yield positions[begin:begin + steps]


# --------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreReport:
    """Result of a clean :func:`validate`: what the selection holds."""

    n_samples: int
    n_times: int
    first: datetime
    last: datetime
    step: timedelta
    gaps: tuple[tuple[datetime, datetime], ...]


def open_period(source: str | os.PathLike | xr.Dataset, spec: SampleSpec,
                purpose: str) -> tuple[xr.Dataset, StoreSelection, str]:
    """Open ``source`` and select ``spec``'s explicit [start, end] period for a statistic.

    Returns (canonical dataset, selection, the source's name for messages). ``purpose``
    names the caller in errors. Statistics of a training period need both ends given, so
    that evaluation times can never leak in.
    """
    if spec.start is None or spec.end is None:
        raise ValueError(f"{purpose} needs SampleSpec.start and .end (the training period), "
                         "so that it never includes evaluation times")
    ds = open_source(source, spec.names)
    name = source_of(ds)
    selection = select(ds, spec)
    if selection.positions.size == 0:
        raise DataError(f"no store times in {spec.start} – {spec.end} of {name}")
    return ds, selection, name


def _to_datetime(value: np.datetime64) -> datetime:
    return pd.Timestamp(value).to_pydatetime()


class WB2Dataset(torch.utils.data.Dataset):
    """(input, target) ``aurora.Batch`` pairs from a WB2-layout store.

    Input: surf_vars (1, history, H, W), atmos_vars (1, history, C, H, W), static_vars (H, W),
    metadata time = (last input time,). Target: the same with one time step at t + lead.
    Values are float32 in physical units (Aurora normalises internally); latitude decreases.
    Only samples whose every time is present in the store and inside [start, end] exist, so
    gaps never produce wrongly spaced pairs. Static tensors are shared between samples.
    Values are checked (:func:`check_finite`) when loaded into memory at construction, or
    else as each sample is read; a bad value raises :class:`DataError`.
    """

    def __init__(self, source: str | os.PathLike | xr.Dataset, spec: SampleSpec | None = None):
        self.spec = spec or SampleSpec()
        if isinstance(source, xr.Dataset):
            self._path: Path | None = None
            self._ds = canonicalise(source, self.spec.names)
        else:
            self._path = Path(source)
            self._ds = open_store(self._path, self.spec.names)
        self._pid = os.getpid()
        self.source = source_of(self._ds)
        self.selection = select(self._ds, self.spec)
        self._inputs, self._targets = self._sample_positions()
        if len(self._targets) == 0:
            step = timedelta(microseconds=self.selection.step_ns // 1000)
            raise DataError(
                f"no complete samples in {pd.Timestamp(self.selection.start)} – "
                f"{pd.Timestamp(self.selection.end)} of {self.source} (history "
                f"{self.spec.history}, step {step}, lead {self.spec.lead}): too short a range, "
                "or every sample crosses a gap in time")
        self._lat = torch.from_numpy(self.selection.lat.astype(np.float32))
        self._lon = torch.from_numpy(self.selection.lon.astype(np.float32))
        self._static = {}
        for name, aurora_name in self.selection.static.items():
            values = read_static(self._ds, name)
            check_static(values, name, self.selection, self.source)
            self._static[aurora_name] = torch.from_numpy(values)
        self._cache: dict[str, np.ndarray] | None = None
        self._cache_offset = 0
        if self._load_into_memory():
            self._fill_cache()

    # -- sample bookkeeping -------------------------------------------------------------

    def _sample_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Store time indices of every valid sample: inputs (N, history) and targets (N,)."""
        sel = self.selection
        times = sel.times.astype(np.int64)
        last_inputs = sel.positions
        offsets = [-(self.spec.history - 1 - k) * sel.step_ns for k in range(self.spec.history)]
        offsets.append(int(pd.Timedelta(self.spec.lead).value))
        start, end = int(sel.start.astype(np.int64)), int(sel.end.astype(np.int64))
        columns, valid = [], np.ones(len(last_inputs), dtype=bool)
        for offset in offsets:
            wanted = times[last_inputs] + offset
            found = np.clip(np.searchsorted(times, wanted), 0, len(times) - 1)
            valid &= (times[found] == wanted) & (wanted >= start) & (wanted <= end)
            columns.append(found)
        positions = np.stack(columns, axis=1)[valid]
        return positions[:, :-1].copy(), positions[:, -1].copy()

    def __len__(self) -> int:
        return len(self._targets)

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        return index

    def sample_times(self, index: int) -> tuple[tuple[datetime, ...], datetime]:
        """(input times, target time) of sample ``index``."""
        index = self._check_index(index)
        times = self.selection.times
        return (tuple(_to_datetime(times[p]) for p in self._inputs[index]),
                _to_datetime(times[self._targets[index]]))

    @property
    def needed_positions(self) -> np.ndarray:
        """Sorted store time indices that some sample reads."""
        return np.unique(np.concatenate([self._inputs.ravel(), self._targets]))

    # -- reading ------------------------------------------------------------------------

    def _dataset(self) -> xr.Dataset:
        """The open store; reopened once in a forked DataLoader worker (file handles)."""
        if self._path is not None and os.getpid() != self._pid:
            self._ds = open_store(self._path, self.spec.names)
            self._pid = os.getpid()
        return self._ds

    def _load_into_memory(self) -> bool:
        if self.spec.in_memory is not None:
            return self.spec.in_memory
        needed = self.needed_positions
        span = int(needed[-1] - needed[0] + 1)
        return span * _bytes_per_step(self.selection) <= self.spec.max_memory_bytes

    def _fill_cache(self) -> None:
        """Load the span of needed times, block by block, into float32 arrays, checking the
        values of every time a sample reads."""
        needed = self.needed_positions
        span = np.arange(needed[0], needed[-1] + 1)
        cache: dict[str, np.ndarray] = {}
        for name in self.selection.dynamic:
            parts = []
            for chunk in time_blocks(self.selection, span, 256 * 2**20):
                values = read_fields(self._ds, name, chunk, self.selection.level_index)
                read = np.isin(chunk, needed)
                check_finite(values if read.all() else values[read], name, chunk[read],
                             self.selection, self.source)
                parts.append(values)
            cache[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._cache, self._cache_offset = cache, int(span[0])

    def _read(self, name: str, positions: np.ndarray) -> np.ndarray:
        if self._cache is not None:
            return self._cache[name][positions - self._cache_offset]  # fancy index: a copy
        values = read_fields(self._dataset(), name, positions, self.selection.level_index)
        check_finite(values, name, positions, self.selection, self.source)
        return values

    def __getitem__(self, index: int) -> tuple[Batch, Batch]:
        index = self._check_index(index)
        history = self.spec.history
        wanted = np.append(self._inputs[index], self._targets[index])
        positions, inverse = np.unique(wanted, return_inverse=True)
        surf_in, surf_out, atmos_in, atmos_out = {}, {}, {}, {}
        for name, aurora_name in self.selection.dynamic.items():
            values = self._read(name, positions)
            inputs = torch.from_numpy(values[inverse[:history]][None])
            target = torch.from_numpy(values[inverse[history:]][None])
            if name in self.selection.atmos:
                atmos_in[aurora_name], atmos_out[aurora_name] = inputs, target
            else:
                surf_in[aurora_name], surf_out[aurora_name] = inputs, target
        times = self.selection.times
        return (self._batch(surf_in, atmos_in, times[self._inputs[index][-1]]),
                self._batch(surf_out, atmos_out, times[self._targets[index]]))

    def _batch(self, surf: dict, atmos: dict, time: np.datetime64) -> Batch:
        metadata = Metadata(lat=self._lat, lon=self._lon, time=(_to_datetime(time),),
                            atmos_levels=self.selection.levels)
        return Batch(surf_vars=surf, static_vars=dict(self._static), atmos_vars=atmos,
                     metadata=metadata)

    # -- checking -----------------------------------------------------------------------

    def validate(self, block_bytes: int = 64 * 2**20) -> StoreReport:
        """Scan every time a sample reads, block by block (values in memory were checked
        when loaded); raise :class:`DataError` at the first bad value."""
        sel = self.selection
        needed = self.needed_positions
        if self._cache is None:
            ds = self._dataset()
            for chunk in time_blocks(sel, needed, block_bytes):
                for name in sel.dynamic:
                    values = read_fields(ds, name, chunk, sel.level_index)
                    check_finite(values, name, chunk, sel, self.source)
        in_range = sel.times[sel.positions].astype(np.int64)
        jumps = np.nonzero(np.diff(in_range) != sel.step_ns)[0]
        gaps = tuple((_to_datetime(sel.times[sel.positions[j]]),
                      _to_datetime(sel.times[sel.positions[j + 1]])) for j in jumps)
        return StoreReport(n_samples=len(self), n_times=len(needed),
                           first=_to_datetime(sel.times[needed[0]]),
                           last=_to_datetime(sel.times[needed[-1]]),
                           step=timedelta(microseconds=sel.step_ns // 1000), gaps=gaps)


def validate(source: str | os.PathLike | xr.Dataset | WB2Dataset,
             spec: SampleSpec | None = None) -> StoreReport:
    """Check a store against ``spec`` without training on it; raise :class:`DataError` at the
    first problem.

    Problems: an unreadable file or chunk, missing variable or level, a broken grid, repeated
    times, time range outside the store, no complete sample, NaN/inf or implausible values in
    any field a sample would read (named with variable, level, timestamp and grid point).
    Reads lazily, chunk by chunk, so it works on stores larger than memory.
    """
    if isinstance(source, WB2Dataset):
        return source.validate()
    spec = spec or SampleSpec()
    return WB2Dataset(source, replace(spec, in_memory=False)).validate()


def collate_batches(pairs: Sequence[tuple[Batch, Batch]]) -> tuple[Batch, Batch]:
    """Stack (input, target) pairs along the batch dim; usable as a DataLoader ``collate_fn``.

    All pairs must share grid, levels and variables; static fields are taken from the first.
    Metadata time becomes the tuple of every element's time.
    """
    if not pairs:
        raise ValueError("collate_batches got no samples")
    return _stack([p[0] for p in pairs]), _stack([p[1] for p in pairs])


def _stack(batches: Sequence[Batch]) -> Batch:
    first = batches[0]
    for other in batches[1:]:
        meta, ref = other.metadata, first.metadata
        if (meta.atmos_levels != ref.atmos_levels or not torch.equal(meta.lat, ref.lat)
                or not torch.equal(meta.lon, ref.lon)):
            raise ValueError("cannot collate batches on different grids or levels")
        if other.surf_vars.keys() != first.surf_vars.keys() or \
                other.atmos_vars.keys() != first.atmos_vars.keys():
            raise ValueError("cannot collate batches with different variables: "
                             f"{sorted(first.surf_vars) + sorted(first.atmos_vars)} vs "
                             f"{sorted(other.surf_vars) + sorted(other.atmos_vars)}")
    metadata = Metadata(lat=first.metadata.lat, lon=first.metadata.lon,
                        time=tuple(t for b in batches for t in b.metadata.time),
                        atmos_levels=first.metadata.atmos_levels,
                        rollout_step=first.metadata.rollout_step)
    return Batch(
        surf_vars={k: torch.cat([b.surf_vars[k] for b in batches]) for k in first.surf_vars},
        static_vars=dict(first.static_vars),
        atmos_vars={k: torch.cat([b.atmos_vars[k] for b in batches]) for k in first.atmos_vars},
        metadata=metadata,
    )
