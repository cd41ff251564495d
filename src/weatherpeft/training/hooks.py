"""What a method plugs into the training loop: :class:`TrainingHook`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from weatherpeft.training.trainer import Trainer

__all__ = ["TrainingHook"]


class TrainingHook:
    """Base class of the objects a :class:`~weatherpeft.training.trainer.Trainer` calls; every
    method does nothing, so a hook overrides only the points it needs.

    ``step`` is the 0-based index of the optimizer step under way (``trainer.step`` is the
    number of completed steps); an update skipped for a non-finite value calls none of the
    step methods, and the next batches redo the same ``step``. Under DDP, gradients seen by
    hooks are already averaged over ranks.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once per :meth:`Trainer.fit`, after any resume (hand-written loops: once, through
        :meth:`Trainer.start_hooks`)."""

    def on_after_backward(self, trainer: Trainer, step: int) -> None:
        """After backward of all micro-batches, before gradient clipping: full gradients, for
        selection methods to read and mask. Called only when the loss and every gradient are
        finite."""

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        """After gradient clipping, before ``optimizer.step()``: gradients are final here."""

    def on_after_optimizer_step(self, trainer: Trainer, step: int) -> None:
        """After ``optimizer.step()`` and the scheduler."""

    def state_dict(self) -> dict[str, Any]:
        """The hook's part of a checkpoint: only tensors and plain Python values."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def rebind_parameters(self, mapping: Mapping[int, torch.nn.Parameter]) -> None:
        """Under FSDP, once, when the Trainer is built: sharding replaced the model's
        parameters by new DTensor objects, ``mapping`` is id(old) → new. A hook holding
        parameters must follow them, or raise if it cannot work on shards."""
