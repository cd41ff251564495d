"""AdaptFormer (Chen et al., NeurIPS 2022): a parallel bottleneck beside every block's MLP.

For the MLP input x of each transformer block (Aurora: each Swin block's ``mlp``),

    out = MLP(x) + s · Up(ReLU(Down(x))),     Down: C → r, Up: r → C,

with Up (weight and bias) and Down's bias zero-initialised, Down's weight as
``nn.Linear``'s default (Kaiming-uniform, as AdaptFormer's code), so the model starts as
the pretrained one; s is a fixed scale (``scale``, AdaptFormer's 0.1). A forward hook on
``mlp`` adds the branch: the backbone's modules and names are untouched. In Aurora's
res-post-norm blocks the sum then goes through ``norm2``, as the MLP output did.

Size: Σ_blocks (2·C·r + r + C); the bottleneck r, one for all blocks, is the nearest to the
budget (not exceeding it beyond the tolerance).

Not mergeable: ReLU makes the branch non-linear in x, so it cannot be folded into the MLP's
weights. ``merge()`` (and thus :func:`~weatherpeft.adapters.save_merged`) raises a ValueError
before writing anything; deploy the adapter file (:func:`~weatherpeft.adapters.load_adapter`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.base import BUDGET_TOLERANCE, Adaptation, BudgetError, budget_entries, register_method
from weatherpeft.methods.output_hooks import OutputHooks, module_key
from weatherpeft.methods.ssf import transformer_blocks

__all__ = ["AdaptFormer", "AdaptFormerOptions", "BottleneckAdapter", "apply_adaptformer"]

@dataclass
class AdaptFormerOptions:
    """``scale``: the fixed factor s on the adapter branch (AdaptFormer: 0.1). The bottleneck
    width comes from the budget."""

    scale: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"AdaptFormer scale must be a finite number > 0, got {self.scale!r}")


class BottleneckAdapter(nn.Module):
    """s · Up(ReLU(Down(x))), zero at the start (Up and the biases are zero)."""

    def __init__(self, width: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale = float(scale)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(x)))

    @staticmethod
    def parameter_count(width: int, bottleneck: int) -> int:
        """Down (w·r + r) + Up (r·w + w)."""
        return 2 * width * bottleneck + bottleneck + width


def _mlp_width(name: str, mlp: nn.Module) -> int:
    """The MLP's input width: its first Linear's in_features."""
    for sub in mlp.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
    raise ValueError(f"'{name}' has no nn.Linear to read its width from")


def mlp_sites(backbone: Backbone) -> dict[str, tuple[nn.Module, int]]:
    """{name: (mlp module, width)} of every block's MLP (``backbone.block_parts()["mlp"]``; its
    input is the MLP's input: Aurora's ``mlp``, Prithvi-WxC's ``ff.1`` after the LayerNorm)."""
    sites = {}
    path = backbone.block_parts().get("mlp")
    for block_name, block in transformer_blocks(backbone):
        try:
            mlp = block.get_submodule(path) if path else None
        except AttributeError:
            mlp = None
        if not isinstance(mlp, nn.Module):
            raise ValueError(f"block '{block_name}' has no MLP module ({path!r}) for AdaptFormer")
        sites[f"{block_name}.{path}"] = (mlp, _mlp_width(f"{block_name}.{path}", mlp))
    return sites


class AdaptFormer(OutputHooks):
    """One BottleneckAdapter beside each MLP, added to its output by a forward hook.

    The MLPs are referenced, not registered: the state dict holds only the adapters.
    """

    def __init__(self, sites: dict[str, tuple[nn.Module, int]], bottleneck: int,
                 scale: float) -> None:
        super().__init__({module_key(name): mlp for name, (mlp, _) in sites.items()})
        self.adapters = nn.ModuleDict({module_key(name): BottleneckAdapter(width, bottleneck, scale)
                                       for name, (_, width) in sites.items()})

    def rewrite(self, key: str, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """The MLP's output plus its adapter's branch on the MLP's input."""
        return output + self.adapters[key](inputs[0])


def _refuse_merge(adaptation: Adaptation) -> None:
    raise ValueError("AdaptFormer cannot be merged: its adapters s·Up(ReLU(Down(x))) are "
                     "non-linear in x, so no change of the backbone's weights reproduces them. "
                     "Deploy the adapter folder with load_adapter instead")


@register_method("adaptformer", AdaptFormerOptions,
                 "AdaptFormer: a scaled ReLU bottleneck adapter parallel to every transformer block's "
                 "MLP (zero-initialised); bottleneck width from the budget; not mergeable")
def apply_adaptformer(backbone: Backbone, budget: float, options: AdaptFormerOptions) -> Adaptation:
    entries = budget_entries(backbone, budget)
    sites = mlp_sites(backbone)
    widths = [width for _, width in sites.values()]

    def size(bottleneck: int) -> int:
        return sum(BottleneckAdapter.parameter_count(w, bottleneck) for w in widths)

    per_unit = size(1) - size(0)  # size is affine in r: size(0) + r·per_unit
    bottleneck = round((entries - size(0)) / per_unit)
    if size(bottleneck) > (1 + BUDGET_TOLERANCE) * entries:
        bottleneck -= 1
    pretrained = backbone.pretrained_count()
    if bottleneck < 1:
        raise BudgetError(f"AdaptFormer's smallest configuration (bottleneck 1) needs "
                          f"{size(1):,} parameters, more than budget {budget} allows "
                          f"({entries:,}); nearest feasible budget: {size(1) / pretrained:.4%}")
    adaptation = Adaptation(backbone, "adaptformer", budget, dataclasses.asdict(options))
    adaptation.parts["adaptformer"] = AdaptFormer(sites, bottleneck, options.scale).attach()
    adaptation.merge_steps.append(_refuse_merge)
    count = size(bottleneck)
    adaptation.resolved.update(adaptformer={"bottleneck": bottleneck, "parameters": count})
    adaptation.note_budget_shortfall(count, entries, f"bottleneck {bottleneck}, one more would "
                                                     "exceed the budget")
    return adaptation
