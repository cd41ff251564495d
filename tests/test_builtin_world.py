"""The committed built-in world: checksums, layout, the reader on it, and its data card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from weatherpeft.data import builtin, manifest, wb2
from weatherpeft.data.stats import NormalisationStats


@pytest.fixture(scope="module")
def root():
    return builtin.builtin_dir()


def test_manifest_checksums_match_committed_files(root):
    assert manifest.verify_manifest(root) == []


def test_committed_data_fits_the_size_budget(root):
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 80 * 10**6, f"committed world is {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", ["downstream", "regional"])
def test_analysis_stores_have_the_weatherbench2_layout(name):
    ds = wb2.open_store(builtin.store_path(name))
    for variable in ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind",
                     "mean_sea_level_pressure", "total_precipitation_6hr"):
        assert ds[variable].dims == ("time", "longitude", "latitude")
    for variable in ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind",
                     "specific_humidity"):
        assert ds[variable].dims == ("time", "level", "longitude", "latitude")
    assert {500, 850} <= set(ds.level.values.tolist())
    assert np.all(np.diff(ds.latitude.values) > 0)
    steps = np.diff(ds.time.values).astype("timedelta64[h]").astype(int)
    assert set(steps.tolist()) == {6}


def test_downstream_store_is_wb2_64x32_grid_for_a_whole_year():
    ds = wb2.open_store(builtin.store_path("downstream"))
    np.testing.assert_allclose(ds.latitude.values, np.linspace(-87.1875, 87.1875, 32))
    np.testing.assert_allclose(ds.longitude.values, np.arange(64) * 5.625)
    assert ds.sizes["time"] == 365 * 4


def test_regional_store_is_a_cropped_2p8125_grid():
    ds = wb2.open_store(builtin.store_path("regional"))
    assert np.allclose(np.diff(ds.latitude.values), 2.8125)
    assert ds.sizes["latitude"] % 4 == 0 and ds.sizes["longitude"] % 4 == 0
    assert ds.latitude.values.min() >= 0 and ds.latitude.values.max() <= 60
    assert ds.longitude.values.min() >= 70 and ds.longitude.values.max() <= 130


def test_ensemble_store_has_the_forecast_layout():
    ds = xr.open_zarr(builtin.store_path("ensemble"))  # as stored, before the reader reorders
    assert ds.sizes["number"] == 10 and ds.sizes["time"] >= 150
    assert ds["2m_temperature"].dims == ("time", "prediction_timedelta", "number", "longitude", "latitude")
    member_spread = float(ds["2m_temperature"].isel(time=0).std("number").mean())
    assert member_spread > 0.05  # members really differ


def test_reader_yields_batches_from_the_committed_store():
    dataset = wb2.WB2Dataset(builtin.store_path("downstream"), wb2.SampleSpec(
        surf_vars=("2m_temperature", "total_precipitation_6hr"), in_memory=False))
    inputs, target = dataset[10]
    assert inputs.surf_vars["2t"].shape == (1, 2, 32, 64)
    assert inputs.atmos_vars["z"].shape == (1, 2, 2, 32, 64)
    assert target.surf_vars["tp"].shape == (1, 1, 32, 64)
    assert inputs.metadata.lat[0] > inputs.metadata.lat[-1]
    assert (target.metadata.time[0] - inputs.metadata.time[0]).total_seconds() == 6 * 3600


def test_normalisation_statistics_come_from_the_pretraining_years(root):
    stats = NormalisationStats.load(root / "normalisation.json")
    downstream_start = wb2.open_store(builtin.store_path("downstream")).time.values[0]
    assert np.datetime64(stats.period[1]) < downstream_start
    assert 250 < stats.locations["2t"] < 300 and stats.scales["t_850"] > 1


def test_data_card_reports_a_realistic_world(root):
    card = json.loads((root / "data_card.json").read_text())
    world = card["downstream"]
    assert 1.5 < world["global_mean_precipitation_mm_per_day"] < 5
    assert world["itcz_latitude_jja_deg"] > world["itcz_latitude_djf_deg"]
    assert world["jet_max_zonal_mean_u500_nh_ms"] > 10
    ensemble = card["ensemble"]
    assert 0 < ensemble["2m_temperature_48h_spread_skill_ratio"] < 1  # under-dispersive raw ensemble
