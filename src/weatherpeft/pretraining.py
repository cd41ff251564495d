"""Pretraining a backbone from random weights on 6-hour forecasting (``weatherpeft pretrain``).

The finished backbone is saved to ``PretrainConfig.export`` with ``pretraining.json`` (the
settings and the fit summary, which the model card reads).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from weatherpeft import distributed
from weatherpeft.atomic import write_json
from weatherpeft.backbones import PRITHVI_PRESETS, build_backbone
from weatherpeft.tasks.forecasting import ForecastingTask
from weatherpeft.tasks.grid import preset_grid
from weatherpeft.train import TrainConfig, Trainer, seed_everything

__all__ = ["PretrainConfig", "run_pretraining"]


@dataclass
class PretrainConfig:
    """What to pretrain on, and where the finished backbone goes."""

    store: str = "data/pretraining/pretraining.zarr"
    preset: str = "aurora-tiny"  # or "prithvi-tiny" (any preset of weatherpeft.backbones)
    train_start: str = "2000-01-01T06:00"
    train_end: str = "2002-11-30T18:00"
    val_start: str = "2002-12-01T00:00"
    val_end: str = "2002-12-31T18:00"
    export: str = "models/aurora-tiny"
    loss_scales: str = "tendency"  # "tendency" (errors / RMS 6-h change) or "state" (errors / std)
    threads: int = 1  # torch threads; 1 is fastest on a shared 2-core machine


def run_pretraining(cfg: PretrainConfig, train_cfg: TrainConfig,
                    resume: bool = False) -> dict[str, Any] | None:
    """Train ``cfg.preset`` from random weights and save it to ``cfg.export``; returns
    pretraining.json's content (None on the ranks other than 0 under torchrun)."""
    periods = {"train": (cfg.train_start, cfg.train_end), "val": (cfg.val_start, cfg.val_end),
               "test": (cfg.val_start, cfg.val_end)}
    # statistics from the training period; roll-out skill is `weatherpeft evaluate`'s job
    if cfg.loss_scales not in ("tendency", "state"):
        raise ValueError(f"--loss-scales must be 'tendency' or 'state', got {cfg.loss_scales!r}")
    task = ForecastingTask(cfg.store, periods, lead_steps=(1,),
                           loss_scales="tendency" if cfg.loss_scales == "tendency" else None,
                           grid=preset_grid(cfg.preset))
    stats = task.stats
    seed_everything(train_cfg.seed)
    extra = {}
    if cfg.preset in PRITHVI_PRESETS:
        # Prithvi de-normalises its output per channel; with the temporal residual the analog
        # of its published anomaly scales is the RMS 6-h change the task measured.
        extra["output_scales"] = task.loss_scales
    backbone = build_backbone(cfg.preset, stats=stats, levels=task.variables.levels, random_init=True,
                              activation_checkpointing=train_cfg.activation_checkpointing, **extra)
    trainer = Trainer(backbone, task, train_cfg)
    start = time.perf_counter()
    summary = trainer.fit(resume=resume)
    summary["wall_seconds_this_invocation"] = time.perf_counter() - start
    summary["resumed"] = bool(resume)
    # under torchrun rank 0 writes; FSDP: from a gathered copy
    backbone = distributed.consolidated_copy(backbone, lambda: build_backbone(
        cfg.preset, stats=stats, levels=task.variables.levels, random_init=True, **extra))
    if not distributed.is_main():
        return None
    backbone.save_checkpoint(cfg.export)
    about = {"pretraining": {**asdict(cfg), **asdict(train_cfg)}, "fit": summary}
    write_json(Path(cfg.export) / "pretraining.json", about)
    return about
