"""The Trainer shared by pretraining, fine-tuning and the benchmark.

One loop for every method and task: AdamW with decay/no-decay parameter groups, linear
warm-up then cosine decay, gradient accumulation and clipping, bf16 autocast on CUDA,
periodic validation, a JSONL metric log, atomic checkpoints and exact resume. Methods plug
in through hooks (objects with optional ``on_fit_start``, ``on_before_optimizer_step``,
``on_after_optimizer_step``, ``state_dict`` and ``load_state_dict``); the loop has no
special cases for any of them.

Reproducibility: python, numpy and torch are seeded from ``TrainConfig.seed``; the data
order of epoch e is a permutation drawn from its own generator seeded by (seed, e), so the
position in the data is two integers (epoch, batches consumed) that a checkpoint records
with every RNG state. Validation and evaluation run under a forked RNG, so they never
change the training trajectory. On CPU, N steps straight and N/2 + resume + N/2 give
bit-identical weights.

Distributed (``TrainConfig.strategy`` "ddp" or "fsdp", launched by torchrun; see
:mod:`weatherpeft.distributed`): ``batch_size`` is per rank, so the global batch is
``batch_size × world size``. Every rank draws the same epoch permutation and takes its
contiguous slice of each global batch — the global batch is exactly the single-process
batch of ``batch_size × world`` samples, and resume stays exact (the data position counts
global batches). Losses and validation are reduced over ranks; only rank 0 logs, shows
progress and writes metric files and checkpoints. Hooks get the Trainer, whose ``model`` is
the unwrapped module (the DDP wrapper is ``trainer.wrapped``; FSDP shards ``model`` in place,
so its parameters are then DTensors). FSDP checkpoints hold the full (gathered) weights and
optimizer state plus each rank's hook state, and resume under FSDP with the same world size.

Faults. Preemption: SIGTERM or SIGINT during the training loop of :meth:`Trainer.fit` lets
the current optimizer step finish, checkpoints it and raises :class:`TrainingInterrupted`
(a second signal aborts at once); ``fit(resume=True)`` then continues exactly. Under torchrun
the ranks agree once per step, so all stop after the same step. Checkpoints are written
atomically (temporary file, fsync, rename, fsync of the folder), so a kill mid-save keeps
the previous one; older ones are pruned only after the new one is in place, and temporaries
left by a killed save are removed by the next one. Divergence: a non-finite loss or gradient
norm never reaches ``optimizer.step()``; ``TrainConfig.on_nonfinite`` either stops with a
:class:`DivergenceError` that says where the first non-finite value came from, or skips the
update; a checkpoint of non-finite weights is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from aurora import Batch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from weatherpeft import distributed
from weatherpeft.atomic import remove_leftovers, torch_save, write_text
from weatherpeft.tasks.base import Task, ignore_stop_signals

__all__ = [
    "CHECKPOINT_FORMAT",
    "DivergenceError",
    "TrainConfig",
    "Trainer",
    "TrainerHook",
    "TrainingInterrupted",
    "default_param_groups",
    "epoch_permutation",
    "latest_checkpoint",
    "load_model_state",
    "lr_factor",
    "move_to",
    "seed_everything",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "weatherpeft.checkpoint/1"
_CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})\.pt$")
METRICS_FILE = "metrics.jsonl"
#: Signals that make :meth:`Trainer.fit` checkpoint and stop after the current step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(BaseException):
    """:meth:`Trainer.fit` stopped on a signal, after finishing a step and checkpointing it.

    ``signum``: the signal; ``step``: completed optimizer steps, all in ``checkpoint``;
    ``exit_code``: the shell's convention 128 + signal (143 for SIGTERM, 130 for SIGINT).
    A BaseException, like KeyboardInterrupt, so ``except Exception`` does not swallow a
    request to stop. Continue with ``fit(resume=True)``.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return (f"training stopped by {signal.Signals(self.signum).name} after step {self.step}; "
                f"checkpoint {self.checkpoint} (resume to continue)")


class DivergenceError(FloatingPointError):
    """A non-finite loss, gradient or weight; the message names the step, the learning rate
    and where the first non-finite value was found. ``exit_code`` is the CLI's exit status."""

    exit_code = 1

    def __init__(self, message: str, *, step: int, lr: float):
        super().__init__(message)
        self.step, self.lr = step, lr


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


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


