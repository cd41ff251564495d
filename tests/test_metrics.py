"""Latitude-weighted metrics: hand-computed values, WeatherBench2 conventions, `scores` cross-checks.

Deterministic (RMSE, MSE, bias, per-sample RMSE), probabilistic (Gaussian and ensemble CRPS,
spread–skill), ACC and SEEPS with its climatology.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import stats
from scores.categorical import seeps as scores_seeps
from scores.continuous import mse as scores_mse
from scores.continuous import rmse as scores_rmse
from scores.probability import crps_cdf, crps_for_ensemble

from weatherpeft.data.grids import equiangular_grid
from weatherpeft.metrics import (
    acc,
    bias,
    crps_ensemble,
    crps_gaussian,
    latitude_weights,
    mse,
    rmse,
    rmse_per_sample,
    seeps,
    seeps_climatology,
    spatial_bias,
    spatial_mse,
    spread_skill_ratio,
)


def test_weights_have_mean_one_and_follow_cos_latitude_on_wb2_grid():
    lat = equiangular_grid(64, 32).lat  # WB2's 5.625° grid, no poles
    weights = latitude_weights(lat)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-12)
    expected = np.cos(np.radians(lat))
    torch.testing.assert_close(weights, torch.as_tensor(expected / expected.mean()), rtol=1e-12, atol=0)


def test_weights_follow_latitude_order_and_give_poles_a_cap():
    lat = torch.tensor([90.0, 45.0, 0.0, -45.0, -90.0])  # Aurora-style: decreasing, with poles
    weights = latitude_weights(lat)
    assert weights.mean().item() == pytest.approx(1.0)
    assert torch.all(weights > 0)  # cos(±90°) = 0 would drop the poles; the cap does not
    torch.testing.assert_close(weights, weights.flip(0))  # symmetric
    torch.testing.assert_close(latitude_weights(lat.flip(0)), weights.flip(0))
    # Cap of a pole row: band 67.5°–90° → 1 − sin(67.5°), equator band: 2·sin(22.5°).
    ratio = (1 - np.sin(np.radians(67.5))) / (2 * np.sin(np.radians(22.5)))
    assert (weights[0] / weights[2]).item() == pytest.approx(ratio)


def test_weights_reject_bad_latitudes():
    with pytest.raises(ValueError, match="within"):
        latitude_weights([100.0, 0.0])
    with pytest.raises(ValueError, match="repeat"):
        latitude_weights([10.0, 10.0])


def test_hand_computed_values_on_two_rows():
    # Rows at ±30° with equal area → weights (1, 1); error 1 on the north row, 3 on the south.
    lat = torch.tensor([30.0, -30.0])
    truth = torch.zeros(2, 4)
    forecast = torch.tensor([[1.0] * 4, [3.0] * 4])
    assert spatial_mse(forecast, truth, lat).item() == pytest.approx(5.0)  # (1 + 9) / 2
    assert rmse(forecast, truth, lat).item() == pytest.approx(np.sqrt(5.0))
    assert bias(forecast, truth, lat).item() == pytest.approx(2.0)
    # Rows at 60° and 0°: weights ∝ band areas, so the equator counts more.
    lat = torch.tensor([60.0, 0.0])
    w = latitude_weights(lat)
    assert w[1] > w[0]
    expected = (w[0] * 1 + w[1] * 9) / 2
    assert mse(forecast, truth, lat).item() == pytest.approx(expected.item())


def test_rmse_averages_mse_over_time_before_the_root():
    lat = torch.tensor([30.0, -30.0])
    truth = torch.zeros(2, 2, 3)
    forecast = torch.stack([torch.full((2, 3), 1.0), torch.full((2, 3), 3.0)])  # per-time MSE 1, 9
    assert rmse(forecast, truth, lat).item() == pytest.approx(np.sqrt(5.0))  # not (1 + 3) / 2
    torch.testing.assert_close(rmse(forecast, truth, lat, dim=()), torch.tensor([1.0, 3.0]))


def test_dim_keeps_the_leading_axes_not_named():
    lat = torch.linspace(80, -80, 5)
    forecast, truth = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    per_level = mse(forecast, truth, lat, dim=0)
    assert per_level.shape == (2,)
    torch.testing.assert_close(per_level[1], mse(forecast[:, 1], truth[:, 1], lat))
    assert spatial_bias(forecast, truth, lat).shape == (3, 2)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="differs"):
        mse(torch.zeros(2, 3), torch.zeros(3, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="3 latitudes"):
        mse(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([1.0, 0.0, -1.0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_check_against_scores(seed):
    rng = np.random.default_rng(seed)
    grid = equiangular_grid(16, 8)
    lat = grid.lat[::-1].copy()  # decreasing, as in an aurora.Batch
    shape = (5, len(lat), len(grid.lon))
    forecast, truth = rng.normal(size=shape), rng.normal(size=shape)
    dims = ("time", "latitude", "longitude")
    coords = {"latitude": lat, "longitude": grid.lon}
    fcst = xr.DataArray(forecast, dims=dims, coords=coords)
    obs = xr.DataArray(truth, dims=dims, coords=coords)
    weights = xr.DataArray(np.cos(np.radians(lat)), dims="latitude", coords={"latitude": lat})
    ours_rmse = rmse(torch.from_numpy(forecast), torch.from_numpy(truth), lat).item()
    ours_mse = mse(torch.from_numpy(forecast), torch.from_numpy(truth), lat).item()
    assert ours_rmse == pytest.approx(float(scores_rmse(fcst, obs, weights=weights)), rel=1e-10)
    assert ours_mse == pytest.approx(float(scores_mse(fcst, obs, weights=weights)), rel=1e-10)
    # Per time (space only): scores keeps the time dim.
    per_time = scores_mse(fcst, obs, weights=weights, preserve_dims=["time"]).values
    np.testing.assert_allclose(spatial_mse(torch.from_numpy(forecast), torch.from_numpy(truth), lat),
                               per_time, rtol=1e-10)


# --- Probabilistic, anomaly and precipitation metrics (issue 6) -------------------------------

DIMS = ("time", "latitude", "longitude")


def _grid(n_lon=16, n_lat=8):
    grid = equiangular_grid(n_lon, n_lat)
    return grid.lat[::-1].copy(), grid.lon  # decreasing latitudes, as in an aurora.Batch


def _xr(values, lat, lon, dims=DIMS, **extra_coords):
    values = values.numpy() if isinstance(values, torch.Tensor) else values
    coords = {"latitude": lat, "longitude": lon, **extra_coords}
    return xr.DataArray(values, dims=dims, coords={k: v for k, v in coords.items() if k in dims})


def _weights(lat):
    """cos-lat weights normalised to mean 1 (scores does not normalise; weighted means don't care)."""
    w = np.cos(np.radians(lat))
    return xr.DataArray(w / w.mean(), dims="latitude", coords={"latitude": lat})


def _weighted_mean_np(values, lat):
    """Reference latitude-weighted spatial mean over the last two axes, in numpy."""
    w = latitude_weights(lat).numpy()[:, None]
    return (values * w).sum(axis=(-2, -1)) / (w.sum() * values.shape[-1])


def test_rmse_per_sample_is_the_mean_of_per_time_rmse_and_below_wb2_rmse():
    rng = np.random.default_rng(0)
    lat, lon = _grid()
    forecast = rng.normal(size=(6, len(lat), len(lon))) * np.arange(1, 7)[:, None, None]
    truth = rng.normal(size=forecast.shape)
    per_time = scores_rmse(_xr(forecast, lat, lon), _xr(truth, lat, lon), weights=_weights(lat),
                           preserve_dims=["time"]).values
    ours = rmse_per_sample(torch.from_numpy(forecast), torch.from_numpy(truth), lat)
    assert ours.item() == pytest.approx(per_time.mean(), rel=1e-10)
    assert ours.item() < rmse(torch.from_numpy(forecast), torch.from_numpy(truth), lat).item()  # Jensen


# CRPS, Gaussian ----------------------------------------------------------------------------

def _gaussian_case(seed, shape=(4, 8, 16)):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=shape)
    std = rng.uniform(0.2, 2.0, size=shape)
    truth = mean + std * rng.normal(size=shape) * 1.5
    return mean, std, truth


