"""The training settings: :class:`TrainConfig` and its validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from weatherpeft import distributed

__all__ = ["TRAJECTORY_FIELDS", "TrainConfig"]

#: Fields whose change makes a resumed run differ from an uninterrupted one.
TRAJECTORY_FIELDS = ("batch_size", "lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio",
                     "grad_clip", "accumulation_steps", "seed", "steps")


@dataclass
class TrainConfig:
    """Everything the loop needs; every field is a CLI flag via :mod:`weatherpeft.config`.

    ``steps`` counts optimizer steps; each takes ``accumulation_steps`` micro-batches of
    ``batch_size`` samples (an epoch drops its last incomplete batch). The learning rate
    warms up linearly over ``warmup_steps`` then decays with a cosine to ``lr ×
    min_lr_ratio``. ``grad_clip`` is a max global norm (0 = off). ``val_every``,
    ``checkpoint_every`` and ``log_every`` are in steps (0 = never; a final checkpoint is
    always written). ``amp="bf16"`` autocasts on CUDA and is a no-op on CPU (under FSDP it
    also keeps parameters in bf16 for compute). ``device`` "auto" picks CUDA when available
    (the rank's own GPU under torchrun). ``strategy``: "none" | "ddp" | "fsdp" (multi-process
    under torchrun; ``batch_size`` is then per rank, see the module doc).

    ``on_nonfinite``: what a non-finite loss or gradient norm does — "stop" raises
    :class:`DivergenceError`; "skip" drops that update (no optimizer, scheduler or hook step;
    ``step`` does not advance, the data does, so the next batches redo the step), warns, and
    counts it in ``skipped_steps``; more than ``max_skipped_steps`` skips in a run raise
    :class:`DivergenceError`.
    """

    steps: int = 1000
    batch_size: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0
    accumulation_steps: int = 1
    val_every: int = 0
    val_batches: int = 8
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    checkpoint_trainable_only: bool = False
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    out_dir: str = "runs/train"
    amp: str = "none"
    activation_checkpointing: bool = False
    device: str = "auto"
    progress: bool = True
    strategy: str = "none"
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "accumulation_steps", "val_batches", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "val_every", "checkpoint_every", "log_every", "num_workers",
                     "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must not be negative, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"TrainConfig: need lr > 0, weight_decay ≥ 0, grad_clip ≥ 0; got "
                             f"{self.lr}, {self.weight_decay}, {self.grad_clip}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must hold two values, got {self.betas}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"TrainConfig.amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"TrainConfig.on_nonfinite must be 'stop' or 'skip', "
                             f"got {self.on_nonfinite!r}")
        if self.strategy not in distributed.STRATEGIES:
            raise ValueError(f"TrainConfig.strategy must be one of {distributed.STRATEGIES}, "
                             f"got {self.strategy!r}")
        self.out_dir = str(self.out_dir)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
