"""Readers for the real data sets' layouts: WeatherBench (1) directories, ENS-10-style ensemble
netCDF, WeatherBench2 zarr at other resolutions (with poles) and fsspec URLs.

Every layout is written here in small files the way its producer writes it, opened through
``open_store``/``WB2Dataset`` and compared value by value with the arrays it was written from.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import dask.array
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import write_wb2_zarr

from weatherpeft.data.builtin import store_path
from weatherpeft.data.readers import GRAVITY, detect_layout, is_url
from weatherpeft.data.wb2 import SampleSpec, WB2Dataset, open_store

HOUR = np.timedelta64(1, "h")
START = pd.Timestamp("2002-12-31T12:00")  # the yearly files split after 12 hours
N_HOURS = 48
LEVELS = (500, 850)


def wb1_grid(resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """WeatherBench's regrid.py grid: latitude ascending, no poles; longitude from 0."""
    return np.arange(-90 + resolution / 2, 90, resolution), np.arange(0, 360, resolution)


def is_lazy(ds: xr.Dataset) -> bool:
    return all(isinstance(ds[name].data, dask.array.Array) for name in ds.data_vars)


# ---------------------------------------------------------------------------------------
# WeatherBench (1): a resolution directory written as the repository's scripts write it
# ---------------------------------------------------------------------------------------