@pytest.mark.parametrize("seed", [0, 1])
def test_crps_gaussian_matches_wb2_formula_with_scipy(seed):
    mean, std, truth = _gaussian_case(seed)
    lat, _ = _grid()
    z = (truth - mean) / std  # WB2 _pointwise_gaussian_crps, with scipy.stats.norm
    pointwise = std * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))
    expected = _weighted_mean_np(pointwise, lat)
    ours = crps_gaussian(*(torch.from_numpy(a) for a in (mean, std, truth)), lat, dim=())
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12)
    assert crps_gaussian(*(torch.from_numpy(a) for a in (mean, std, truth)), lat).item() == \
        pytest.approx(expected.mean(), rel=1e-12)


@pytest.mark.filterwarnings("ignore:numba is not available")
def test_crps_gaussian_matches_scores_crps_cdf_integral():
    mean, std, truth = _gaussian_case(3, shape=(2, 8, 16))
    lat, lon = _grid()
    thresholds = np.linspace(-12, 12, 2401)
    cdf = stats.norm.cdf((thresholds - mean[..., None]) / std[..., None])
    fcst = _xr(cdf, lat, lon, dims=(*DIMS, "threshold"), threshold=thresholds)
    fcst = fcst.assign_coords(threshold=thresholds)
    theirs = crps_cdf(fcst, _xr(truth, lat, lon), threshold_dim="threshold", weights=_weights(lat))
    ours = crps_gaussian(*(torch.from_numpy(a) for a in (mean, std, truth)), lat)
    assert ours.item() == pytest.approx(float(theirs["total"]), rel=1e-4)


