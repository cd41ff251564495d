"""Collated batches: moving them to a device, counting their samples."""

from __future__ import annotations

from typing import Any

import torch
from aurora import Batch

__all__ = ["batch_size", "move_to"]


def move_to(value: Any, device: torch.device | str) -> Any:
    """Move a Batch, tensor, or tuple/list/dict of them to ``device``."""
    if isinstance(value, (Batch, torch.Tensor)):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to(v, device) for v in value)
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


def batch_size(batch: Any) -> int:
    """Number of samples in a collated (input, target) batch."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(first, Batch):
        return int(next(iter({**first.surf_vars, **first.atmos_vars}.values())).shape[0])
    if isinstance(first, torch.Tensor):
        return int(first.shape[0])
    return 1
