"""GRIB files through xarray's cfgrib engine (the ``grib`` extra).

The files are written here with eccodes' Python API from its GRIB 2 samples, the way ECMWF
writes ERA5 and ENS: latitude 90 … −90 with both poles, pressure levels and surface fields in
one file, IEEE packing (so the values read back exactly). ``open_store`` must give the values
written, in WB2's canonical layout; ``data check`` / ``data info`` must pass.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from weatherpeft.cli import main
from weatherpeft.data.readers import detect_layout
from weatherpeft.data.wb2 import DataError, SampleSpec, WB2Dataset, open_store

LAT = np.linspace(90.0, -90.0, 7)  # both poles, as ERA5 (rows north to south)
LON = np.arange(0.0, 360.0, 30.0)
TIMES = (pd.Timestamp("2003-01-01T00:00"), pd.Timestamp("2003-01-01T06:00"))
LEVELS = (500, 850)
#: GRIB short name → (typical value, spread) of the fields written.
UPPER = {"t": (250.0, 10.0), "z": (5.0e4, 3.0e3)}
SURFACE = {"2t": (280.0, 10.0), "msl": (1.0e5, 1.0e3), "10u": (0.0, 5.0), "z": (2.0e3, 1.0e3)}
CANONICAL = {"t": "temperature", "2t": "2m_temperature", "msl": "mean_sea_level_pressure",
             "10u": "10m_u_component_of_wind"}


@pytest.fixture(scope="module")
def eccodes():
    pytest.importorskip("cfgrib")
    return pytest.importorskip("eccodes")


def write_message(eccodes, handle, sample: str, values: np.ndarray, **keys) -> None:
    """One GRIB 2 message on the LAT × LON grid (values: rows north to south)."""
    message = eccodes.codes_grib_new_from_samples(sample)
    grid = {"Ni": LON.size, "Nj": LAT.size, "latitudeOfFirstGridPointInDegrees": LAT[0],
            "latitudeOfLastGridPointInDegrees": LAT[-1], "longitudeOfFirstGridPointInDegrees": LON[0],
            "longitudeOfLastGridPointInDegrees": LON[-1], "iDirectionIncrementInDegrees": 30.0,
            "jDirectionIncrementInDegrees": 30.0, "packingType": "grid_ieee"}
    for key, value in {**grid, **keys}.items():
        eccodes.codes_set(message, key, value)
    eccodes.codes_set_values(message, values.astype(np.float64).ravel())
    eccodes.codes_write(message, handle)
    eccodes.codes_release(message)


def field(rng: np.random.Generator, typical: tuple[float, float]) -> np.ndarray:
    centre, spread = typical
    return (centre + spread * rng.standard_normal((LAT.size, LON.size))).astype(np.float32)


@pytest.fixture(scope="module")
def analysis(eccodes, tmp_path_factory) -> tuple[Path, dict]:
    """Two analysis times: t and z at 500 and 850 hPa, 2t, msl, 10u and the orography z;
    the land-sea mask at the first time only.

    Returns the file and {(short name, level or None, time index): values written}."""
    path = tmp_path_factory.mktemp("grib") / "era5.grib2"
    rng = np.random.default_rng(0)
    written = {}
    with open(path, "wb") as handle:
        for index, time in enumerate(TIMES):
            when = {"dataDate": int(time.strftime("%Y%m%d")), "dataTime": time.hour * 100}
            for level in LEVELS:
                for short, typical in UPPER.items():
                    written[short, level, index] = field(rng, typical)
                    write_message(eccodes, handle, "regular_ll_pl_grib2", written[short, level, index],
                                  shortName=short, level=level, **when)
            for short, typical in SURFACE.items():
                written[short, None, index] = field(rng, typical)
                write_message(eccodes, handle, "regular_ll_sfc_grib2", written[short, None, index],
                              shortName=short, **when)
            if index == 0:
                written["lsm", None, 0] = (rng.random((LAT.size, LON.size)) > 0.5).astype(np.float32)
                write_message(eccodes, handle, "regular_ll_sfc_grib2", written["lsm", None, 0],
                              shortName="lsm", **when)
    return path, written


def canonical_field(values: np.ndarray) -> np.ndarray:
    """Rows north to south (lat, lon) → WB2's canonical (longitude, latitude ascending)."""
    return values[::-1, :].T