#: Fields whose change makes a resumed run differ from an uninterrupted one.
_TRAJECTORY_FIELDS = ("batch_size", "lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio",
                      "grad_clip", "accumulation_steps", "seed", "steps")


class TrainerHook(Protocol):
    """What a method may plug into the loop; every member is optional (duck-typed).

    ``on_fit_start(trainer)``: once per :meth:`Trainer.fit`, after any resume.
    ``on_after_backward(trainer, step)``: after backward of all micro-batches, before
    gradient clipping — full gradients, for selection methods to read and mask; called only
    when the loss and every gradient are finite.
    ``on_before_optimizer_step(trainer, step)``: after gradient clipping, before
    ``optimizer.step()`` — gradients are final here. ``on_after_optimizer_step(trainer,
    step)``: after ``optimizer.step()`` and the scheduler. ``step`` is the 0-based index of
    this optimizer step (``trainer.step`` is the number of completed steps); an update
    skipped for a non-finite value calls none of these, and the next batches redo the same
    ``step``. ``state_dict()``/``load_state_dict()`` make the hook's state part of
    checkpoints; it must hold only tensors and plain Python values.
    ``rebind_parameters(mapping)``: under FSDP, once, when the Trainer is built — sharding
    replaced the model's parameters by new DTensor objects, ``mapping`` is id(old) → new; a
    hook holding parameters must follow them, or raise if it cannot work on shards.
    Under DDP, gradients seen by hooks are already averaged over ranks.
    """


# --------------------------------------------------------------------------------------
# Small pure pieces
# --------------------------------------------------------------------------------------


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