def write_yearly(folder: Path, prefix: str, ds: xr.Dataset, resolution: float) -> list[Path]:
    """One file per year, ``{prefix}_{year}_{res}deg.nc``, hours since 1900 as in ERA5 files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for year, part in ds.groupby("time.year"):
        path = folder / f"{prefix}_{year}_{resolution}deg.nc"
        part.to_netcdf(path, encoding={"time": {"units": "hours since 1900-01-01", "dtype": "int32"}})
        paths.append(path)
    return paths


def make_wb1(root: Path, resolution: float = 5.625, hours: int = N_HOURS, seed: int = 0,
             full: bool = True) -> dict[str, np.ndarray]:
    """A WeatherBench directory; returns the arrays written, as (time, [level,] lat, lon)."""
    rng = np.random.default_rng(seed)
    lat, lon = wb1_grid(resolution)
    times = pd.date_range(START, periods=hours, freq="h")
    coords = {"time": times, "lat": lat, "lon": lon}
    level_coords = {**coords, "level": np.asarray(LEVELS, dtype=np.int32)}
    surf, atmos = (hours, lat.size, lon.size), (hours, len(LEVELS), lat.size, lon.size)
    truth = {
        "t2m": (250 + 30 * rng.random(surf)).astype(np.float32),
        "u10": (5 * rng.standard_normal(surf)).astype(np.float32),
        "v10": (5 * rng.standard_normal(surf)).astype(np.float32),
        "z": (50000 + 3000 * rng.random(atmos)).astype(np.float32),
        "q": (1e-3 * rng.random(atmos)).astype(np.float32),
        "t850": (270 + 10 * rng.random(surf)).astype(np.float32),
        "tp": (1e-3 * rng.random(surf) * (rng.random(surf) > 0.5)).astype(np.float32),
        "orography": (3000 * rng.random((lat.size, lon.size))).astype(np.float32),
        "lsm": (rng.random((lat.size, lon.size)) > 0.6).astype(np.float32),
        "slt": rng.integers(0, 7, (lat.size, lon.size)).astype(np.float32),
    }
    dims3, dims4 = ("time", "lat", "lon"), ("time", "level", "lat", "lon")

    def single(name, short, units, long_name):
        return xr.Dataset({short: (dims3, truth[name], {"units": units, "long_name": long_name})},
                          coords=coords)

    write_yearly(root / "2m_temperature", "2m_temperature",
                 single("t2m", "t2m", "K", "2 metre temperature"), resolution)
    if full:
        write_yearly(root / "10m_u_component_of_wind", "10m_u_component_of_wind",
                     single("u10", "u10", "m s**-1", "10 metre U wind component"), resolution)
        write_yearly(root / "10m_v_component_of_wind", "10m_v_component_of_wind",
                     single("v10", "v10", "m s**-1", "10 metre V wind component"), resolution)
        z = xr.Dataset({"z": (dims4, truth["z"], {"units": "m**2 s**-2"})}, coords=level_coords)
        write_yearly(root / "geopotential", "geopotential", z, resolution)
        # extract_level.py's single-level file: level kept as a scalar coordinate. Different
        # values from the multi-level folder, which must win where both have a level.
        z500 = (z + 1000).sel(level=500)
        write_yearly(root / "geopotential_500", "geopotential_500hPa", z500, resolution)
        q = xr.Dataset({"q": (dims4, truth["q"], {"units": "kg kg**-1"})}, coords=level_coords)
        write_yearly(root / "specific_humidity", "specific_humidity", q, resolution)
        t850 = single("t850", "t", "K", "Temperature").assign_coords(level=np.int32(850))
        write_yearly(root / "temperature_850", "temperature_850hPa", t850, resolution)
        write_yearly(root / "total_precipitation", "total_precipitation",
                     single("tp", "tp", "m", "Total precipitation"), resolution)
    constants = xr.Dataset(
        {"orography": (("lat", "lon"), truth["orography"], {"units": "m"}),
         "lsm": (("lat", "lon"), truth["lsm"], {"units": "(0 - 1)"}),
         "slt": (("lat", "lon"), truth["slt"], {"units": "~"}),
         "lat2d": (("lat", "lon"), np.broadcast_to(lat[:, None], (lat.size, lon.size)).copy()),
         "lon2d": (("lat", "lon"), np.broadcast_to(lon[None, :], (lat.size, lon.size)).copy())},
        coords={"lat": lat, "lon": lon})
    (root / "constants").mkdir(parents=True)
    constants.to_netcdf(root / "constants" / f"constants_{resolution}deg.nc")
    (root / "baselines").mkdir()  # not a variable folder: ignored
    truth["times"] = times.values
    return truth


def six_hour_sums(tp: np.ndarray) -> np.ndarray:
    """Reference 6-h totals: value at hour k = sum of hours k-5 … k (k ≥ 5)."""
    return np.stack([tp[k - 5:k + 1].sum(axis=0) for k in range(5, tp.shape[0])])


@pytest.fixture(scope="module")
def wb1(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("weatherbench") / "5.625deg"
    return root, make_wb1(root)


def field(ds: xr.Dataset, name: str, **sel) -> np.ndarray:
    """A canonical dataset's field as (time, [level,] lat, lon), the truth's order."""
    array = ds[name].sel(**sel) if sel else ds[name]
    order = [d for d in ("time", "level", "latitude", "longitude") if d in array.dims]
    return array.transpose(*order).values


def test_layout_detection(wb1, wb2_store, era5_netcdf, ensemble_dir):
    root, _ = wb1
    assert detect_layout(root) == "weatherbench1"
    assert detect_layout(ensemble_dir) == "ensemble"
    assert detect_layout(next(ensemble_dir.glob("*.nc"))) == "ensemble"
    assert detect_layout(wb2_store) is None and detect_layout(era5_netcdf) is None
    assert detect_layout("gs://weatherbench2/datasets/era5/x.zarr") == "remote"
    assert is_url(Path("gs://bucket/x.zarr")) == "gs://bucket/x.zarr"  # pathlib's "gs:/bucket"
    assert is_url("C:/data/x.zarr") is None and is_url("data/x.zarr") is None


def test_weatherbench1_names_levels_and_units(wb1):
    root, truth = wb1
    ds = open_store(root)
    assert set(ds.data_vars) == {
        "2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind", "geopotential",
        "specific_humidity", "temperature", "total_precipitation_6hr", "geopotential_at_surface",
        "land_sea_mask", "soil_type"}  # lat2d/lon2d dropped
    assert ds["geopotential"].dims == ("time", "level", "longitude", "latitude")
    assert ds["land_sea_mask"].dims == ("longitude", "latitude")
    assert list(ds.level.values) == list(LEVELS)
    assert ds.sizes["latitude"] == 32 and ds.sizes["longitude"] == 64
    assert np.all(np.diff(ds.latitude.values) > 0) and ds.longitude.values[0] == 0
    assert ds["geopotential"].attrs["units"] == "m**2 s**-2"
    assert ds["total_precipitation_6hr"].attrs["units"] == "m"
    hours = slice(5, None)  # the times with a complete 6-h precipitation window
    np.testing.assert_array_equal(field(ds, "2m_temperature"), truth["t2m"][hours])
    np.testing.assert_array_equal(field(ds, "specific_humidity"), truth["q"][hours])
    # The multi-level folder wins over geopotential_500/ (which holds z + 1000).
    np.testing.assert_array_equal(field(ds, "geopotential"), truth["z"][hours])
    # temperature_850/ is temperature at 850 hPa; absent at 500 hPa (NaN, reported if read).
    np.testing.assert_array_equal(field(ds, "temperature", level=850), truth["t850"][hours])
    assert np.isnan(field(ds, "temperature", level=500)).all()
    # Orography (m) → surface geopotential (m² s⁻²).
    np.testing.assert_allclose(field(ds, "geopotential_at_surface"),
                               truth["orography"] * np.float32(GRAVITY), rtol=1e-6)
    np.testing.assert_array_equal(field(ds, "land_sea_mask"), truth["lsm"])
    np.testing.assert_array_equal(field(ds, "soil_type"), truth["slt"])


def test_weatherbench1_six_hour_precipitation_from_hourly_tp(wb1):
    root, truth = wb1
    ds = open_store(root)
    times = ds.time.values
    assert times[0] == truth["times"][5] and times[-1] == truth["times"][-1]
    assert np.all(np.diff(times) == HOUR)
    np.testing.assert_allclose(field(ds, "total_precipitation_6hr"), six_hour_sums(truth["tp"]),
                               rtol=1e-5, atol=1e-9)
    # Across the yearly files: 2003-01-01 02:00 sums 2002-12-31 21:00 … 2003-01-01 02:00.
    k = int(np.nonzero(truth["times"] == np.datetime64("2003-01-01T02:00"))[0][0])
    value = ds["total_precipitation_6hr"].sel(time="2003-01-01T02:00").isel(longitude=7, latitude=3)
    assert float(value) == pytest.approx(float(truth["tp"][k - 5:k + 1, 3, 7].sum()), rel=1e-5)


def test_yearly_files_whose_names_do_not_sort_by_time(tmp_path):
    root = tmp_path / "wb"
    truth = make_wb1(root, hours=24)
    for folder in ("2m_temperature", "total_precipitation"):
        for path in (root / folder).glob("*_2002_*.nc"):
            path.rename(path.with_name("zz_" + path.name))  # listed after the 2003 file
    ds = open_store(root)
    np.testing.assert_array_equal(field(ds, "2m_temperature"), truth["t2m"][5:])
    np.testing.assert_allclose(field(ds, "total_precipitation_6hr"), six_hour_sums(truth["tp"]),
                               rtol=1e-5, atol=1e-9)


def test_weatherbench1_opens_lazily_with_dask(wb1):
    ds = open_store(wb1[0])
    assert is_lazy(ds)
    assert ds["2m_temperature"].data.npartitions >= 2  # one file per year at least


def test_weatherbench1_through_wb2dataset(wb1):
    root, truth = wb1
    spec = SampleSpec(surf_vars=("2t", "10u", "10v", "tp"), atmos_vars=("z", "t", "q"),
                      levels=(850,), step=timedelta(hours=6), lead=timedelta(hours=6),
                      in_memory=False)
    dataset = WB2Dataset(root, spec)
    assert len(dataset) == (N_HOURS - 5) - 12  # hourly samples: 6 h back, 6 h ahead
    inputs, target = dataset[4]
    (first, last), valid = dataset.sample_times(4)
    k = int(np.nonzero(truth["times"] == np.datetime64(last))[0][0])
    assert k == 5 + 4 + 6 and valid - last == timedelta(hours=6) and last - first == timedelta(hours=6)
    flip = (Ellipsis, slice(None, None, -1), slice(None))  # latitude decreasing for Aurora
    np.testing.assert_array_equal(inputs.surf_vars["2t"][0, 1].numpy(), truth["t2m"][k][flip])
    np.testing.assert_array_equal(inputs.surf_vars["2t"][0, 0].numpy(), truth["t2m"][k - 6][flip])
    np.testing.assert_array_equal(target.atmos_vars["t"][0, 0, 0].numpy(), truth["t850"][k + 6][flip])
    np.testing.assert_array_equal(inputs.atmos_vars["z"][0, 1, 0].numpy(), truth["z"][k, 1][flip])
    np.testing.assert_allclose(target.surf_vars["tp"][0, 0].numpy(),
                               truth["tp"][k + 1:k + 7].sum(axis=0)[flip], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(inputs.static_vars["z"].numpy(),
                               (truth["orography"] * np.float32(GRAVITY))[flip], rtol=1e-6)
    assert inputs.metadata.lat[0] > inputs.metadata.lat[-1]
    # Asking for temperature at 500 hPa, which the directory lacks, names it when read.
    missing = WB2Dataset(root, SampleSpec(surf_vars=("2t",), atmos_vars=("t",), levels=(500,),
                                          step=timedelta(hours=6), in_memory=False))
    # the grid runs south to north on disk: its last row, 87.1875°N, is a sample's row 0
    with pytest.raises(ValueError, match=r"'temperature' at level 500 hPa at time .* \(store time index "
                                         r"\d+\), latitude 87.1875 \(row 0\), longitude 0 \(column 0\)"):
        missing[0]


def test_weatherbench1_at_1p40625_degrees(tmp_path):
    root = tmp_path / "1.40625deg"
    truth = make_wb1(root, resolution=1.40625, hours=4, full=False)
    ds = open_store(root)
    assert ds.sizes["latitude"] == 128 and ds.sizes["longitude"] == 256
    assert ds.latitude.values[0] == pytest.approx(-89.296875) and is_lazy(ds)
    dataset = WB2Dataset(root, SampleSpec(surf_vars=("2t",), atmos_vars=(), lead=timedelta(hours=1),
                                          in_memory=False))
    inputs, target = dataset[0]
    assert inputs.surf_vars["2t"].shape == (1, 2, 128, 256)
    assert float(inputs.metadata.lat[0]) == pytest.approx(89.296875)
    np.testing.assert_array_equal(target.surf_vars["2t"][0, 0].numpy(), truth["t2m"][2][::-1])
    np.testing.assert_array_equal(inputs.static_vars["lsm"].numpy(), truth["lsm"][::-1])


def test_weatherbench1_celsius_is_converted_and_unknown_units_fail(tmp_path):
    root = tmp_path / "wb"
    truth = make_wb1(root, hours=3, full=False)
    for path in (root / "2m_temperature").glob("*.nc"):
        ds = xr.load_dataset(path)
        ds["t2m"] = (ds["t2m"] - 273.15).assign_attrs(units="degC")
        ds.to_netcdf(path)
    np.testing.assert_allclose(field(open_store(root), "2m_temperature"), truth["t2m"], atol=1e-4)
    for path in (root / "2m_temperature").glob("*.nc"):
        ds = xr.load_dataset(path)
        ds["t2m"].attrs["units"] = "furlongs"
        ds.to_netcdf(path)
    with pytest.raises(ValueError, match=r"'2m_temperature' .* units 'furlongs'.*cannot be converted to K"):
        open_store(root)


def test_six_hour_totals_can_be_given_directly(tmp_path):
    root = tmp_path / "wb"
    truth = make_wb1(root, hours=12)
    ds = open_store(root, names={"tp": "total_precipitation_6hr"})
    assert ds.sizes["time"] == 12  # nothing summed, nothing dropped
    np.testing.assert_array_equal(field(ds, "total_precipitation_6hr"), truth["tp"])


def test_precipitation_that_is_not_hourly_fails(tmp_path):
    root = tmp_path / "wb"
    make_wb1(root, hours=24)
    for path in (root / "total_precipitation").glob("*.nc"):
        xr.load_dataset(path).isel(time=slice(None, None, 6)).to_netcdf(path)
    with pytest.raises(ValueError, match=r"must be hourly ERA5 'tp'.*spaced 0 days 06:00"):
        open_store(root)


# -- malformed WeatherBench directories ----------------------------------------------------


def test_directory_without_variable_folders(tmp_path):
    (tmp_path / "misc").mkdir()
    xr.Dataset({"x": ("a", [1.0])}).to_netcdf(tmp_path / "misc" / "x.nc")
    with pytest.raises(ValueError, match=r"no recognised variable folder.*\['misc'\]"):
        open_store(tmp_path)
    nested = tmp_path / "all"
    make_wb1(nested / "5.625deg", hours=2, full=False)
    with pytest.raises(ValueError, match=r"open one resolution directory instead: \['5.625deg'\]"):
        open_store(nested)


def test_zipped_folder_is_explained(tmp_path):
    root = tmp_path / "wb"
    make_wb1(root, hours=2, full=False)
    for path in (root / "2m_temperature").glob("*.nc"):
        path.unlink()
    (root / "2m_temperature" / "2m_temperature_5.625deg.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"holds no netCDF files \(unzip"):
        open_store(root)


def test_yearly_files_on_different_grids(tmp_path):
    root = tmp_path / "wb"
    make_wb1(root, hours=24, full=False)
    path = root / "2m_temperature" / "2m_temperature_2003_5.625deg.nc"
    shifted = xr.load_dataset(path)
    shifted = shifted.assign_coords(lat=shifted.lat + 1.0)
    shifted.to_netcdf(path)
    with pytest.raises(ValueError, match=r"different grids: .*_2002_5.625deg.nc is on 64×32.*"
                                         r"_2003_5.625deg.nc on 64×32"):
        open_store(root)


def test_folders_on_different_grids(tmp_path):
    root = tmp_path / "wb"
    make_wb1(root, hours=2, full=False)
    make_wb1(tmp_path / "fine", resolution=2.8125, hours=2, full=False)
    shutil.rmtree(root / "constants")
    shutil.copytree(tmp_path / "fine" / "constants", root / "constants")
    with pytest.raises(ValueError, match=r"different grids: .*64×32.*128×64"):
        open_store(root)


def test_file_without_time(tmp_path):
    root = tmp_path / "wb"
    make_wb1(root, hours=24, full=False)
    path = root / "2m_temperature" / "2m_temperature_2003_5.625deg.nc"
    xr.load_dataset(path).isel(time=0, drop=True).to_netcdf(path)
    with pytest.raises(ValueError, match=r"2m_temperature_2003_5.625deg.nc has no 'time' coordinate"):
        open_store(root)


@pytest.mark.parametrize("how", ["overlap", "copy"])
def test_overlapping_yearly_files(tmp_path, how):
    root = tmp_path / "wb"
    make_wb1(root, hours=24, full=False)
    folder = root / "2m_temperature"
    if how == "overlap":  # the 2003 file also holds the last hour of 2002
        late = xr.load_dataset(folder / "2m_temperature_2002_5.625deg.nc").isel(time=[-1])
        early = xr.load_dataset(folder / "2m_temperature_2003_5.625deg.nc")
        xr.concat([late, early], "time").to_netcdf(folder / "2m_temperature_2003_5.625deg.nc")
        match = r"overlapping times .*_2002_5.625deg.nc covers .*_2003_5.625deg.nc covers .*2002-12-31 23:00"
    else:  # a stray copy of one year
        shutil.copy(folder / "2m_temperature_2003_5.625deg.nc", folder / "2m_temperature_2003_copy.nc")
        match = r"overlapping times .*_2003_5.625deg.nc .*_2003_copy.nc"
    with pytest.raises(ValueError, match=match):
        open_store(root)


def test_unknown_constant_and_mismatched_folder(tmp_path):
    root = tmp_path / "wb"
    make_wb1(root, hours=2, full=False)
    path = root / "constants" / "constants_5.625deg.nc"
    xr.load_dataset(path).rename({"slt": "mystery"}).to_netcdf(path)
    with pytest.raises(ValueError, match=r"unknown variable 'mystery' in .*constants"):
        open_store(root)
    assert "soil_type" in open_store(root, names={"mystery": "soil_type"}).data_vars
    (root / "temperature_850").mkdir()
    z = xr.load_dataset(next((root / "2m_temperature").glob("*.nc"))).rename({"t2m": "z"})
    z.to_netcdf(root / "temperature_850" / "temperature_850hPa_2002_5.625deg.nc")
    with pytest.raises(ValueError, match=r"should hold temperature but its variable 'z' is geopotential"):
        open_store(root, names={"mystery": "soil_type"})


# ---------------------------------------------------------------------------------------
# ENS-10-style ensemble netCDF
# ---------------------------------------------------------------------------------------

N_INITS = 4
CFGRIB_SURFACE = {"2m_temperature": "t2m", "10m_u_component_of_wind": "u10",
                  "10m_v_component_of_wind": "v10"}
CFGRIB_LEVELS = {"geopotential": "z", "temperature": "t"}


@pytest.fixture(scope="module")
def builtin_ensemble() -> xr.Dataset:
    """The first initialisations of the built-in WB2-forecast-layout ensemble, loaded."""
    return open_store(store_path("ensemble")).isel(time=slice(0, N_INITS)).load()


def cfgrib_file(reference: xr.Dataset, init: int, variables: dict[str, str], path: Path) -> None:
    """One initialisation as cfgrib writes it: GRIB names, single-valued dims as scalar
    coordinates (time, step, valid_time, surface), latitude and levels descending."""
    one = reference.isel(time=init, prediction_timedelta=0)
    data = {}
    for canonical, short in variables.items():
        array = one[canonical]
        order = ["number", *(["level"] if "level" in array.dims else []), "latitude", "longitude"]
        data[short] = array.transpose(*order).isel(latitude=slice(None, None, -1))
        if "level" in array.dims:
            data[short] = data[short].isel(level=slice(None, None, -1))
        data[short].attrs = {"units": reference[canonical].attrs["units"], "GRIB_shortName": short}
    ds = xr.Dataset(data).rename({"level": "isobaricInhPa"} if "level" in one[list(variables)[0]].dims else {})
    ds = ds.assign_coords(step=one.prediction_timedelta.values, valid_time=one.time.values
                          + one.prediction_timedelta.values)
    if "isobaricInhPa" in ds.coords:
        ds = ds.assign_coords(isobaricInhPa=ds.isobaricInhPa.astype(np.float64))
    else:
        ds = ds.assign_coords(surface=0.0)
    ds.to_netcdf(path)


@pytest.fixture(scope="module")
def ensemble_dir(builtin_ensemble, tmp_path_factory) -> Path:
    """Per-initialisation, per-type (sfc/pl) files, named like ENS-10's."""
    folder = tmp_path_factory.mktemp("ens10")
    for init in range(N_INITS):
        stamp = pd.Timestamp(builtin_ensemble.time.values[init]).strftime("%Y%m%d%H")
        cfgrib_file(builtin_ensemble, init, CFGRIB_SURFACE, folder / f"output.sfc.{stamp}.nc")
        cfgrib_file(builtin_ensemble, init, CFGRIB_LEVELS, folder / f"output.pl.{stamp}.nc")
    return folder


