"""The optimizer: AdamW over decay/no-decay parameter groups, linear warm-up then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from weatherpeft.training.config import TrainConfig

__all__ = ["build_optimizer", "default_param_groups", "lr_factor", "only_trainable"]


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at 0-based optimizer step ``step``.

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps (the first step already
    moves; the last warm-up step is at the full rate). Then cosine from 1 at step
    ``warmup_steps`` to ``min_lr_ratio`` at step ``total_steps``:
    r + (1 − r)·½(1 + cos(π·p)), p = (step − warmup) / (total − warmup), clipped to [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on trainable tensors with ndim ≥ 2, none on 1-D ones.

    1-D parameters are biases, norm scales/shifts and similar vectors; decaying them to
    zero only hurts. Frozen parameters (``requires_grad=False``) are left out entirely.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    if not groups:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return groups


def only_trainable(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Caller-supplied groups without frozen parameters; empty groups dropped."""
    kept = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            kept.append({**group, "params": params})
    if not kept:
        raise ValueError("the parameter groups hold no trainable parameters")
    return kept


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig,
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``groups`` and its schedule (:func:`lr_factor` over ``config.steps``)."""
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total_steps=config.steps, warmup_steps=config.warmup_steps,
                           min_lr_ratio=config.min_lr_ratio))
    return optimizer, scheduler
