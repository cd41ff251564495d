"""Bad data: every fault raises DataError naming the file, the variable and the time/level,
when the dataset is built (before any training step) where it can be; ``weatherpeft data
check`` reports the same message and exits 1 without a traceback."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import START, make_world, strip_encoding, write_wb2_zarr

from weatherpeft.cli import main
from weatherpeft.data.wb2 import DataError, SampleSpec, WB2Dataset, open_store, validate
from weatherpeft.tasks.forecasting import ForecastingTask

SPEC = SampleSpec()  # 2t, 10u, 10v, msl; z, t, u, v, q at every level; lsm, orography


def at(k: int) -> datetime:
    """The k-th time of the synthetic world (6-hourly from START)."""
    return START.to_pydatetime() + timedelta(hours=6 * k)


def write(tmp_path: Path, world: xr.Dataset, name: str = "world.zarr") -> Path:
    """The world as a plain-float WB2 zarr store (chunks of 4 times)."""
    return write_wb2_zarr(strip_encoding(world), tmp_path / name, packed=False)


def assert_check_fails(path: Path, capsys, *fragments: str) -> str:
    """``weatherpeft data check`` exits 1 and prints one error line holding every fragment."""
    assert main(["data", "check", str(path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("weatherpeft: error: ") and "Traceback" not in error
    for fragment in fragments:
        assert fragment in error, (fragment, error)
    return error


# -- variables and levels -------------------------------------------------------------------


def test_missing_variable_fails_when_the_task_is_built(tmp_path):
    store = write(tmp_path, make_world().drop_vars("specific_humidity"))
    periods = {"train": (at(0), at(5)), "val": (at(6), at(8)), "test": (at(6), at(11))}
    with pytest.raises(DataError, match=rf"'specific_humidity' not in store {store}; it has: \["):
        ForecastingTask(store, periods, lead_steps=(1,))


def test_extra_variables_are_ignored_and_listed_by_the_check(tmp_path, capsys):
    world = make_world()
    store = write(tmp_path, world)
    extra = world.assign(
        relative_humidity=world["temperature"] * 0 + 50.0,
        soil_moisture=world["2m_temperature"].expand_dims(depth=[0.1, 0.5], axis=1) * 0 + 0.3,
        station_id=("station", np.arange(3)))
    extra_store = write(tmp_path, extra, "extra.zarr")
    plain, with_extra = WB2Dataset(store, SPEC)[3], WB2Dataset(extra_store, SPEC)[3]
    for a, b in zip(plain, with_extra):
        assert a.surf_vars.keys() == b.surf_vars.keys() and a.atmos_vars.keys() == b.atmos_vars.keys()
        for key in a.atmos_vars:
            assert (a.atmos_vars[key] == b.atmos_vars[key]).all()
    assert main(["data", "check", str(extra_store)]) == 0
    assert "not checked (no Aurora name): relative_humidity, soil_moisture, station_id" in capsys.readouterr().out


def test_missing_pressure_level_is_named(tmp_path):
    store = write(tmp_path, make_world(levels=(300, 500, 925)))
    with pytest.raises(DataError, match=rf"level 850 hPa not in store {store}; available: \[300, 500, 925\]"):
        WB2Dataset(store, SampleSpec(levels=(500, 850)))


def test_repeated_pressure_level_is_named(tmp_path, capsys):
    store = write(tmp_path, make_world(levels=(300, 500, 500)))
    with pytest.raises(DataError, match=rf"'level' of {store} repeats values: 500 at indices \[1, 2\]"):
        open_store(store)
    assert_check_fails(store, capsys, str(store), "'level'", "[1, 2]")


# -- grids ----------------------------------------------------------------------------------


def _shuffled(values: np.ndarray) -> np.ndarray:
    values = values.copy()
    values[[3, 4]] = values[[4, 3]]
    return values


@pytest.mark.parametrize("coordinate, change, message", [
    ("latitude", _shuffled, r"latitude of .* is not strictly monotonic: .* at index 3, then .* at index 4"),
    ("latitude", lambda lat: lat + 10.0, r"latitude of .* is 91.5625 at index 30, outside \[-90, 90\]"),
    ("latitude", lambda lat: np.where(np.arange(lat.size) == 7, np.nan, lat),
     r"latitude of .* is nan at index 7"),
    ("longitude", _shuffled, r"longitude of .* is not strictly monotonic: .* at index 3, then .* at index 4"),
    ("longitude", lambda lon: lon * 360.0 / lon[-1], r"longitude of .* runs 0 … 360, 360° or more"),
], ids=["latitude-unsorted", "latitude-beyond-pole", "latitude-nan", "longitude-unsorted",
        "longitude-repeats-meridian"])
def test_broken_grid_is_named(tmp_path, capsys, coordinate, change, message):
    world = make_world()
    broken = world.assign_coords({coordinate: change(world[coordinate].values)})
    store = write(tmp_path, broken)
    with pytest.raises(DataError, match=message) as caught:
        WB2Dataset(store, SPEC)
    assert str(store) in str(caught.value)
    assert_check_fails(store, capsys, str(store), coordinate)


def test_regional_grid_across_the_dateline_is_accepted(tmp_path):
    world = make_world().isel(longitude=slice(0, 8))
    crossing = world.assign_coords(longitude=np.array([170, 175, 180, 185, 190, 195, 200, 205.0]) - 360 * (
        np.array([170, 175, 180, 185, 190, 195, 200, 205.0]) >= 180))
    dataset = WB2Dataset(write(tmp_path, crossing), SPEC)
    assert dataset.selection.lon.tolist() == [170, 175, 180, 185, 190, 195, 200, 205]


# -- times ----------------------------------------------------------------------------------


def test_unsorted_times_are_sorted(tmp_path):
    world = make_world()
    order = np.random.default_rng(0).permutation(world.sizes["time"])
    plain = WB2Dataset(write(tmp_path, world), SPEC)
    shuffled = WB2Dataset(write(tmp_path, world.isel(time=order), "shuffled.zarr"), SPEC)
    assert len(plain) == len(shuffled)
    for index in (0, 5):
        assert plain.sample_times(index) == shuffled.sample_times(index)
        assert (plain[index][1].surf_vars["2t"] == shuffled[index][1].surf_vars["2t"]).all()


def test_repeated_time_is_named(tmp_path, capsys):
    world = make_world()
    times = world["time"].values.copy()
    times[2] = times[1]
    store = write(tmp_path, world.assign_coords(time=times))
    message = rf"'time' of {store} repeats values: 2001-03-01 06:00:00 at indices \[1, 2\]"
    with pytest.raises(DataError, match=message):
        WB2Dataset(store, SPEC)
    assert_check_fails(store, capsys, str(store), "'time'", "2001-03-01 06:00:00", "[1, 2]")


def test_missing_time_is_named(tmp_path):
    world = make_world()
    times = world["time"].values.copy()
    times[4] = np.datetime64("NaT")
    store = write(tmp_path, world.assign_coords(time=times))
    with pytest.raises(DataError, match=rf"time of {store} holds no date \(NaT\) at index 4"):
        open_store(store)


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [9.96921e36, 1e20, -9999.0, np.nan, np.inf])
def test_unmasked_fill_value_fails_when_the_dataset_is_built(tmp_path, capsys, fill):
    world = make_world()
    world["temperature"][6, 2, 10, 20] = fill  # time 6 = 2001-03-02 12:00, level 850
    store = write(tmp_path, world)
    what = {9.96921e36: "implausible value 9.96921e+36", 1e20: "implausible value 1e+20",
            -9999.0: "implausible value -9999"}.get(fill, str(fill).replace("nan", "NaN"))
    # latitude index 20 of 32 ascending = row 11 counted from the north, as in a sample
    message = (f"{re.escape(what)}.* in variable 'temperature' at level 850 hPa at time 2001-03-02 12:00:00 "
               f"\\(store time index 6\\), latitude 25.3125 \\(row 11\\), longitude 56.25 \\(column 10\\), "
               f"in {store}")
    with pytest.raises(DataError, match=message):
        WB2Dataset(store, SPEC)  # small enough to be loaded, so checked, at construction
    lazy = WB2Dataset(store, SampleSpec(in_memory=False))
    lazy[0]  # times 0–2: clean
    with pytest.raises(DataError, match=message):
        lazy[4]  # times 4, 5 → 6
    assert_check_fails(store, capsys, what, "'temperature' at level 850 hPa", "2001-03-02 12:00:00",
                       "latitude 25.3125 (row 11), longitude 56.25 (column 10)", str(store))


def test_declared_fill_value_is_masked_and_named(tmp_path):
    world = strip_encoding(make_world())
    world["u_component_of_wind"][3, 0, 1, 2] = -32767.0
    store = tmp_path / "declared.zarr"
    world.to_zarr(store, zarr_format=2, consolidated=True,
                  encoding={"u_component_of_wind": {"_FillValue": -32767.0}})
    with pytest.raises(DataError, match=r"NaN in variable 'u_component_of_wind' at level 300 hPa at time "
                                        r"2001-03-01 18:00:00 \(store time index 3\)"):
        WB2Dataset(store, SPEC)


def test_other_units_than_declared_are_named(tmp_path):
    world = make_world()
    world["mean_sea_level_pressure"] = world["mean_sea_level_pressure"] / 100  # hPa, no units attribute
    with pytest.raises(DataError, match=r"implausible value \d+\.?\d* \(outside \[50000, 150000\]: an unmasked "
                                        r"fill value, or other units.* 'mean_sea_level_pressure' at time "
                                        r"2001-03-01 00:00:00"):
        WB2Dataset(write(tmp_path, world), SPEC)


def test_declared_units_move_the_plausible_range(tmp_path):
    world = make_world()
    world["total_precipitation_6hr"] = (world["total_precipitation_6hr"] * 1e4).assign_attrs(units="mm")
    dataset = WB2Dataset(write(tmp_path, world), SampleSpec(surf_vars=("total_precipitation_6hr",)))
    assert float(dataset[0][0].surf_vars["tp"].max()) > 10  # above 10 m, plausible in mm


def test_static_fill_value_is_named(tmp_path):
    world = make_world()
    world["land_sea_mask"][5, 6] = -9999.0
    store = write(tmp_path, world)
    with pytest.raises(DataError, match=rf"implausible value -9999 .* in static variable 'land_sea_mask', "
                                        rf"latitude -53.4375 \(row 25\), longitude 28.125 \(column 5\), "
                                        rf"in {store}"):
        WB2Dataset(store, SPEC)


def test_fault_in_the_test_period_fails_before_training(tmp_path):
    world = make_world()
    world["geopotential"][10, 1, 0, 0] = 1e20
    periods = {"train": (at(0), at(5)), "val": (at(4), at(8)), "test": (at(6), at(11))}
    # statistics come from the clean training period: the task builds
    task = ForecastingTask(write(tmp_path, world), periods, lead_steps=(1,))
    with pytest.raises(DataError, match=r"1e\+20 .* 'geopotential' at level 500 hPa at time 2001-03-03 12:00:00"):
        task.datasets()  # the Trainer's first call, before step 1


# -- broken files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("clean"), make_world())


def _copy(store: Path, target: Path) -> Path:
    subprocess.run(["cp", "-r", str(store), str(target)], check=True)
    return target


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_zarr_chunk_is_named(clean_store, tmp_path, capsys, damage):
    store = _copy(clean_store, tmp_path / "damaged.zarr")
    chunk = store / "temperature" / "1.0.0.0"  # times 4–7
    data = chunk.read_bytes()
    chunk.write_bytes({"garbage": np.random.default_rng(0).bytes(len(data)),
                       "truncated": data[: len(data) // 2], "empty": b""}[damage])
    # The first unreadable time of the chunk (times 4–7): with partial decompression, blosc
    # may still read the blocks before the damage, depending on its block layout.
    where = r"at time 2001-03-02 \d\d:00:00 \(store time index [4-7]\)"
    message = rf"cannot read variable 'temperature' {where} from {store} \(a truncated or corrupt chunk or file\?\)"
    with pytest.raises(DataError, match=message):
        WB2Dataset(store, SPEC)
    lazy = WB2Dataset(store, SampleSpec(in_memory=False))
    lazy[0]  # times 0–2: other chunk
    with pytest.raises(DataError, match=rf"'temperature' {where} from {store}"):
        lazy[5]  # times 5–7
    assert_check_fails(store, capsys, "'temperature'", str(store), "truncated or corrupt")


def test_corrupt_coordinate_chunk_is_named(clean_store, tmp_path):
    store = _copy(clean_store, tmp_path / "damaged.zarr")
    (store / "time" / "0").write_bytes(b"\x00" * 7)
    with pytest.raises(DataError, match=rf"cannot read zarr store {store}"):
        open_store(store)


def test_missing_zarr_chunk_reads_as_nan_and_is_named(clean_store, tmp_path):
    store = _copy(clean_store, tmp_path / "damaged.zarr")
    (store / "2m_temperature" / "2.0.0").unlink()  # times 8–11
    with pytest.raises(DataError, match=rf"NaN in variable '2m_temperature' at time 2001-03-03 00:00:00 "
                                        rf"\(store time index 8\), latitude 87.1875 \(row 0\), "
                                        rf"longitude 0 \(column 0\), in {store}"):
        validate(store)


def test_data_check_fails_without_a_traceback(clean_store, tmp_path):
    store = _copy(clean_store, tmp_path / "damaged.zarr")
    (store / "geopotential" / "0.0.0.0").write_bytes(b"not a blosc frame")
    done = subprocess.run([sys.executable, "-m", "weatherpeft", "data", "check", str(store)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "cannot read variable 'geopotential' at time 2001-03-01 00:00:00 (store time index 0)" in done.stderr
    assert str(store) in done.stderr


@pytest.fixture(scope="module")
def netcdf_files(tmp_path_factory) -> dict[str, Path]:
    """The world as netCDF-4 (HDF5) and as classic netCDF (64-bit offsets)."""
    folder = tmp_path_factory.mktemp("netcdf")
    world = strip_encoding(make_world())
    files = {"NETCDF4": folder / "world4.nc", "NETCDF3_64BIT": folder / "world3.nc"}
    for form, path in files.items():
        world.to_netcdf(path, format=form)
    return files


@pytest.mark.parametrize("form", ["NETCDF4", "NETCDF3_64BIT"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_netcdf_is_named(netcdf_files, tmp_path, capsys, form, keep):
    data = netcdf_files[form].read_bytes()
    path = tmp_path / "truncated.nc"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match=rf"{path}"):
        validate(path)
    assert_check_fails(path, capsys, str(path))


def test_corrupt_netcdf_bytes_are_named(netcdf_files, tmp_path, capsys):
    data = bytearray(netcdf_files["NETCDF3_64BIT"].read_bytes())
    middle = len(data) // 2
    data[middle: middle + 4096] = np.random.default_rng(1).bytes(4096)
    path = tmp_path / "corrupt.nc"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"in variable '\w+'.* at time .* in {path}"):
        validate(path, SampleSpec(surf_vars=(), static_vars=()))
    assert_check_fails(path, capsys, str(path), "in variable")


def test_forecast_store_fill_value_is_named_by_init(tmp_path, capsys):
    from weatherpeft.data.builtin import store_path

    ensemble = xr.open_zarr(store_path("ensemble")).isel(time=slice(0, 3)).load()
    ensemble["temperature"][1, 0, 4, 1, 2, 3] = -9999.0
    path = tmp_path / "ensemble.zarr"
    strip_encoding(ensemble).to_zarr(path, zarr_format=2, consolidated=True)
    assert_check_fails(path, capsys, "implausible value -9999", "'temperature'",
                       "init 2003-01-03T06:00 (time index 1)", "lead 2 days 00:00:00 (lead index 0)",
                       "member 4 (member index 4)", "level 850 hPa (level index 1)",
                       "latitude -70.3125 (row 28), longitude 11.25 (column 2)", str(path))


def test_zarr_array_with_the_pickle_codec_is_refused(clean_store, tmp_path):
    """zarr 2 would unpickle such chunks (zarr 3 cannot read them): refused before opening."""
    store = _copy(clean_store, tmp_path / "pickled.zarr")
    marker = tmp_path / "unpickled"
    array = {"chunks": [12], "compressor": None, "dtype": "|O", "fill_value": 0, "order": "C",
             "filters": [{"id": "pickle", "protocol": 5}], "shape": [12], "zarr_format": 2}
    (store / "notes").mkdir()
    (store / "notes" / ".zarray").write_text(json.dumps(array))
    (store / "notes" / ".zattrs").write_text(json.dumps({"_ARRAY_DIMENSIONS": ["time"]}))
    (store / "notes" / "0").write_bytes(pickle.dumps((Path.write_text, (marker, "ran"))))
    with pytest.raises(DataError, match=rf"refusing to open zarr store {store}: an array is "
                                        r"encoded with the pickle codec"):
        WB2Dataset(store, SPEC)
    assert not marker.exists()
