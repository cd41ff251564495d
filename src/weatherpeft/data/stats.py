"""Normalisation statistics of a data set, in Aurora's key convention, and their installation.

Aurora normalises every variable with module-level dicts (``aurora.normalisation.locations``
and ``scales``) that hold ERA5 statistics. A different world (the built-in simulation, a
region, another reanalysis) needs its own: :func:`compute_stats` measures them over the
training period only, :class:`NormalisationStats` saves, loads and installs them.

Keys: surface and static variables by Aurora name ("2t", "lsm", static "z"); atmospheric
variables per level as ``f"{name}_{level_to_str(level)}"`` ("z_500").

Means and standard deviations are latitude-weighted (weights ∝ cos(latitude), the area of
an equiangular cell, normalised to mean 1 — WeatherBench2's convention), so they describe
the globe rather than over-weighting the many small polar cells. A (near-)constant field
gets scale 1: it is centred but never divided by ~0.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aurora.normalisation as aurora_normalisation
import numpy as np
import pandas as pd
import xarray as xr

from weatherpeft.atomic import write_json
from weatherpeft.data.wb2 import (
    SampleSpec,
    StoreSelection,
    check_finite,
    open_period,
    read_fields,
    read_static,
    time_blocks,
)
from weatherpeft.metrics import latitude_weights

__all__ = ["NormalisationStats", "compute_stats", "merge_statistics", "model_statistics"]

_FORMAT = "weatherpeft.normalisation/1"
#: A standard deviation at or below this fraction of |mean| (or exactly 0) means "constant".
_CONSTANT_REL = 1e-6


@dataclass
class NormalisationStats:
    """Per-variable location (mean) and scale (standard deviation) in Aurora's keys.

    ``period`` is the inclusive training period the statistics were measured on;
    ``n_times`` how many time steps went in; ``source`` the store they came from.
    """

    locations: dict[str, float]
    scales: dict[str, float]
    period: tuple[str, str] | None = None
    latitude_weighted: bool = True
    n_times: int = 0
    source: str = ""
    _saved: dict[str, tuple[float | None, float | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if set(self.locations) != set(self.scales):
            raise ValueError("locations and scales must have the same keys; differing: "
                             f"{sorted(set(self.locations) ^ set(self.scales))}")
        for key in self.locations:
            location, scale = float(self.locations[key]), float(self.scales[key])
            if not math.isfinite(location) or not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"bad statistics for '{key}': location {location}, scale {scale}")

    # -- files ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-ready dict (keys sorted, floats as Python floats)."""
        return {
            "format": _FORMAT,
            "period": list(self.period) if self.period else None,
            "latitude_weighted": self.latitude_weighted,
            "n_times": self.n_times,
            "source": self.source,
            "locations": {k: float(self.locations[k]) for k in sorted(self.locations)},
            "scales": {k: float(self.scales[k]) for k in sorted(self.scales)},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temporary file, fsync, rename)."""
        return write_json(path, self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NormalisationStats:
        """Read a file written by :meth:`save`; a bad file raises ``ValueError`` naming it."""
        path = Path(path)
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(content, dict) or content.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a weatherpeft normalisation file (format {_FORMAT})")
        try:
            return cls(locations={k: float(v) for k, v in content["locations"].items()},
                       scales={k: float(v) for k, v in content["scales"].items()},
                       period=tuple(content["period"]) if content.get("period") else None,
                       latitude_weighted=bool(content.get("latitude_weighted", True)),
                       n_times=int(content.get("n_times", 0)),
                       source=str(content.get("source", "")))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: malformed normalisation statistics: {error}") from error

    # -- combining -------------------------------------------------------------------------

    def subset(self, keys: Sequence[str]) -> NormalisationStats:
        """These statistics for ``keys`` only (keys they lack are left out)."""
        return NormalisationStats(locations={k: self.locations[k] for k in keys if k in self.locations},
                                  scales={k: self.scales[k] for k in keys if k in self.scales},
                                  period=self.period, latitude_weighted=self.latitude_weighted,
                                  n_times=self.n_times, source=self.source)

    def require(self, keys: Sequence[str], model: str) -> NormalisationStats:
        """:meth:`subset` of ``keys``; a clear error naming the keys missing for ``model``."""
        missing = [k for k in keys if k not in self.locations]
        if missing:
            raise ValueError(f"normalisation statistics ({self.source or 'given'}) lack {missing}, "
                             f"which {model} needs; compute them with "
                             "weatherpeft.data.stats.compute_stats")
        return self.subset(keys)

    # -- Aurora ----------------------------------------------------------------------------

    def surf_stats(self) -> dict[str, tuple[float, float]]:
        """(location, scale) per key, the form of ``Aurora(surf_stats=...)``."""
        return {k: (self.locations[k], self.scales[k]) for k in self.locations}

    def install(self) -> None:
        """Write these statistics into ``aurora.normalisation.locations``/``scales``.

        Global and process-wide, as Aurora's normalisation is. An Aurora model built with its
        own ``surf_stats`` still prefers those for the surface variables they name.
        """
        for key in self.locations:
            if key not in self._saved:
                self._saved[key] = (aurora_normalisation.locations.get(key),
                                    aurora_normalisation.scales.get(key))
        aurora_normalisation.locations.update(self.locations)
        aurora_normalisation.scales.update(self.scales)

    def uninstall(self) -> None:
        """Put back whatever :meth:`install` overwrote (and drop keys it added)."""
        for key, (location, scale) in self._saved.items():
            for table, value in ((aurora_normalisation.locations, location),
                                 (aurora_normalisation.scales, scale)):
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
        self._saved.clear()

    @contextmanager
    def installed(self) -> Iterator[NormalisationStats]:
        """Install for the duration of a ``with`` block (tests, evaluating another data set)."""
        self.install()
        try:
            yield self
        finally:
            self.uninstall()


# -- computing ----------------------------------------------------------------------------


def _latitude_weights(selection: StoreSelection, weighted: bool) -> np.ndarray:
    """Per-row weights (H,) with mean 1; rows follow the selection's (decreasing) latitude."""
    if not weighted:
        return np.ones(len(selection.lat))
    return latitude_weights(selection.lat).numpy()