def test_ensemble_files_open_as_the_wb2_forecast_layout(ensemble_dir, builtin_ensemble):
    ds = open_store(ensemble_dir)
    assert is_lazy(ds)
    assert set(ds.data_vars) == set(builtin_ensemble.data_vars)
    for name in ds.data_vars:
        assert ds[name].dims == builtin_ensemble[name].dims, name
        np.testing.assert_array_equal(ds[name].values, builtin_ensemble[name].values, err_msg=name)
        assert ds[name].attrs["units"] == builtin_ensemble[name].attrs["units"]
    for coord in ("time", "prediction_timedelta", "number", "level", "latitude", "longitude"):
        np.testing.assert_array_equal(ds[coord].values, builtin_ensemble[coord].values, err_msg=coord)
    single = open_store(next(ensemble_dir.glob("output.pl.*.nc")))
    assert single["temperature"].dims == builtin_ensemble["temperature"].dims
    assert single.sizes["time"] == 1


def ens10_day_file(path: Path, days: list[str], seed: int, names: dict[str, str],
                   units: dict[str, str]) -> xr.Dataset:
    """ENS-10's per-day-of-year file, CDO-style: one date in several years, steps 0/24/48 as
    hours, levels in Pa, members along ``realization``."""
    rng = np.random.default_rng(seed)
    lat, lon = np.linspace(90, -90, 5), np.arange(0, 360, 45.0)
    shape = (len(days), 3, 2, lat.size, lon.size)
    ds = xr.Dataset(
        {names["t2m"]: (("time", "step", "realization", "lat", "lon"),
                        rng.random(shape, dtype=np.float32) + 280, {"units": units["t2m"]}),
         names["z"]: (("time", "step", "realization", "plev", "lat", "lon"),
                      rng.random((*shape[:3], 2, *shape[3:]), dtype=np.float32) + 5e4,
                      {"units": units["z"]})},
        coords={"time": pd.DatetimeIndex(days), "step": ("step", [0, 24, 48], {"units": "hours"}),
                "realization": [1, 2], "plev": [85000.0, 50000.0], "lat": lat, "lon": lon})
    ds.to_netcdf(path)
    return ds