def test_crps_gaussian_zero_spread_limit_is_the_absolute_error():
    mean, _, truth = _gaussian_case(4)
    lat, _ = _grid()
    tiny = np.full_like(mean, 1e-9)
    ours = crps_gaussian(torch.from_numpy(mean), torch.from_numpy(tiny), torch.from_numpy(truth), lat)
    assert ours.item() == pytest.approx(_weighted_mean_np(np.abs(truth - mean), lat).mean(), abs=1e-8)


def test_crps_gaussian_equals_crps_of_a_large_sample_from_it():
    torch.manual_seed(0)
    lat, _ = _grid(8, 4)
    mean = torch.randn(2, 4, 8, dtype=torch.float64)
    std = torch.rand(2, 4, 8, dtype=torch.float64) + 0.5
    truth = mean + 2 * torch.randn(2, 4, 8, dtype=torch.float64)
    members = mean[:, None] + std[:, None] * torch.randn(2, 4000, 4, 8, dtype=torch.float64)
    sampled = crps_ensemble(members, truth, lat, member_dim=1)
    assert sampled.item() == pytest.approx(crps_gaussian(mean, std, truth, lat).item(), rel=0.02)


def test_crps_gaussian_errors_nan_and_gradient():
    lat = torch.tensor([30.0, -30.0])
    mean, truth = torch.zeros(2, 2, 3), torch.ones(2, 2, 3)
    std = torch.ones(2, 2, 3)
    with pytest.raises(ValueError, match="std must be > 0"):
        crps_gaussian(mean, std.clone().fill_(0.0), truth, lat)
    with pytest.raises(ValueError, match=r"std shape \(2, 3\) differs from truth shape \(2, 2, 3\)"):
        crps_gaussian(mean, std[0], truth, lat)
    with pytest.raises(ValueError, match=r"mean shape \(2, 2, 2\) differs from truth shape \(2, 2, 3\)"):
        crps_gaussian(mean[..., :2], std, truth, lat)
    nan_truth = truth.clone()
    nan_truth[1, 0, 0] = float("nan")
    per_time = crps_gaussian(mean, std, nan_truth, lat, dim=())
    assert torch.isfinite(per_time[0]) and torch.isnan(per_time[1])  # NaN propagates, per time
    mean.requires_grad_(True)
    crps_gaussian(mean, std, truth, lat).backward()
    assert torch.all(torch.isfinite(mean.grad)) and torch.all(mean.grad < 0)  # raise μ towards y


