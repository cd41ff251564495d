"""Shared fixtures: a tiny synthetic WeatherBench2-layout world and its on-disk variants.

The world is the 64x32 equiangular grid, 3 pressure levels, 3 days every 6 hours (12 times),
random fields of plausible magnitude (so every time, level and grid point differs and a
misplaced value shows), latitude ascending as in WB2. Everything is built once per session.
"""

from __future__ import annotations

from pathlib import Path

import aurora.normalisation as aurora_normalisation
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from weatherpeft.data.grids import equiangular_grid
from weatherpeft.data.wb2 import open_store

LEVELS = (300, 500, 850)
N_TIMES = 12
START = pd.Timestamp("2001-03-01T00:00")

#: int16 CF packing for some variables, as real stores do (decoded by xarray).
PACKED = {
    "2m_temperature": {"dtype": "int16", "scale_factor": 0.005, "add_offset": 280.0, "_FillValue": -32768},
    "geopotential": {"dtype": "int16", "scale_factor": 3.0, "add_offset": 50000.0, "_FillValue": -32768},
    "mean_sea_level_pressure": {"dtype": "int16", "scale_factor": 0.5, "add_offset": 101000.0,
                                "_FillValue": -32768},
}

#: Canonical WB2 names → ERA5 short names used by the netCDF variant.
ERA5_NAMES = {
    "temperature": "t", "geopotential": "z", "u_component_of_wind": "u",
    "v_component_of_wind": "v", "specific_humidity": "q", "2m_temperature": "t2m",
    "10m_u_component_of_wind": "u10", "10m_v_component_of_wind": "v10",
    "mean_sea_level_pressure": "msl", "total_precipitation_6hr": "tp", "land_sea_mask": "lsm",
    "level": "pressure_level", "time": "valid_time", "latitude": "lat", "longitude": "lon",
}


def make_world(n_times: int = N_TIMES, levels: tuple[int, ...] = LEVELS, seed: int = 0) -> xr.Dataset:
    """A canonical WB2 dataset: dims (time, level, longitude, latitude), float32."""
    rng = np.random.default_rng(seed)
    grid = equiangular_grid(64, 32)
    n_lon, n_lat, n_lev = len(grid.lon), len(grid.lat), len(levels)
    coslat = np.cos(np.radians(grid.lat))[None, :]
    lev = np.asarray(levels, dtype=np.float64)[None, :, None, None]

    def noise(*shape):
        return rng.standard_normal(shape)

    atmos = (n_times, n_lev, n_lon, n_lat)
    surf = (n_times, n_lon, n_lat)
    fields = {
        "geopotential": 9.81 * 7000 * np.log(1000 / lev) + 300 * noise(*atmos),
        "temperature": 210 + 70 * lev / 1000 + 20 * coslat + 2 * noise(*atmos),
        "u_component_of_wind": 10 * noise(*atmos),
        "v_component_of_wind": 5 * noise(*atmos),
        "specific_humidity": 1e-3 * (lev / 1000) ** 3 * np.abs(noise(*atmos)),
        "2m_temperature": 250 + 40 * coslat + 5 * noise(*surf),
        "10m_u_component_of_wind": 5 * noise(*surf),
        "10m_v_component_of_wind": 4 * noise(*surf),
        "mean_sea_level_pressure": 101000 + 1000 * noise(*surf),
        "total_precipitation_6hr": 1e-3 * np.abs(noise(*surf)),
    }
    dims = {4: ("time", "level", "longitude", "latitude"), 3: ("time", "longitude", "latitude")}
    data_vars = {k: (dims[v.ndim], v.astype(np.float32)) for k, v in fields.items()}
    data_vars["land_sea_mask"] = (("longitude", "latitude"),
                                  (rng.random((n_lon, n_lat)) > 0.7).astype(np.float32))
    data_vars["geopotential_at_surface"] = (("longitude", "latitude"),
                                            (2000 * np.abs(noise(n_lon, n_lat))).astype(np.float32))
    coords = {
        "time": pd.date_range(START, periods=n_times, freq="6h"),
        "level": np.asarray(levels, dtype=np.int64),
        "longitude": grid.lon,
        "latitude": grid.lat,
    }
    return xr.Dataset(data_vars, coords=coords)


