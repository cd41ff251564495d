"""Diagnostics of the simulation: sigma → pressure interpolation, mean-sea-level pressure.

These are pure numpy functions; they need neither jcm nor JAX.
"""

from __future__ import annotations

import numpy as np
import pytest

from weatherpeft.data.simulate import GRAVITY, LAPSE_RATE, R_DRY, mean_sea_level_pressure, pressure_level_fields

#: SPEEDY's eight sigma full levels, top to bottom (as jcm's ``coords.vertical.centers``).
SIGMA = np.array([0.025, 0.095, 0.2, 0.34, 0.51, 0.685, 0.835, 0.95])


def column(profile, surface_pressure: np.ndarray) -> np.ndarray:
    """(sigma, lon, lat) values of ``profile(p in Pa)`` on the sigma levels."""
    pressure = SIGMA[:, None, None] * surface_pressure[None]
    return profile(pressure)


def test_linear_in_log_p_is_reproduced_inside_and_below_the_column():
    surface_pressure = np.array([[100000.0, 92000.0, 70000.0]])  # (lon=1, lat=3): sea, plateau, mountain
    temperature = lambda p: 288.0 + 30.0 * np.log(p / 100000.0)  # noqa: E731
    geopotential = lambda p: -R_DRY * 250.0 * np.log(p / 101325.0)  # isothermal 250 K column  # noqa: E731
    state = {"temperature": column(temperature, surface_pressure),
             "geopotential": column(geopotential, surface_pressure)}
    levels = (50, 200, 500, 850, 1000)
    out = pressure_level_fields(state, SIGMA, surface_pressure, levels)
    assert set(out) == {"temperature", "geopotential"}
    for name, profile in (("temperature", temperature), ("geopotential", geopotential)):
        assert out[name].shape == (len(levels), 1, 3)
        for k, level in enumerate(levels):
            expected = profile(np.full((1, 3), level * 100.0))
            np.testing.assert_allclose(out[name][k], expected, rtol=1e-12, err_msg=f"{name} at {level} hPa")
    # 850 hPa over the 700 hPa mountain and 1000 hPa everywhere lie below the lowest sigma
    # level (0.95 ps): those values came from extrapolation, and are still exact.
    assert 85000.0 > 0.95 * 70000.0 and 100000.0 > 0.95 * 100000.0


def test_curved_profile_uses_the_bracketing_levels_and_extrapolates_the_lowest_segment():
    """With a profile that is not linear in log p, only the right segment gives the right value."""
    surface_pressure = np.array([[100000.0, 80000.0]])
    values = lambda p: (np.log(p / 100000.0)) ** 2 * 100.0 + 250.0  # noqa: E731
    state = {"t": column(values, surface_pressure)}
    levels = (300, 500, 850, 1000)
    out = pressure_level_fields(state, SIGMA, surface_pressure, levels)["t"]
    log_sigma = np.log(SIGMA)
    for j, ps in enumerate(surface_pressure[0]):
        on_levels = state["t"][:, 0, j]
        for k, level in enumerate(levels):
            target = np.log(level * 100.0 / ps)
            if target <= log_sigma[-1]:  # inside the column: linear interpolation in log p
                expected = np.interp(target, log_sigma, on_levels)
            else:  # below the lowest level: the lowest segment, continued
                slope = (on_levels[-1] - on_levels[-2]) / (log_sigma[-1] - log_sigma[-2])
                expected = on_levels[-1] + slope * (target - log_sigma[-1])
            assert out[k, 0, j] == pytest.approx(expected, rel=1e-12), (level, ps)
    # Exactly on a sigma level the model value comes back unchanged.
    at_level = pressure_level_fields(state, SIGMA, np.array([[100000.0]]), (510,))["t"]
    assert at_level[0, 0, 0] == pytest.approx(state["t"][4, 0, 0], rel=1e-12)


def test_above_the_model_top_extrapolates_the_top_segment():
    surface_pressure = np.array([[100000.0]])
    state = {"u": np.arange(8.0)[:, None, None] ** 2}  # 0, 1, 4, … top to bottom
    out = pressure_level_fields(state, SIGMA, surface_pressure, (1,))["u"]  # 1 hPa: sigma 0.001
    log_sigma = np.log(SIGMA)
    expected = 0.0 + (1.0 - 0.0) / (log_sigma[1] - log_sigma[0]) * (np.log(0.001) - log_sigma[0])
    assert out[0, 0, 0] == pytest.approx(expected, rel=1e-12)


def test_mslp_equals_surface_pressure_at_sea_level():
    ps = np.array([[98000.0, 101325.0, 103500.0]])
    t = np.array([[250.0, 288.0, 305.0]])
    np.testing.assert_array_equal(mean_sea_level_pressure(ps, np.zeros_like(ps), t), ps)


def test_mslp_over_a_1500_m_mountain_follows_the_hypsometric_equation():
    height = 1500.0
    ps = np.array([85000.0, 85000.0])
    t_surface = np.array([288.0, 260.0])
    mslp = mean_sea_level_pressure(ps, np.full(2, GRAVITY * height), t_surface)
    # Exact hypsometric reduction through a column whose temperature rises by LAPSE_RATE
    # per metre below the surface: p0 = ps (1 + Γ h / T_s)^(g / (R Γ)).
    exact = ps * (1 + LAPSE_RATE * height / t_surface) ** (GRAVITY / (R_DRY * LAPSE_RATE))
    np.testing.assert_allclose(mslp, exact, rtol=1e-4)
    assert np.all(mslp > ps)
    assert 101000.0 < mslp[0] < 101500.0  # the standard-atmosphere ballpark: ~+16.3 kPa per 1500 m
    assert mslp[1] > mslp[0]  # a colder column is denser: more pressure added below the surface
    # A higher mountain adds more.
    higher = mean_sea_level_pressure(ps[:1], np.array([GRAVITY * 3000.0]), t_surface[:1])
    assert higher[0] > mslp[0] * 1.15
