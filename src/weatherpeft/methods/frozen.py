"""Frozen backbone: only the task head trains (new variables' embeddings and output heads).

The floor of every comparison: what the task head alone can learn on the pretrained features.
"""

from __future__ import annotations

from dataclasses import dataclass

from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.base import Adaptation, register_method

__all__ = ["FrozenOptions", "apply_frozen"]


@dataclass
class FrozenOptions:
    """No options: the backbone stays as pretrained."""


@register_method("frozen", FrozenOptions, "frozen backbone, task head only (the budget does not apply)")
def apply_frozen(backbone: Backbone, budget: float, options: FrozenOptions) -> Adaptation:
    return Adaptation(backbone, "frozen", budget, {})
