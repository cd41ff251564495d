"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022).

After chosen operations of every transformer block the features are scaled and shifted per
channel,

    y = γ ⊙ x + β,        γ ∈ R^C initialised to 1, β ∈ R^C to 0,

so the adapted model starts exactly as the pretrained one. Sites, per Swin block: the
outputs of ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` (Linear layers) and of
``norm1``, ``norm2`` (Aurora's adaptive LayerNorms, res-post-norm). Forward hooks apply
them: the backbone's modules and parameter names are untouched.

Size: 2 × features per site, fixed by the architecture (aurora-tiny, every site:
22 × Σ block widths = 33,792 parameters, 0.55 % of the backbone). Sizing (``sites`` empty)
picks the set of site *kinds* (qkv, proj, fc1, fc2, norm1, norm2; all blocks) whose size is
closest to the budget without exceeding it by more than the tolerance (ties: fewer kinds,
then the order above). Exception: a budget beyond SSF's full size cannot be reached — every
site is used and a warning states the shortfall (also in ``adaptation.resolved``); a budget
below the smallest kind is a :class:`~weatherpeft.methods.base.BudgetError`.

Merge (exact up to rounding; :meth:`SSF.merge`):

- after a Linear: W' = diag(γ)·W, b' = γ ⊙ b + β;
- after Aurora's ``AdaptiveLayerNorm``, y = LN(x)·(s₀ + scale(c)) + shift(c) with
  (shift, scale) = Linear(SiLU(c)): γ ⊙ y + β has the same form with shift' = γ ⊙ shift + β
  and scale' = γ ⊙ scale + (γ − 1)·s₀ — the modulation Linear's rows scaled by γ, its biases
  b_shift' = γ ⊙ b_shift + β and b_scale' = γ ⊙ b_scale + (γ − 1)·s₀;
- after a LayerNorm with affine: weight' = γ ⊙ weight, bias' = γ ⊙ bias + β.

A site with no such parameters to absorb γ and β (a LayerNorm without affine, a Linear
without bias, any other module) cannot be merged: :meth:`SSF.merge` raises a ValueError
naming it, before changing any weight.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any

import torch
from aurora.model.film import AdaptiveLayerNorm
from torch import nn

from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.base import BUDGET_TOLERANCE, Adaptation, BudgetError, budget_entries, register_method
from weatherpeft.methods.output_hooks import OutputHooks, module_key

__all__ = ["SITE_KINDS", "SSF", "SSFOptions", "ScaleShift", "apply_ssf", "fold_scale_shift",
           "ssf_sites", "transformer_blocks"]

#: Operations of a block that get SSF, as submodule paths inside the block.
SITE_KINDS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2")


@dataclass
class SSFOptions:
    """``sites``: regexes (re.search) on site names such as
    ``backbone.encoder_layers.0.blocks.1.mlp.fc1`` choosing where SSF goes; empty (default):
    sizing picks whole kinds of sites to match the budget (see the module doc)."""

    sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.sites = tuple(self.sites)
        for pattern in self.sites:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"SSF sites pattern {pattern!r} is not a regex: {error}") from error


@dataclass(frozen=True)
class _Site:
    name: str
    kind: str
    module: nn.Module
    features: int


def transformer_blocks(backbone: Backbone) -> list[tuple[str, nn.Module]]:
    """(name, module) of every transformer block (``backbone.transformer_blocks()``; for
    Aurora the Swin blocks, encoder then decoder, the parents of its prompt sites)."""
    blocks = backbone.transformer_blocks()
    if not blocks:
        raise ValueError(f"{type(backbone).__name__} has no transformer blocks to adapt")
    return blocks


def _features(name: str, module: nn.Module) -> int:
    """Output features of a site: a Linear's out_features, else its LayerNorm's width."""
    if isinstance(module, nn.Linear):
        return module.out_features
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            return int(sub.normalized_shape[-1])
    raise ValueError(f"SSF site '{name}' is neither a Linear nor contains a LayerNorm")


def ssf_sites(backbone: Backbone) -> list[_Site]:
    """Every candidate SSF site, block by block, in :data:`SITE_KINDS` order. A kind is a
    canonical part name; its module is at ``backbone.block_parts()[kind]`` inside each block
    (kinds the backbone does not map are skipped: Prithvi-WxC's attention norm passes a tuple)."""
    sites = []
    paths = backbone.block_parts()
    for block_name, block in transformer_blocks(backbone):
        for kind in SITE_KINDS:
            if kind not in paths:
                continue
            try:
                module = block.get_submodule(paths[kind])
            except AttributeError as error:
                raise ValueError(f"block '{block_name}' has no '{paths[kind]}' ({kind}) for "
                                 "SSF") from error
            name = f"{block_name}.{paths[kind]}"
            sites.append(_Site(name, kind, module, _features(name, module)))
    return sites


class ScaleShift(nn.Module):
    """y = γ ⊙ x + β over the last axis; γ = 1, β = 0 at the start (the identity)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _foldable(module: nn.Module) -> str | None:
    """Why ``module``'s output scale and shift cannot be folded into it (None: they can)."""
    if isinstance(module, nn.Linear):
        return None if module.bias is not None else "a Linear without bias has no shift to absorb β"
    if isinstance(module, AdaptiveLayerNorm):
        modulation = module.ln_modulation[-1]
        if isinstance(modulation, nn.Linear) and modulation.bias is not None:
            return None
        return "its modulation is not a Linear with bias"
    if isinstance(module, nn.LayerNorm):
        if module.weight is not None and module.bias is not None:
            return None
        return "a LayerNorm without affine weight and bias has nothing to absorb γ and β"
    return f"SSF does not know how to fold into {type(module).__name__}"


@torch.no_grad()
def fold_scale_shift(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Change ``module``'s weights so that its output becomes scale ⊙ output + shift (see the
    module doc); ValueError if it cannot absorb them."""
    reason = _foldable(module)
    if reason is not None:
        raise ValueError(f"cannot merge SSF into {type(module).__name__}: {reason}")
    gamma, beta = scale.detach().double(), shift.detach().double()

    def write(target: torch.Tensor, value: torch.Tensor) -> None:
        target.copy_(value.to(target.dtype))

    if isinstance(module, nn.Linear):
        write(module.weight, module.weight.double() * gamma[:, None])
        write(module.bias, module.bias.double() * gamma + beta)
    elif isinstance(module, AdaptiveLayerNorm):
        linear = module.ln_modulation[-1]
        features = gamma.numel()
        both = torch.cat([gamma, gamma])  # rows: shift, then scale
        write(linear.weight, linear.weight.double() * both[:, None])
        bias = linear.bias.double()
        write(linear.bias, torch.cat([bias[:features] * gamma + beta,
                                      bias[features:] * gamma + (gamma - 1) * module.scale_bias]))
    else:
        write(module.weight, module.weight.double() * gamma)
        write(module.bias, module.bias.double() * gamma + beta)


class SSF(OutputHooks):
    """SSF's scale-shift pairs for chosen sites of one backbone, applied by forward hooks.

    The site modules are referenced, not registered: SSF's parameters and state dict cover
    only the γ and β it created. :meth:`merge` folds them into the backbone and removes the
    hooks (the backbone then computes the adapted model alone).
    """

    def __init__(self, sites: list[_Site]) -> None:
        if not sites:
            raise ValueError("SSF needs at least one site")
        super().__init__({module_key(s.name): s.module for s in sites})
        self.site_names = {module_key(s.name): s.name for s in sites}
        self.sites = nn.ModuleDict({module_key(s.name): ScaleShift(s.features) for s in sites})
        self.merged = False

    def rewrite(self, key: str, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """The site's output through its ScaleShift."""
        return self.sites[key](output)

    def merge(self) -> None:
        """Fold every γ, β into its site's weights and remove the hooks (once; later calls
        have nothing left to fold). Checks every site first: nothing changes on failure."""
        if self.merged:
            return
        problems = [f"'{self.site_names[key]}' ({reason})" for key, module
                    in self._hooked.items() if (reason := _foldable(module)) is not None]
        if problems:
            raise ValueError("SSF cannot be merged: no parameters to absorb γ and β at "
                             + "; ".join(problems) + ". Deploy the adapter (load_adapter) instead")
        for key, module in self._hooked.items():
            fold_scale_shift(module, self.sites[key].scale, self.sites[key].shift)
        self.detach()
        self.merged = True


def _kind_sizes(sites: list[_Site]) -> dict[str, int]:
    """Parameters of every kind present, in :data:`SITE_KINDS` order."""
    sizes = {kind: 0 for kind in SITE_KINDS if any(site.kind == kind for site in sites)}
    for site in sites:
        sizes[site.kind] += 2 * site.features
    return sizes


def _choose_kinds(sizes: dict[str, int], entries: int) -> tuple[str, ...] | None:
    """The kinds whose total is closest to ``entries`` without exceeding it beyond tolerance
    (ties: fewer kinds, then SITE_KINDS order); None if even the smallest kind does."""
    best, best_gap = None, None
    present = [kind for kind in SITE_KINDS if kind in sizes]
    for count in range(1, len(present) + 1):
        for kinds in itertools.combinations(present, count):
            total = sum(sizes[k] for k in kinds)
            if total > (1 + BUDGET_TOLERANCE) * entries:
                continue
            if best_gap is None or abs(total - entries) < best_gap:
                best, best_gap = kinds, abs(total - entries)
    return best


@register_method("ssf", SSFOptions,
                 "SSF: learned per-channel scale and shift after every transformer block's qkv, "
                 "proj, fc1, fc2 and norms; site kinds chosen to fit the budget. Exception: its size "
                 "is fixed by the architecture (aurora-tiny at most 0.55 %); a larger budget "
                 "uses every site and warns")
def apply_ssf(backbone: Backbone, budget: float, options: SSFOptions) -> Adaptation:
    entries = budget_entries(backbone, budget)
    pretrained = backbone.pretrained_count()
    candidates = ssf_sites(backbone)
    if options.sites:
        chosen = [s for s in candidates if any(re.search(p, s.name) for p in options.sites)]
        if not chosen:
            raise ValueError(f"SSF sites {list(options.sites)} match none of "
                             f"{[s.name for s in candidates[:len(SITE_KINDS)]]}, ...")
        kinds = tuple(k for k in SITE_KINDS if any(s.kind == k for s in chosen))
    else:
        sizes = _kind_sizes(candidates)
        kinds = _choose_kinds(sizes, entries)
        if kinds is None:
            smallest = min(sizes, key=sizes.__getitem__)
            raise BudgetError(f"SSF's smallest configuration (every '{smallest}') needs "
                              f"{sizes[smallest]:,} parameters, more than budget {budget} allows "
                              f"({entries:,}); nearest feasible budget: "
                              f"{sizes[smallest] / pretrained:.4%}")
        chosen = [s for s in candidates if s.kind in kinds]
    count = sum(2 * s.features for s in chosen)
    if count > (1 + BUDGET_TOLERANCE) * entries:
        raise BudgetError(f"SSF on the {len(chosen)} chosen sites needs {count:,} parameters, more "
                          f"than budget {budget} allows ({entries:,}); nearest feasible budget: "
                          f"{count / pretrained:.4%}")
    adaptation = Adaptation(backbone, "ssf", budget, dataclasses.asdict(options))
    ssf = SSF(chosen).attach()
    adaptation.parts["ssf"] = ssf
    adaptation.merge_steps.append(lambda _: ssf.merge())
    adaptation.resolved.update(ssf={"kinds": list(kinds), "sites": len(chosen), "parameters": count})
    adaptation.note_budget_shortfall(count, entries, f"{count / pretrained:.4%} of the backbone; "
                                     f"its size is fixed by the architecture (2 × features on "
                                     f"{len(chosen)} sites)")
    return adaptation
