"""Random number generators: seeding, private generators, capture and restore, forking.

Python, numpy and torch are seeded from ``TrainConfig.seed``; what must not depend on the
global state (the data order, the loaders' base seeds) draws from its own generator seeded
by integers; a checkpoint captures every global state so that resume is exact; validation,
evaluation and diagnosis run under a forked RNG, so they never change the training trajectory.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "fork_rng", "generator", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(*entropy: int) -> torch.Generator:
    """A torch generator seeded from integers via numpy's SeedSequence (well mixed)."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def fork_rng(device: torch.device) -> AbstractContextManager:
    """Inside, torch's CPU RNG (and ``device``'s, on CUDA) may be drawn from; restored on exit."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def capture_rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's and every CUDA device's RNG state, as checkpointable values."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set every RNG to what :func:`capture_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