def _finish(total: np.ndarray, squares: np.ndarray, count: float,
            shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean_shifted = total / count
    variance = np.clip(squares / count - mean_shifted**2, 0.0, None)
    mean = mean_shifted + shift
    std = np.sqrt(variance)
    constant = (std == 0) | (std <= _CONSTANT_REL * np.abs(mean))
    return mean, np.where(constant, 1.0, std)


def merge_statistics(base: NormalisationStats | None, given: NormalisationStats | None,
                     base_name: str) -> NormalisationStats | None:
    """``given`` over ``base`` (statistics carried by pretrained weights); warns where ``given``
    changes statistics the pretrained model was fit with."""
    if base is None or given is None:
        return given if base is None else base
    changed = sorted(k for k in given.locations if k in base.locations and
                     (not math.isclose(given.locations[k], base.locations[k], rel_tol=1e-6) or
                      not math.isclose(given.scales[k], base.scales[k], rel_tol=1e-6)))
    if changed:
        warnings.warn(f"stats override the normalisation of {base_name} for {changed}: the "
                      "pretrained weights were fit with the originals", stacklevel=5)
    added = sorted(set(given.locations) - set(base.locations))
    source = f"{base.source or base_name}" + (f" + {given.source or 'given'} ({', '.join(added)})"
                                              if added or changed else "")
    return NormalisationStats(locations={**base.locations, **given.locations},
                              scales={**base.scales, **given.scales}, period=base.period,
                              latitude_weighted=base.latitude_weighted, n_times=base.n_times,
                              source=source)


def model_statistics(preset: str, carried: NormalisationStats | None,
                     given: NormalisationStats | None, required: Sequence[str],
                     levels: Sequence[int | float]) -> NormalisationStats:
    """The statistics a model reads: ``given`` over those ``carried`` by its weights, for
    exactly the keys ``required``; a clear error when there are none or keys are missing."""
    merged = merge_statistics(carried, given, f"the {preset} weights")
    if merged is None:
        raise ValueError(f"{preset} has no normalisation statistics of its own: pass stats= "
                         "(weatherpeft.data.stats.compute_stats over the training period) "
                         f"covering {list(required)}")
    return merged.require(required, f"{preset} with levels {list(levels)}")


def compute_stats(source: str | os.PathLike | xr.Dataset, spec: SampleSpec, *,
                  latitude_weighted: bool = True,
                  block_bytes: int = 64 * 2**20) -> NormalisationStats:
    """Mean and standard deviation of ``spec``'s variables over [spec.start, spec.end] only.

    Every store time inside the (inclusive) period counts, whether or not it belongs to a
    sample; nothing outside it is read. ``spec.start`` and ``spec.end`` must be given so
    that evaluation years can never leak in. Reads block by block (float64 sums, shifted by
    the first block's mean for accuracy), so stores larger than memory are fine.
    """
    ds, selection, name_of_source = open_period(source, spec, "compute_stats")
    positions = selection.positions
    weights = _latitude_weights(selection, latitude_weighted)

    locations: dict[str, float] = {}
    scales: dict[str, float] = {}
    for name, aurora_name in selection.dynamic.items():
        shift = total = squares = None
        count = 0.0
        for chunk in time_blocks(selection, positions, block_bytes):
            values = read_fields(ds, name, chunk, selection.level_index)
            check_finite(values, name, chunk, selection, name_of_source)
            # Move the level axis (if any) first: (C, n, H, W) or (1, n, H, W).
            values = np.moveaxis(values, 1, 0) if values.ndim == 4 else values[None]
            if shift is None:
                shift = values.mean(axis=(1, 2, 3), dtype=np.float64)
                total = np.zeros_like(shift)
                squares = np.zeros_like(shift)
            deviation = values.astype(np.float64) - shift[:, None, None, None]
            total += np.einsum("cnhw,h->c", deviation, weights)
            squares += np.einsum("cnhw,h->c", deviation * deviation, weights)
            count += values.shape[1] * values.shape[2] * values.shape[3]
        mean, std = _finish(total, squares, count, shift)
        if name in selection.atmos:
            for level, level_mean, level_std in zip(selection.levels, mean, std):
                key = f"{aurora_name}_{aurora_normalisation.level_to_str(level)}"
                locations[key], scales[key] = float(level_mean), float(level_std)
        else:
            locations[aurora_name], scales[aurora_name] = float(mean[0]), float(std[0])

    for name, aurora_name in selection.static.items():
        values = read_static(ds, name).astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"NaN/inf in static variable '{name}' in {name_of_source}")
        shift = np.array([values.mean()])
        deviation = values - shift[0]
        total = np.array([np.einsum("hw,h->", deviation, weights)])
        squares = np.array([np.einsum("hw,h->", deviation * deviation, weights)])
        mean, std = _finish(total, squares, float(values.size), shift)
        locations[aurora_name], scales[aurora_name] = float(mean[0]), float(std[0])

    period = (str(pd.Timestamp(selection.start)), str(pd.Timestamp(selection.end)))
    return NormalisationStats(locations=locations, scales=scales, period=period,
                              latitude_weighted=latitude_weighted, n_times=int(positions.size),
                              source=name_of_source)
