"""WeatherBench2's canonical layout, shared by every store reader (:mod:`~weatherpeft.data.wb2`,
:mod:`~weatherpeft.data.readers`, :mod:`~weatherpeft.data.canonical`): variable and dimension
names, the error type, format sniffing, units and their conversions, plausible value ranges.

It imports no other module of the package.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

__all__ = [
    "ANY_VALUE",
    "AURORA_NAMES",
    "CANONICAL_DIMS",
    "DataError",
    "GRAVITY",
    "PLAUSIBLE_RANGES",
    "SOURCE_ATTR",
    "STORE_NAMES",
    "UNITS",
    "canonical_name",
    "convert_units",
    "format_coordinate",
    "is_zarr_dir",
    "level_positions",
    "level_value",
    "looks_like_netcdf",
    "plausible_range",
    "source_of",
]

#: Store / ERA5 (CF netCDF and GRIB) names → canonical WeatherBench2 names. Dimensions too.
STORE_NAMES: dict[str, str] = {
    "t": "temperature",
    "z": "geopotential",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "q": "specific_humidity",
    "t2m": "2m_temperature",
    "2t": "2m_temperature",
    "u10": "10m_u_component_of_wind",
    "10u": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "10v": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure",
    "tp": "total_precipitation_6hr",
    "lsm": "land_sea_mask",
    "isobaricInhPa": "level",
    "pressure_level": "level",
    "plev": "level",
    "lat": "latitude",
    "lon": "longitude",
    "valid_time": "time",
    # More ERA5/ECMWF short names (cfgrib and CDS) and CDO's ``-t ecmwf`` upper-case ones;
    # used by data/readers.py too (WeatherBench 1, ENS-10).
    "sp": "surface_pressure",
    "r": "relative_humidity",
    "w": "vertical_velocity",
    "d": "divergence",
    "vo": "vorticity",
    "pv": "potential_vorticity",
    "tcc": "total_cloud_cover",
    "tisr": "toa_incident_solar_radiation",
    "tcw": "total_column_water",
    "tcwv": "total_column_water_vapour",
    "sst": "sea_surface_temperature",
    "skt": "skin_temperature",
    "slt": "soil_type",
    "T2M": "2m_temperature",
    "U10M": "10m_u_component_of_wind",
    "V10M": "10m_v_component_of_wind",
    "MSL": "mean_sea_level_pressure",
    "Z": "geopotential",
    "T": "temperature",
    "U": "u_component_of_wind",
    "V": "v_component_of_wind",
    "Q": "specific_humidity",
    "W": "vertical_velocity",
    "D": "divergence",
    "LSM": "land_sea_mask",
}

#: Canonical WeatherBench2 names → Aurora's variable names in a ``Batch``.
AURORA_NAMES: dict[str, str] = {
    "2m_temperature": "2t",
    "10m_u_component_of_wind": "10u",
    "10m_v_component_of_wind": "10v",
    "mean_sea_level_pressure": "msl",
    "total_precipitation_6hr": "tp",
    "geopotential": "z",
    "temperature": "t",
    "u_component_of_wind": "u",
    "v_component_of_wind": "v",
    "specific_humidity": "q",
    "land_sea_mask": "lsm",
    "geopotential_at_surface": "z",
}

#: The canonical order of a variable's dimensions (any others come first).
CANONICAL_DIMS = ("time", "level", "longitude", "latitude")
#: Bounds of a variable without a plausible range: only fill values (9.96921e36, 1e20) are out.
ANY_VALUE = (-1e15, 1e15)
#: Dataset attribute where :func:`~weatherpeft.data.wb2.open_store` records the path, for error messages.
SOURCE_ATTR = "weatherpeft_source"


class DataError(ValueError):
    """A store cannot be read or does not hold what a sample needs; the message names the
    file, the variable and where: coordinate values (time, level in hPa, latitude and
    longitude in degrees) with their indices (see :func:`~weatherpeft.data.wb2.describe_point`)."""


def canonical_name(name: str, names: Mapping[str, str] | None = None, static: bool = False) -> str:
    """The canonical WB2 name of a store, ERA5 or canonical variable name (``names`` adds to
    :data:`STORE_NAMES`); ``static``: a geopotential is the surface one (Aurora's static "z")."""
    canonical = {**STORE_NAMES, **(names or {})}.get(name, name)
    if static and canonical == "geopotential":
        canonical = "geopotential_at_surface"
    return canonical


def source_of(ds: xr.Dataset) -> str:
    """Where ``ds`` was read from (its :data:`SOURCE_ATTR`), for messages."""
    return str(ds.attrs.get(SOURCE_ATTR, "<in-memory dataset>"))


def is_zarr_dir(path: Path) -> bool:
    """Whether a local directory is a zarr store (format 2 or 3)."""
    return any((path / marker).exists() for marker in ("zarr.json", ".zgroup", ".zmetadata", ".zarray"))


def looks_like_netcdf(path: Path) -> bool:
    """Whether a local file is netCDF (3 or 4/HDF5): by its suffix or its first bytes."""
    if path.suffix.lower() in {".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5"}:
        return True
    with open(path, "rb") as handle:
        magic = handle.read(8)
    return magic[:3] == b"CDF" or magic == b"\x89HDF\r\n\x1a\n"


def format_coordinate(value) -> str:
    """A coordinate value (time, lead, number) as messages spell it."""
    if isinstance(value, (np.datetime64, pd.Timestamp)):
        return str(pd.Timestamp(value))
    if isinstance(value, np.timedelta64):
        return str(pd.Timedelta(value))
    return f"{value:g}" if isinstance(value, (int, float, np.number)) else str(value)


def level_value(level: float) -> int | float:
    """A pressure level in hPa as messages spell it: 850, not 850.0."""
    return int(level) if float(level).is_integer() else float(level)


def level_positions(available: np.ndarray, levels, where: str) -> np.ndarray:
    """The positions of ``levels`` (hPa) in the ``available`` level coordinate; ``ValueError``
    naming the level, ``where`` it was looked for and what is available."""
    available = np.asarray(available, dtype=np.float64)
    index = []
    for level in levels:
        match = np.nonzero(np.isclose(available, float(level)))[0]
        if match.size == 0:
            raise ValueError(f"level {level_value(level)} hPa not in {where}; "
                             f"available: {[level_value(a) for a in available]}")
        index.append(int(match[0]))
    return np.asarray(index, dtype=np.int64)


# --------------------------------------------------------------------------------------
# Units and plausible ranges
# --------------------------------------------------------------------------------------

#: Standard gravity (m s⁻²), as WeatherBench used to turn surface geopotential into orography.
GRAVITY = 9.80665

#: Canonical variable → its WB2 unit (as ERA5/WB2 spell it). Also the list of known variables.
UNITS: dict[str, str] = {
    "2m_temperature": "K",
    "temperature": "K",
    "skin_temperature": "K",
    "sea_surface_temperature": "K",
    "geopotential": "m**2 s**-2",
    "geopotential_at_surface": "m**2 s**-2",
    "10m_u_component_of_wind": "m s**-1",
    "10m_v_component_of_wind": "m s**-1",
    "u_component_of_wind": "m s**-1",
    "v_component_of_wind": "m s**-1",
    "mean_sea_level_pressure": "Pa",
    "surface_pressure": "Pa",
    "specific_humidity": "kg kg**-1",
    "relative_humidity": "%",
    "total_precipitation_6hr": "m",
    "total_precipitation": "m",
    "convective_precipitation": "m",
    "land_sea_mask": "(0 - 1)",
    "total_cloud_cover": "(0 - 1)",
    "toa_incident_solar_radiation": "J m**-2",
    "potential_vorticity": "K m**2 kg**-1 s**-1",
    "vorticity": "s**-1",
    "divergence": "s**-1",
    "vertical_velocity": "Pa s**-1",
    "total_column_water": "kg m**-2",
    "total_column_water_vapour": "kg m**-2",
    "soil_type": "~",
}

#: Canonical unit → {normalised spelling: (scale, offset)}: value_canonical = value · scale + offset.
_CONVERSIONS: dict[str, dict[str, tuple[float, float]]] = {
    "K": {"k": (1, 0), "kelvin": (1, 0), "degk": (1, 0), "degreesk": (1, 0),
          "degc": (1, 273.15), "°c": (1, 273.15), "c": (1, 273.15), "celsius": (1, 273.15),
          "deg_c": (1, 273.15), "degreesc": (1, 273.15), "degrees_celsius": (1, 273.15)},
    "m**2 s**-2": {"m2s-2": (1, 0), "m2/s2": (1, 0), "jkg-1": (1, 0), "j/kg": (1, 0),
                   "m": (GRAVITY, 0), "gpm": (GRAVITY, 0)},
    "m s**-1": {"ms-1": (1, 0), "m/s": (1, 0)},
    "Pa": {"pa": (1, 0), "hpa": (100, 0), "mb": (100, 0), "mbar": (100, 0), "millibars": (100, 0)},
    "kg kg**-1": {"kgkg-1": (1, 0), "kg/kg": (1, 0), "1": (1, 0), "gkg-1": (1e-3, 0),
                  "g/kg": (1e-3, 0)},
    "%": {"%": (1, 0), "percent": (1, 0)},
    "m": {"m": (1, 0), "mm": (1e-3, 0), "kgm-2": (1e-3, 0), "kg/m2": (1e-3, 0)},
    "(0 - 1)": {"(0-1)": (1, 0), "0-1": (1, 0), "1": (1, 0), "fraction": (1, 0), "~": (1, 0),
                "dimensionless": (1, 0), "-": (1, 0), "%": (0.01, 0)},
    "J m**-2": {"jm-2": (1, 0), "j/m2": (1, 0)},
    "K m**2 kg**-1 s**-1": {"km2kg-1s-1": (1, 0), "pvu": (1e-6, 0)},
    "s**-1": {"s-1": (1, 0), "1/s": (1, 0)},
    "Pa s**-1": {"pas-1": (1, 0), "pa/s": (1, 0)},
    "kg m**-2": {"kgm-2": (1, 0), "kg/m2": (1, 0), "mm": (1, 0)},
    "~": {"~": (1, 0), "1": (1, 0), "-": (1, 0), "code": (1, 0), "dimensionless": (1, 0)},
}

#: Canonical variable → (lowest, highest) value, in its WB2 unit: what Earth's atmosphere
#: (and a model of it) can hold, generous on purpose. A value outside is an unmasked fill value
#: (-9999, 9.96921e36, 1e20) or data in other units than its ``units`` attribute says (hPa, °C).
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "2m_temperature": (50.0, 500.0),
    "temperature": (50.0, 500.0),
    "skin_temperature": (50.0, 500.0),
    "sea_surface_temperature": (200.0, 350.0),
    "geopotential": (-1e5, 1e6),
    "geopotential_at_surface": (-1e5, 1e5),
    "10m_u_component_of_wind": (-500.0, 500.0),
    "10m_v_component_of_wind": (-500.0, 500.0),
    "u_component_of_wind": (-500.0, 500.0),
    "v_component_of_wind": (-500.0, 500.0),
    "mean_sea_level_pressure": (5e4, 1.5e5),
    "surface_pressure": (1e4, 1.5e5),
    "specific_humidity": (-0.01, 0.1),
    "relative_humidity": (-10.0, 200.0),
    "total_precipitation_6hr": (-0.01, 10.0),
    "total_precipitation": (-0.01, 10.0),
    "convective_precipitation": (-0.01, 10.0),
    "land_sea_mask": (-0.1, 1.1),
    "total_cloud_cover": (-0.1, 1.1),
    "toa_incident_solar_radiation": (-1e3, 1e8),
    "vertical_velocity": (-100.0, 100.0),
    "vorticity": (-1.0, 1.0),
    "divergence": (-1.0, 1.0),
    "total_column_water": (-1.0, 500.0),
    "total_column_water_vapour": (-1.0, 500.0),
}