def _only_trainable(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Caller-supplied groups without frozen parameters; empty groups dropped."""
    kept = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            kept.append({**group, "params": params})
    if not kept:
        raise ValueError("the parameter groups hold no trainable parameters")
    return kept


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _generator(*entropy: int) -> torch.Generator:
    """A torch generator seeded from integers via numpy's SeedSequence (well mixed)."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of range(n) from its own generator."""
    return torch.randperm(n, generator=_generator(seed, epoch))


def _init_worker(worker_id: int) -> None:
    """DataLoader worker init: seed python and numpy from torch's per-worker seed; ignore the
    stop signals (the main process finishes its step first, then shuts the workers down)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    ignore_stop_signals(worker_id)


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


def _first_nonfinite(value: Any, path: str) -> str | None:
    """Where the first NaN or infinity in ``value`` is — ``path`` extended by field, key or
    position (Batches and other dataclasses, dicts, tuples, lists of tensors) and the index
    of the entry — or None if every floating-point value is finite."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return None
        bad = ~torch.isfinite(distributed.local_tensor(value.detach()))
        if not bad.any():
            return None
        return f"{path} at index {tuple(torch.nonzero(bad)[0].tolist())}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items: Iterable[tuple[str, Any]] = ((f".{field.name}", getattr(value, field.name))
                                            for field in dataclasses.fields(value))
    elif isinstance(value, Mapping):
        items = ((f"[{key!r}]", item) for key, item in value.items())
    elif isinstance(value, (tuple, list)):
        items = ((f"[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for suffix, item in items:
        found = _first_nonfinite(item, path + suffix)
        if found:
            return found
    return None


def _first_nonfinite_name(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or infinity (under FSDP,
    in this rank's shard), or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(distributed.local_tensor(tensor)).all():
            return name
    return None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``out_dir/checkpoints``, or None."""
    found = _checkpoints(out_dir)
    return found[-1][1] if found else None


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
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
    content = _read_checkpoint(path)
    model.load_state_dict(content["model"], strict=not content.get("trainable_only", False))
    return int(content["step"])


def _rng_state() -> dict[str, Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------


class Trainer:
    """Train ``model`` on ``task`` under ``config``; see the module docstring.

    ``model`` is any module; the task decides how it is called (by default
    ``task.loss(model(input), target)``). ``param_groups`` replaces
    :func:`default_param_groups` (frozen parameters are dropped from it). ``hooks`` are
    called in order at the points described in :class:`TrainerHook`.
    """

    def __init__(self, model: torch.nn.Module, task: Task, config: TrainConfig, *,
                 hooks: Sequence[object] = (),
                 param_groups: Sequence[Mapping[str, Any]] | None = None):
        self.config = config
        self.task = task
        self.strategy = config.strategy
        self.device = _resolve_device(config.device)
        if self.strategy != "none" and not distributed.init(self.device):
            log.warning("strategy '%s' without torchrun: training in this one process", self.strategy)
            self.strategy = "none"
        elif self.strategy == "none" and distributed.launched():
            raise ValueError(f"launched as {os.environ.get('WORLD_SIZE')} processes but "
                             "TrainConfig.strategy is 'none': choose 'ddp' or 'fsdp'")
        self.device = distributed.device_for_rank(self.device)
        self.model = model.to(self.device)
        self.hooks = list(hooks)
        self.out_dir = Path(config.out_dir)
        if config.amp == "bf16" and self.device.type != "cuda":
            log.info("amp='bf16' requested on %s: autocast is CUDA-only, running in float32",
                     self.device)
        if config.activation_checkpointing:
            configure = getattr(model, "configure_activation_checkpointing", None)
            if callable(configure):
                configure()
            else:
                log.warning("activation_checkpointing requested but %s has no "
                            "configure_activation_checkpointing(); ignored", type(model).__name__)
        groups = default_param_groups(model, config.weight_decay) if param_groups is None \
            else _only_trainable(param_groups)
        #: What forward and backward run through: the DDP wrapper, else ``model`` itself.
        self.wrapped = self._wrap(groups)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, total_steps=config.steps,
                                    warmup_steps=config.warmup_steps,
                                    min_lr_ratio=config.min_lr_ratio))
        #: Completed optimizer steps.
        self.step = 0
        #: Data position: the epoch and how many of its batches were consumed.
        self.epoch = 0
        self.batch_in_epoch = 0
        #: Updates dropped for a non-finite loss or gradient (``on_nonfinite="skip"``).
        self.skipped_steps = 0
        #: The stop signal received during :meth:`fit` (0: none).
        self._stop_signal = 0
        #: Most recent values, for hooks and callers.
        self.last_loss: float | None = None
        self.last_grad_norm: float | None = None
        self.last_val_loss: float | None = None
        self.last_lr: float = self.optimizer.param_groups[0]["lr"]

    # -- distribution -------------------------------------------------------------------

    def _wrap(self, groups: list[dict[str, Any]]) -> torch.nn.Module:
        """Wrap for the strategy; under FSDP, point ``groups`` and hooks at the new DTensors."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        wrapped = distributed.wrap_model(self.model, self.strategy, self.device,
                                         mixed_precision=self.config.amp == "bf16")
        if self.strategy == "fsdp":
            live = dict(self.model.named_parameters())
            mapping = {old: live[name] for old, name in names.items()}
            for group in groups:
                group["params"] = [mapping[id(p)] for p in group["params"]]
            for hook in self.hooks:
                if hasattr(hook, "rebind_parameters"):
                    hook.rebind_parameters(mapping)
        return wrapped

    @property
    def world_size(self) -> int:
        """Processes training this model together (1 unless strategy is ddp or fsdp)."""
        return distributed.world_size() if self.strategy != "none" else 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes files: rank 0, or a process training alone."""
        return self.world_size == 1 or distributed.is_main()

    def _gradient_sync(self, enabled: bool) -> AbstractContextManager:
        """Skip the gradient reduction of all but the last micro-batch of a step."""
        if enabled or self.strategy == "none":
            return nullcontext()
        if self.strategy == "ddp":
            return self.wrapped.no_sync()
        return _fsdp_no_sync(self.model)

    # -- contexts -----------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast on CUDA when ``amp="bf16"``; otherwise nothing."""
        if self.config.amp == "bf16" and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _fork_rng(self) -> AbstractContextManager:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    # -- data ---------------------------------------------------------------------------

    def _train_batches(self, dataset: Dataset) -> Iterator[Any]:
        """Collated training batches from the current (epoch, batch_in_epoch), forever."""
        cfg = self.config
        world, rank = self.world_size, distributed.rank() if self.world_size > 1 else 0
        global_batch = cfg.batch_size * world
        n_batches = len(dataset) // global_batch
        if n_batches == 0:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than "
                             f"batch_size {cfg.batch_size}" + (f" × {world} ranks" if world > 1 else ""))
        while True:
            order = epoch_permutation(len(dataset), cfg.seed, self.epoch).tolist()
            # Every rank: its contiguous slice of each global batch of the same permutation.
            batches = [order[i * global_batch + rank * cfg.batch_size:
                             i * global_batch + (rank + 1) * cfg.batch_size]
                       for i in range(self.batch_in_epoch, n_batches)]
            # Its own generator: creating the loader's iterator must not draw from the
            # global RNG (a resumed run creates one mid-epoch, an uninterrupted one not).
            loader = DataLoader(dataset, batch_sampler=batches, collate_fn=self.task.collate,
                                num_workers=cfg.num_workers,
                                generator=_generator(cfg.seed, self.epoch, 1,
                                                     *((rank,) if world > 1 else ())),
                                worker_init_fn=_init_worker if cfg.num_workers else None)
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    # -- one optimizer step -------------------------------------------------------------

    def _parameters_with_grad(self) -> list[torch.Tensor]:
        """Every trainable parameter holding a gradient (also those a hook updates itself)."""
        return [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]

    def _gradient_norm(self) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """The parameters holding a gradient, the global norm of their gradients, its value."""
        parameters = self._parameters_with_grad()
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters]) if parameters \
            else torch.zeros(())
        return parameters, norm, float(norm.full_tensor() if distributed.is_dtensor(norm) else norm)

    def start_hooks(self) -> None:
        """Call every hook's ``on_fit_start`` (by :meth:`fit`, and once by hand-written loops)."""
        for hook in self.hooks:
            if hasattr(hook, "on_fit_start"):
                hook.on_fit_start(self)

    def _train_step(self, batches: Iterator[Any]) -> tuple[float, float] | None:
        """One optimizer step over ``accumulation_steps`` micro-batches: (loss, gradient norm),
        or None when a non-finite loss or gradient made it skip the update.

        Finiteness is checked on the loss, then on the gradients before ``on_after_backward``
        (hooks never see a non-finite gradient), then again after those hooks.
        """
        cfg = self.config
        self.model.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        micro_batches = []
        for micro in range(cfg.accumulation_steps):
            micro_batches.append(next(batches))
            batch = move_to(micro_batches[-1], self.device)
            with self._gradient_sync(micro == cfg.accumulation_steps - 1):
                with self.autocast():
                    loss = self.task.training_loss(self.wrapped, batch)
                (loss / cfg.accumulation_steps).backward()
            total += loss.detach().float()
        if self.world_size > 1:  # the mean over ranks: the loss of the global batch
            total = distributed.all_reduce(total, "mean")
        loss_value = float(total) / cfg.accumulation_steps
        return self.apply_gradients(loss_value, partial(self._diagnose_loss, micro_batches))

    def apply_gradients(self, loss_value: float,
                        diagnose_loss: Callable[[], str]) -> tuple[float, float] | None:
        """Everything of one optimizer step after backward: finiteness checks, the hooks,
        gradient clipping, ``optimizer.step()`` and the schedule. (loss, gradient norm), or None
        when a non-finite loss or gradient made it skip the update.

        Shared by :meth:`fit` and hand-written loops (:mod:`weatherpeft.api`), so that the
        methods' hooks run in one order everywhere. ``diagnose_loss()`` says where a
        non-finite ``loss_value`` came from.
        """
        cfg = self.config
        if not math.isfinite(loss_value):
            return self._non_finite(f"training loss is {loss_value}", diagnose_loss)
        grads, norm, grad_norm = self._gradient_norm()
        backward_hooks = [hook for hook in self.hooks if hasattr(hook, "on_after_backward")]
        if backward_hooks and math.isfinite(grad_norm):
            for hook in backward_hooks:
                hook.on_after_backward(self, self.step)
            grads, norm, grad_norm = self._gradient_norm()  # hooks may mask gradients
        if not math.isfinite(grad_norm):
            return self._non_finite(f"gradient norm is {grad_norm} (loss {loss_value:.6g})",
                                    self._diagnose_gradients)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(grads, cfg.grad_clip, norm)
        step = self.step
        for hook in self.hooks:
            if hasattr(hook, "on_before_optimizer_step"):
                hook.on_before_optimizer_step(self, step)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        for hook in self.hooks:
            if hasattr(hook, "on_after_optimizer_step"):
                hook.on_after_optimizer_step(self, step)
        self.last_loss, self.last_grad_norm = loss_value, grad_norm
        return loss_value, grad_norm

    # -- non-finite values --------------------------------------------------------------

    def _non_finite(self, what: str, diagnose: Callable[[], str]) -> None:
        """Drop this step's gradients; raise :class:`DivergenceError` (``on_nonfinite="stop"``
        or too many skips) or warn and count the skipped update."""
        cfg = self.config
        lr = self.optimizer.param_groups[0]["lr"]
        where = diagnose()
        if self.world_size > 1:
            where = f"rank {distributed.rank()}: {where}"
        message = f"{what} at step {self.step} (lr {lr:.6g}); {where}"
        self.model.zero_grad(set_to_none=True)
        if cfg.on_nonfinite == "stop":
            raise DivergenceError(message, step=self.step, lr=lr)
        self.skipped_steps += 1
        if self.skipped_steps > cfg.max_skipped_steps:
            raise DivergenceError(f"{message} — {self.skipped_steps} updates skipped, more than "
                                  f"max_skipped_steps={cfg.max_skipped_steps}", step=self.step, lr=lr)
        log.warning("update skipped (%d of at most %d): %s", self.skipped_steps,
                    cfg.max_skipped_steps, message)

    def _diagnose_loss(self, micro_batches: Sequence[Any]) -> str:
        """Where a non-finite loss came from: the first non-finite value in a micro-batch's
        input or target, else in a weight, else in a prediction (one forward without gradients
        per micro-batch, RNG forked), else the task's loss itself."""
        batches = [move_to(batch, self.device) for batch in micro_batches]
        # Every forward first, on every rank: under FSDP forwards are collective.
        predictions = [self._first_nonfinite_prediction(batch) for batch in batches]
        suffixes = [f" of micro-batch {i}" if len(batches) > 1 else "" for i in range(len(batches))]
        for batch, suffix in zip(batches, suffixes):
            parts = zip(("input", "target"), batch) if isinstance(batch, (tuple, list)) \
                and len(batch) == 2 else [("batch", batch)]
            for label, part in parts:
                found = _first_nonfinite(part, label)
                if found:
                    return f"non-finite value in the data: {found}{suffix}"
        weight = _first_nonfinite_name(self.model.named_parameters())
        if weight:
            return f"non-finite weight '{weight}'"
        for found, suffix in zip(predictions, suffixes):
            if found:
                return f"inputs and weights are finite, the model's output is not: {found}{suffix}"
        return "inputs, targets, weights and predictions are finite: the task's loss produced it"

    def _first_nonfinite_prediction(self, batch: Any) -> str | None:
        """Where the model's output on ``batch`` (every forward, for roll-outs) is first non-finite."""
        outputs: list[Any] = []
        handle = self.model.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            with torch.no_grad(), self._fork_rng(), self.autocast():
                self.task.training_loss(self.model, batch)
        finally:
            handle.remove()
        return _first_nonfinite(outputs[0] if len(outputs) == 1 else outputs, "prediction")

    def _diagnose_gradients(self) -> str:
        """The first parameter whose gradient is non-finite."""
        name = _first_nonfinite_name((n, p.grad) for n, p in self.model.named_parameters()
                                     if p.grad is not None)
        return f"first non-finite gradient: '{name}'" if name \
            else "no gradient on this rank is non-finite"

    # -- stop signals -------------------------------------------------------------------

    @contextmanager
    def _stop_signals_caught(self) -> Iterator[None]:
        """Inside, SIGTERM and SIGINT only record a request to stop (a second one raises
        KeyboardInterrupt at once); the previous handlers are back on exit. Handlers can only
        be set in the main thread: elsewhere, signals keep their usual effect."""
        self._stop_signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_signal:
                raise KeyboardInterrupt(f"second stop signal ({signal.Signals(signum).name})")
            self._stop_signal = signum

        previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _stop_if_requested(self, saved: Path | None) -> None:
        """After a step: if a stop signal came (on any rank: they agree through one
        all-reduce), checkpoint unless ``saved`` already holds this step, and raise
        :class:`TrainingInterrupted`."""
        signum = self._stop_signal
        if self.world_size > 1:
            signum = int(distributed.all_reduce([float(signum)], "max")[0])
        if not signum:
            return
        checkpoint = saved or self.save_checkpoint()
        log.warning("%s: stopped after step %d, checkpoint %s", signal.Signals(signum).name,
                    self.step, checkpoint)
        raise TrainingInterrupted(signum, self.step, checkpoint)

    # -- the loop -----------------------------------------------------------------------

    def fit(self, resume: bool = False, until_step: int | None = None) -> dict[str, float]:
        """Train to ``config.steps`` (or stop early at ``until_step``, checkpointed).

        ``resume=True`` continues from the latest checkpoint in ``out_dir`` (a fresh start
        if there is none); a fresh start refuses an ``out_dir`` that holds checkpoints.
        Returns the last logged values (step, loss, val_loss, …) and ``skipped_steps``.

        SIGTERM or SIGINT during the training loop (main thread only): the current step
        finishes and is checkpointed, then :class:`TrainingInterrupted` is raised. A
        non-finite loss or gradient raises :class:`DivergenceError` or skips the update
        (``TrainConfig.on_nonfinite``).
        """
        cfg = self.config
        main = self.is_main
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_checkpoint(self.out_dir) if resume else None
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            if main:
                self._truncate_metrics(self.step)
            log.info("resumed from %s at step %d", checkpoint, self.step)
        else:
            if _checkpoints(self.out_dir):
                raise FileExistsError(
                    f"{self.out_dir} holds checkpoints of an earlier run; resume it (resume=True) "
                    "or choose another out_dir")
            if resume:
                log.info("no checkpoint in %s: starting from scratch", self.out_dir)
            seed_everything(cfg.seed)
            if main:
                (self.out_dir / METRICS_FILE).unlink(missing_ok=True)
                with open(self.out_dir / "config.json", "w") as stream:
                    json.dump({**cfg.to_dict(), "world_size": self.world_size}, stream, indent=1)
        if self.world_size > 1:
            distributed.barrier()  # every rank has read the folder before rank 0 writes to it
        self.start_hooks()

        target = cfg.steps if until_step is None else min(int(until_step), cfg.steps)
        summary = {"step": float(self.step), "skipped_steps": float(self.skipped_steps)}
        if self.step >= target:
            return summary
        batches = self._train_batches(self.task.datasets()["train"])
        samples_per_step = cfg.batch_size * cfg.accumulation_steps * self.world_size
        progress = tqdm(total=target, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=not (cfg.progress and main and sys.stderr.isatty()))
        window_losses: list[float] = []
        window_start, window_steps = time.perf_counter(), 0
        self.model.train()
        try:
            with self._stop_signals_caught():
                while self.step < target:
                    outcome = self._train_step(batches)
                    if outcome is None:  # a skipped update: nothing to log or save
                        self._stop_if_requested(None)
                        continue
                    loss, grad_norm = outcome
                    window_losses.append(loss)
                    window_steps += 1
                    progress.update(1)
                    record: dict[str, float] = {}
                    if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == target):
                        elapsed = time.perf_counter() - window_start
                        record.update(loss=sum(window_losses) / len(window_losses), lr=self.last_lr,
                                      grad_norm=grad_norm,
                                      samples_per_s=window_steps * samples_per_step / max(elapsed, 1e-9))
                        if cfg.on_nonfinite == "skip":
                            record["skipped_steps"] = self.skipped_steps
                        progress.set_postfix(loss=f"{record['loss']:.4g}",
                                             samples_s=f"{record['samples_per_s']:.3g}")
                        window_losses, window_start, window_steps = [], time.perf_counter(), 0
                    if cfg.val_every and self.step % cfg.val_every == 0:
                        record["val_loss"] = self.validate()
                    if record:
                        record = {"step": self.step, "epoch": self.epoch, **record}
                        if main:
                            self._log(record)
                        summary.update(record)
                    saved = None
                    if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) \
                            or self.step == target:
                        saved = self.save_checkpoint()
                    self._stop_if_requested(saved)
        finally:
            progress.close()
            batches.close()
        summary.update(step=float(self.step), skipped_steps=float(self.skipped_steps))
        return summary

    @torch.no_grad()
    def validate(self, batches: int | None = None) -> float:
        """Mean ``task`` loss over the first ``batches`` (default ``val_batches``) val batches.

        Sample-weighted; the model is put in eval mode and back; the RNG is forked so the
        training trajectory does not depend on how often validation runs.
        """
        limit = self.config.val_batches if batches is None else batches
        if self.world_size > 1:
            loader = self._distributed_val_loader(limit)
        else:
            loader = self.task.dataloader("val", self.config.batch_size,
                                          num_workers=self.config.num_workers)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            with self._fork_rng():
                for index, batch in enumerate(loader):
                    if index >= limit:
                        break
                    batch = move_to(batch, self.device)
                    size = _batch_size(batch)
                    with self.autocast():
                        loss = self.task.training_loss(self.model, batch)
                    if self.world_size > 1 and index in self._val_padding:
                        size = 0  # a stand-in batch: FSDP needs every rank to run a forward
                    total += float(loss) * size
                    count += size
        finally:
            self.model.train(was_training)
        if self.world_size > 1:
            total, count = (float(v) for v in distributed.all_reduce([total, count]))
        if count == 0:
            raise ValueError("the validation set is empty")
        self.last_val_loss = total / count
        return self.last_val_loss

    def _distributed_val_loader(self, limit: int) -> DataLoader:
        """This rank's slices of the first ``limit`` global val batches (``batch_size × world``
        samples each, in order: the single-process batches of that size). A rank whose slice of
        the last batch is empty gets a stand-in sample weighted 0 (FSDP forwards are collective)."""
        dataset = self.task.datasets()["val"]
        size, world, rank = self.config.batch_size, self.world_size, distributed.rank()
        n_global = min(limit, math.ceil(len(dataset) / (size * world)))
        batches, self._val_padding = [], set()
        for g in range(n_global):
            start = g * size * world + rank * size
            indices = list(range(start, min(start + size, len(dataset))))
            if not indices:
                indices = [g * size * world]
                self._val_padding.add(g)
            batches.append(indices)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=self.task.collate,
                          num_workers=self.config.num_workers)

    def evaluate(self, loader: Any = None, *, split: str = "test",
                 batch_size: int | None = None) -> dict[str, float]:
        """``task.evaluate`` on ``loader`` (default: the task's ``split`` loader), under
        autocast and no_grad, with the RNG forked. Distributed, every rank evaluates the whole
        loader (the task's metrics are not sums that could be reduced) and gets the same scores."""
        if loader is None:
            loader = self.task.dataloader(split, batch_size or self.config.batch_size,
                                          num_workers=self.config.num_workers)
        with self._fork_rng(), torch.no_grad(), self.autocast():
            return self.task.evaluate(self.model, loader)

    # -- logging ------------------------------------------------------------------------

    def _log(self, record: Mapping[str, Any]) -> None:
        with open(self.out_dir / METRICS_FILE, "a") as stream:
            stream.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines past ``step`` (written by a run that died after its checkpoint)."""
        path = self.out_dir / METRICS_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
        write_text(path, "".join(line + "\n" for line in kept))

    # -- checkpoints --------------------------------------------------------------------

    def _model_state(self) -> dict[str, torch.Tensor]:
        state = distributed.full_model_state(self.model)  # FSDP: gathered on rank 0 only
        if not self.config.checkpoint_trainable_only:
            return state
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        parameters = {name for name, _ in self.model.named_parameters()}
        return {k: v for k, v in state.items() if k in trainable or k not in parameters}

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step_XXXXXXXX.pt`` atomically; prune old ones.

        Older checkpoints are deleted only once the new one is in place, and temporaries of
        killed saves are removed. Raises :class:`DivergenceError` instead of saving a model
        with a non-finite parameter. Distributed: every rank calls this (FSDP gathers the
        full weights, optimizer state and every rank's hook state), rank 0 writes, and all
        wait for the file."""
        self._check_finite_parameters()
        hooks = [hook.state_dict() if hasattr(hook, "state_dict") else {} for hook in self.hooks]
        sharded = self.strategy == "fsdp" and self.world_size > 1
        content = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_steps": self.skipped_steps,
            "trainable_only": self.config.checkpoint_trainable_only,
            "model": self._model_state(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "hooks": hooks,
            "rng": _rng_state(),
            "config": json.dumps(self.config.to_dict()),
            "strategy": self.strategy,
            "world_size": self.world_size,
        }
        if sharded and any(hooks):  # hook state refers to this rank's shards: keep every rank's
            content["hooks"] = [{} for _ in self.hooks]
            content["hooks_by_rank"] = distributed.gather_objects(hooks)
        path = self.out_dir / "checkpoints" / f"step_{self.step:08d}.pt"
        if self.is_main:
            remove_leftovers(path.parent, "step_*.pt")
            torch_save(path, content)
            for _, old in _checkpoints(self.out_dir)[:-self.config.keep_checkpoints]:
                old.unlink(missing_ok=True)
        if self.world_size > 1:
            distributed.barrier()
        return path

    def _check_finite_parameters(self) -> None:
        """Raise :class:`DivergenceError` naming the first parameter holding a NaN or infinity
        (distributed: on every rank if on any)."""
        name = _first_nonfinite_name(self.model.named_parameters())
        found = name is not None
        if self.world_size > 1:  # FSDP: the value may be in another rank's shard
            found = bool(distributed.all_reduce([float(found)], "max")[0])
        if found:
            what = f"parameter '{name}'" if name else "a parameter shard of another rank"
            raise DivergenceError(f"refusing to checkpoint step {self.step}: {what} holds NaN or "
                                  "infinity", step=self.step, lr=self.last_lr)

    def _optimizer_state(self) -> dict[str, Any]:
        if self.strategy != "fsdp":
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, scheduler, hooks, RNG states and data position."""
        content = _read_checkpoint(path)
        saved = json.loads(content["config"])
        current = self.config.to_dict()
        changed = [k for k in _TRAJECTORY_FIELDS if saved.get(k) != current.get(k)]
        if changed:
            log.warning("resuming %s with changed settings %s: the run will not match an "
                        "uninterrupted one", path,
                        {k: (saved.get(k), current.get(k)) for k in changed})
        saved_strategy = content.get("strategy", "none")
        if (saved_strategy == "fsdp") != (self.strategy == "fsdp"):
            raise ValueError(f"{path} was written under strategy '{saved_strategy}'; its optimizer "
                             f"state does not load under '{self.strategy}'")
        saved_world = int(content.get("world_size", 1))
        if saved_world != self.world_size:
            if "hooks_by_rank" in content:
                raise ValueError(f"{path} holds the per-shard state of {saved_world} FSDP ranks; "
                                 f"resume it with {saved_world} processes, not {self.world_size}")
            log.warning("resuming %s, written by %d process(es), with %d: the global batch "
                        "changes, the run will not match an uninterrupted one", path, saved_world,
                        self.world_size)
        distributed.load_full_model_state(self.model, content["model"],
                                          strict=not content["trainable_only"])
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            # strict=False: masked parameters have no AdamW state (their update keeps its own)
            set_optimizer_state_dict(self.model, self.optimizer, content["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.optimizer.load_state_dict(content["optimizer"])
        self.scheduler.load_state_dict(content["scheduler"])
        hook_states = content["hooks_by_rank"][distributed.rank()] if "hooks_by_rank" in content \
            else content["hooks"]
        if len(hook_states) != len(self.hooks):
            raise ValueError(f"{path} holds the state of {len(hook_states)} hook(s); "
                             f"this trainer has {len(self.hooks)}")
        for hook, state in zip(self.hooks, hook_states):
            if hasattr(hook, "load_state_dict"):
                hook.load_state_dict(state)
        _set_rng_state(content["rng"])
        self.step = int(content["step"])
        self.epoch = int(content["epoch"])
        self.batch_in_epoch = int(content["batch_in_epoch"])
        self.skipped_steps = int(content.get("skipped_steps", 0))


class _fsdp_no_sync(AbstractContextManager):
    """FSDP2: no gradient reduce-scatter inside (accumulate locally), back on at exit."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc: Any) -> None:
        self.module.set_requires_gradient_sync(True)


def _batch_size(batch: Any) -> int:
    """Number of samples in a collated (input, target) batch."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(first, Batch):
        return int(next(iter({**first.surf_vars, **first.atmos_vars}.values())).shape[0])
    if isinstance(first, torch.Tensor):
        return int(first.shape[0])
    return 1
