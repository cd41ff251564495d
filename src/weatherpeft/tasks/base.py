"""The Task contract: what a task reads, what the backbone must add, how it is scored.

A task turns a data source into ``(input, target)`` pairs of :class:`aurora.Batch` (the
train and validation splits), states which variables and levels the backbone must take
and which new ones it must learn to produce (task heads), defines the training loss on a
prediction and a target, and evaluates a model with the metrics the paper reports for it.
The :class:`~weatherpeft.training.Trainer`, :func:`~weatherpeft.finetune.run_finetune`, the
``evaluate`` command, the benchmark and the maps only ever talk to a task through this
contract (:class:`Task` lists every member they use).

Samples are ``aurora.Batch`` pairs in physical units, latitude decreasing (north first),
(B, T, H, W) surface and (B, T, C, H, W) atmospheric fields, static fields (H, W). The grid
must suit the backbone (:mod:`weatherpeft.tasks.grid`); an Aurora backbone drops the last
row of a grid with both poles, so a prediction can have one row fewer than its target:
compare them with :func:`weatherpeft.tasks.scoring.match_rows`.
"""

from __future__ import annotations

import abc
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from aurora import Batch
from torch.utils.data import DataLoader, Dataset

from weatherpeft.data.stats import NormalisationStats
from weatherpeft.data.wb2 import StoreSelection, collate_batches

__all__ = ["SPLITS", "Task", "TaskVariables"]

#: The splits every task provides.
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskVariables:
    """The variables of a task, in Aurora's names (``"2t"``, ``"z"``, static ``"lsm"``).

    ``surf_vars``/``atmos_vars``/``static_vars`` are what samples carry (inputs and, for
    the dynamic ones, targets) at pressure ``levels`` (hPa). ``new_surf_vars`` and
    ``new_atmos_vars`` are those among them the backbone was not pretrained on: it must add
    an embedding and an output head for each (trainable under every method, counted apart);
    ``new_static_vars`` likewise need a new embedding.
    """

    surf_vars: tuple[str, ...]
    atmos_vars: tuple[str, ...]
    static_vars: tuple[str, ...]
    levels: tuple[int | float, ...]
    new_surf_vars: tuple[str, ...] = ()
    new_atmos_vars: tuple[str, ...] = ()
    new_static_vars: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("surf_vars", "atmos_vars", "static_vars", "levels",
                     "new_surf_vars", "new_atmos_vars", "new_static_vars"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        for new, known in (("new_surf_vars", "surf_vars"), ("new_atmos_vars", "atmos_vars"),
                           ("new_static_vars", "static_vars")):
            missing = set(getattr(self, new)) - set(getattr(self, known))
            if missing:
                raise ValueError(f"{new} {sorted(missing)} must also be listed in {known}")
        if self.atmos_vars and not self.levels:
            raise ValueError(f"atmospheric variables {list(self.atmos_vars)} need pressure levels")

    @classmethod
    def from_selection(cls, selection: StoreSelection) -> TaskVariables:
        """The variables a store selection carries, in Aurora's names (none of them new)."""
        return cls(surf_vars=tuple(selection.surf.values()), atmos_vars=tuple(selection.atmos.values()),
                   static_vars=tuple(selection.static.values()), levels=tuple(selection.levels))


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGTERM/SIGINT to the main process, which stops cleanly
    (a checkpoint first, when training) and then shuts its workers down."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


class Task(abc.ABC):
    """A downstream (or pretraining) task; subclasses fill in the four abstract members.

    What the package uses, and who:

    * ``variables`` (abstract): which heads and embeddings ``run_finetune`` gives the backbone.
    * ``datasets()`` (abstract): the splits :data:`SPLITS`; the train and val splits yield
      ``(input Batch, target Batch)`` pairs (``loss`` is computed on them), the test split
      yields whatever ``evaluate`` expects. Built once and cached by the task. The Trainer
      draws training batches from "train" and validates on "val".
    * ``loss`` (abstract), through ``training_loss``: the Trainer's objective.
    * ``evaluate`` (abstract): the test scores of ``run_finetune``, ``evaluate`` and the benchmark.
    * ``stats``: normalisation statistics for every variable the samples carry (the
      backbone's, extended with what the task measured, e.g. for new variables);
      ``run_finetune`` loads the backbone with them. ``None`` (the default): the backbone's own.
    * ``name``, ``collate``, ``dataloader``, ``collated_sample`` and ``sample_prediction``:
      shared behaviour below (logs and metric files, DataLoader collation, evaluation
      loaders, maps); override when a task's samples need it.
    """

    #: Short name used in logs, metric files and the CLI.
    name: str = "task"
    #: Collates a list of samples into a batch; a DataLoader ``collate_fn``.
    collate: Callable = staticmethod(collate_batches)
    #: Normalisation statistics the backbone is loaded with (None: the backbone's own).
    stats: NormalisationStats | None = None

    @property
    @abc.abstractmethod
    def variables(self) -> TaskVariables:
        """The variables and levels samples carry and the new heads the backbone needs."""

    @abc.abstractmethod
    def datasets(self) -> dict[str, Dataset]:
        """``{"train": …, "val": …, "test": …}``, built on first call and cached."""

    @abc.abstractmethod
    def loss(self, prediction: Batch, target: Batch) -> torch.Tensor:
        """Scalar training loss of ``prediction`` against ``target`` (differentiable)."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, loader: Sequence | DataLoader) -> dict[str, float]:
        """The metrics the paper reports for this task, as ``{name: value}``."""

    # -- shared behaviour, overridable --------------------------------------------------

    def training_loss(self, model: torch.nn.Module, batch: tuple[Batch, Batch]) -> torch.Tensor:
        """Loss of ``model`` on one collated ``(input, target)`` batch (already on device).

        The Trainer calls this for training and validation; override it for tasks whose
        forward is more than ``model(input)`` (e.g. multi-step roll-out training).
        """
        inputs, target = batch
        return self.loss(model(inputs), target)

    def sample_prediction(self, model: torch.nn.Module, split: str,
                          index: int) -> tuple[Batch, Batch]:
        """(prediction, truth) for sample ``index`` of ``split``, batch of one (for maps).

        Truth and prediction hold the fields at the verifying time as their last time step.
        """
        inputs, target = self.collated_sample(split, index)
        device = next(model.parameters()).device
        return model(inputs.to(device)), target

    def collated_sample(self, split: str, index: int) -> tuple[Batch, Batch]:
        """Sample ``index`` of ``split`` as an (input, target) batch of one."""
        dataset = self.datasets()[split]
        if not 0 <= index < len(dataset):
            raise IndexError(f"task '{self.name}' has {len(dataset)} {split} samples; no index {index}")
        return self.collate([dataset[index]])

    def dataloader(self, split: str, batch_size: int, *, num_workers: int = 0) -> DataLoader:
        """A sequential (unshuffled, all samples kept) loader over ``split``, for evaluation."""
        splits = self.datasets()
        if split not in splits:
            raise KeyError(f"task '{self.name}' has no split '{split}'; it has {sorted(splits)}")
        return DataLoader(splits[split], batch_size=batch_size, shuffle=False,
                          num_workers=num_workers, collate_fn=self.collate,
                          persistent_workers=False,
                          worker_init_fn=ignore_stop_signals if num_workers else None)
