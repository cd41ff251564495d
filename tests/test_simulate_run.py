"""End to end: a reduced built-in world from the SPEEDY GCM (jcm), read back like WB2 ERA5.

One truth run at T21 (1 day of spin-up, 2 pretraining days that cross a year boundary,
3 downstream days) and a 2-member T21 ensemble, generated once for the module; a second
identical run checks that generation is deterministic down to the bytes.

The ensemble is started every 6 h: its perturbations are scaled differences of two other
init states, so it needs several inits (with one it cannot run; with two, both members of
an init can draw the same pair), and a 48-h forecast must verify inside the 3 downstream days.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from weatherpeft.data.manifest import MANIFEST_NAME, verify_manifest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("jcm") is None,
                       reason="jcm is not installed: the simulation needs the optional extra "
                              "`pip install 'weatherpeft[simulate]'`"),
]

SIX_HOURS = np.timedelta64(6, "h")


def reduced_config(root: Path):
    from weatherpeft.data.simulate import SimulationConfig

    return SimulationConfig(out=root / "builtin", pretraining_out=root / "pretraining", truncation=21,
                            spinup_days=1, archive_start="1999-12-31", pretraining_days=2, downstream_days=3,
                            ensemble_members=2, ensemble_init_every_hours=6)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """(config, timings, wall seconds) of one reduced generation."""
    from weatherpeft.data.simulate import generate

    cfg = reduced_config(tmp_path_factory.mktemp("world"))
    start = time.perf_counter()
    timings = generate(cfg)
    return cfg, timings, time.perf_counter() - start


def open_raw(path: Path) -> xr.Dataset:
    """A store as written (no canonicalisation), decoded."""
    return xr.open_zarr(path, chunks=None).load()


def assert_six_hourly(times: np.ndarray, first, count: int):
    expected = pd.date_range(first, periods=count, freq="6h").values
    np.testing.assert_array_equal(times, expected)


def test_stores_exist_and_manifest_verifies(generated):
    cfg, timings, wall = generated
    out, pre = Path(cfg.out), Path(cfg.pretraining_out)
    for name in ("downstream.zarr", "regional.zarr", "ensemble.zarr"):
        assert (out / name / ".zmetadata").is_file(), name
        assert (pre / "float32" / name / ".zmetadata").is_file(), name
    assert (pre / "pretraining.zarr" / ".zmetadata").is_file()
    assert (out / MANIFEST_NAME).is_file()
    assert verify_manifest(out) == []
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert any(name.startswith("downstream.zarr/") for name in files)
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]
    assert set(timings) >= {"spinup_seconds", "truth_run_seconds", "ensemble_seconds"}
    print(f"\nreduced generation took {wall:.1f} s: {timings}")


def test_times_are_contiguous_six_hourly_and_pretraining_precedes_downstream(generated):
    cfg = generated[0]
    pretraining = open_raw(Path(cfg.pretraining_out) / "pretraining.zarr")
    downstream = open_raw(Path(cfg.out) / "downstream.zarr")
    regional = open_raw(Path(cfg.out) / "regional.zarr")
    # 2 pretraining days sampled after each 6-h step from 1999-12-31 00 UTC; written in two
    # appends (1999, then 2000) that must join without a gap or a repeat.
    assert_six_hourly(pretraining.time.values, "1999-12-31T06:00", 7)
    assert pd.DatetimeIndex(pretraining.time.values).year.tolist() == [1999] * 3 + [2000] * 4
    assert_six_hourly(downstream.time.values, "2000-01-02T00:00", 12)
    np.testing.assert_array_equal(regional.time.values, downstream.time.values)
    assert pretraining.time.values[-1] < downstream.time.values[0]
    assert downstream.time.values[0] - pretraining.time.values[-1] == SIX_HOURS
    # Both archives hold the same variables on the same grid; pretraining is float32.
    assert set(pretraining.data_vars) == set(downstream.data_vars)
    assert pretraining["2m_temperature"].dtype == np.float32
    for name in ("2m_temperature", "geopotential", "specific_humidity"):
        assert np.all(np.isfinite(pretraining[name].values)), name
    # The two appends really appended: the 2000 part differs from the 1999 part.
    assert not np.allclose(pretraining["2m_temperature"].values[2], pretraining["2m_temperature"].values[3])


def test_downstream_store_gives_batches(generated):
    from weatherpeft.data.simulate import ATMOSPHERIC_VARIABLES, SURFACE_VARIABLES
    from weatherpeft.data.wb2 import SampleSpec, WB2Dataset

    cfg = generated[0]
    spec = SampleSpec(surf_vars=SURFACE_VARIABLES, atmos_vars=ATMOSPHERIC_VARIABLES, history=2,
                      lead=timedelta(hours=6))
    dataset = WB2Dataset(Path(cfg.out) / "downstream.zarr", spec)
    assert len(dataset) == 12 - 2  # 12 times; history 2 and lead 6 h use three of them
    inputs, target = dataset[0]
    n_lon, n_lat = cfg.grid
    assert inputs.surf_vars["2t"].shape == (1, 2, n_lat, n_lon)
    assert inputs.surf_vars["tp"].shape == (1, 2, n_lat, n_lon)
    assert inputs.atmos_vars["z"].shape == (1, 2, len(cfg.levels), n_lat, n_lon)
    assert target.atmos_vars["q"].shape == (1, 1, len(cfg.levels), n_lat, n_lon)
    assert inputs.static_vars["lsm"].shape == (n_lat, n_lon)
    assert inputs.metadata.atmos_levels == tuple(cfg.levels)
    assert inputs.metadata.lat[0] == pytest.approx(87.1875) and inputs.metadata.lat[-1] == pytest.approx(-87.1875)
    assert dataset.sample_times(0)[1] - dataset.sample_times(0)[0][-1] == timedelta(hours=6)
    report = dataset.validate()  # every field finite, no gaps
    assert report.gaps == () and report.step == timedelta(hours=6)
    # Plausible physical units (K, Pa, m² s⁻², kg kg⁻¹, m of water per 6 h).
    t2m = inputs.surf_vars["2t"]
    assert float(t2m.min()) > 180 and float(t2m.max()) < 330
    msl = inputs.surf_vars["msl"]
    assert 90000 < float(msl.mean()) < 110000
    z500 = inputs.atmos_vars["z"][0, 0, list(cfg.levels).index(500)]
    assert 4.5e4 < float(z500.mean()) < 6.0e4
    q = inputs.atmos_vars["q"]
    assert float(q.min()) >= 0 and float(q.max()) < 0.05


def test_regional_store_lies_in_the_box_and_gives_batches(generated):
    from weatherpeft.data.wb2 import SampleSpec, WB2Dataset

    cfg = generated[0]
    regional = open_raw(Path(cfg.out) / "regional.zarr")
    lat, lon = regional.latitude.values, regional.longitude.values
    assert cfg.region_lat[0] <= lat.min() and lat.max() <= cfg.region_lat[1]
    assert cfg.region_lon[0] <= lon.min() and lon.max() <= cfg.region_lon[1]
    assert len(lat) % cfg.region_multiple == 0 and len(lon) % cfg.region_multiple == 0
    assert len(lat) >= cfg.region_multiple and len(lon) >= cfg.region_multiple
    step = 180.0 / cfg.regional_grid[1]
    np.testing.assert_allclose(np.diff(lat), step)  # contiguous, ascending 2.8125° cells
    np.testing.assert_allclose(np.diff(lon), 360.0 / cfg.regional_grid[0])
    spec = SampleSpec(surf_vars=("2m_temperature", "total_precipitation_6hr"),
                      atmos_vars=("temperature", "geopotential"), levels=tuple(cfg.regional_levels))
    dataset = WB2Dataset(Path(cfg.out) / "regional.zarr", spec)
    inputs, target = dataset[len(dataset) - 1]
    assert inputs.surf_vars["2t"].shape == (1, 2, len(lat), len(lon))
    assert target.atmos_vars["t"].shape == (1, 1, len(cfg.regional_levels), len(lat), len(lon))
    assert inputs.static_vars["z"].shape == (len(lat), len(lon))
    assert float(inputs.metadata.lat[0]) == pytest.approx(lat.max())  # decreasing for Aurora
    # The region includes the Tibetan Plateau: orography well above 1 km somewhere.
    assert float(regional["geopotential_at_surface"].max()) / 9.81 > 1000.0


def test_ensemble_layout_members_and_valid_times(generated):
    cfg = generated[0]
    ensemble = open_raw(Path(cfg.out) / "ensemble.zarr")
    downstream = open_raw(Path(cfg.out) / "downstream.zarr")
    for name in cfg.ensemble_surface:
        assert ensemble[name].dims == ("time", "prediction_timedelta", "number", "longitude", "latitude"), name
    for name in cfg.ensemble_atmospheric:
        assert ensemble[name].dims == ("time", "prediction_timedelta", "number", "level", "longitude",
                                       "latitude"), name
    assert ensemble.sizes["number"] == cfg.ensemble_members
    assert ensemble.sizes["prediction_timedelta"] == len(cfg.ensemble_leads_hours)
    assert (ensemble.sizes["longitude"], ensemble.sizes["latitude"]) == tuple(cfg.grid)
    np.testing.assert_array_equal(ensemble.level.values, cfg.ensemble_levels)
    leads = ensemble.prediction_timedelta.values
    np.testing.assert_array_equal(leads, [np.timedelta64(h, "h") for h in cfg.ensemble_leads_hours])
    # Inits every 6 h from the downstream start, each on a downstream time, …
    inits = ensemble.time.values
    assert_six_hourly(inits, downstream.time.values[0], 4)  # 00–18 UTC of day 1: +48 h stays in day 3
    assert inits[0] == downstream.time.values[0]
    assert np.all(np.isin(inits, downstream.time.values))
    assert np.all(np.diff(inits) == np.timedelta64(cfg.ensemble_init_every_hours, "h"))
    # … and every forecast verifies against a stored truth time.
    valid = (inits[:, None] + leads[None, :]).ravel()
    assert np.all(np.isin(valid, downstream.time.values)), (valid, downstream.time.values[-1])
    # Members differ from each other, in every variable and at every init.
    for name in cfg.ensemble_surface + cfg.ensemble_atmospheric:
        values = ensemble[name].values
        assert np.all(np.isfinite(values)), name
        difference = np.abs(values[:, :, 0] - values[:, :, 1])
        per_init = difference.reshape(len(inits), -1).max(axis=1)
        assert np.all(per_init > 0), (name, per_init)
    spread_t850 = ensemble["temperature"].sel(level=850).std("number").mean()
    assert float(spread_t850) > 0.01
    # A forecast, not the truth: the ensemble mean differs from the verifying truth state.
    truth_t = downstream["temperature"].sel(time=valid[0], level=850).values
    assert np.abs(ensemble["temperature"].isel(time=0, prediction_timedelta=0).sel(level=850).mean("number").values
                  - truth_t).mean() > 0.01


def test_precipitation_is_non_negative_and_rains_somewhere(generated):
    cfg = generated[0]
    for store in (Path(cfg.out) / "downstream.zarr", Path(cfg.out) / "regional.zarr",
                  Path(cfg.pretraining_out) / "pretraining.zarr"):
        precip = open_raw(store)["total_precipitation_6hr"].values
        assert np.all(np.isfinite(precip)), store.name
        assert precip.min() >= 0.0, (store.name, precip.min())
        assert precip.max() > 1e-4, store.name  # > 0.1 mm in 6 h somewhere
    downstream = open_raw(Path(cfg.out) / "downstream.zarr")["total_precipitation_6hr"]
    weights = np.cos(np.radians(downstream.latitude))
    mm_per_day = float(downstream.weighted(weights).mean()) * 4 * 1000
    # Units check (m per 6 h → mm/day): after 1 day of spin-up from rest the world is still
    # spinning up its hydrological cycle (measured ≈0.09 mm/day here; Earth ≈3, the full run ≈3).
    assert 0.01 < mm_per_day < 20.0, mm_per_day


def test_second_identical_run_gives_a_byte_identical_manifest(generated, tmp_path):
    from weatherpeft.data.simulate import generate

    cfg = generated[0]
    again = replace(cfg, out=tmp_path / "builtin", pretraining_out=tmp_path / "pretraining")
    generate(again)
    first = (Path(cfg.out) / MANIFEST_NAME).read_bytes()
    second = (Path(again.out) / MANIFEST_NAME).read_bytes()
    if first != second:
        files_a = json.loads(first)["files"]
        files_b = json.loads(second)["files"]
        differing = sorted(k for k in files_a.keys() | files_b.keys() if files_a.get(k) != files_b.get(k))
        pytest.fail(f"generation is not deterministic: {len(differing)} files differ, e.g. {differing[:5]}")