def test_grib_analysis_opens_as_a_wb2_store(analysis):
    path, written = analysis
    assert detect_layout(path) == "grib"
    ds = open_store(path)
    assert ds.attrs["source_layout"] == "GRIB analysis"
    assert sorted(ds.data_vars) == ["10m_u_component_of_wind", "2m_temperature", "geopotential",
                                    "geopotential_at_surface", "land_sea_mask", "mean_sea_level_pressure",
                                    "temperature"]
    assert list(ds.time.values) == [np.datetime64(t) for t in TIMES]
    assert list(ds.level.values) == list(LEVELS)
    np.testing.assert_array_equal(ds.latitude.values, LAT[::-1])
    np.testing.assert_array_equal(ds.longitude.values, LON)
    assert ds["temperature"].dims == ("time", "level", "longitude", "latitude")
    assert ds["2m_temperature"].dims == ("time", "longitude", "latitude")
    assert ds["land_sea_mask"].dims == ("longitude", "latitude")  # given once: constant
    np.testing.assert_array_equal(ds["land_sea_mask"].values, canonical_field(written["lsm", None, 0]))
    for index in range(len(TIMES)):
        for level_index, level in enumerate(LEVELS):
            np.testing.assert_array_equal(ds["temperature"].values[index, level_index],
                                          canonical_field(written["t", level, index]))
            np.testing.assert_array_equal(ds["geopotential"].values[index, level_index],
                                          canonical_field(written["z", level, index]))
        for short, name in CANONICAL.items():
            if short in SURFACE:
                np.testing.assert_array_equal(ds[name].values[index],
                                              canonical_field(written[short, None, index]))
        np.testing.assert_array_equal(ds["geopotential_at_surface"].values[index],
                                      canonical_field(written["z", None, index]))
    assert ds["temperature"].attrs["units"] == "K"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no cfgrib index file beside it


def test_grib_is_recognised_by_its_magic_bytes(analysis, tmp_path):
    path, written = analysis
    unnamed = tmp_path / "era5.bin"
    unnamed.write_bytes(path.read_bytes())
    assert detect_layout(unnamed) == "grib"
    np.testing.assert_array_equal(open_store(unnamed)["2m_temperature"].values[1],
                                  canonical_field(written["2t", None, 1]))


def test_grib_analysis_serves_samples(analysis):
    """Aurora's layout (latitude decreasing) is the file's own row order."""
    path, written = analysis
    spec = SampleSpec(surf_vars=("2t", "msl", "10u"), atmos_vars=("z", "t"),
                      static_vars=("geopotential_at_surface", "lsm"), history=1, lead=timedelta(hours=6))
    dataset = WB2Dataset(path, spec)
    assert len(dataset) == 1
    inputs, target = dataset[0]
    np.testing.assert_array_equal(inputs.metadata.lat.numpy(), LAT.astype(np.float32))
    assert target.metadata.time == (TIMES[1].to_pydatetime(),)
    np.testing.assert_array_equal(target.surf_vars["2t"][0, 0].numpy(), written["2t", None, 1])
    np.testing.assert_array_equal(inputs.surf_vars["msl"][0, 0].numpy(), written["msl", None, 0])
    np.testing.assert_array_equal(target.atmos_vars["t"][0, 0, 1].numpy(), written["t", 850, 1])
    np.testing.assert_array_equal(inputs.static_vars["z"].numpy(), written["z", None, 0])
    np.testing.assert_array_equal(target.static_vars["lsm"].numpy(), written["lsm", None, 0])


def test_data_check_and_info_pass_on_a_grib_file(analysis, capsys):
    path, _ = analysis
    assert main(["data", "check", str(path)]) == 0
    assert "2 times 2003-01-01 00:00 … 2003-01-01 06:00, step 6:00:00, all finite and plausible" \
        in capsys.readouterr().out
    assert main(["data", "info", str(path)]) == 0
    info = capsys.readouterr().out
    assert "level (hPa): [500, 850]" in info and "grid: 12×7 lon×lat, lat -90…90" in info