def test_ensemble_per_day_of_year_files_interleave_and_cdo_names(tmp_path):
    names, units = {"t2m": "T2M", "z": "Z"}, {"t2m": "K", "z": "m**2 s**-2"}
    a = ens10_day_file(tmp_path / "ENS10_0101.nc", ["2003-01-01", "2004-01-01"], 0, names, units)
    b = ens10_day_file(tmp_path / "ENS10_0104.nc", ["2003-01-04", "2004-01-04"], 1, names, units)
    ds = open_store(tmp_path)
    assert [str(t)[:10] for t in ds.time.values] == ["2003-01-01", "2003-01-04", "2004-01-01", "2004-01-04"]
    assert list(ds.prediction_timedelta.values) == [np.timedelta64(h, "h") for h in (0, 24, 48)]
    assert list(ds.level.values) == [500, 850] and list(ds.number.values) == [1, 2]
    assert ds["geopotential"].dims == ("prediction_timedelta", "number", "time", "level",
                                       "longitude", "latitude")
    expected = b["Z"].isel(time=1).sel(step=48, realization=2, plev=50000.0).transpose("lon", "lat")
    got = ds["geopotential"].sel(time="2004-01-04", prediction_timedelta=np.timedelta64(48, "h"),
                                 number=2, level=500)
    np.testing.assert_array_equal(got.values, expected.values[:, ::-1])
    np.testing.assert_array_equal(ds["2m_temperature"].isel(time=0).values,
                                  a["T2M"].isel(time=0).transpose("step", "realization", "lon", "lat")
                                  .values[..., ::-1])


