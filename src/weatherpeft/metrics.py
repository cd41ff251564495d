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

* Every other metric follows the same pattern: a per-point score, its latitude-weighted
  spatial mean per time (WB2's ``compute_chunk``), then the plain mean over time (WB2's
  ``compute``). Ratios (ACC per time; spread–skill over the whole period) are formed where
  WB2 forms them. :func:`rmse_per_sample` is the one deliberate exception (the paper's code).

NaN handling follows WB2's default ``skipna=False``: a NaN anywhere in a time step's field
makes that step's value NaN, and a NaN step makes the time mean NaN. SEEPS is the exception,
as in WB2 (whose ``SEEPS`` forces ``skipna=True`` in the spatial mean): NaN points are left out
of that time's spatial mean, like the climatologically masked points. Mismatched shapes
raise a ``ValueError`` naming both shapes.

Units: every metric is in the units of its inputs, except SEEPS (dimensionless), whose
precipitation is in **metres** (WB2's ``total_precipitation_*`` units) while its dry threshold
is given in **millimetres** (0.25 mm for 24 h totals as in WB2, 0.1 mm for 6 h totals as in the
paper's code) and converted to metres once, as WB2 does (``dry_threshold_mm / 1000``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "acc",
    "bias",
    "crps_ensemble",
    "crps_gaussian",
    "latitude_weights",
    "mse",
    "rmse",
    "rmse_per_sample",
    "seeps",
    "seeps_climatology",
    "spatial_bias",
    "spatial_mse",
    "spread_skill_ratio",
]

#: SEEPS: grid points whose climatological dry fraction p1 is not strictly inside
#: (SEEPS_MIN_P1, SEEPS_MAX_P1) are left out (WB2 ``SpatialSEEPS.min_p1/max_p1``).
SEEPS_MIN_P1, SEEPS_MAX_P1 = 0.1, 0.85
#: SEEPS: the light/heavy split is this quantile of the wet amounts (WB2 ``SEEPSThreshold``).
SEEPS_WET_QUANTILE = 2.0 / 3.0
MM_PER_M = 1000.0

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
    values = torch.as_tensor(np.array(lat, dtype=np.float64) if not isinstance(lat, torch.Tensor)
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
    climatologically too dry or too wet points; the weights are renormalised over what is kept,
    and a dropped point's value (even NaN or inf) does not reach the sum. A time step with
    nothing kept gives NaN (0/0).
    """
    weights = _weights_for(values, lat)
    if mask is None:
        return (values * weights).mean(dim=(-2, -1))
    kept = mask.to(values.dtype) * weights
    kept = kept.expand_as(values) if kept.shape != values.shape else kept
    values = torch.where(kept > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return (values * kept).sum(dim=(-2, -1)) / kept.sum(dim=(-2, -1))


def _reduce(values: torch.Tensor, dim: Dims) -> torch.Tensor:
    """Mean over the leading dims ``dim`` (``None`` = all that are left)."""
    if dim is None:
        return values.mean() if values.ndim else values
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return values.mean(dim=dims) if dims else values


def _check_shapes(forecast: torch.Tensor, truth: torch.Tensor,
                  names: tuple[str, str] = ("forecast", "truth")) -> None:
    if forecast.shape != truth.shape:
        raise ValueError(f"{names[0]} shape {tuple(forecast.shape)} differs from {names[1]} shape "
                         f"{tuple(truth.shape)}")


def _check_broadcasts(name: str, values: torch.Tensor, field: torch.Tensor) -> None:
    """``values`` (e.g. a climatology) must broadcast to ``field``'s shape without enlarging it."""
    try:
        shape = torch.broadcast_shapes(values.shape, field.shape)
    except RuntimeError:
        shape = None
    if shape != field.shape:
        raise ValueError(f"{name} shape {tuple(values.shape)} does not broadcast to the field shape "
                         f"{tuple(field.shape)}")


def _as_float(values: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(values)
    return values if values.is_floating_point() else values.to(torch.float64)


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


def rmse_per_sample(forecast: torch.Tensor, truth: torch.Tensor, lat, dim: Dims = None) -> torch.Tensor:
    """The paper code's RMSE: the root of each sample's spatial MSE, then the mean over ``dim``.

    mean_t sqrt(Σ_ij w_i (f − o)²_tij / Σ_ij w_i) — WB2's ``RMSESqrtBeforeTimeAvg``. By Jensen's
    inequality it is ≤ :func:`rmse` (equal only when every sample has the same MSE). Offered
    only to compare with numbers computed that way; the tasks report :func:`rmse`. NaN
    propagates.
    """
    return _reduce(torch.sqrt(spatial_mse(forecast, truth, lat)), dim)


def _pointwise_crps_gaussian(mean: torch.Tensor, std: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π] with z = (y − μ)/σ; differentiable in μ and σ."""
    z = (truth - mean) / std
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return std * (z * (2 * torch.special.ndtr(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def crps_gaussian(mean: torch.Tensor, std: torch.Tensor, truth: torch.Tensor, lat,
                  dim: Dims = None) -> torch.Tensor:
    """Latitude-weighted mean CRPS of the Gaussian forecasts N(mean, std²) for ``truth``.

    Closed form (Gneiting, Raftery, Westveld & Goldman 2005, "Calibrated probabilistic
    forecasting using ensemble model output statistics and minimum CRPS estimation", MWR
    133, eq. 5; WB2 ``GaussianCRPS``): CRPS = σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π], z = (y − μ)/σ,
    with Φ, φ the standard normal CDF and density. It tends to |y − μ| as σ → 0. Spatial mean
    per time, then the mean over ``dim``. Differentiable, so it also serves as a training loss.

    ``mean``, ``std`` and ``truth`` share one shape (..., H, W); ``std`` must be > 0 (a ValueError
    otherwise — keep σ positive, e.g. with softplus). NaN in any input propagates.
    """
    mean, std, truth = _as_float(mean), _as_float(std), _as_float(truth)
    _check_shapes(mean, truth, ("mean", "truth"))
    _check_shapes(std, truth, ("std", "truth"))
    if torch.any(std <= 0):
        raise ValueError(f"std must be > 0 everywhere for the Gaussian CRPS; its minimum is "
                         f"{std[~torch.isnan(std)].min().item():g}")
    return _reduce(_spatial_mean(_pointwise_crps_gaussian(mean, std, truth), lat), dim)


def crps_ensemble(members: torch.Tensor, truth: torch.Tensor, lat, member_dim: int = 1,
                  dim: Dims = None, fair: bool = True) -> torch.Tensor:
    """Latitude-weighted mean CRPS of an ensemble: E|X − y| − ½ E|X − X'| per point.

    With M members x_1..x_M: CRPS = (1/M) Σ_i |x_i − y| − Σ_ij |x_i − x_j| / (2 D), where
    D = M(M − 1) for the *fair* estimator (``fair=True``, the default) and D = M² for the
    empirical-CDF ("ecdf") one (``fair=False``). The default follows WeatherBench2 ``CRPS``:
    its spread term ``_pointwise_crps_spread`` is the unbiased E|X − X'| (Zamo & Naveau 2018
    PWM form, divided by M − 1), i.e. the fair CRPS; ``scores.probability.crps_for_ensemble``
    gives the two as ``method="fair"`` / ``"ecdf"``. With one member the spread term is 0
    (WB2) and CRPS = MAE. The pair sum uses sorted members, O(M log M):
    Σ_ij |x_i − x_j| = 2 Σ_k (2k − M − 1) x_(k). References: Gneiting & Raftery 2007
    (JASA 102, eq. 21); Ferro 2014 (fair scores).

    ``members`` is ``truth``'s shape with the member axis inserted at ``member_dim`` (a leading
    axis; default 1, i.e. (time, member, ..., H, W)). Spatial mean per time, then the mean
    over ``dim`` (dims of ``truth``). A NaN member or truth value propagates (WB2 default;
    ``scores`` instead skips NaN members).
    """
    members, truth = _as_float(members), _as_float(truth)
    ndim = members.ndim
    if not -ndim <= member_dim < ndim or member_dim % ndim >= ndim - 2:
        raise ValueError(f"member_dim={member_dim} must name a leading axis of members shaped "
                         f"{tuple(members.shape)} (not latitude or longitude)")
    stacked = members.movedim(member_dim % ndim, 0)
    if stacked.shape[1:] != truth.shape:
        raise ValueError(f"members shape {tuple(members.shape)} without its member_dim={member_dim} "
                         f"differs from truth shape {tuple(truth.shape)}")
    n_members = stacked.shape[0]
    if n_members == 0:
        raise ValueError(f"members shaped {tuple(members.shape)} has no member along dim {member_dim}")
    skill = (stacked - truth).abs().mean(dim=0)
    if n_members == 1:
        return _reduce(_spatial_mean(skill, lat), dim)
    ordered = torch.sort(stacked, dim=0).values
    rank = torch.arange(1, n_members + 1, dtype=stacked.dtype, device=stacked.device)
    coefficient = (2 * rank - n_members - 1).view(-1, *([1] * truth.ndim))
    pair_sum = 2 * (coefficient * ordered).sum(dim=0)  # Σ_ij |x_i − x_j|
    pairs = n_members * (n_members - 1) if fair else n_members**2
    return _reduce(_spatial_mean(skill - pair_sum / (2 * pairs), lat), dim)


def spread_skill_ratio(spread: torch.Tensor, ensemble_mean: torch.Tensor, truth: torch.Tensor,
                       lat, dim: Dims = None) -> torch.Tensor:
    """Spread–skill ratio: sqrt(mean ensemble variance) / RMSE of the ensemble mean.

    WB2 (``visualization.compute_spread_skill_ratio`` over ``EnsembleVariance`` and
    ``EnsembleMeanMSE``): spread = sqrt(mean_t Σ_ij w_i s²_tij / Σ_ij w_i), skill = the RMSE of
    the ensemble mean (:func:`rmse`), both time-averaged before the root. ``spread`` is the
    per-point standard deviation: for an ensemble WB2 uses the unbiased one
    (``std(ddof=1)``, i.e. ``torch.std(..., correction=1)``), for a Gaussian forecast its σ.
    A statistically consistent Gaussian forecast gives 1; a consistent M-member ensemble
    gives about sqrt(M/(M+1)) (its mean's error includes the sampling error σ²/M; WB2 does not
    correct for it). All three inputs share one shape; ``spread`` must be ≥ 0. NaN propagates.
    """
    spread, ensemble_mean, truth = _as_float(spread), _as_float(ensemble_mean), _as_float(truth)
    _check_shapes(ensemble_mean, truth, ("ensemble_mean", "truth"))
    _check_shapes(spread, truth, ("spread", "truth"))
    if torch.any(spread < 0):
        raise ValueError("spread is a standard deviation and must be >= 0 everywhere")
    variance = _reduce(_spatial_mean(spread**2, lat), dim)
    return torch.sqrt(variance) / rmse(ensemble_mean, truth, lat, dim)


def acc(forecast: torch.Tensor, truth: torch.Tensor, climatology: torch.Tensor, lat,
        dim: Dims = None) -> torch.Tensor:
    """Anomaly correlation coefficient, WB2 ``ACC``: per time step, then the mean over ``dim``.

    With anomalies f' = f − c and o' = o − c from the climatology c and ⟨·⟩ the latitude-weighted
    spatial mean: ACC_t = ⟨f' o'⟩ / sqrt(⟨f'²⟩ ⟨o'²⟩) — uncentred (the anomalies' spatial means
    are not removed), as in WB2. ``climatology`` broadcasts to the field, e.g. (H, W) or one
    map per time. Truth against itself gives 1; a forecast equal to the climatology everywhere
    gives NaN (0/0), as in WB2. NaN propagates.
    """
    forecast, truth, climatology = _as_float(forecast), _as_float(truth), _as_float(climatology)
    _check_shapes(forecast, truth)
    _check_broadcasts("climatology", climatology, forecast)
    forecast_anomaly, truth_anomaly = forecast - climatology, truth - climatology
    per_time = _spatial_mean(forecast_anomaly * truth_anomaly, lat) / torch.sqrt(
        _spatial_mean(forecast_anomaly**2, lat) * _spatial_mean(truth_anomaly**2, lat))
    return _reduce(per_time, dim)


def _dry_threshold_m(dry_threshold: float) -> float:
    """The SEEPS dry threshold, given in mm, in metres (WB2: ``dry_threshold_mm / 1000``)."""
    value = float(dry_threshold)
    if not math.isfinite(value) or value < 1e-3:
        raise ValueError(f"dry_threshold is in millimetres (0.25 for 24 h totals, 0.1 for 6 h totals) "
                         f"and must be >= 0.001 mm; got {dry_threshold!r} (metres passed by mistake?)")
    return value / MM_PER_M


def _check_precipitation(name: str, values: torch.Tensor) -> None:
    if torch.any(values < 0):
        raise ValueError(f"{name} has negative precipitation (minimum {values.nan_to_num(0).min().item():g} m); "
                         "clamp it first, e.g. values.clamp(min=0), if these are rounding artefacts")


def seeps_climatology(precip_train: torch.Tensor, dry_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point SEEPS climatology from training-period totals (T, H, W) in metres.

    Returns ``(dry_fraction, wet_threshold)``, each (H, W), as WB2's ``SEEPSThreshold``
    (scripts/compute_climatology.py): p1 = the fraction of times with precipitation below
    ``dry_threshold`` (mm, converted to m); the wet threshold (m) is the 2/3 quantile (linear
    interpolation, numpy's default) of the amounts ≥ that threshold. Unlike WB2, which keeps one
    per day-of-year and hour, this is one value per point over the whole training period.
    NaN times are ignored at each point (WB2 counts them as not dry); a point with no wet
    time gets a NaN threshold and a point with no valid time NaN for both — :func:`seeps`
    leaves such points out. Negative precipitation is an error.
    """
    precip = _as_float(precip_train)
    if precip.ndim != 3 or precip.shape[0] == 0:
        raise ValueError(f"precip_train must be shaped (T, H, W) with T >= 1, got {tuple(precip.shape)}")
    _check_precipitation("precip_train", precip)
    threshold = _dry_threshold_m(dry_threshold)
    valid = ~torch.isnan(precip)
    dry = precip < threshold
    dry_fraction = dry.sum(dim=0).to(precip.dtype) / valid.sum(dim=0).to(precip.dtype)
    wet = valid & ~dry
    # Linear-interpolation quantile over each point's wet amounts: sort with the rest pushed last.
    ordered = torch.sort(torch.where(wet, precip, torch.full_like(precip, math.inf)), dim=0).values
    n_wet = wet.sum(dim=0)
    position = (n_wet - 1).clamp(min=0).to(torch.float64) * SEEPS_WET_QUANTILE
    lower = position.floor().to(torch.long)
    upper = torch.minimum(lower + 1, (n_wet - 1).clamp(min=0))
    fraction = (position - lower).to(precip.dtype)
    low_value = ordered.gather(0, lower[None]).squeeze(0)
    high_value = ordered.gather(0, upper[None]).squeeze(0)
    wet_threshold = low_value + fraction * (high_value - low_value)
    wet_threshold = torch.where(n_wet > 0, wet_threshold, torch.full_like(wet_threshold, math.nan))
    return dry_fraction, wet_threshold


def _seeps_category(precip: torch.Tensor, dry_m: float, wet_threshold: torch.Tensor) -> torch.Tensor:
    """0 = dry (< dry threshold), 2 = heavy (≥ wet threshold), 1 = light (in between)."""
    category = torch.ones(precip.shape, dtype=torch.long, device=precip.device)
    category = torch.where(precip >= wet_threshold, 2, category)
    return torch.where(precip < dry_m, 0, category)


def seeps(forecast: torch.Tensor, truth: torch.Tensor, dry_fraction: torch.Tensor,
          wet_threshold: torch.Tensor, lat, dry_threshold: float, dim: Dims = None) -> torch.Tensor:
    """Stable Equitable Error in Probability Space, WB2 ``SEEPS`` (Rodwell et al. 2010, QJRMS 136).

    Each point's forecast and observed precipitation (metres) fall into dry (< ``dry_threshold``,
    given in mm: 0.25 for 24 h totals as in WB2, 0.1 for 6 h totals as in the paper's code),
    heavy (≥ ``wet_threshold``, metres, from :func:`seeps_climatology`) or light (in between).
    The score is S[forecast category, observed category] of WB2's matrix
    ½·[[0, 1/(1−p1), 4/(1−p1)], [1/p1, 0, 3/(1−p1)], [1/p1 + 3/(2+p1), 3/(2+p1), 0]]
    (rows: forecast dry/light/heavy; columns: observed), with p1 = ``dry_fraction``; this is
    Rodwell's eq. 15 with p3 = (1 − p1)/3 and the same as ``scores.categorical.seeps``.
    Points with p1 not strictly inside (0.1, 0.85), or with a NaN threshold, forecast or truth,
    are left out of that time's latitude-weighted spatial mean (WB2); then the mean over
    ``dim``. A time step with no point left gives NaN. A perfect forecast scores 0;
    the climatological forecast scores about 1.

    Boundaries as in WB2 (and its climatology): dry is x < d and heavy x ≥ wet. Rodwell and
    ``scores`` put equality the other way (dry x ≤ d, heavy x > wet) and keep p1 = 0.1 or 0.85;
    only exact ties differ. (WB2 itself puts x == d in no category; here it is light.)
    ``dry_fraction`` and ``wet_threshold`` broadcast to the field, e.g. (H, W). Negative
    precipitation is an error.
    """
    forecast, truth = _as_float(forecast), _as_float(truth)
    dry_fraction, wet_threshold = _as_float(dry_fraction), _as_float(wet_threshold)
    _check_shapes(forecast, truth)
    _check_broadcasts("dry_fraction", dry_fraction, forecast)
    _check_broadcasts("wet_threshold", wet_threshold, forecast)
    if torch.any((dry_fraction < 0) | (dry_fraction > 1)):
        raise ValueError("dry_fraction (p1) must lie in [0, 1]")
    _check_precipitation("forecast", forecast)
    _check_precipitation("truth", truth)
    dry_m = _dry_threshold_m(dry_threshold)
    forecast_category = _seeps_category(forecast, dry_m, wet_threshold)
    truth_category = _seeps_category(truth, dry_m, wet_threshold)
    p1 = dry_fraction.to(forecast.dtype)
    penalties = {  # (forecast, observed) → ½ × WB2's matrix entry
        (0, 1): 1 / (1 - p1), (0, 2): 4 / (1 - p1),
        (1, 0): 1 / p1, (1, 2): 3 / (1 - p1),
        (2, 0): 1 / p1 + 3 / (2 + p1), (2, 1): 3 / (2 + p1),
    }
    score = torch.zeros(forecast.shape, dtype=forecast.dtype, device=forecast.device)
    for (forecast_cat, truth_cat), penalty in penalties.items():
        hit = (forecast_category == forecast_cat) & (truth_category == truth_cat)
        score = torch.where(hit, 0.5 * penalty, score)
    keep = ((p1 > SEEPS_MIN_P1) & (p1 < SEEPS_MAX_P1) & ~torch.isnan(wet_threshold)
            & ~torch.isnan(forecast) & ~torch.isnan(truth))
    return _reduce(_spatial_mean(score, lat, mask=keep), dim)
