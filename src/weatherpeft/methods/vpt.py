"""VPT-deep: Visual Prompt Tuning (Jia et al., ECCV 2022), deep variant.

At every prompt site i (each Swin block's window attention) P free, learned tokens
E_i ∈ R^{P×C_i} are prepended to the tokens of every window, the site runs on [E_i ; x] and
the P prompt outputs are dropped (:class:`~weatherpeft.methods.prompts.PromptInjector`): new
prompts enter every block, as in VPT-deep. Unlike TADP the prompts are parameters
themselves, generated from nothing.

Initialisation, as VPT's code: uniform U(−a, a) with a = √(6 / (fan_in + C_i)), Xavier's
bound with fan_in the patch embedding's input size per token (VPT: 3·patch² for RGB;
here V·S: every embedded variable's history × patch kernel), from a generator seeded by
``seed`` (the global RNG is not drawn from).

Size: Σ_i P·C_i; P = round(B / Σ_i C_i) for a budget of B entries, one P for all sites.
Deployment: the prompts are fixed tokens (``adaptation.add_prompts``), saved by
:func:`~weatherpeft.adapters.save_merged` and prepended again by its ``DeployedModel``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.base import BUDGET_TOLERANCE, Adaptation, BudgetError, budget_entries, register_method
from weatherpeft.methods.prompts import PromptInjector, site_width

__all__ = ["VPTOptions", "VPTPrompts", "apply_vpt"]

@dataclass
class VPTOptions:
    """``seed``: of the prompts' initialisation. The prompt length comes from the budget."""

    seed: int = 0


class VPTPrompts(nn.Module):
    """One (P, C_site) parameter per prompt site; ``prompts()`` is the injector's source."""

    def __init__(self, widths: dict[str, int], prompt_length: int, fan_in: int, seed: int) -> None:
        super().__init__()
        if prompt_length < 1:
            raise ValueError(f"VPT needs at least one prompt per site, got {prompt_length}")
        generator = torch.Generator().manual_seed(seed)
        self.site_names = {self._key(site): site for site in widths}
        self.tokens = nn.ParameterDict()
        for site, width in widths.items():
            bound = math.sqrt(6.0 / (fan_in + width))
            values = torch.rand(prompt_length, width, generator=generator) * (2 * bound) - bound
            self.tokens[self._key(site)] = nn.Parameter(values)

    @staticmethod
    def _key(site: str) -> str:
        return site.replace(".", "_")

    def prompts(self) -> dict[str, torch.Tensor]:
        """{site name: (P, C_site)}."""
        return {self.site_names[key]: tokens for key, tokens in self.tokens.items()}


def _patch_fan_in(backbone: Backbone) -> int:
    """V·S of the patch embeddings: inputs one token's embedding sees (VPT's 3·patch²)."""
    variables = getattr(backbone, "embedding_variables", None)
    if not variables:
        raise ValueError(f"{type(backbone).__name__} does not list its embedding_variables, "
                         "needed for VPT's initialisation bound")
    _, n_variables, kernel_size = backbone.embedding_weights(variables).shape
    return n_variables * kernel_size


@register_method("vpt", VPTOptions, "VPT-deep: free learned prompt tokens prepended at every "
                                    "Swin block's attention; prompt length from the budget")
def apply_vpt(backbone: Backbone, budget: float, options: VPTOptions) -> Adaptation:
    entries = budget_entries(backbone, budget)
    widths = {name: site_width(name, module) for name, module in backbone.prompt_sites()}
    if not widths:
        raise ValueError(f"{type(backbone).__name__} has no prompt sites")
    per_prompt = sum(widths.values())
    pretrained = backbone.pretrained_count()
    length = round(entries / per_prompt)
    if length * per_prompt > (1 + BUDGET_TOLERANCE) * entries:
        length -= 1
    if length < 1:
        raise BudgetError(f"VPT's smallest configuration (one prompt per site) needs "
                          f"{per_prompt:,} parameters, more than budget {budget} allows "
                          f"({entries:,}); nearest feasible budget: {per_prompt / pretrained:.4%}")
    adaptation = Adaptation(backbone, "vpt", budget, dataclasses.asdict(options))
    prompts = VPTPrompts(widths, length, _patch_fan_in(backbone), options.seed)
    adaptation.parts["vpt"] = prompts
    adaptation.add_prompts(prompts.prompts, PromptInjector(backbone, prompts.prompts).attach())
    count = length * per_prompt
    adaptation.resolved.update(vpt={"prompt_length": length, "parameters": count})
    adaptation.note_budget_shortfall(count, entries, f"{length} prompt(s) per site, one more "
                                                     "would exceed the budget")
    return adaptation