# CRPS, ensemble ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fair,method", [(True, "fair"), (False, "ecdf")])
def test_crps_ensemble_matches_scores(seed, fair, method):
    rng = np.random.default_rng(seed)
    lat, lon = _grid()
    members = rng.normal(size=(3, 7, len(lat), len(lon)))  # (time, member, lat, lon)
    truth = rng.normal(size=(3, len(lat), len(lon)))
    fcst = xr.DataArray(members, dims=("time", "member", "latitude", "longitude"),
                        coords={"latitude": lat, "longitude": lon})
    theirs = crps_for_ensemble(fcst, _xr(truth, lat, lon), "member", method=method, weights=_weights(lat),
                               preserve_dims=["time"]).values
    ours = crps_ensemble(torch.from_numpy(members), torch.from_numpy(truth), lat, fair=fair, dim=())
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-10)
    # Member axis elsewhere: the same numbers.
    moved = torch.from_numpy(members).movedim(1, 0)
    torch.testing.assert_close(crps_ensemble(moved, torch.from_numpy(truth), lat, member_dim=0, fair=fair),
                               ours.mean())


def test_crps_ensemble_default_is_wb2_fair_form_and_hand_values():
    lat = torch.tensor([30.0, -30.0])  # equal weights
    members = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 2, 1)
    truth = torch.ones(1, 2, 1)
    # skill 1; Σ_ij |x_i − x_j| = 4; fair: 1 − 4/(2·2·1) = 0; ecdf: 1 − 4/(2·4) = 0.5.
    assert crps_ensemble(members, truth, lat).item() == pytest.approx(0.0)
    assert crps_ensemble(members, truth, lat, fair=True).item() == pytest.approx(0.0)
    assert crps_ensemble(members, truth, lat, fair=False).item() == pytest.approx(0.5)


@pytest.mark.parametrize("fair", [True, False])
def test_crps_ensemble_of_one_member_is_the_mae_and_of_a_constant_field_zero(fair):
    rng = np.random.default_rng(5)
    lat, _ = _grid()
    forecast, truth = rng.normal(size=(3, 8, 16)), rng.normal(size=(3, 8, 16))
    ours = crps_ensemble(torch.from_numpy(forecast)[:, None], torch.from_numpy(truth), lat, fair=fair)
    assert ours.item() == pytest.approx(_weighted_mean_np(np.abs(forecast - truth), lat).mean(), rel=1e-12)
    constant = torch.full((3, 5, 8, 16), 7.0, dtype=torch.float64)
    assert crps_ensemble(constant, constant[:, 0], lat, fair=fair).item() == 0.0


def test_crps_ensemble_nan_propagates_where_scores_skips_members():
    rng = np.random.default_rng(6)
    lat, lon = _grid()
    members = rng.normal(size=(2, 5, len(lat), len(lon)))
    truth = rng.normal(size=(2, len(lat), len(lon)))
    members[1, 2, 3, 4] = np.nan
    ours = crps_ensemble(torch.from_numpy(members), torch.from_numpy(truth), lat, dim=())
    assert torch.isnan(ours[1])  # WB2: NaN propagates
    clean = crps_for_ensemble(_xr(members[0], lat, lon, dims=("member", "latitude", "longitude")),
                              _xr(truth[0], lat, lon, dims=("latitude", "longitude")), "member",
                              method="fair", weights=_weights(lat))
    assert ours[0].item() == pytest.approx(float(clean), rel=1e-10)  # the clean step is untouched


