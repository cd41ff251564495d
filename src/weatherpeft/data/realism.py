"""Realism numbers for the built-in world's data card, measured on its stores.

Each number is a check that the simulated world behaves like Earth's atmosphere in the
ways the downstream tasks rely on: how much and how often it rains, where the ITCZ sits
and how it moves with the seasons, jet strength, near-surface temperature range, and
whether the ensemble is biased and under-dispersive as an imperfect model should be.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from weatherpeft.metrics import latitude_weights

DRY_THRESHOLD_MM_6H = 0.1


def _weights(lat: xr.DataArray) -> xr.DataArray:
    return xr.DataArray(latitude_weights(lat.values).numpy(), coords=lat.coords)


def _global_mean(field: xr.DataArray) -> float:
    return float(field.weighted(_weights(field.latitude)).mean())


def _season(ds: xr.Dataset, months: tuple[int, ...]) -> xr.Dataset:
    return ds.sel(time=ds.time.dt.month.isin(months))


def _itcz_latitude(precip: xr.DataArray) -> float | None:
    """Latitude of the tropical (±30°) maximum of zonal-mean precipitation; None without data."""
    if precip.sizes["time"] == 0:
        return None
    zonal = precip.mean(("time", "longitude")).sel(latitude=slice(-30, 30))
    return float(zonal.latitude.values[int(np.argmax(zonal.values))])


def world_card(downstream: xr.Dataset) -> dict:
    """Precipitation, ITCZ, jets and temperature statistics of a global store."""
    precip_mm = downstream["total_precipitation_6hr"] * 1000.0
    t2m = downstream["2m_temperature"]
    card = {
        "period": [str(downstream.time.values[0])[:16], str(downstream.time.values[-1])[:16]],
        "global_mean_precipitation_mm_per_day": _global_mean(precip_mm) * 4,
        "dry_fraction_6h_below_0.1mm": _global_mean((precip_mm < DRY_THRESHOLD_MM_6H).astype(float)),
        "max_6h_precipitation_mm": float(precip_mm.max()),
        "itcz_latitude_jja_deg": _itcz_latitude(_season(downstream, (6, 7, 8))["total_precipitation_6hr"]),
        "itcz_latitude_djf_deg": _itcz_latitude(_season(downstream, (12, 1, 2))["total_precipitation_6hr"]),
        "t2m_global_mean_k": _global_mean(t2m),
        "t2m_min_k": float(t2m.min()),
        "t2m_max_k": float(t2m.max()),
        "mslp_global_mean_hpa": _global_mean(downstream["mean_sea_level_pressure"]) / 100.0,
    }
    if card["itcz_latitude_jja_deg"] is not None and card["itcz_latitude_djf_deg"] is not None:
        card["itcz_seasonal_shift_deg"] = card["itcz_latitude_jja_deg"] - card["itcz_latitude_djf_deg"]
    if "land_sea_mask" in downstream and "itcz_seasonal_shift_deg" in card:
        land = downstream["land_sea_mask"] > 0.5
        summer = _season(downstream, (6, 7, 8))["2m_temperature"].mean("time")
        winter = _season(downstream, (12, 1, 2))["2m_temperature"].mean("time")
        north = downstream.latitude > 30
        amplitude = (summer - winter).where(north)
        card["t2m_seasonal_amplitude_nh_land_k"] = float(amplitude.where(land).mean())
        card["t2m_seasonal_amplitude_nh_sea_k"] = float(amplitude.where(~land).mean())
    for level in downstream.level.values:
        zonal_u = downstream["u_component_of_wind"].sel(level=level).mean(("time", "longitude"))
        card[f"jet_max_zonal_mean_u{int(level)}_nh_ms"] = float(zonal_u.sel(latitude=slice(0, 90)).max())
        card[f"jet_max_zonal_mean_u{int(level)}_sh_ms"] = float(zonal_u.sel(latitude=slice(-90, 0)).max())
    return card


def ensemble_card(ensemble: xr.Dataset, truth: xr.Dataset) -> dict:
    """Bias, RMSE of the mean and spread/skill of the raw ensemble against the truth run."""
    card = {"members": int(ensemble.sizes["number"]), "inits": int(ensemble.sizes["time"])}
    for lead in ensemble.prediction_timedelta.values:
        hours = int(lead / np.timedelta64(1, "h"))
        forecast = ensemble.sel(prediction_timedelta=lead)
        valid = forecast.time.values + lead
        for name in forecast.data_vars:
            fields = ([(name, forecast[name], truth[name])] if "level" not in forecast[name].dims else
                      [(f"{name}{int(level)}", forecast[name].sel(level=level), truth[name].sel(level=level))
                       for level in forecast.level.values])
            for key, members, observed in fields:
                observed = observed.sel(time=valid).assign_coords(time=forecast.time.values)
                error = members.mean("number") - observed
                spread = np.sqrt(_global_mean(members.var("number", ddof=1)))
                rmse = np.sqrt(_global_mean(error**2))
                card[f"{key}_{hours}h_bias"] = _global_mean(error)
                card[f"{key}_{hours}h_rmse_of_mean"] = float(rmse)
                card[f"{key}_{hours}h_spread_skill_ratio"] = float(spread / rmse)
    return card