def test_malformed_ensemble_files(tmp_path, builtin_ensemble):
    names, units = {"t2m": "T2M", "z": "Z"}, {"t2m": "K", "z": "m**2 s**-2"}
    duplicate = tmp_path / "dup"
    duplicate.mkdir()
    ens10_day_file(duplicate / "a.nc", ["2003-01-01", "2004-01-01"], 0, names, units)
    ens10_day_file(duplicate / "b.nc", ["2004-01-01", "2005-01-01"], 1, names, units)
    with pytest.raises(ValueError, match=r"overlapping times .*a.nc covers .*b.nc covers .*2004-01-01"):
        open_store(duplicate)
    unknown = tmp_path / "unknown.nc"
    ens10_day_file(unknown, ["2003-01-01"], 0, {"t2m": "XYZ", "z": "Z"}, units)
    with pytest.raises(ValueError, match=r"unknown variable 'XYZ' in .*unknown.nc"):
        open_store(unknown)
    bad_units = tmp_path / "units.nc"
    ens10_day_file(bad_units, ["2003-01-01"], 0, names, {"t2m": "K", "z": "furlongs"})
    with pytest.raises(ValueError, match=r"'geopotential' .* units 'furlongs'"):
        open_store(bad_units)
    no_time = tmp_path / "notime.nc"
    xr.load_dataset(unknown).rename({"XYZ": "T2M"}).isel(time=0, drop=True).to_netcdf(no_time)
    with pytest.raises(ValueError, match=r"notime.nc has no 'time' coordinate"):
        open_store(no_time)
    no_lead = tmp_path / "nolead.nc"
    xr.load_dataset(unknown).rename({"XYZ": "T2M"}).isel(step=0, drop=True).to_netcdf(no_lead)
    with pytest.raises(ValueError, match=r"nolead.nc has no lead-time coordinate"):
        open_store(no_lead)
    grids = tmp_path / "grids"
    grids.mkdir()
    ens10_day_file(grids / "a.nc", ["2003-01-01"], 0, names, units)
    other = xr.load_dataset(grids / "a.nc")
    other.assign_coords(time=pd.DatetimeIndex(["2003-01-04"]), lat=other.lat * 0.5).to_netcdf(grids / "b.nc")
    with pytest.raises(ValueError, match=r"different grids: .*a.nc is on 8×5 .*b.nc on 8×5"):
        open_store(grids)


