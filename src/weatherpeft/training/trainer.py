"""The Trainer: the loop shared by pretraining, fine-tuning and the benchmark.

It owns distribution (wrapping the model, gradient synchronisation), the contexts of a
forward (autocast, forked RNG), one optimizer step, the loop and its log; the pieces it calls
live beside it in :mod:`weatherpeft.training` (see the package doc).

Distributed (``TrainConfig.strategy`` "ddp" or "fsdp", launched by torchrun; see
:mod:`weatherpeft.distributed`): ``batch_size`` is per rank, so the global batch is
``batch_size × world size`` (:mod:`~weatherpeft.training.data_order`). Losses and validation
are reduced over ranks; only rank 0 logs, shows progress and writes metric files and
checkpoints. Hooks get the Trainer, whose ``model`` is the unwrapped module (the DDP wrapper
is ``trainer.wrapped``; FSDP shards ``model`` in place, so its parameters are then DTensors).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from weatherpeft import distributed
from weatherpeft.tasks.base import Task
from weatherpeft.training.batches import batch_size, move_to
from weatherpeft.training.checkpoints import CheckpointStore
from weatherpeft.training.config import TrainConfig
from weatherpeft.training.data_order import (
    epoch_batches,
    training_loader,
    validation_batches,
    validation_loader,
)
from weatherpeft.training.divergence import diagnose_gradients, diagnose_loss, stop_or_skip
from weatherpeft.training.hooks import TrainingHook
from weatherpeft.training.metrics_log import MetricsLog
from weatherpeft.training.optimizer import build_optimizer, default_param_groups, only_trainable
from weatherpeft.training.rng import fork_rng, seed_everything
from weatherpeft.training.signals import StopRequests, TrainingInterrupted

__all__ = ["Trainer"]

log = logging.getLogger(__name__)


class Trainer:
    """Train ``model`` on ``task`` under ``config``; see the module docstring.

    ``model`` is any module; the task decides how it is called (by default
    ``task.loss(model(input), target)``). ``param_groups`` replaces
    :func:`~weatherpeft.training.optimizer.default_param_groups` (frozen parameters are
    dropped from it). ``hooks`` are called in order at the points of :class:`TrainingHook`.
    """

    def __init__(self, model: torch.nn.Module, task: Task, config: TrainConfig, *,
                 hooks: Sequence[TrainingHook] = (),
                 param_groups: Sequence[Mapping[str, Any]] | None = None):
        self.config = config
        self.task = task
        self.hooks = _training_hooks(hooks)
        self.strategy = config.strategy
        self.device = self._join_processes(_resolve_device(config.device))
        self.model = model.to(self.device)
        self.out_dir = Path(config.out_dir)
        self.checkpoint_store = CheckpointStore(self.out_dir)
        self.metrics_log = MetricsLog(self.out_dir)
        self._configure_model()
        groups = default_param_groups(model, config.weight_decay) if param_groups is None \
            else only_trainable(param_groups)
        #: What forward and backward run through: the DDP wrapper, else ``model`` itself.
        self.wrapped = self._wrap(groups)
        self.optimizer, self.scheduler = build_optimizer(groups, config)
        #: Completed optimizer steps.
        self.step = 0
        #: Data position: the epoch and how many of its batches were consumed.
        self.epoch = 0
        self.batch_in_epoch = 0
        #: Updates dropped for a non-finite loss or gradient (``on_nonfinite="skip"``).
        self.skipped_steps = 0
        self._stop_requests = StopRequests()
        #: Most recent values, for hooks and callers.
        self.last_loss: float | None = None
        self.last_grad_norm: float | None = None
        self.last_val_loss: float | None = None
        self.last_lr: float = self.optimizer.param_groups[0]["lr"]

    def _configure_model(self) -> None:
        """Say that bf16 autocast is CUDA-only; switch on activation checkpointing."""
        if self.config.amp == "bf16" and self.device.type != "cuda":
            log.info("amp='bf16' requested on %s: autocast is CUDA-only, running in float32",
                     self.device)
        if self.config.activation_checkpointing:
            configure = getattr(self.model, "configure_activation_checkpointing", None)
            if callable(configure):
                configure()
            else:
                log.warning("activation_checkpointing requested but %s has no "
                            "configure_activation_checkpointing(); ignored",
                            type(self.model).__name__)

    # -- distribution -------------------------------------------------------------------

    def _join_processes(self, device: torch.device) -> torch.device:
        """Join torchrun's process group for strategy ddp or fsdp (without torchrun: train in
        this one process); returns this rank's device."""
        if self.strategy != "none" and not distributed.init(device):
            log.warning("strategy '%s' without torchrun: training in this one process", self.strategy)
            self.strategy = "none"
        elif self.strategy == "none" and distributed.launched():
            raise ValueError(f"launched as {os.environ.get('WORLD_SIZE')} processes but "
                             "TrainConfig.strategy is 'none': choose 'ddp' or 'fsdp'")
        return distributed.device_for_rank(device)

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

    @contextmanager
    def _side_effect_free(self) -> Iterator[None]:
        """No gradients, a forked RNG, autocast: forwards that leave the trajectory alone."""
        with torch.no_grad(), fork_rng(self.device), self.autocast():
            yield

    # -- data ---------------------------------------------------------------------------

    def _train_batches(self, dataset: Dataset) -> Iterator[Any]:
        """Collated training batches from the current (epoch, batch_in_epoch), forever."""
        cfg = self.config
        world, rank = self.world_size, distributed.rank() if self.world_size > 1 else 0
        while True:
            batches = epoch_batches(len(dataset), seed=cfg.seed, epoch=self.epoch,
                                    start=self.batch_in_epoch, batch_size=cfg.batch_size,
                                    world=world, rank=rank)
            for batch in training_loader(dataset, self.task.collate, batches,
                                         num_workers=cfg.num_workers, seed=cfg.seed,
                                         epoch=self.epoch, world=world, rank=rank):
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def _validation_loader(self, limit: int) -> tuple[Iterable[Any], frozenset[int]]:
        """The validation batches of this rank, and the positions of stand-in batches among
        them (distributed: FSDP needs every rank to run a forward)."""
        if self.world_size == 1:
            return self.task.dataloader("val", self.config.batch_size,
                                        num_workers=self.config.num_workers), frozenset()
        dataset = self.task.datasets()["val"]
        plan = validation_batches(len(dataset), limit, self.config.batch_size, self.world_size,
                                  distributed.rank())
        return validation_loader(dataset, self.task.collate, plan.batches,
                                 num_workers=self.config.num_workers), plan.padding

    # -- one optimizer step -------------------------------------------------------------

    def _gradient_norm(self) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """The trainable parameters holding a gradient (also those a hook updates itself), the
        global norm of their gradients, its value."""
        parameters = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters]) if parameters \
            else torch.zeros(())
        return parameters, norm, float(norm.full_tensor() if distributed.is_dtensor(norm) else norm)

    def start_hooks(self) -> None:
        """Call every hook's ``on_fit_start`` (by :meth:`fit`, and once by hand-written loops)."""
        for hook in self.hooks:
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
        return self.apply_gradients(loss_value, partial(
            diagnose_loss, self.model, self.task, micro_batches, self.device, self._side_effect_free))

    def apply_gradients(self, loss_value: float,
                        diagnose_loss: Callable[[], str]) -> tuple[float, float] | None:
        """Everything of one optimizer step after backward: finiteness checks, the hooks,
        gradient clipping, ``optimizer.step()`` and the schedule. (loss, gradient norm), or None
        when a non-finite loss or gradient made it skip the update.

        Shared by :meth:`fit` and hand-written loops (:mod:`weatherpeft.api`), so that the
        methods' hooks run in one order everywhere. ``diagnose_loss()`` says where a
        non-finite ``loss_value`` came from.
        """
        if not math.isfinite(loss_value):
            return self._non_finite(f"training loss is {loss_value}", diagnose_loss)
        grads, norm, grad_norm = self._gradient_norm()
        if self.hooks and math.isfinite(grad_norm):
            for hook in self.hooks:
                hook.on_after_backward(self, self.step)
            grads, norm, grad_norm = self._gradient_norm()  # hooks may mask gradients
        if not math.isfinite(grad_norm):
            return self._non_finite(f"gradient norm is {grad_norm} (loss {loss_value:.6g})",
                                    partial(diagnose_gradients, self.model))
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(grads, self.config.grad_clip, norm)
        step = self.step
        for hook in self.hooks:
            hook.on_before_optimizer_step(self, step)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        for hook in self.hooks:
            hook.on_after_optimizer_step(self, step)
        self.last_loss, self.last_grad_norm = loss_value, grad_norm
        return loss_value, grad_norm

    def _non_finite(self, what: str, diagnose: Callable[[], str]) -> None:
        """Drop this step's gradients; raise :class:`DivergenceError` (``on_nonfinite="stop"``
        or too many skips) or warn and count the skipped update."""
        lr = self.optimizer.param_groups[0]["lr"]
        where = diagnose()
        if self.world_size > 1:
            where = f"rank {distributed.rank()}: {where}"
        self.model.zero_grad(set_to_none=True)
        if self.config.on_nonfinite == "skip":
            self.skipped_steps += 1
        stop_or_skip(f"{what} at step {self.step} (lr {lr:.6g}); {where}", config=self.config,
                     skipped_steps=self.skipped_steps, step=self.step, lr=lr)

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
        self._start_run(resume)
        target = self.config.steps if until_step is None else min(int(until_step), self.config.steps)
        summary = {"step": float(self.step), "skipped_steps": float(self.skipped_steps)}
        if self.step >= target:
            return summary
        batches = self._train_batches(self.task.datasets()["train"])
        progress = tqdm(total=target, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=not (self.config.progress and self.is_main and sys.stderr.isatty()))
        window = _LogWindow(self.config.batch_size * self.config.accumulation_steps
                            * self.world_size)
        self.model.train()
        try:
            with self._stop_requests.caught():
                while self.step < target:
                    outcome = self._train_step(batches)
                    saved = None
                    if outcome is not None:  # None: a skipped update, nothing to log or save
                        progress.update(1)
                        summary.update(self._record(outcome, target, window, progress))
                        saved = self._checkpoint_if_due(target)
                    self._stop_if_requested(saved)
        finally:
            progress.close()
            batches.close()
        summary.update(step=float(self.step), skipped_steps=float(self.skipped_steps))
        return summary

    def _start_run(self, resume: bool) -> None:
        """Resume from the latest checkpoint (``resume`` and there is one) or start afresh;
        then start the hooks."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self.checkpoint_store.latest() if resume else None
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            if self.is_main:
                self.metrics_log.truncate(self.step)
            log.info("resumed from %s at step %d", checkpoint, self.step)
        else:
            self._start_afresh(resume)
        if self.world_size > 1:
            distributed.barrier()  # every rank has read the folder before rank 0 writes to it
        self.start_hooks()

    def _start_afresh(self, resume: bool) -> None:
        """Refuse a folder holding checkpoints; seed; a new metric log and ``config.json``."""
        if self.checkpoint_store.checkpoints():
            raise FileExistsError(
                f"{self.out_dir} holds checkpoints of an earlier run; resume it (resume=True) "
                "or choose another out_dir")
        if resume:
            log.info("no checkpoint in %s: starting from scratch", self.out_dir)
        seed_everything(self.config.seed)
        if self.is_main:
            self.metrics_log.clear()
            with open(self.out_dir / "config.json", "w") as stream:
                json.dump({**self.config.to_dict(), "world_size": self.world_size}, stream,
                          indent=1)

    def _record(self, outcome: tuple[float, float], target: int, window: _LogWindow,
                progress: tqdm) -> dict[str, float]:
        """After a step: the values due (training values every ``log_every`` steps and at
        ``target``, the validation loss every ``val_every`` steps), logged by the main
        process; {} when none are due."""
        cfg = self.config
        loss, grad_norm = outcome
        window.add(loss)
        record: dict[str, float] = {}
        if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == target):
            mean_loss, samples_per_s = window.flush()
            record.update(loss=mean_loss, lr=self.last_lr, grad_norm=grad_norm,
                          samples_per_s=samples_per_s)
            if cfg.on_nonfinite == "skip":
                record["skipped_steps"] = self.skipped_steps
            progress.set_postfix(loss=f"{mean_loss:.4g}", samples_s=f"{samples_per_s:.3g}")
        if cfg.val_every and self.step % cfg.val_every == 0:
            record["val_loss"] = self.validate()
        if not record:
            return record
        record = {"step": self.step, "epoch": self.epoch, **record}
        if self.is_main:
            self.metrics_log.append(record)
        return record

    def _checkpoint_if_due(self, target: int) -> Path | None:
        """Save every ``checkpoint_every`` steps and at ``target``; the path, if saved."""
        every = self.config.checkpoint_every
        if (every and self.step % every == 0) or self.step == target:
            return self.save_checkpoint()
        return None

    def _stop_if_requested(self, saved: Path | None) -> None:
        """After a step: if a stop signal came (on any rank: they agree through one
        all-reduce), checkpoint unless ``saved`` already holds this step, and raise
        :class:`TrainingInterrupted`."""
        signum = self._stop_requests.agreed(self.world_size)
        if not signum:
            return
        checkpoint = saved or self.save_checkpoint()
        log.warning("%s: stopped after step %d, checkpoint %s", signal.Signals(signum).name,
                    self.step, checkpoint)
        raise TrainingInterrupted(signum, self.step, checkpoint)

    # -- validation and evaluation ------------------------------------------------------

    @torch.no_grad()
    def validate(self, batches: int | None = None) -> float:
        """Mean ``task`` loss over the first ``batches`` (default ``val_batches``) val batches.

        Sample-weighted; the model is put in eval mode and back; the RNG is forked so the
        training trajectory does not depend on how often validation runs.
        """
        limit = self.config.val_batches if batches is None else batches
        loader, padding = self._validation_loader(limit)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            with fork_rng(self.device):
                for index, batch in enumerate(loader):
                    if index >= limit:
                        break
                    batch = move_to(batch, self.device)
                    with self.autocast():
                        loss = self.task.training_loss(self.model, batch)
                    size = 0 if index in padding else batch_size(batch)  # stand-ins weigh 0
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

    def evaluate(self, loader: Any = None, *, split: str = "test",
                 batch_size: int | None = None) -> dict[str, float]:
        """``task.evaluate`` on ``loader`` (default: the task's ``split`` loader), under
        autocast and no_grad, with the RNG forked. Distributed, every rank evaluates the whole
        loader (the task's metrics are not sums that could be reduced) and gets the same scores."""
        if loader is None:
            loader = self.task.dataloader(split, batch_size or self.config.batch_size,
                                          num_workers=self.config.num_workers)
        with self._side_effect_free():
            return self.task.evaluate(self.model, loader)

    # -- checkpoints --------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step_XXXXXXXX.pt`` (see :class:`CheckpointStore`)."""
        return self.checkpoint_store.save(self)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, scheduler, hooks, RNG states and data position."""
        self.checkpoint_store.load(self, path)


def _training_hooks(hooks: Sequence[TrainingHook]) -> list[TrainingHook]:
    for hook in hooks:
        if not isinstance(hook, TrainingHook):
            raise TypeError(f"hook {hook!r} is not a TrainingHook: subclass "
                            "weatherpeft.training.TrainingHook (its methods do nothing unless "
                            "overridden)")
    return list(hooks)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _LogWindow:
    """The losses and time of the steps since the last logged one."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.losses: list[float] = []
        self.start = time.perf_counter()

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def flush(self) -> tuple[float, float]:
        """Mean loss and samples per second over the window; then a new window."""
        elapsed = time.perf_counter() - self.start
        mean = sum(self.losses) / len(self.losses)
        samples_per_s = len(self.losses) * self.samples_per_step / max(elapsed, 1e-9)
        self.losses, self.start = [], time.perf_counter()
        return mean, samples_per_s


class _fsdp_no_sync(AbstractContextManager):
    """FSDP2: no gradient reduce-scatter inside (accumulate locally), back on at exit."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc: Any) -> None:
        self.module.set_requires_gradient_sync(True)
