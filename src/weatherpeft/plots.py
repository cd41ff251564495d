"""Maps for people: prediction, truth and error of one field, side by side, as a PNG.

Prediction and truth share one colour scale (the range of both); the error uses a diverging
scale symmetric about zero, so its sign reads at a glance. Latitude rows may run either way;
the map is drawn north up. Written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from weatherpeft.atomic import atomic_write

__all__ = ["save_field_maps", "save_task_map"]


def _array(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().to("cpu").float().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"a map needs a 2-D (lat, lon) field, got shape {array.shape}")
    return array


def save_field_maps(prediction, truth, lat, lon, path: str | os.PathLike, *, title: str,
                    units: str = "") -> Path:
    """Write a three-panel PNG (prediction, truth, prediction − truth) of (lat, lon) fields."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prediction, truth = _array(prediction), _array(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    lat, lon = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    if lat.shape != (prediction.shape[0],) or lon.shape != (prediction.shape[1],):
        raise ValueError(f"coordinates lat {lat.shape} / lon {lon.shape} do not match the field "
                         f"{prediction.shape}")
    if lat[0] < lat[-1]:  # draw north up
        lat, prediction, truth = lat[::-1], prediction[::-1], truth[::-1]
    error = prediction - truth
    low, high = float(np.nanmin([prediction.min(), truth.min()])), float(np.nanmax([prediction.max(), truth.max()]))
    bound = float(np.nanmax(np.abs(error))) or 1.0
    extent = (lon[0], lon[-1], lat[-1], lat[0])
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.6), constrained_layout=True)
    panels = ((prediction, "prediction", "viridis", low, high),
              (truth, "truth", "viridis", low, high),
              (error, "prediction − truth", "RdBu_r", -bound, bound))
    for axis, (field, name, colours, vmin, vmax) in zip(axes, panels):
        image = axis.imshow(field, extent=extent, cmap=colours, vmin=vmin, vmax=vmax,
                            aspect="auto", interpolation="nearest")
        axis.set_title(name)
        axis.set_xlabel("longitude (°E)")
        axis.set_ylabel("latitude (°N)")
        figure.colorbar(image, ax=axis, label=units)
    figure.suptitle(title)
    try:
        return atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    finally:
        plt.close(figure)


def save_task_map(model, task, variable: str, path: str | os.PathLike, *, sample: int = 0,
                  split: str = "test") -> Path:
    """Maps of ``variable`` ("2t", or "t_850" for a level) predicted by ``model`` for sample
    ``sample`` of the task's ``split``, beside the truth and the error."""
    import torch

    with torch.no_grad():
        prediction, truth = task.sample_prediction(model, split, sample)
    name, _, level = variable.partition("_")
    if name in prediction.surf_vars:
        fields = prediction.surf_vars[name][0, -1], truth.surf_vars[name][0, -1]
    elif name in prediction.atmos_vars and level:
        levels = [int(value) for value in truth.metadata.atmos_levels]
        if not level.isdigit() or int(level) not in levels:
            raise ValueError(f"level {level!r} is not among the task's levels {levels}")
        index = levels.index(int(level))
        fields = prediction.atmos_vars[name][0, -1, index], truth.atmos_vars[name][0, -1, index]
    else:
        known = list(prediction.surf_vars) + [f"{v}_<level>" for v in prediction.atmos_vars]
        raise ValueError(f"map variable {variable!r} is not predicted; choose from {known}")
    metadata = truth.metadata
    return save_field_maps(*fields, metadata.lat, metadata.lon, path,
                           title=f"{task.name}: {variable} at {metadata.time[0]:%Y-%m-%d %H:%M}")
