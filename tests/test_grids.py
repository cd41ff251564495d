"""Grids: WB2 layouts, Gaussian nodes, conservative regridding, coarsening, crops.

Reference values are computed here from first principles (cell areas ∝ Δsin(lat)·Δlon,
Gauss–Legendre weights from numpy), never from the module's own edges.
"""

from __future__ import annotations

import numpy as np
import pytest

from weatherpeft.data.grids import (
    Grid,
    coarsen,
    conservative_regridder,
    crop_indices,
    equiangular_grid,
    gaussian_grid,
)


def equiangular_areas(lat: np.ndarray, n_lon: int) -> np.ndarray:
    """(n_lon, n_lat) cell areas of an equiangular grid from its centres (unit sphere)."""
    half = np.radians(180.0 / len(lat)) / 2
    lat_r = np.radians(lat)
    band = np.abs(np.sin(lat_r + half) - np.sin(lat_r - half))
    return np.broadcast_to(band * 2 * np.pi / n_lon, (n_lon, len(lat)))


def gaussian_areas(n_lon: int, n_lat: int) -> np.ndarray:
    """(n_lon, n_lat) cell areas of a Gaussian grid: Gauss weight × Δlon."""
    _, weights = np.polynomial.legendre.leggauss(n_lat)
    return np.broadcast_to(weights * 2 * np.pi / n_lon, (n_lon, n_lat))


def area_mean(field: np.ndarray, areas: np.ndarray) -> float:
    return float(np.sum(field * areas) / np.sum(areas))


def flipped_lat(grid: Grid) -> Grid:
    """The same grid with latitude stored north → south."""
    return Grid(lat=grid.lat[::-1].copy(), lon=grid.lon, lat_edges=grid.lat_edges[::-1].copy(),
                lon_edges=grid.lon_edges)


# --------------------------------------------------------------------------------------
# Grid layouts
# --------------------------------------------------------------------------------------


def test_equiangular_64x32_is_weatherbench2_layout():
    grid = equiangular_grid(64, 32)
    expected_lat = -87.1875 + 5.625 * np.arange(32)
    expected_lon = 5.625 * np.arange(64)
    np.testing.assert_array_equal(grid.lat, expected_lat)
    np.testing.assert_array_equal(grid.lon, expected_lon)
    assert grid.lat[0] == -87.1875 and grid.lat[-1] == 87.1875
    assert grid.lon[0] == 0.0 and grid.lon[-1] == 354.375
    assert grid.shape == (64, 32)
    # Edges: no poles as centres, but the cells reach them; longitude cells centred on 0.
    np.testing.assert_array_equal(grid.lat_edges, -90.0 + 5.625 * np.arange(33))
    np.testing.assert_array_equal(grid.lon_edges, -2.8125 + 5.625 * np.arange(65))


def test_equiangular_128x64_is_weatherbench2_layout():
    grid = equiangular_grid(128, 64)
    np.testing.assert_array_equal(grid.lat, -88.59375 + 2.8125 * np.arange(64))
    np.testing.assert_array_equal(grid.lon, 2.8125 * np.arange(128))


@pytest.mark.parametrize("n_lat", [32, 64])
def test_gaussian_latitudes_are_gauss_legendre_nodes(n_lat):
    grid = gaussian_grid(2 * n_lat, n_lat)
    nodes, weights = np.polynomial.legendre.leggauss(n_lat)
    np.testing.assert_allclose(np.sin(np.radians(grid.lat)), nodes, rtol=0, atol=1e-13)
    assert np.all(np.diff(grid.lat) > 0)
    assert np.allclose(grid.lat, -grid.lat[::-1], atol=1e-12)  # symmetric about the equator
    # Edge areas in sin(lat) are the quadrature weights; the edges bracket the nodes.
    np.testing.assert_allclose(np.diff(np.sin(np.radians(grid.lat_edges))), weights, rtol=0, atol=1e-12)
    assert grid.lat_edges[0] == -90.0 and grid.lat_edges[-1] == 90.0
    assert np.all(grid.lat_edges[:-1] < grid.lat) and np.all(grid.lat < grid.lat_edges[1:])
    np.testing.assert_array_equal(grid.lon, np.arange(2 * n_lat) * 360.0 / (2 * n_lat))


# --------------------------------------------------------------------------------------
# Conservative regridding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dst_shape", [(64, 32), (128, 64)])
@pytest.mark.parametrize("descending", [False, True])
def test_regridding_preserves_area_weighted_mean(dst_shape, descending):
    rng = np.random.default_rng(1)
    src = gaussian_grid(128, 64)
    dst = equiangular_grid(*dst_shape)
    if descending:
        dst = flipped_lat(dst)
    field = 280.0 + 20.0 * rng.standard_normal((3,) + src.shape)  # a leading axis is carried along
    out = conservative_regridder(src, dst)(field)
    assert out.shape == (3,) + dst.shape
    dst_areas = equiangular_areas(dst.lat, dst_shape[0])
    src_areas = gaussian_areas(128, 64)
    for k in range(3):
        assert area_mean(out[k], dst_areas) == pytest.approx(area_mean(field[k], src_areas), rel=1e-12)
    # A random field is not simply copied: the destination differs from a point sample.
    assert out.std() < field.std()


