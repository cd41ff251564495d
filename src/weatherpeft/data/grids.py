"""Regular latitude-longitude grids: cell edges, conservative regridding, coarsening, crops.

All functions work on numpy arrays whose last two axes are (longitude, latitude), the
WeatherBench2 storage order. Conservative regridding between rectilinear grids is
separable: it is the product of a 1-D overlap matrix in longitude and one in sin(latitude),
so it preserves area-weighted means exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A rectilinear global or regional grid given by its cell centres (degrees).

    ``lat`` ascending or descending; ``lon`` ascending in [0, 360). ``lat_edges`` and
    ``lon_edges`` have one more entry than the centres and run in the same direction.
    """

    lat: np.ndarray
    lon: np.ndarray
    lat_edges: np.ndarray
    lon_edges: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(n_lon, n_lat), the storage order."""
        return (len(self.lon), len(self.lat))


def equiangular_grid(n_lon: int, n_lat: int) -> Grid:
    """WeatherBench2's ``{n_lon}x{n_lat}_equiangular_conservative`` grid (no poles).

    For 64x32: latitude −87.1875 … 87.1875 ascending, longitude 0 … 354.375.
    """
    d_lat = 180.0 / n_lat
    d_lon = 360.0 / n_lon
    lat_edges = np.linspace(-90.0, 90.0, n_lat + 1)
    lat = lat_edges[:-1] + d_lat / 2
    lon = np.arange(n_lon) * d_lon
    lon_edges = np.concatenate([lon - d_lon / 2, [lon[-1] + d_lon / 2]])
    return Grid(lat=lat, lon=lon, lat_edges=lat_edges, lon_edges=lon_edges)


def gaussian_grid(n_lon: int, n_lat: int) -> Grid:
    """A Gaussian grid (spectral models' nodal grid), latitude ascending.

    Cell edges in latitude are placed so that each cell's area fraction equals its
    Gauss-Legendre weight, as is usual for conservative remapping of spectral output.
    """
    nodes, weights = np.polynomial.legendre.leggauss(n_lat)  # nodes = sin(lat), ascending
    lat = np.degrees(np.arcsin(nodes))
    sin_edges = np.concatenate([[-1.0], -1.0 + np.cumsum(weights)])
    sin_edges[-1] = 1.0
    lat_edges = np.degrees(np.arcsin(np.clip(sin_edges, -1.0, 1.0)))
    d_lon = 360.0 / n_lon
    lon = np.arange(n_lon) * d_lon
    lon_edges = np.concatenate([lon - d_lon / 2, [lon[-1] + d_lon / 2]])
    return Grid(lat=lat, lon=lon, lat_edges=lat_edges, lon_edges=lon_edges)


def _overlap_matrix(src_edges: np.ndarray, dst_edges: np.ndarray) -> np.ndarray:
    """Row-normalised overlap lengths of 1-D intervals, shape (n_dst, n_src)."""
    lo = np.maximum(dst_edges[:-1, None], src_edges[None, :-1])
    hi = np.minimum(dst_edges[1:, None], src_edges[None, 1:])
    overlap = np.clip(hi - lo, 0.0, None)
    totals = overlap.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError("destination cells lie outside the source grid")
    return overlap / totals


def _periodic_lon_matrix(src: Grid, dst: Grid) -> np.ndarray:
    """Longitude overlap matrix that wraps around 360° for global source grids."""
    src_edges = src.lon_edges
    is_global = np.isclose(src_edges[-1] - src_edges[0], 360.0)
    if not is_global:
        return _overlap_matrix(src_edges, dst.lon_edges)
    n = len(src.lon)
    tiled = np.concatenate([src_edges[:-1] - 360.0, src_edges[:-1], src_edges[:-1] + 360.0,
                            [src_edges[-1] + 360.0]])
    matrix = _overlap_matrix(tiled, dst.lon_edges)
    return matrix[:, :n] + matrix[:, n : 2 * n] + matrix[:, 2 * n :]


def _ascending(edges: np.ndarray) -> tuple[np.ndarray, bool]:
    return (edges, False) if edges[-1] > edges[0] else (edges[::-1], True)


def conservative_regridder(src: Grid, dst: Grid):
    """Return a function mapping fields on ``src`` (..., lon, lat) to ``dst`` conservatively."""
    lon_matrix = _periodic_lon_matrix(src, dst)
    src_lat, src_flip = _ascending(src.lat_edges)
    dst_lat, dst_flip = _ascending(dst.lat_edges)
    lat_matrix = _overlap_matrix(np.sin(np.radians(src_lat)), np.sin(np.radians(dst_lat)))
    if src_flip:
        lat_matrix = lat_matrix[:, ::-1]
    if dst_flip:
        lat_matrix = lat_matrix[::-1, :]

    def regrid(field: np.ndarray) -> np.ndarray:
        if field.shape[-2:] != src.shape:
            raise ValueError(f"field has (lon, lat) shape {field.shape[-2:]}, grid expects {src.shape}")
        out = lon_matrix @ field @ lat_matrix.T  # BLAS matmuls broadcast over leading axes
        return out.astype(field.dtype, copy=False)

    return regrid


def coarsen(field: np.ndarray, factor: int, lat: np.ndarray) -> np.ndarray:
    """Area-weighted ``factor``×``factor`` block mean over the last two axes (lon, lat).

    ``lat`` are the fine grid's cell centres; weights are cos(lat), exact for equiangular
    cells. Used to derive the 11.25° downscaling input from the 5.625° store.
    """
    n_lon, n_lat = field.shape[-2:]
    if n_lon % factor or n_lat % factor:
        raise ValueError(f"grid ({n_lon}, {n_lat}) is not divisible by coarsening factor {factor}")
    weights = np.cos(np.radians(np.asarray(lat, dtype=np.float64)))
    weighted = field * weights
    shape = field.shape[:-2] + (n_lon // factor, factor, n_lat // factor, factor)
    sums = weighted.reshape(shape).sum(axis=(-3, -1))
    norm = weights.reshape(n_lat // factor, factor).sum(axis=1) * factor
    return (sums / norm).astype(field.dtype, copy=False)


def crop_indices(centres: np.ndarray, low: float, high: float) -> np.ndarray:
    """Indices of cell centres within [low, high] (degrees); raises if none are."""
    idx = np.nonzero((centres >= low) & (centres <= high))[0]
    if idx.size == 0:
        raise ValueError(f"no grid cells with centres in [{low}, {high}]")
    return idx
