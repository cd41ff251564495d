"""Training checkpoints: what they hold, and the store that writes, prunes and reads them.

A checkpoint (``out_dir/checkpoints/step_XXXXXXXX.pt``) holds the model, optimizer, scheduler
and hook states, every RNG state and the data position, so that resume is exact. It is
written atomically (temporary file, fsync, rename, fsync of the folder: a kill mid-save keeps
the previous one); older ones are pruned only after the new one is in place, and temporaries
left by a killed save are removed by the next one. FSDP checkpoints hold the full (gathered)
weights and optimizer state plus each rank's hook state, and resume under FSDP with the same
world size.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from weatherpeft import distributed
from weatherpeft.atomic import remove_leftovers, torch_save
from weatherpeft.training.config import TRAJECTORY_FIELDS, TrainConfig
from weatherpeft.training.divergence import check_finite_parameters
from weatherpeft.training.rng import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from weatherpeft.training.trainer import Trainer

__all__ = ["CHECKPOINT_FORMAT", "CheckpointStore", "latest_checkpoint", "load_model_state",
           "read_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "weatherpeft.checkpoint/1"
_CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The content of a weatherpeft checkpoint; a clear ValueError for anything else."""
    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, foreign pickle, ...
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a weatherpeft checkpoint (format {CHECKPOINT_FORMAT})")
    return content


def load_model_state(model: torch.nn.Module, path: str | os.PathLike) -> int:
    """Load only the model weights of a checkpoint into ``model``; returns its step.

    For evaluation: no optimizer, scheduler or RNG is touched. A checkpoint written with
    ``checkpoint_trainable_only`` holds only trainable weights and buffers; the rest of
    ``model`` must already be the same pretrained weights.
    """
    content = read_checkpoint(path)
    model.load_state_dict(content["model"], strict=not content.get("trainable_only", False))
    return int(content["step"])


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``out_dir/checkpoints``, or None."""
    return CheckpointStore(out_dir).latest()


class CheckpointStore:
    """The checkpoints of one run folder, ``out_dir/checkpoints``.

    :meth:`save` and :meth:`load` take the Trainer whose state they write or restore;
    distributed, every rank calls them.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.folder = Path(out_dir) / "checkpoints"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint, oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _CHECKPOINT_NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def save(self, trainer: Trainer) -> Path:
        """Write ``step_XXXXXXXX.pt`` for the trainer's step atomically; prune all but the
        newest ``keep_checkpoints``.

        Raises :class:`~weatherpeft.training.divergence.DivergenceError` instead of saving a
        model with a non-finite parameter. Distributed: FSDP gathers the full weights,
        optimizer state and every rank's hook state, rank 0 writes, and all wait for the file.
        """
        check_finite_parameters(trainer.model, world_size=trainer.world_size, step=trainer.step,
                                lr=trainer.last_lr)
        content = _content(trainer)
        path = self.folder / f"step_{trainer.step:08d}.pt"
        if trainer.is_main:
            remove_leftovers(self.folder, "step_*.pt")
            torch_save(path, content)
            for _, old in self.checkpoints()[:-trainer.config.keep_checkpoints]:
                old.unlink(missing_ok=True)
        if trainer.world_size > 1:
            distributed.barrier()
        return path

    def load(self, trainer: Trainer, path: str | os.PathLike) -> None:
        """Restore model, optimizer, scheduler, hooks, RNG states and data position."""
        content = read_checkpoint(path)
        _check_resumable(content, path, trainer.config, trainer.strategy, trainer.world_size)
        distributed.load_full_model_state(trainer.model, content["model"],
                                          strict=not content["trainable_only"])
        _load_optimizer_state(trainer, content["optimizer"])
        trainer.scheduler.load_state_dict(content["scheduler"])
        hook_states = content["hooks_by_rank"][distributed.rank()] if "hooks_by_rank" in content \
            else content["hooks"]
        if len(hook_states) != len(trainer.hooks):
            raise ValueError(f"{path} holds the state of {len(hook_states)} hook(s); "
                             f"this trainer has {len(trainer.hooks)}")
        for hook, state in zip(trainer.hooks, hook_states):
            hook.load_state_dict(state)
        restore_rng_state(content["rng"])
        trainer.step = int(content["step"])
        trainer.epoch = int(content["epoch"])
        trainer.batch_in_epoch = int(content["batch_in_epoch"])
        trainer.skipped_steps = int(content.get("skipped_steps", 0))


def _content(trainer: Trainer) -> dict[str, Any]:
    """What a checkpoint of ``trainer`` holds (see the module doc)."""
    config = trainer.config
    hooks = [hook.state_dict() for hook in trainer.hooks]
    content = {
        "format": CHECKPOINT_FORMAT,
        "step": trainer.step,
        "epoch": trainer.epoch,
        "batch_in_epoch": trainer.batch_in_epoch,
        "skipped_steps": trainer.skipped_steps,
        "trainable_only": config.checkpoint_trainable_only,
        "model": _model_state(trainer.model, config.checkpoint_trainable_only),
        "optimizer": _optimizer_state(trainer),
        "scheduler": trainer.scheduler.state_dict(),
        "hooks": hooks,
        "rng": capture_rng_state(),
        "config": json.dumps(config.to_dict()),
        "strategy": trainer.strategy,
        "world_size": trainer.world_size,
    }
    sharded = trainer.strategy == "fsdp" and trainer.world_size > 1
    if sharded and any(hooks):  # hook state refers to this rank's shards: keep every rank's
        content["hooks"] = [{} for _ in trainer.hooks]
        content["hooks_by_rank"] = distributed.gather_objects(hooks)
    return content


def _model_state(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    state = distributed.full_model_state(model)  # FSDP: gathered on rank 0 only
    if not trainable_only:
        return state
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    parameters = {name for name, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in trainable or k not in parameters}


def _optimizer_state(trainer: Trainer) -> dict[str, Any]:
    if trainer.strategy != "fsdp":
        return trainer.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(trainer.model, trainer.optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(trainer: Trainer, state: dict[str, Any]) -> None:
    if trainer.strategy != "fsdp":
        trainer.optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: masked parameters have no AdamW state (their update keeps its own)
    set_optimizer_state_dict(trainer.model, trainer.optimizer, state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def _check_resumable(content: dict[str, Any], path: str | os.PathLike, config: TrainConfig,
                     strategy: str, world_size: int) -> None:
    """Refuse a checkpoint whose optimizer or hook state cannot load here; warn when changed
    settings or world size make the resumed run differ from an uninterrupted one."""
    saved = json.loads(content["config"])
    current = config.to_dict()
    changed = [k for k in TRAJECTORY_FIELDS if saved.get(k) != current.get(k)]
    if changed:
        log.warning("resuming %s with changed settings %s: the run will not match an "
                    "uninterrupted one", path, {k: (saved.get(k), current.get(k)) for k in changed})
    saved_strategy = content.get("strategy", "none")
    if (saved_strategy == "fsdp") != (strategy == "fsdp"):
        raise ValueError(f"{path} was written under strategy '{saved_strategy}'; its optimizer "
                         f"state does not load under '{strategy}'")
    saved_world = int(content.get("world_size", 1))
    if saved_world != world_size:
        if "hooks_by_rank" in content:
            raise ValueError(f"{path} holds the per-shard state of {saved_world} FSDP ranks; "
                             f"resume it with {saved_world} processes, not {world_size}")
        log.warning("resuming %s, written by %d process(es), with %d: the global batch "
                    "changes, the run will not match an uninterrupted one", path, saved_world,
                    world_size)
