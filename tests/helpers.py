"""Helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import torch


def outputs(model, batch) -> dict[str, torch.Tensor]:
    """The model's predicted fields for ``batch`` in eval mode, without gradients, by name."""
    model.eval()
    with torch.no_grad():
        prediction = model(batch)
    return {key: value.clone() for key, value in {**prediction.surf_vars, **prediction.atmos_vars}.items()}
