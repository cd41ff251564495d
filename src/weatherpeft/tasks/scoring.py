"""Helpers every task's loss and ``evaluate`` share: batch access, row cropping, scales, sums.

Public for tasks written outside the package (see the README, "Your own data, your own
task"). Aurora drops the last latitude row of a grid whose row count is one more than a
multiple of its patch size (a grid with both poles: 33, 121, 721 rows), so a prediction can
have one row fewer than its target: :func:`crop_rows` / :func:`match_rows` align them.
Scores follow WeatherBench2: a spatial (latitude-weighted) statistic per sample, summed over
samples with :func:`accumulate`, divided by the count at the end; :func:`channel_values`
names a per-variable value or per-level vector by channel ("2t", "z500").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import torch
from aurora import Batch
from aurora.normalisation import level_to_str

__all__ = ["accumulate", "batch_device", "channel_name", "channel_values", "crop_rows",
           "first_dynamic", "match_rows", "module_device", "scale_tensors"]


def channel_name(variable: str, level: int | float | None = None) -> str:
    """Metric name of a variable at a level: "2t", "z500", "t850" (Aurora names + hPa)."""
    if level is None:
        return variable
    level = float(level)
    return f"{variable}{int(level) if level.is_integer() else level}"


def first_dynamic(batch: Batch) -> torch.Tensor:
    """The first surface (else atmospheric) field of a batch: (B, T, [C,] H, W)."""
    fields = {**batch.surf_vars, **batch.atmos_vars}
    if not fields:
        raise ValueError("the batch holds no surface or atmospheric variable")
    return next(iter(fields.values()))


def batch_device(batch: Batch) -> torch.device:
    """Device of a batch's first dynamic variable."""
    return first_dynamic(batch).device


def module_device(model: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter (else buffer); CPU for a module with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def crop_rows(batch: Batch, height: int) -> Batch:
    """Drop trailing latitude rows down to ``height`` (what ``Batch.crop`` does for Aurora)."""
    current = batch.spatial_shape[0]
    if current == height:
        return batch
    if height > current:
        raise ValueError(f"cannot crop a batch with {current} latitude rows to {height}")
    meta = batch.metadata
    return Batch(surf_vars={k: v[..., :height, :] for k, v in batch.surf_vars.items()},
                 static_vars={k: v[..., :height, :] for k, v in batch.static_vars.items()},
                 atmos_vars={k: v[..., :height, :] for k, v in batch.atmos_vars.items()},
                 metadata=dataclasses.replace(meta, lat=meta.lat[:height]))


def match_rows(forecast: Batch, truth: Batch) -> tuple[Batch, Batch]:
    """Both batches cropped to the rows they share (the forecast may have lost the last one)."""
    height = min(forecast.spatial_shape[0], truth.spatial_shape[0])
    return crop_rows(forecast, height), crop_rows(truth, height)


def scale_tensors(scales: Mapping[str, float], surf_vars: Iterable[str],
                  atmos_vars: Iterable[str], levels: Sequence[float],
                  device: torch.device | str) -> dict[str, torch.Tensor]:
    """One scale per variable, broadcastable to its field: () surface, (C, 1, 1) atmospheric.

    ``scales`` is keyed as normalisation statistics are ("2t", "z_500"); a missing key is a
    ValueError naming it and the levels asked for.
    """
    result = {}
    for name in surf_vars:
        if name not in scales:
            raise ValueError(f"scales lack '{name}'")
        result[name] = torch.tensor(scales[name], dtype=torch.float32, device=device)
    for name in atmos_vars:
        keys = [f"{name}_{level_to_str(level)}" for level in levels]
        missing = [key for key in keys if key not in scales]
        if missing:
            raise ValueError(f"scales lack {missing} for levels {tuple(levels)}")
        result[name] = torch.tensor([scales[k] for k in keys], dtype=torch.float32,
                                    device=device)[:, None, None]
    return result


def accumulate(sums: dict, key, per_sample: torch.Tensor) -> None:
    """Add ``per_sample`` (B, …) summed over its first axis, in float64, into ``sums[key]``."""
    total = per_sample.double().sum(dim=0)
    sums[key] = sums[key] + total if key in sums else total


def channel_values(variable: str, value: torch.Tensor,
                   levels: Sequence[float]) -> list[tuple[str, float]]:
    """[(channel, value)]: one for a scalar (surface) value, one per level for a vector."""
    value = value.detach().cpu()
    if value.ndim == 0:
        return [(channel_name(variable), float(value))]
    if value.numel() != len(levels):
        raise ValueError(f"'{variable}': {value.numel()} values for {len(levels)} levels")
    return [(channel_name(variable, level), float(item)) for level, item in zip(levels, value.tolist())]