def test_crps_ensemble_shape_errors():
    lat = torch.tensor([30.0, -30.0])
    with pytest.raises(ValueError, match=r"members shape \(2, 4, 2, 3\) .* differs from truth shape \(2, 2, 4\)"):
        crps_ensemble(torch.zeros(2, 4, 2, 3), torch.zeros(2, 2, 4), lat)
    with pytest.raises(ValueError, match="member_dim=2 must name a leading axis"):
        crps_ensemble(torch.zeros(2, 4, 2, 3), torch.zeros(2, 4, 3), lat, member_dim=2)


# Spread–skill ------------------------------------------------------------------------------

def test_spread_skill_matches_scores_rmse_ratio():
    rng = np.random.default_rng(7)
    lat, lon = _grid()
    spread = rng.uniform(0.1, 2, size=(4, len(lat), len(lon)))
    mean, truth = rng.normal(size=spread.shape), rng.normal(size=spread.shape)
    w = _weights(lat)
    expected = float(scores_rmse(_xr(spread, lat, lon), _xr(np.zeros_like(spread), lat, lon), weights=w)
                     / scores_rmse(_xr(mean, lat, lon), _xr(truth, lat, lon), weights=w))
    ours = spread_skill_ratio(*(torch.from_numpy(a) for a in (spread, mean, truth)), lat)
    assert ours.item() == pytest.approx(expected, rel=1e-10)


def test_spread_skill_of_consistent_forecasts_is_one():
    torch.manual_seed(1)
    lat, _ = _grid(32, 16)
    shape = (100, 16, 32)
    # A Gaussian forecast whose truth is drawn from it: ratio 1.
    mean, std = torch.randn(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64) + 0.5
    truth = mean + std * torch.randn(shape, dtype=torch.float64)
    assert spread_skill_ratio(std, mean, truth, lat).item() == pytest.approx(1.0, abs=0.02)
    # A 10-member ensemble exchangeable with the truth: sqrt(M/(M+1)) with the unbiased std (WB2).
    members = mean[:, None] + std[:, None] * torch.randn(100, 10, 16, 32, dtype=torch.float64)
    ratio = spread_skill_ratio(members.std(dim=1, correction=1), members.mean(dim=1), truth, lat)
    assert ratio.item() == pytest.approx(np.sqrt(10 / 11), abs=0.02)
    # An under-dispersive ensemble falls clearly below.
    assert spread_skill_ratio(std / 2, mean, truth, lat).item() < 0.6


def test_spread_skill_errors():
    lat = torch.tensor([30.0, -30.0])
    with pytest.raises(ValueError, match=r"spread shape \(2, 2\) differs from truth shape \(1, 2, 2\)"):
        spread_skill_ratio(torch.ones(2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), lat)
    with pytest.raises(ValueError, match=">= 0"):
        spread_skill_ratio(-torch.ones(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), lat)


# ACC ---------------------------------------------------------------------------------------

def test_acc_analytic_values():
    rng = np.random.default_rng(8)
    lat, _ = _grid()
    truth = torch.from_numpy(rng.normal(size=(3, 8, 16)))
    clim = torch.from_numpy(rng.normal(size=(8, 16)))
    assert acc(truth, truth, clim, lat).item() == pytest.approx(1.0, abs=1e-12)
    assert acc(clim + 3 * (truth - clim), truth, clim, lat).item() == pytest.approx(1.0, abs=1e-12)
    assert acc(clim - (truth - clim), truth, clim, lat).item() == pytest.approx(-1.0, abs=1e-12)
    # A forecast equal to the climatology has no anomaly: 0/0 = NaN, as in WB2.
    assert torch.isnan(acc(clim.expand(3, 8, 16), truth, clim, lat))