def test_descending_destination_is_the_flip_of_ascending():
    rng = np.random.default_rng(2)
    src = gaussian_grid(128, 64)
    field = rng.standard_normal(src.shape)
    up = conservative_regridder(src, equiangular_grid(64, 32))(field)
    down = conservative_regridder(src, flipped_lat(equiangular_grid(64, 32)))(field)
    np.testing.assert_allclose(down, up[:, ::-1], rtol=0, atol=1e-13)


def test_descending_source_gives_the_same_result():
    rng = np.random.default_rng(3)
    src = gaussian_grid(128, 64)
    field = rng.standard_normal(src.shape)
    dst = equiangular_grid(64, 32)
    reference = conservative_regridder(src, dst)(field)
    from_flipped = conservative_regridder(flipped_lat(src), dst)(field[:, ::-1])
    np.testing.assert_allclose(from_flipped, reference, rtol=0, atol=1e-13)


def test_regridding_a_constant_gives_the_constant():
    src = gaussian_grid(128, 64)
    for dst in (equiangular_grid(64, 32), equiangular_grid(128, 64), flipped_lat(equiangular_grid(64, 32))):
        out = conservative_regridder(src, dst)(np.full(src.shape, 101325.0))
        np.testing.assert_allclose(out, 101325.0, rtol=1e-13)


def test_identity_regrid_returns_the_field():
    rng = np.random.default_rng(4)
    grid = equiangular_grid(64, 32)
    field = rng.standard_normal(grid.shape)
    np.testing.assert_allclose(conservative_regridder(grid, grid)(field), field, rtol=0, atol=1e-13)


def test_regrid_is_a_local_area_average():
    """2.8125° → 5.625° on nested equiangular grids: each coarse cell averages its 2×2 children."""
    rng = np.random.default_rng(5)
    fine, coarse = equiangular_grid(128, 64), equiangular_grid(64, 32)
    field = rng.standard_normal(fine.shape)
    out = conservative_regridder(fine, coarse)(field)
    areas = equiangular_areas(fine.lat, 128)
    # Coarse longitude cell k spans [5.625k − 2.8125, 5.625k + 2.8125]: half of fine cell 2k−1,
    # all of 2k, half of 2k+1 (cell 0 wraps round to fine cell 127). Latitude cells nest exactly.
    k, j = 0, 10
    lon_w = {127: 0.5, 0: 1.0, 1: 0.5}
    num = sum(w * (field[i, 2 * j] * areas[i, 2 * j] + field[i, 2 * j + 1] * areas[i, 2 * j + 1])
              for i, w in lon_w.items())
    den = sum(w * (areas[i, 2 * j] + areas[i, 2 * j + 1]) for i, w in lon_w.items())
    assert out[k, j] == pytest.approx(num / den, rel=1e-12)


def test_longitude_wraps_around_zero():
    """A spike in the source cell at lon 0 (−2.8125…2.8125) lands on both sides of 0/360."""
    src = equiangular_grid(64, 32)
    dst = equiangular_grid(128, 64)  # dst cell 0 spans −1.40625…1.40625
    field = np.zeros(src.shape)
    field[0, :] = 1.0
    out = conservative_regridder(src, dst)(field)
    np.testing.assert_allclose(out[0], 1.0, rtol=1e-13)  # wholly inside the source cell
    np.testing.assert_allclose(out[1], 0.5, rtol=1e-13)  # 1.40625…4.21875: half covered
    np.testing.assert_allclose(out[127], 0.5, rtol=1e-13)  # 355.78125…358.59375: half covered
    np.testing.assert_allclose(out[2:127], 0.0, atol=1e-15)

    # Destination edges at exactly 0 and 360: the source cell splits half-and-half.
    lon = 5.625 + 11.25 * np.arange(32)
    edged = Grid(lat=src.lat, lon=lon, lat_edges=src.lat_edges, lon_edges=11.25 * np.arange(33))
    out = conservative_regridder(src, edged)(field)
    np.testing.assert_allclose(out[0], 0.25, rtol=1e-13)  # [0, 11.25] holds 2.8125° of the spike
    np.testing.assert_allclose(out[31], 0.25, rtol=1e-13)  # [348.75, 360] holds the other half
    np.testing.assert_allclose(out[1:31], 0.0, atol=1e-15)


