"""Full fine-tuning: every pretrained parameter, encoder and decoder included, trained whole.

The reference point of every comparison. The budget does not size it (it is always 100 %);
its adapter file holds every weight, so it is a full checkpoint in adapter form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.base import Adaptation, match_names, register_method

__all__ = ["FullOptions", "apply_full"]


@dataclass
class FullOptions:
    """``include`` / ``exclude``: regexes on pretrained parameter names (default: all)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@register_method("full", FullOptions, "full fine-tuning of every pretrained weight "
                                      "(the budget does not apply)")
def apply_full(backbone: Backbone, budget: float, options: FullOptions) -> Adaptation:
    adaptation = Adaptation(backbone, "full", budget, dataclasses.asdict(options))
    names = match_names(backbone.pretrained_parameters(), tuple(options.include), tuple(options.exclude))
    if not names:
        raise ValueError(f"full fine-tuning: no pretrained parameter matches include="
                         f"{list(options.include)} exclude={list(options.exclude)}")
    adaptation.train_densely(names)
    return adaptation