def test_acc_is_wb2_uncentred_per_time_then_mean():
    rng = np.random.default_rng(9)
    lat, _ = _grid()
    clim = rng.normal(size=(8, 16))
    truth = clim + rng.normal(size=(4, 8, 16)) + 0.5  # anomalies with a non-zero spatial mean
    forecast = clim + 0.6 * (truth - clim) + rng.normal(size=truth.shape)
    fa, ta = forecast - clim, truth - clim
    per_time = _weighted_mean_np(fa * ta, lat) / np.sqrt(_weighted_mean_np(fa**2, lat) * _weighted_mean_np(ta**2, lat))
    ours = acc(*(torch.from_numpy(a) for a in (forecast, truth, clim)), lat, dim=())
    np.testing.assert_allclose(ours.numpy(), per_time, rtol=1e-12)
    assert acc(*(torch.from_numpy(a) for a in (forecast, truth, clim)), lat).item() == \
        pytest.approx(per_time.mean(), rel=1e-12)
    # Centred (Pearson) correlation differs because the anomalies' spatial mean is kept.
    pearson = np.mean([np.corrcoef(fa[t].ravel(), ta[t].ravel())[0, 1] for t in range(4)])
    assert abs(pearson - per_time.mean()) > 1e-3
    with pytest.raises(ValueError, match=r"climatology shape \(8, 15\) does not broadcast"):
        acc(torch.from_numpy(forecast), torch.from_numpy(truth), torch.zeros(8, 15), lat)


# SEEPS -------------------------------------------------------------------------------------

def _precip(rng, shape, wet_probability):
    """Zero-inflated gamma amounts in metres; wet_probability broadcasts over (H, W)."""
    wet = rng.random(shape) < wet_probability
    return np.where(wet, rng.gamma(0.7, 0.003, size=shape), 0.0)


def _seeps_case(seed, n_train=401, n_test=6):  # 401: p1 = k/401 never hits 0.1 or 0.85
    rng = np.random.default_rng(seed)
    lat, lon = _grid()
    wet_probability = rng.uniform(0.05, 0.97, size=(len(lat), len(lon)))  # some points masked
    train = _precip(rng, (n_train, len(lat), len(lon)), wet_probability)
    truth = _precip(rng, (n_test, len(lat), len(lon)), wet_probability)
    forecast = _precip(rng, (n_test, len(lat), len(lon)), wet_probability)
    return lat, lon, train, forecast, truth


def _scores_seeps(forecast, truth, p1, wet, lat, lon, dry_mm, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # p1 exactly 0 or 1
        return scores_seeps(_xr(forecast, lat, lon), _xr(truth, lat, lon),
                            _xr(p1, lat, lon, dims=("latitude", "longitude")),
                            _xr(wet, lat, lon, dims=("latitude", "longitude")),
                            dry_light_threshold=dry_mm / 1000, weights=_weights(lat),
                            preserve_dims=["time"], **kwargs).values


def test_seeps_climatology_matches_numpy_quantile_and_wb2_units():
    lat, lon, train, _, _ = _seeps_case(10)
    train[5:9, 2, 3] = np.nan  # ignored at that point
    p1, wet = seeps_climatology(torch.from_numpy(train), dry_threshold=0.25)
    dry_m = 0.25 / 1000
    valid = ~np.isnan(train)
    np.testing.assert_allclose(p1.numpy(), (train < dry_m).sum(0) / valid.sum(0), rtol=1e-12)
    wet_amounts = np.where(train >= dry_m, train, np.nan)
    np.testing.assert_allclose(wet.numpy(), np.nanquantile(wet_amounts, 2 / 3, axis=0), rtol=1e-12)
    # The threshold is in mm and the data in metres: 0.2 mm is dry and 0.3 mm wet at 0.25 mm.
    p1, wet = seeps_climatology(torch.tensor([[[0.0002]], [[0.0003]], [[0.0009]]]), 0.25)
    assert p1.item() == pytest.approx(1 / 3)
    assert wet.item() == pytest.approx(0.0003 + 2 / 3 * 0.0006)
    # A point never wet has no threshold.
    assert torch.isnan(seeps_climatology(torch.zeros(4, 1, 2), 0.1)[1]).all()


def test_seeps_climatology_errors():
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        seeps_climatology(torch.zeros(4, 3), 0.25)
    with pytest.raises(ValueError, match="negative precipitation"):
        seeps_climatology(-torch.ones(4, 2, 3), 0.25)
    with pytest.raises(ValueError, match="millimetres"):
        seeps_climatology(torch.zeros(4, 2, 3), 0.00025)  # metres by mistake


@pytest.mark.parametrize("seed,dry_mm", [(11, 0.25), (12, 0.1)])
def test_seeps_matches_scores_on_random_fields(seed, dry_mm):
    lat, lon, train, forecast, truth = _seeps_case(seed)
    p1, wet = seeps_climatology(torch.from_numpy(train), dry_mm)
    assert ((p1 <= 0.1) | (p1 >= 0.85)).any() and ((p1 > 0.1) & (p1 < 0.85)).any()  # mask exercised
    theirs = _scores_seeps(forecast, truth, p1.numpy(), wet.numpy(), lat, lon, dry_mm)
    ours = seeps(torch.from_numpy(forecast), torch.from_numpy(truth), p1, wet, lat, dry_mm, dim=())
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-10)
    assert seeps(torch.from_numpy(forecast), torch.from_numpy(truth), p1, wet, lat, dry_mm).item() == \
        pytest.approx(theirs.mean(), rel=1e-10)
    assert 0 < theirs.mean() < 2