# ---------------------------------------------------------------------------------------
# WeatherBench2 zarr at another resolution, with poles
# ---------------------------------------------------------------------------------------


def test_wb2_zarr_240x121_with_poles(tmp_path):
    rng = np.random.default_rng(3)
    lat, lon = np.linspace(-90, 90, 121), np.arange(240) * 1.5
    times = pd.date_range("2020-01-01", periods=4, freq="6h")
    world = xr.Dataset(
        {"2m_temperature": (("time", "longitude", "latitude"),
                            rng.random((4, 240, 121), dtype=np.float32) + 250),
         "geopotential": (("time", "level", "longitude", "latitude"),
                          rng.random((4, 2, 240, 121), dtype=np.float32) + 5e4),
         "land_sea_mask": (("longitude", "latitude"), rng.random((240, 121), dtype=np.float32)),
         "geopotential_at_surface": (("longitude", "latitude"), rng.random((240, 121), dtype=np.float32))},
        coords={"time": times, "level": list(LEVELS), "longitude": lon, "latitude": lat})
    store = write_wb2_zarr(world, tmp_path / "240x121_equiangular_with_poles.zarr", packed=False)
    ds = open_store(store)
    assert ds.sizes["longitude"] == 240 and ds.sizes["latitude"] == 121
    assert ds.latitude.values[0] == -90 and ds.latitude.values[-1] == 90
    inputs, target = WB2Dataset(store, SampleSpec(surf_vars=("2t",), atmos_vars=("z",)))[0]
    assert inputs.surf_vars["2t"].shape == (1, 2, 121, 240)
    assert float(inputs.metadata.lat[0]) == 90 and float(inputs.metadata.lat[-1]) == -90
    north_pole = world["2m_temperature"].isel(time=2).sel(latitude=90).values
    np.testing.assert_array_equal(target.surf_vars["2t"][0, 0, 0].numpy(), north_pole)
    south_pole = world["geopotential"].isel(time=1).sel(latitude=-90, level=850).values
    np.testing.assert_array_equal(inputs.atmos_vars["z"][0, 1, 1, -1].numpy(), south_pole)


