"""Which samples go into which batch, in which order, on which rank.

The data order of epoch e is a permutation drawn from its own generator seeded by (seed, e),
so the position in the data is two integers (epoch, batches consumed) that a checkpoint
records. Distributed, every rank draws the same permutation and takes its contiguous slice
of each global batch of ``batch_size × world`` samples: the global batch is exactly the
single-process batch of that size. Every function here is pure in the data position: the
same arguments give the same batches.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from weatherpeft.tasks.base import ignore_stop_signals
from weatherpeft.training.rng import generator

__all__ = ["ValidationBatches", "batches_per_epoch", "epoch_batches", "epoch_permutation",
           "training_loader", "validation_batches", "validation_loader"]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of range(n) from its own generator."""
    return torch.randperm(n, generator=generator(seed, epoch))


def batches_per_epoch(n_samples: int, batch_size: int, world: int) -> int:
    """Global batches of ``batch_size × world`` samples in an epoch (the last incomplete one
    dropped); raises if there is not even one."""
    n_batches = n_samples // (batch_size * world)
    if n_batches == 0:
        raise ValueError(f"the training set has {n_samples} samples, fewer than "
                         f"batch_size {batch_size}" + (f" × {world} ranks" if world > 1 else ""))
    return n_batches


def epoch_batches(n_samples: int, *, seed: int, epoch: int, start: int, batch_size: int,
                  world: int, rank: int) -> list[list[int]]:
    """Rank ``rank``'s sample indices of the global batches ``start``, ``start + 1``, … of
    ``epoch``: its contiguous slice of each, all ranks cutting the same permutation."""
    order = epoch_permutation(n_samples, seed, epoch).tolist()
    global_batch = batch_size * world
    return [order[i * global_batch + rank * batch_size:i * global_batch + (rank + 1) * batch_size]
            for i in range(start, batches_per_epoch(n_samples, batch_size, world))]


def _init_worker(worker_id: int) -> None:
    """DataLoader worker init: seed python and numpy from torch's per-worker seed; ignore the
    stop signals (the main process finishes its step first, then shuts the workers down)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    ignore_stop_signals(worker_id)


def training_loader(dataset: Dataset, collate: Callable[[list[Any]], Any],
                    batches: list[list[int]], *, num_workers: int, seed: int, epoch: int,
                    world: int, rank: int) -> DataLoader:
    """The loader of ``batches`` (from :func:`epoch_batches`). Its own generator: creating its
    iterator must not draw from the global RNG (a resumed run creates one mid-epoch, an
    uninterrupted one not)."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                      generator=generator(seed, epoch, 1, *((rank,) if world > 1 else ())),
                      worker_init_fn=_init_worker if num_workers else None)


class ValidationBatches(NamedTuple):
    """One rank's validation batches (sample indices) and which of them are stand-ins."""

    batches: list[list[int]]
    #: Positions in ``batches`` of stand-in batches, whose loss must be weighted 0.
    padding: frozenset[int]


def validation_batches(n_samples: int, limit: int, batch_size: int, world: int,
                       rank: int) -> ValidationBatches:
    """This rank's slices of the first ``limit`` global validation batches (``batch_size ×
    world`` samples each, in order: the single-process batches of that size). A rank whose
    slice of the last batch is empty gets a stand-in sample (FSDP forwards are collective)."""
    n_global = min(limit, math.ceil(n_samples / (batch_size * world)))
    batches, padding = [], set()
    for g in range(n_global):
        start = g * batch_size * world + rank * batch_size
        indices = list(range(start, min(start + batch_size, n_samples)))
        if not indices:
            indices = [g * batch_size * world]
            padding.add(g)
        batches.append(indices)
    return ValidationBatches(batches, frozenset(padding))


def validation_loader(dataset: Dataset, collate: Callable[[list[Any]], Any],
                      batches: list[list[int]], *, num_workers: int) -> DataLoader:
    """The loader of ``batches`` (from :func:`validation_batches`), in order."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