def test_seeps_edge_cases_match_scores():
    lat, lon, train, forecast, truth = _seeps_case(13)
    p1, wet = seeps_climatology(torch.from_numpy(train), 0.25)
    dry = np.zeros_like(truth)
    very_wet = np.full_like(truth, 0.05)  # 50 mm: heavy everywhere
    light = np.where(np.isnan(wet.numpy()), 0.0003, (0.00025 + wet.numpy()) / 2)[None].repeat(len(truth), 0)
    cases = {"all dry vs wet": (dry, very_wet), "all wet vs dry": (very_wet, dry),
             "heavy vs light": (very_wet, light), "light vs random": (light, truth),
             "all dry, perfect": (dry, dry), "all wet, perfect": (very_wet, very_wet)}
    for name, (f, o) in cases.items():
        theirs = _scores_seeps(f, o, p1.numpy(), wet.numpy(), lat, lon, 0.25)
        ours = seeps(torch.from_numpy(f), torch.from_numpy(o), p1, wet, lat, 0.25, dim=())
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-10, err_msg=name)
    assert seeps(torch.from_numpy(truth), torch.from_numpy(truth), p1, wet, lat, 0.25).item() == 0.0
    # Points with p1 exactly 0 or 1 (infinite penalties) are masked without poisoning the mean.
    p1_extreme = p1.clone()
    p1_extreme[0, 0], p1_extreme[0, 1] = 0.0, 1.0
    ours = seeps(torch.from_numpy(dry), torch.from_numpy(very_wet), p1_extreme, wet, lat, 0.25, dim=())
    assert torch.all(torch.isfinite(ours))
    np.testing.assert_allclose(ours.numpy(), _scores_seeps(dry, very_wet, p1_extreme.numpy(), wet.numpy(),
                                                           lat, lon, 0.25), rtol=1e-10)
    # A climatology that is all dry (or all wet) masks every point: NaN, as in scores and WB2.
    for p1_const in (1.0, 0.0):
        p1_edge = torch.full_like(p1, p1_const)
        assert torch.isnan(seeps(torch.from_numpy(forecast), torch.from_numpy(truth), p1_edge, wet, lat, 0.25))
        assert np.isnan(_scores_seeps(forecast, truth, p1_edge.numpy(), wet.numpy(), lat, lon, 0.25)).all()


def test_seeps_nan_points_are_left_out_like_scores():
    lat, lon, train, forecast, truth = _seeps_case(14)
    p1, wet = seeps_climatology(torch.from_numpy(train), 0.25)
    forecast[2, 3, :] = np.nan
    truth[4, :, 5] = np.nan
    ours = seeps(torch.from_numpy(forecast), torch.from_numpy(truth), p1, wet, lat, 0.25, dim=())
    assert torch.all(torch.isfinite(ours))
    np.testing.assert_allclose(ours.numpy(), _scores_seeps(forecast, truth, p1.numpy(), wet.numpy(), lat, lon,
                                                           0.25), rtol=1e-10)