# ---------------------------------------------------------------------------------------
# Remote stores (fsspec URLs)
# ---------------------------------------------------------------------------------------


def test_memory_url_is_opened_through_fsspec(world_decoded, era5_netcdf):
    import fsspec

    url = "memory://weatherpeft-test/world.zarr"
    world_decoded.to_zarr(url, mode="w", consolidated=True, zarr_format=2)
    try:
        ds = open_store(url)
        assert ds.attrs["weatherpeft_source"] == url
        xr.testing.assert_equal(ds["temperature"].load(), world_decoded["temperature"])
        spec = SampleSpec(surf_vars=("2t",), atmos_vars=("t",))
        # WB2Dataset keeps a Path, which turns "memory://" into "memory:/": still a URL.
        inputs, _ = WB2Dataset(url, spec)[0]
        assert inputs.surf_vars["2t"].shape == (1, 2, 32, 64)
        with fsspec.open("memory://weatherpeft-test/era5.nc", "wb") as handle:
            handle.write(era5_netcdf.read_bytes())
        xr.testing.assert_equal(open_store("memory://weatherpeft-test/era5.nc")["temperature"].load(),
                                world_decoded["temperature"])
    finally:
        fsspec.filesystem("memory").rm("/weatherpeft-test", recursive=True)


def test_cloud_url_is_passed_through_not_treated_as_a_missing_path(monkeypatch):
    """No network here: the zarr opener is replaced by one that fails as an unreachable bucket
    would. The URL (also after pathlib mangled it) and storage_options must reach it intact."""
    url = "gs://weatherbench2/datasets/era5/1959-2023_01_10-6h-64x32_equiangular_conservative.zarr"
    calls = []

    def unreachable(store, **kwargs):
        calls.append((store, kwargs))
        raise OSError("network is unreachable")

    monkeypatch.setattr(xr, "open_zarr", unreachable)
    for given in (url, Path(url)):
        with pytest.raises(ValueError, match=r"cannot open remote store gs://weatherbench2/datasets/"
                                             r"era5/.*: OSError: network is unreachable"):
            open_store(given, storage_options={"token": "anon"})
    assert {store for store, _ in calls} == {url}
    assert all(kwargs["storage_options"] == {"token": "anon"} for _, kwargs in calls)
