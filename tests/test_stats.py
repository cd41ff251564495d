"""Normalisation statistics: values, training-period isolation, files, installation in Aurora."""

from __future__ import annotations

import json

import aurora.normalisation as aurora_normalisation
import numpy as np
import pytest
import torch
from conftest import LEVELS

from weatherpeft.data.stats import NormalisationStats, compute_stats
from weatherpeft.data.wb2 import SampleSpec

SURF = ("2m_temperature", "10m_u_component_of_wind", "mean_sea_level_pressure",
        "total_precipitation_6hr")
ATMOS = ("geopotential", "specific_humidity")
TRAIN = SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, static_vars=("land_sea_mask", "geopotential_at_surface"),
                   start="2001-03-01T00:00", end="2001-03-02T12:00")  # times 0..6


def weighted_moments(values: np.ndarray, lat: np.ndarray, weighted: bool) -> tuple[float, float]:
    """Reference: (lat-weighted) mean and std of values (..., lon, lat), computed directly."""
    weights = np.cos(np.radians(lat)) if weighted else np.ones_like(lat)
    weights = np.broadcast_to(weights, values.shape).astype(np.float64)
    mean = np.sum(weights * values) / np.sum(weights)
    return float(mean), float(np.sqrt(np.sum(weights * (values - mean) ** 2) / np.sum(weights)))


def test_keys_follow_aurora_convention(world_decoded):
    stats = compute_stats(world_decoded, TRAIN)
    expected = {"2t", "10u", "msl", "tp", "lsm", "z"}
    expected |= {f"{v}_{level}" for v in ("z", "q") for level in LEVELS}
    assert set(stats.locations) == set(stats.scales) == expected
    assert stats.n_times == 7 and stats.period == ("2001-03-01 00:00:00", "2001-03-02 12:00:00")


@pytest.mark.parametrize("weighted", [True, False])
def test_values_match_direct_computation(world_decoded, weighted):
    stats = compute_stats(world_decoded, TRAIN, latitude_weighted=weighted)
    train = world_decoded.isel(time=slice(0, 7))
    lat = world_decoded.latitude.values
    cases = {
        "2t": train["2m_temperature"].values,
        "tp": train["total_precipitation_6hr"].values,
        "z_500": train["geopotential"].sel(level=500).values,
        "q_850": train["specific_humidity"].sel(level=850).values,
        "z": world_decoded["geopotential_at_surface"].values,
    }
    for key, values in cases.items():
        mean, std = weighted_moments(values.astype(np.float64), lat, weighted)
        assert stats.locations[key] == pytest.approx(mean, rel=1e-6, abs=1e-12), key
        assert stats.scales[key] == pytest.approx(std, rel=1e-5), key
    # Weighting matters for a field with a latitude gradient: it must change 2t's mean.
    other = compute_stats(world_decoded, TRAIN, latitude_weighted=not weighted)
    assert other.locations["2t"] != pytest.approx(stats.locations["2t"], rel=1e-4)


def test_only_the_training_period_counts(world_decoded):
    baseline = compute_stats(world_decoded, TRAIN)
    outside = world_decoded.copy(deep=True)
    outside["2m_temperature"][7:] += 100.0  # times after the period's end
    outside["geopotential"][7:] *= 3.0
    unchanged = compute_stats(outside, TRAIN)
    assert unchanged.locations == baseline.locations and unchanged.scales == baseline.scales
    inside = world_decoded.copy(deep=True)
    inside["2m_temperature"][6] += 100.0  # the period's last time (inclusive end)
    assert compute_stats(inside, TRAIN).locations["2t"] > baseline.locations["2t"] + 1.0


def test_constant_field_gets_unit_scale(world_decoded):
    flat = world_decoded.copy(deep=True)
    flat["land_sea_mask"][:] = 0.0
    flat["10m_u_component_of_wind"][:] = 7.0
    stats = compute_stats(flat, TRAIN)
    assert stats.scales["lsm"] == 1.0 and stats.locations["lsm"] == 0.0
    assert stats.scales["10u"] == 1.0 and stats.locations["10u"] == pytest.approx(7.0)
    assert all(scale > 0 for scale in stats.scales.values())


def test_needs_an_explicit_training_period(world_decoded):
    with pytest.raises(ValueError, match="training period"):
        compute_stats(world_decoded, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, end="2001-03-02"))


def test_nan_in_training_period_is_named(world_decoded):
    broken = world_decoded.copy(deep=True)
    broken["specific_humidity"][2, 1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"'specific_humidity' at level 500 hPa at time 2001-03-01 12:00"):
        compute_stats(broken, TRAIN)


def test_reads_from_a_store_path_in_blocks(wb2_store, world_decoded):
    from_path = compute_stats(wb2_store, TRAIN, block_bytes=1)  # one time step per block
    in_memory = compute_stats(world_decoded, TRAIN)
    for key in in_memory.locations:
        assert from_path.locations[key] == pytest.approx(in_memory.locations[key], rel=1e-9, abs=1e-15)
        assert from_path.scales[key] == pytest.approx(in_memory.scales[key], rel=1e-7)


def test_save_load_roundtrip_is_exact_and_atomic(world_decoded, tmp_path):
    stats = compute_stats(world_decoded, TRAIN)
    path = stats.save(tmp_path / "sub" / "stats.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.json"]  # no temp file left
    loaded = NormalisationStats.load(path)
    assert loaded == stats


def test_failed_save_leaves_old_file_intact(world_decoded, tmp_path):
    path = tmp_path / "stats.json"
    stats = compute_stats(world_decoded, TRAIN)
    stats.save(path)
    before = path.read_text()
    stats.locations["2t"] = {1, 2}  # not JSON-serialisable: save must fail midway
    with pytest.raises(TypeError):
        stats.save(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_load_rejects_bad_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        NormalisationStats.load(bad_json)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"locations": {}, "scales": {}}))
    with pytest.raises(ValueError, match="not a weatherpeft normalisation file"):
        NormalisationStats.load(wrong)
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"format": "weatherpeft.normalisation/1",
                                "locations": {"2t": 280.0}, "scales": {"2t": 0.0}}))
    with pytest.raises(ValueError, match="'2t'"):
        NormalisationStats.load(zero)


def test_install_changes_aurora_and_uninstall_restores(world_decoded):
    stats = compute_stats(world_decoded, TRAIN)
    default_2t = aurora_normalisation.locations["2t"]
    default_z500 = aurora_normalisation.scales["z_500"]
    assert "tp" not in aurora_normalisation.locations
    with stats.installed():
        assert aurora_normalisation.locations["2t"] == stats.locations["2t"] != default_2t
        assert aurora_normalisation.scales["z_500"] == stats.scales["z_500"] != default_z500
        assert aurora_normalisation.locations["tp"] == stats.locations["tp"]
        # Aurora's own normalisation now uses the data statistics.
        field = torch.full((1, 1, 2, 2), stats.locations["2t"] + stats.scales["2t"])
        normalised = aurora_normalisation.normalise_surf_var(field, "2t")
        torch.testing.assert_close(normalised, torch.ones_like(field))
        atmos = torch.full((1, 1, len(LEVELS), 2, 2), 0.0)
        for i, level in enumerate(LEVELS):
            atmos[:, :, i] = stats.locations[f"z_{level}"]
        torch.testing.assert_close(aurora_normalisation.normalise_atmos_var(atmos, "z", LEVELS),
                                   torch.zeros_like(atmos))
    assert aurora_normalisation.locations["2t"] == default_2t
    assert aurora_normalisation.scales["z_500"] == default_z500
    assert "tp" not in aurora_normalisation.locations

