"""Where the shipped built-in world lives, and its stores by name."""

from __future__ import annotations

import os
from pathlib import Path

from weatherpeft.data.paths import CHECKOUT

#: Committed stores of the built-in world (see the README's data card).
STORES = {"downstream": "downstream.zarr", "regional": "regional.zarr", "ensemble": "ensemble.zarr"}
ENV_VAR = "WEATHERPEFT_DATA"


def builtin_dir() -> Path:
    """The built-in world's folder: ``$WEATHERPEFT_DATA`` or the checkout's ``data/builtin``."""
    configured = os.environ.get(ENV_VAR)
    path = Path(configured) if configured else CHECKOUT / "data" / "builtin"
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(
            f"built-in world not found at {path} (no manifest.json): run from a weatherpeft checkout, "
            f"set {ENV_VAR}, or regenerate it with `weatherpeft data generate`")
    return path


def store_path(name: str) -> Path:
    """Path of a built-in store by short name (downstream, regional, ensemble)."""
    if name not in STORES:
        raise ValueError(f"unknown built-in store {name!r}; known: {sorted(STORES)}")
    return builtin_dir() / STORES[name]