def write_wb2_zarr(ds: xr.Dataset, path: Path, packed: bool = True) -> Path:
    """Write as WB2 does: zarr format 2, consolidated metadata, chunked in time."""
    encoding = {name: {"chunks": tuple(4 if d == "time" else ds.sizes[d] for d in ds[name].dims)}
                for name in ds.data_vars}
    if packed:
        for name, packing in PACKED.items():
            encoding[name].update(packing)
    ds.to_zarr(path, mode="w", consolidated=True, zarr_format=2, encoding=encoding)
    return path


def strip_encoding(ds: xr.Dataset) -> xr.Dataset:
    """Forget how a dataset was stored (so it is written as plain floats)."""
    ds = ds.copy()
    for variable in ds.variables.values():
        variable.encoding = {}
    return ds


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One torch thread: this machine's two cores are shared, and more threads run slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Aurora's published statistics, as imported: every test ends with them restored.
_PRISTINE_STATISTICS = (dict(aurora_normalisation.locations), dict(aurora_normalisation.scales))


@pytest.fixture(autouse=True)
def pristine_aurora_statistics():
    """Backbones install statistics into Aurora's module-level dicts: put the defaults back."""
    yield
    for table, saved in zip((aurora_normalisation.locations, aurora_normalisation.scales),
                            _PRISTINE_STATISTICS):
        table.clear()
        table.update(saved)


@pytest.fixture(scope="session")
def world() -> xr.Dataset:
    return make_world()


@pytest.fixture(scope="session")
def wb2_store(world, tmp_path_factory) -> Path:
    """The canonical store on disk, int16-packed for three variables."""
    return write_wb2_zarr(world, tmp_path_factory.mktemp("wb2") / "world.zarr")


@pytest.fixture(scope="session")
def world_decoded(wb2_store) -> xr.Dataset:
    """The canonical store as decoded from disk: the reference values for every reader test."""
    return open_store(wb2_store).load()


@pytest.fixture(scope="session")
def descending_store(world_decoded, tmp_path_factory) -> Path:
    """Same values, latitude stored north → south."""
    flipped = strip_encoding(world_decoded).isel(latitude=slice(None, None, -1))
    return write_wb2_zarr(flipped, tmp_path_factory.mktemp("desc") / "world.zarr", packed=False)


@pytest.fixture(scope="session")
def era5_netcdf(world_decoded, tmp_path_factory) -> Path:
    """Same values as an ERA5-style netCDF: short names, (time, level, lat, lon) order,
    longitudes in [−180, 180), latitude and level descending, lsm with a time axis."""
    ds = strip_encoding(world_decoded)
    ds = ds.assign_coords(longitude=((ds.longitude + 180) % 360) - 180).sortby("longitude")
    ds = ds.isel(latitude=slice(None, None, -1), level=slice(None, None, -1))
    ds["land_sea_mask"] = ds["land_sea_mask"].expand_dims(time=ds.time)
    ds = ds.transpose("time", "level", "latitude", "longitude")
    ds = ds.rename(ERA5_NAMES)
    path = tmp_path_factory.mktemp("era5") / "era5.nc"
    ds.to_netcdf(path)
    return path


# -- the shipped pretrained backbone and real batches from the built-in world --------------

PRETRAINED_TINY = Path(__file__).resolve().parents[1] / "models" / "aurora-tiny"


def load_pretrained_tiny(**kwargs):
    """A fresh copy of the committed, pretrained aurora-tiny (its blocks are not the identity)."""
    from weatherpeft.backbones.aurora import AuroraBackbone

    return AuroraBackbone.from_checkpoint(PRETRAINED_TINY, **kwargs)


@pytest.fixture(scope="session")
def march_task():
    """6-h forecasting on 1–9 March 2003 of the built-in downstream year (aurora-tiny's statistics):
    a small real task for fine-tuning tests."""
    from weatherpeft.data.builtin import store_path
    from weatherpeft.tasks.forecasting import ForecastingTask

    periods = {"train": ("2003-03-01", "2003-03-06"), "val": ("2003-03-07", "2003-03-09"),
               "test": ("2003-03-07", "2003-03-09")}
    return ForecastingTask(store_path("downstream"), periods, load_pretrained_tiny().stats,
                           lead_steps=(1,))


@pytest.fixture(scope="session")
def builtin_batches():
    """(input, target) of two real samples from the built-in downstream year: batch 2, 32 × 64."""
    from weatherpeft.data.builtin import store_path
    from weatherpeft.data.wb2 import SampleSpec, WB2Dataset, collate_batches

    dataset = WB2Dataset(store_path("downstream"), SampleSpec(start="2003-03-01", end="2003-03-03"))
    return collate_batches([dataset[0], dataset[1]])