@pytest.mark.parametrize("keep", [0.1, 0.97])
def test_truncated_grib_is_named(analysis, tmp_path, capsys, keep):
    path, _ = analysis
    data = path.read_bytes()
    truncated = tmp_path / "truncated.grib2"
    truncated.write_bytes(data[: int(len(data) * keep)])
    message = rf"cannot read GRIB file {truncated} \(a truncated or corrupt file\?\)"
    with pytest.raises(DataError, match=message):
        open_store(truncated)
    assert main(["data", "check", str(truncated)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("weatherpeft: error: ") and str(truncated) in error and "Traceback" not in error


def test_grib_with_a_bad_value_is_named_by_coordinates(eccodes, tmp_path, capsys):
    path = tmp_path / "bad.grib"
    values = np.full((LAT.size, LON.size), 280.0, dtype=np.float32)
    values[6, 3] = 9999.0  # the south pole, 90°E
    with open(path, "wb") as handle:
        for hour, field_values in ((0, values * 0 + 280.0), (6, values)):
            write_message(eccodes, handle, "regular_ll_sfc_grib2", field_values, shortName="2t",
                          dataDate=20030101, dataTime=hour * 100)
    assert main(["data", "check", str(path)]) == 1
    error = capsys.readouterr().err
    assert "implausible value 9999" in error and "'2m_temperature'" in error
    assert "time 2003-01-01 06:00:00 (store time index 1)" in error
    assert "latitude -90 (row 6), longitude 90 (column 3)" in error and str(path) in error


@pytest.fixture(scope="module")
def ensemble(eccodes, tmp_path_factory) -> tuple[Path, dict]:
    """One initialisation, steps 0 and 24 h, t at 500/850 hPa and 2t: the control forecast
    (member 0) and perturbed members 1–2, as ECMWF writes them (two hypercubes for cfgrib)."""
    path = tmp_path_factory.mktemp("grib") / "ens.grib2"
    rng = np.random.default_rng(1)
    written = {}
    ensemble_keys = {"setLocalDefinition": 1, "productDefinitionTemplateNumber": 1,
                     "numberOfForecastsInEnsemble": 10, "dataDate": 20030101, "dataTime": 1200}
    with open(path, "wb") as handle:
        for member in (0, 1, 2):
            control = {"type": "cf", "typeOfEnsembleForecast": 1} if member == 0 else \
                {"type": "pf", "typeOfEnsembleForecast": 3}
            for step in (0, 24):
                keys = {**ensemble_keys, **control, "perturbationNumber": member, "stepRange": step}
                for level in LEVELS:
                    written["t", member, step, level] = field(rng, UPPER["t"])
                    write_message(eccodes, handle, "regular_ll_pl_grib2", written["t", member, step, level],
                                  shortName="t", level=level, **keys)
                written["2t", member, step, None] = field(rng, SURFACE["2t"])
                write_message(eccodes, handle, "regular_ll_sfc_grib2", written["2t", member, step, None],
                              shortName="2t", **keys)
    return path, written


def test_ensemble_grib_opens_as_the_wb2_forecast_layout(ensemble, capsys):
    path, written = ensemble
    ds = open_store(path)
    assert ds.attrs["source_layout"] == "ensemble GRIB"
    assert list(ds.number.values) == [0, 1, 2]
    assert list(ds.prediction_timedelta.values) == [np.timedelta64(0, "h"), np.timedelta64(24, "h")]
    assert list(ds.time.values) == [np.datetime64("2003-01-01T12:00")]
    assert list(ds.level.values) == list(LEVELS)
    got = ds["temperature"].sel(number=2, prediction_timedelta=np.timedelta64(24, "h"), level=850)
    np.testing.assert_array_equal(got.isel(time=0).values, canonical_field(written["t", 2, 24, 850]))
    for member in (0, 1):
        got = ds["2m_temperature"].sel(number=member, prediction_timedelta=np.timedelta64(0, "h"))
        np.testing.assert_array_equal(got.isel(time=0).values, canonical_field(written["2t", member, 0, None]))
    assert main(["data", "check", str(path)]) == 0
    assert "1 inits, 3 members, all finite and plausible" in capsys.readouterr().out


def test_grib_without_cfgrib_asks_for_the_extra(tmp_path, monkeypatch):
    """Runs without cfgrib too: the file is refused before anything parses it."""
    path = tmp_path / "era5.grib"
    path.write_bytes(b"GRIB\x00\x00\x00\x02" + bytes(64))
    monkeypatch.setitem(sys.modules, "cfgrib", None)  # import cfgrib → ImportError
    with pytest.raises(DataError, match=rf"cannot read GRIB file {path}: .*pip install weatherpeft\[grib\]"):
        open_store(path)