def _normalise_units(units: str) -> str:
    """A units string in one spelling for lookups: lower case, no spaces, ``**`` or ``^``."""
    text = str(units).strip().lower().replace("**", "").replace("^", "")
    return re.sub(r"\s+", "", text)


def convert_units(da: xr.DataArray, canonical: str, where: str) -> xr.DataArray:
    """``da`` (variable ``canonical``) in its WB2 unit, lazily; raise on an unknown unit.

    A missing ``units`` attribute is taken as the canonical unit already. ``where`` names the
    file or folder in errors.
    """
    if canonical not in UNITS:
        raise DataError(f"unknown variable '{canonical}' in {where}: no WB2 unit known for it "
                        f"(known: {sorted(UNITS)}); map its name with `names`")
    target = UNITS[canonical]
    attrs = dict(da.attrs)
    units = attrs.get("units")
    if units is None or _normalise_units(units) == _normalise_units(target):
        scale, offset = 1, 0
    else:
        table = _CONVERSIONS[target]
        key = _normalise_units(units)
        if key not in table:
            raise DataError(f"variable '{canonical}' in {where} has units '{units}', which "
                            f"cannot be converted to {target} (accepted: {sorted(table)})")
        scale, offset = table[key]
    if (scale, offset) != (1, 0):
        da = da * scale + offset if offset else da * scale
    attrs["units"] = target
    return da.assign_attrs(attrs)


def plausible_range(canonical: str, units: str | None) -> tuple[float, float]:
    """``canonical``'s :data:`PLAUSIBLE_RANGES` in ``units`` (None: its WB2 unit); for another
    variable, or units this module cannot convert, only fill values (beyond ±1e15) are out."""
    if canonical not in PLAUSIBLE_RANGES:
        return ANY_VALUE
    low, high = PLAUSIBLE_RANGES[canonical]
    target = UNITS[canonical]
    if units is None or _normalise_units(units) == _normalise_units(target):
        return low, high
    conversion = _CONVERSIONS[target].get(_normalise_units(units))
    if conversion is None:
        return ANY_VALUE
    scale, offset = conversion  # canonical = stored · scale + offset, scale > 0
    return (low - offset) / scale, (high - offset) / scale
