"""Latitude-weighted metrics: hand-computed values, WeatherBench2 conventions, `scores` cross-check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from scores.continuous import mse as scores_mse
from scores.continuous import rmse as scores_rmse

from weatherpeft.data.grids import equiangular_grid
from weatherpeft.metrics import bias, latitude_weights, mse, rmse, spatial_bias, spatial_mse


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
