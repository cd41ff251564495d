"""Non-finite values: where they came from, and what a non-finite loss or gradient does.

A non-finite loss or gradient norm never reaches ``optimizer.step()``;
``TrainConfig.on_nonfinite`` either stops with a :class:`DivergenceError` that says where the
first non-finite value came from, or skips the update; a checkpoint of non-finite weights is
refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from weatherpeft import distributed
from weatherpeft.tasks.base import Task
from weatherpeft.training.batches import move_to
from weatherpeft.training.config import TrainConfig

__all__ = ["DivergenceError", "check_finite_parameters", "diagnose_gradients", "diagnose_loss",
           "first_nonfinite", "first_nonfinite_name", "stop_or_skip"]

log = logging.getLogger(__name__)


class DivergenceError(FloatingPointError):
    """A non-finite loss, gradient or weight; the message names the step, the learning rate
    and where the first non-finite value was found. ``exit_code`` is the CLI's exit status."""

    exit_code = 1

    def __init__(self, message: str, *, step: int, lr: float):
        super().__init__(message)
        self.step, self.lr = step, lr


def first_nonfinite(value: Any, path: str) -> str | None:
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
        found = first_nonfinite(item, path + suffix)
        if found:
            return found
    return None


def first_nonfinite_name(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or infinity (under FSDP,
    in this rank's shard), or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(distributed.local_tensor(tensor)).all():
            return name
    return None


def stop_or_skip(message: str, *, config: TrainConfig, skipped_steps: int, step: int,
                 lr: float) -> None:
    """Act on the non-finite value ``message`` describes: raise :class:`DivergenceError`
    (``on_nonfinite="stop"``, or ``skipped_steps``, this update counted, above
    ``max_skipped_steps``), else warn that the update is skipped."""
    if config.on_nonfinite == "stop":
        raise DivergenceError(message, step=step, lr=lr)
    if skipped_steps > config.max_skipped_steps:
        raise DivergenceError(f"{message} — {skipped_steps} updates skipped, more than "
                              f"max_skipped_steps={config.max_skipped_steps}", step=step, lr=lr)
    log.warning("update skipped (%d of at most %d): %s", skipped_steps, config.max_skipped_steps,
                message)


def diagnose_loss(model: torch.nn.Module, task: Task, micro_batches: Sequence[Any],
                  device: torch.device, quiet: Callable[[], AbstractContextManager]) -> str:
    """Where a non-finite loss came from: the first non-finite value in a micro-batch's
    input or target, else in a weight, else in a prediction (one forward per micro-batch
    inside ``quiet()``: no gradients, RNG forked), else the task's loss itself."""
    batches = [move_to(batch, device) for batch in micro_batches]
    # Every forward first, on every rank: under FSDP forwards are collective.
    predictions = [_first_nonfinite_prediction(model, task, batch, quiet) for batch in batches]
    suffixes = [f" of micro-batch {i}" if len(batches) > 1 else "" for i in range(len(batches))]
    for batch, suffix in zip(batches, suffixes):
        parts = zip(("input", "target"), batch) if isinstance(batch, (tuple, list)) \
            and len(batch) == 2 else [("batch", batch)]
        for label, part in parts:
            found = first_nonfinite(part, label)
            if found:
                return f"non-finite value in the data: {found}{suffix}"
    weight = first_nonfinite_name(model.named_parameters())
    if weight:
        return f"non-finite weight '{weight}'"
    for found, suffix in zip(predictions, suffixes):
        if found:
            return f"inputs and weights are finite, the model's output is not: {found}{suffix}"
    return "inputs, targets, weights and predictions are finite: the task's loss produced it"


def _first_nonfinite_prediction(model: torch.nn.Module, task: Task, batch: Any,
                                quiet: Callable[[], AbstractContextManager]) -> str | None:
    """Where the model's output on ``batch`` (every forward, for roll-outs) is first non-finite."""
    outputs: list[Any] = []
    handle = model.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        with quiet():
            task.training_loss(model, batch)
    finally:
        handle.remove()
    return first_nonfinite(outputs[0] if len(outputs) == 1 else outputs, "prediction")


def diagnose_gradients(model: torch.nn.Module) -> str:
    """The first parameter whose gradient is non-finite."""
    name = first_nonfinite_name((n, p.grad) for n, p in model.named_parameters()
                                if p.grad is not None)
    return f"first non-finite gradient: '{name}'" if name \
        else "no gradient on this rank is non-finite"


def check_finite_parameters(model: torch.nn.Module, *, world_size: int, step: int,
                            lr: float) -> None:
    """Before a checkpoint: raise :class:`DivergenceError` naming the first parameter holding
    a NaN or infinity (distributed: on every rank if on any; all ranks must call this)."""
    name = first_nonfinite_name(model.named_parameters())
    found = name is not None
    if world_size > 1:  # FSDP: the value may be in another rank's shard
        found = bool(distributed.all_reduce([float(found)], "max")[0])
    if found:
        what = f"parameter '{name}'" if name else "a parameter shard of another rank"
        raise DivergenceError(f"refusing to checkpoint step {step}: {what} holds NaN or "
                              "infinity", step=step, lr=lr)