def test_seeps_matrix_is_wb2_half_scaled_and_boundaries_follow_wb2():
    lat = torch.tensor([30.0, -30.0])  # equal weights
    p1 = torch.full((2, 1), 0.5)
    wet = torch.full((2, 1), 0.004)  # 4 mm
    mm = 1e-3

    def score(f, o):
        return seeps(torch.full((1, 2, 1), f), torch.full((1, 2, 1), o), p1, wet, lat, 0.25).item()

    # Rows forecast, columns observed:
    # ½·[[0, 1/(1−p1), 4/(1−p1)], [1/p1, 0, 3/(1−p1)], [1/p1 + 3/(2+p1), 3/(2+p1), 0]]
    assert score(0.0, 1 * mm) == pytest.approx(0.5 * 2)                 # dry fcst, light obs
    assert score(0.0, 9 * mm) == pytest.approx(0.5 * 8)                 # dry, heavy
    assert score(1 * mm, 0.0) == pytest.approx(0.5 * 2)                 # light, dry
    assert score(1 * mm, 9 * mm) == pytest.approx(0.5 * 6)              # light, heavy
    assert score(9 * mm, 0.0) == pytest.approx(0.5 * (2 + 3 / 2.5))     # heavy, dry
    assert score(9 * mm, 1 * mm) == pytest.approx(0.5 * 3 / 2.5)        # heavy, light
    # Ties (WB2): x == wet threshold is heavy (scores: light); x == dry threshold is not dry (scores: dry).
    assert score(4 * mm, 1 * mm) == pytest.approx(0.5 * 3 / 2.5)
    assert score(0.25 * mm, 0.0) == pytest.approx(0.5 * 2)
    # p1 exactly on the mask bounds is left out (WB2: strict), scores keeps it.
    lat_f, lon_f, train, forecast, truth = _seeps_case(15)
    p1_case, wet_case = seeps_climatology(torch.from_numpy(train), 0.25)
    p1_case[0, :] = 0.85
    p1_case[1, :] = 0.1
    ours = seeps(torch.from_numpy(forecast), torch.from_numpy(truth), p1_case, wet_case, lat_f, 0.25, dim=())
    inclusive = _scores_seeps(forecast, truth, p1_case.numpy(), wet_case.numpy(), lat_f, lon_f, 0.25)
    strict = _scores_seeps(forecast, truth, p1_case.numpy(), wet_case.numpy(), lat_f, lon_f, 0.25,
                           lower_masked_value=np.nextafter(0.1, 1), upper_masked_value=np.nextafter(0.85, 0))
    np.testing.assert_allclose(ours.numpy(), strict, rtol=1e-10)
    assert not np.allclose(ours.numpy(), inclusive)


def test_seeps_errors():
    lat = torch.tensor([30.0, -30.0])
    p1, wet, field = torch.full((2, 3), 0.5), torch.full((2, 3), 0.004), torch.zeros(4, 2, 3)
    with pytest.raises(ValueError, match=r"forecast shape \(4, 2, 2\) differs from truth shape \(4, 2, 3\)"):
        seeps(torch.zeros(4, 2, 2), field, p1, wet, lat, 0.25)
    with pytest.raises(ValueError, match=r"dry_fraction shape \(3, 2\) does not broadcast"):
        seeps(field, field, p1.T, wet, lat, 0.25)
    with pytest.raises(ValueError, match="negative precipitation"):
        seeps(field - 1e-6, field, p1, wet, lat, 0.25)
    with pytest.raises(ValueError, match="millimetres"):
        seeps(field, field, p1, wet, lat, 0.00025)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        seeps(field, field, p1 + 1, wet, lat, 0.25)
