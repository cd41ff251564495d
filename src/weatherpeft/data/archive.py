"""Writing WeatherBench2-layout zarr stores: CF metadata, int16 packing, atomic replace.

The committed stores are CF-packed int16 (``scale_factor``/``add_offset`` chosen from each
variable's range, so the quantisation step is range/65534) with Blosc-zstd compression:
xarray decodes them to float32 transparently, so any WB2 reader opens them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numcodecs
import numpy as np
import xarray as xr

from weatherpeft.atomic import atomic_directory

#: CF units and long names of every variable the built-in world stores.
VARIABLE_ATTRS = {
    "2m_temperature": ("K", "2 metre temperature"),
    "10m_u_component_of_wind": ("m s**-1", "10 metre U wind component"),
    "10m_v_component_of_wind": ("m s**-1", "10 metre V wind component"),
    "mean_sea_level_pressure": ("Pa", "Mean sea level pressure"),
    "total_precipitation_6hr": ("m", "Total precipitation accumulated over the previous 6 hours"),
    "geopotential": ("m**2 s**-2", "Geopotential"),
    "temperature": ("K", "Temperature"),
    "u_component_of_wind": ("m s**-1", "U component of wind"),
    "v_component_of_wind": ("m s**-1", "V component of wind"),
    "specific_humidity": ("kg kg**-1", "Specific humidity"),
    "land_sea_mask": ("1", "Land-sea mask (land fraction)"),
    "geopotential_at_surface": ("m**2 s**-2", "Geopotential at surface"),
}
_COORD_ATTRS = {
    "latitude": {"units": "degrees_north", "long_name": "latitude"},
    "longitude": {"units": "degrees_east", "long_name": "longitude"},
    "level": {"units": "hPa", "long_name": "pressure level"},
}
_INT16_STEPS = 65534  # -32767 … 32767; -32768 is the fill value
#: Quantisation step of each packed variable: well below any error the tasks measure
#: (e.g. 0.1 K, an RMS error of 0.03 K, against 6-hour persistence errors of ~0.5 K), coarse
#: enough to fit the size budget.
PACKING_PRECISION = {
    "2m_temperature": 0.1, "temperature": 0.1,
    "10m_u_component_of_wind": 0.1, "10m_v_component_of_wind": 0.1,
    "u_component_of_wind": 0.1, "v_component_of_wind": 0.1,
    "mean_sea_level_pressure": 10.0, "geopotential": 10.0, "geopotential_at_surface": 1.0,
    "specific_humidity": 1e-5, "total_precipitation_6hr": 1e-5, "land_sea_mask": 1e-4,
}
_TIME_CHUNK = 40


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Attach CF units/long names to known variables and coordinates."""
    for name, (units, long_name) in VARIABLE_ATTRS.items():
        if name in ds:
            ds[name].attrs.update(units=units, long_name=long_name)
    for name, attrs in _COORD_ATTRS.items():
        if name in ds.coords:
            ds[name].attrs.update(attrs)
    return ds


def _compressor():
    return numcodecs.Blosc(cname="zstd", clevel=9, shuffle=numcodecs.Blosc.SHUFFLE)


def _packed_encoding(name: str, values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError(f"cannot pack variable {name!r}: it has no finite values")
    low, high = float(finite.min()), float(finite.max())
    # the precision step where the range allows it, else the finest step that fits int16
    scale = max(PACKING_PRECISION.get(name, 0.0), (high - low) / _INT16_STEPS, 1e-30)
    # Non-negative fields (precipitation, humidity, land fraction) get offset 0 where it fits:
    # zero then decodes to exactly 0 and nothing decodes negative (a mid-range offset puts
    # zero up to half a step either side of 0).
    offset = 0.0 if low >= 0 and high / scale <= _INT16_STEPS // 2 else (high + low) / 2
    return {"dtype": "int16", "scale_factor": np.float32(scale), "add_offset": np.float32(offset),
            "_FillValue": np.int16(-32768)}


def _encoding(ds: xr.Dataset, pack: bool) -> dict:
    encoding = {}
    for name, variable in ds.data_vars.items():
        chunks = tuple(min(_TIME_CHUNK, n) if dim == "time" else n for dim, n in zip(variable.dims, variable.shape))
        enc = {"compressors": [_compressor()], "chunks": chunks}
        if pack and np.issubdtype(variable.dtype, np.floating):
            enc.update(_packed_encoding(name, variable.values))
        encoding[name] = enc
    return encoding


def write(ds: xr.Dataset, path: Path, pack: bool = True) -> Path:
    """Write ``ds`` as a zarr v2 store with consolidated metadata, replacing ``path`` atomically.

    The store is written beside the target and renamed into place, so a crash never
    leaves a half-written store at ``path`` nor loses the previous one.
    """
    encoding = _encoding(ds, pack)
    return atomic_directory(path, lambda temporary: ds.to_zarr(
        temporary, mode="w", encoding=encoding, consolidated=True, zarr_format=2), marker=".zmetadata")


def append(ds: xr.Dataset, path: Path) -> Path:
    """Append time steps to a float32 store (created on first call); for the pretraining archive."""
    path = Path(path)
    if not path.exists():
        return write(ds, path, pack=False)
    time_vars = [name for name, variable in ds.data_vars.items() if "time" in variable.dims]
    ds[time_vars].to_zarr(path, append_dim="time", consolidated=True, zarr_format=2)
    return path


def repack(source: Path, target: Path) -> Path:
    """Rewrite an unpacked store as a packed one (e.g. after changing :data:`PACKING_PRECISION`)."""
    with xr.open_zarr(source) as ds:
        return write(ds.load(), target, pack=True)