def test_regional_destination_inside_a_global_source():
    rng = np.random.default_rng(6)
    src = gaussian_grid(128, 64)
    glob = equiangular_grid(128, 64)
    lon_idx, lat_idx = crop_indices(glob.lon, 70, 130), crop_indices(glob.lat, 0, 60)
    region = Grid(lat=glob.lat[lat_idx], lon=glob.lon[lon_idx],
                  lat_edges=glob.lat_edges[lat_idx[0]:lat_idx[-1] + 2],
                  lon_edges=glob.lon_edges[lon_idx[0]:lon_idx[-1] + 2])
    field = rng.standard_normal(src.shape)
    full = conservative_regridder(src, glob)(field)
    regional = conservative_regridder(src, region)(field)
    np.testing.assert_allclose(regional, full[np.ix_(lon_idx, lat_idx)], rtol=0, atol=1e-13)


def test_regridder_rejects_wrong_shapes():
    src = gaussian_grid(128, 64)
    regrid = conservative_regridder(src, equiangular_grid(64, 32))
    with pytest.raises(ValueError, match=r"\(64, 128\).*\(128, 64\)"):
        regrid(np.zeros((64, 128)))  # (lat, lon) order instead of (lon, lat)
    with pytest.raises(ValueError, match="shape"):
        regrid(np.zeros((2, 64, 32)))


# --------------------------------------------------------------------------------------
# Coarsening and crops
# --------------------------------------------------------------------------------------


def test_coarsen_equals_hand_computed_cos_weighted_mean():
    lat = np.array([-67.5, -22.5, 22.5, 67.5])
    field = np.arange(16, dtype=np.float64).reshape(4, 4) ** 1.5  # (lon, lat), not linear
    out = coarsen(field, 2, lat)
    assert out.shape == (2, 2)
    c = np.cos(np.radians(lat))
    for i in range(2):
        for j in range(2):
            block = field[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            w = c[2 * j:2 * j + 2]
            expected = (block[0, 0] * w[0] + block[0, 1] * w[1] + block[1, 0] * w[0] + block[1, 1] * w[1]) \
                / (2 * (w[0] + w[1]))
            assert out[i, j] == pytest.approx(expected, rel=1e-14)
    # cos weighting matters: the plain block mean is different here.
    assert out[0, 0] != pytest.approx(field[:2, :2].mean(), rel=1e-3)


def test_coarsen_preserves_area_weighted_mean_and_dtype():
    rng = np.random.default_rng(7)
    fine, coarse = equiangular_grid(64, 32), equiangular_grid(32, 16)
    field = (280 + 10 * rng.standard_normal((2, 64, 32))).astype(np.float32)
    out = coarsen(field, 2, fine.lat)
    assert out.shape == (2, 32, 16) and out.dtype == np.float32
    fine_areas, coarse_areas = equiangular_areas(fine.lat, 64), equiangular_areas(coarse.lat, 32)
    for k in range(2):
        assert area_mean(out[k].astype(np.float64), coarse_areas) == pytest.approx(
            area_mean(field[k].astype(np.float64), fine_areas), rel=1e-6)
    # Coarsening by 2 on nested equiangular grids is the conservative regrid (cells line up in
    # latitude; in longitude the WB2 cells are centred on 0, so compare a shifted-edge grid).
    shifted_fine = Grid(lat=fine.lat, lon=fine.lon + 2.8125, lat_edges=fine.lat_edges,
                        lon_edges=fine.lon_edges + 2.8125)
    shifted_coarse = Grid(lat=coarse.lat, lon=coarse.lon + 5.625, lat_edges=coarse.lat_edges,
                          lon_edges=coarse.lon_edges + 5.625)
    regridded = conservative_regridder(shifted_fine, shifted_coarse)(field.astype(np.float64))
    np.testing.assert_allclose(out, regridded, rtol=1e-6)


def test_coarsen_rejects_indivisible_shapes():
    lat = equiangular_grid(64, 30).lat
    with pytest.raises(ValueError, match=r"\(64, 30\).*4"):
        coarsen(np.zeros((64, 30)), 4, lat)
    with pytest.raises(ValueError, match="divisible"):
        coarsen(np.zeros((63, 32)), 2, equiangular_grid(63, 32).lat)


def test_crop_indices_inclusive_bounds():
    centres = np.array([-10.0, 0.0, 10.0, 20.0, 30.0])
    np.testing.assert_array_equal(crop_indices(centres, 0.0, 20.0), [1, 2, 3])
    np.testing.assert_array_equal(crop_indices(centres, 5.0, 25.0), [2, 3])
    np.testing.assert_array_equal(crop_indices(centres[::-1], 0.0, 20.0), [1, 2, 3])
    lon = equiangular_grid(128, 64).lon
    idx = crop_indices(lon, 70.0, 130.0)
    assert lon[idx[0]] == 70.3125 and lon[idx[-1]] == 129.375 and np.all(np.diff(idx) == 1)
    with pytest.raises(ValueError, match=r"\[40.0, 45.0\]"):
        crop_indices(centres, 40.0, 45.0)
