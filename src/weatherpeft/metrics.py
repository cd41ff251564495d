"""Verification metrics on gridded fields, following WeatherBench2's conventions.

Every metric takes a forecast and a truth shaped ``(..., H, W)`` — latitude then longitude
last — and the ``H`` latitudes of the rows (any order, degrees). It first takes the
latitude-weighted spatial mean over (H, W) of a per-point score, then the plain mean over
the leading dimensions named by ``dim`` (time, samples; ``None`` = all of them). Leading
dimensions not named are kept, so ``(time, level, H, W)`` with ``dim=0`` gives one value
per level.

Conventions (Rasp et al. 2024, "WeatherBench 2", §4 and its ``metrics.py``):

* Latitude weights are proportional to the area of each grid cell, normalised to mean 1
  (:func:`latitude_weights`). For an equiangular grid this is cos(latitude) (exactly, for
  grids without poles such as WB2's 64×32 and 128×64).
* RMSE is the square root of the space-*time* mean of the squared error: the spatial MSE
  of each time is averaged over time first, the root is taken last (not the mean of
  per-time RMSEs, which is smaller by Jensen's inequality).

Later metrics (ACC, CRPS, spread–skill, SEEPS) share :func:`_spatial_mean` and
:func:`_reduce`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "bias",
    "latitude_weights",
    "mse",
    "rmse",
    "spatial_bias",
    "spatial_mse",
]

Dims = int | Sequence[int] | None


def latitude_weights(lat: torch.Tensor | np.ndarray | Sequence[float],
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Area weights of the grid rows at latitudes ``lat`` (degrees), normalised to mean 1.

    Each row is a band between the midpoints to its neighbours (an end row extends half
    its spacing outward, clipped at ±90°), so its area ∝ sin(upper) − sin(lower). For
    equally spaced latitudes this is cos(latitude) up to a constant; a pole row gets its
    polar cap rather than zero. The weights follow ``lat``'s order. Reference: WeatherBench2
    ``get_lat_weights`` (cell area from latitude).
    """
    values = torch.as_tensor(np.asarray(lat, dtype=np.float64) if not isinstance(lat, torch.Tensor)
                             else lat.detach().cpu().to(torch.float64))
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"latitudes must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    if torch.any(values.abs() > 90) or not torch.all(torch.isfinite(values)):
        raise ValueError("latitudes must be finite and within [-90, 90] degrees")
    if values.numel() == 1:
        return torch.ones(1, dtype=dtype)
    order = torch.argsort(values)
    ascending = values[order]
    if torch.any(ascending[1:] == ascending[:-1]):
        raise ValueError("latitudes must not repeat")
    middle = (ascending[1:] + ascending[:-1]) / 2
    lower_end = ascending[0] - (ascending[1] - ascending[0]) / 2
    upper_end = ascending[-1] + (ascending[-1] - ascending[-2]) / 2
    edges = torch.cat([lower_end[None], middle, upper_end[None]]).clamp(-90.0, 90.0)
    area = torch.sin(torch.deg2rad(edges[1:])) - torch.sin(torch.deg2rad(edges[:-1]))
    weights = torch.empty_like(area)
    weights[order] = area
    return (weights / weights.mean()).to(dtype)


def _weights_for(values: torch.Tensor, lat) -> torch.Tensor:
    """Latitude weights as an (H, 1) column on ``values``' device, in its (floating) dtype."""
    weights = latitude_weights(lat)
    if values.ndim < 2 or weights.numel() != values.shape[-2]:
        raise ValueError(f"{weights.numel()} latitudes given for a field shaped {tuple(values.shape)}; "
                         "expected (..., H=lat, W=lon)")
    dtype = values.dtype if values.is_floating_point() else torch.float64
    return weights.to(device=values.device, dtype=dtype)[:, None]


def _spatial_mean(values: torch.Tensor, lat, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Latitude-weighted mean over the last two dims (H, W): Σ w·x / Σ w.

    ``mask`` (broadcastable to ``values``, True = keep) drops grid points, e.g. SEEPS's
    climatologically too dry or too wet points; the weights are renormalised over what is kept.
    """
    weights = _weights_for(values, lat)
    if mask is None:
        return (values * weights).mean(dim=(-2, -1))
    kept = mask.to(values.dtype) * weights
    kept = kept.expand_as(values) if kept.shape != values.shape else kept
    return (values * kept).sum(dim=(-2, -1)) / kept.sum(dim=(-2, -1))


def _reduce(values: torch.Tensor, dim: Dims) -> torch.Tensor:
    """Mean over the leading dims ``dim`` (``None`` = all that are left)."""
    if dim is None:
        return values.mean() if values.ndim else values
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return values.mean(dim=dims) if dims else values


def _check_shapes(forecast: torch.Tensor, truth: torch.Tensor) -> None:
    if forecast.shape != truth.shape:
        raise ValueError(f"forecast shape {tuple(forecast.shape)} differs from truth shape "
                         f"{tuple(truth.shape)}")


def spatial_mse(forecast: torch.Tensor, truth: torch.Tensor, lat) -> torch.Tensor:
    """Latitude-weighted spatial mean of the squared error, one value per leading index.

    (..., H, W) → (...): Σ_ij w_i (f − o)²_ij / Σ_ij w_i. The building block of MSE/RMSE;
    sums of it over samples can be streamed and turned into RMSE at the end.
    """
    _check_shapes(forecast, truth)
    return _spatial_mean((forecast - truth) ** 2, lat)


def mse(forecast: torch.Tensor, truth: torch.Tensor, lat, dim: Dims = None) -> torch.Tensor:
    """Latitude-weighted mean squared error, averaged over the leading dims ``dim``.

    MSE = mean_t [ Σ_ij w_i (f − o)²_tij / Σ_ij w_i ] (WeatherBench2 ``MSE``).
    """
    return _reduce(spatial_mse(forecast, truth, lat), dim)


def rmse(forecast: torch.Tensor, truth: torch.Tensor, lat, dim: Dims = None) -> torch.Tensor:
    """Root of the latitude-weighted space–time MSE: sqrt(mean_t spatial_mse_t).

    The time mean is taken before the root, as WeatherBench2 does (``RMSE`` =
    sqrt of the time-averaged ``MSE``); with ``dim=()`` it is the per-time RMSE.
    """
    return torch.sqrt(mse(forecast, truth, lat, dim))


def spatial_bias(forecast: torch.Tensor, truth: torch.Tensor, lat) -> torch.Tensor:
    """Latitude-weighted spatial mean of the error f − o, one value per leading index."""
    _check_shapes(forecast, truth)
    return _spatial_mean(forecast - truth, lat)


def bias(forecast: torch.Tensor, truth: torch.Tensor, lat, dim: Dims = None) -> torch.Tensor:
    """Mean bias: latitude-weighted space–time mean of f − o (WeatherBench2 ``Bias``).

    Positive means the forecast is too high on average.
    """
    return _reduce(spatial_bias(forecast, truth, lat), dim)
