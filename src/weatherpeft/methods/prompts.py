"""Prompt tokens prepended at a backbone's prompt sites, by hooks, without touching its code.

A prompt site (``Backbone.prompt_sites()``) is an attention module called as
``site(x, mask=None, ...)`` with tokens ``x`` of shape (B', N, C) — for Aurora B' = nW·B
windows — and an optional additive attention mask (nW, N, N), repeated over B by the site.
With prompts E_P of shape (P, C) for that site, the injector runs the site on

    x'    = [E_P ; x]                           E_P expanded over the B' windows → (B', P+N, C)
    mask' = | b  0    |   (rows: queries, columns: keys; nW, P+N, P+N)
            | b  mask |

and returns y'[:, P:], dropping the P prompt outputs. b is ``key_bias`` (default 0): 0 is
ordinary prompting (TADP, VPT-deep); ``-inf`` makes the prompts invisible (softmax weight
exp(−inf) = 0), so the output equals the un-prompted site's — a check that the mechanism is
otherwise exact, and a diagnostic (how much do the prompts matter?). A site called without a
mask gets none (mask stays ``None``) unless b ≠ 0, when it gets the (1, P+N, P+N) mask above.
The prompt rows of mask' only affect the prompt outputs, which are dropped.

Prompts are computed once per backbone forward: a pre-hook on the backbone clears the cache
and calls ``source()`` once, before any block runs, and every site uses that result. At
inference (backbone in eval mode and gradients disabled) the cache is kept across forwards —
prompts depend on weights only — until :meth:`PromptInjector.invalidate` is called or a forward
runs in training mode or with gradients. Call ``invalidate()`` after changing the weights the
prompts come from without a training forward (loading an adapter in eval mode). A site called
outside a backbone forward uses the cached prompts, if any; blocks recomputed by activation
checkpointing in backward thus use the prompts of their own forward.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["PromptInjector", "site_width"]

_MASK_ARGUMENT = "mask"


class PromptInjector:
    """Prepends ``source()``'s prompts at the backbone's prompt sites while attached.

    ``source()`` maps site names (from ``backbone.prompt_sites()``) to prompt tensors (P, C_site);
    P may differ per site, and sites it leaves out get no prompts. The backbone's parameters,
    names and state dict are unchanged: only forward hooks are added, and :meth:`detach`
    removes them. Prompts are cast to the dtype and device of the site's tokens.
    """

    def __init__(self, backbone: torch.nn.Module,
                 source: Callable[[], Mapping[str, torch.Tensor]], *,
                 key_bias: float = 0.0) -> None:
        key_bias = float(key_bias)
        if math.isnan(key_bias) or key_bias == math.inf:
            raise ValueError(f"key_bias must be finite or -inf, got {key_bias}")
        self.backbone = backbone
        self.source = source
        self.key_bias = key_bias
        self.sites: dict[str, torch.nn.Module] = dict(backbone.prompt_sites())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._prompts: dict[str, torch.Tensor] | None = None
        self._cached_for_inference = False
        self._pending: dict[str, int] = {}  # site → prompt count of its call in progress

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def attach(self) -> PromptInjector:
        """Install the hooks on the backbone and on every prompt site."""
        if self.attached:
            raise RuntimeError("this PromptInjector is already attached")
        signatures = {name: inspect.signature(site.forward) for name, site in self.sites.items()}
        for name, signature in signatures.items():
            if not signature.parameters:
                raise ValueError(f"prompt site '{name}' takes no arguments: it needs the tokens "
                                 "as its first argument")
            if self.key_bias != 0.0 and _MASK_ARGUMENT not in signature.parameters:
                raise ValueError(f"prompt site '{name}' has no '{_MASK_ARGUMENT}' argument, so "
                                 f"key_bias={self.key_bias} cannot be applied")
        self._handles.append(self.backbone.register_forward_pre_hook(self._before_backbone))
        for name, site in self.sites.items():
            self._handles.append(site.register_forward_pre_hook(
                functools.partial(self._before_site, name, signatures[name]), with_kwargs=True))
            # prepend=True: with several injectors on one site, the last to prepend drops first.
            self._handles.append(site.register_forward_hook(
                functools.partial(self._after_site, name), prepend=True))
        return self

    def detach(self) -> None:
        """Remove every hook and forget cached prompts: the backbone is as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self.invalidate()

    def invalidate(self) -> None:
        """Forget cached prompts: the next site call computes them again."""
        self._prompts = None
        self._cached_for_inference = False

    def prompts(self) -> dict[str, torch.Tensor]:
        """The current forward's prompts: the cached ones, else ``source()``'s (then cached)."""
        if self._prompts is None:
            prompts = dict(self.source())
            unknown = sorted(set(prompts) - set(self.sites))
            if unknown:
                raise ValueError(f"prompt source names {unknown}, which are not prompt sites of "
                                 f"the backbone ({list(self.sites)})")
            self._prompts = prompts
            self._cached_for_inference = self._inference()
        return self._prompts

    # -- hooks ----------------------------------------------------------------------------

    def _inference(self) -> bool:
        return not self.backbone.training and not torch.is_grad_enabled()

    def _before_backbone(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """A new forward: keep the cache only for inference after inference, else recompute.

        Computed here, outside every block, so that a block under activation checkpointing
        saves the same tensors in its forward and in its recomputation.
        """
        if not (self._cached_for_inference and self._inference()):
            self.invalidate()
        self.prompts()

    def _before_site(self, name: str, signature: inspect.Signature, module: torch.nn.Module,
                     args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        prompts = self.prompts().get(name)
        if prompts is None or prompts.shape[0] == 0:
            self._pending[name] = 0
            return None
        bound = signature.bind(*args, **kwargs)
        tokens_argument = next(iter(signature.parameters))
        x = bound.arguments[tokens_argument]
        if x.ndim != 3 or prompts.ndim != 2 or prompts.shape[1] != x.shape[2]:
            raise ValueError(f"prompts for site '{name}' have shape {tuple(prompts.shape)}; the "
                             f"site's tokens have shape {tuple(x.shape)} (expected prompts "
                             f"(P, {x.shape[-1]}))")
        count = prompts.shape[0]
        prompts = prompts.to(dtype=x.dtype, device=x.device)
        bound.arguments[tokens_argument] = torch.cat(
            [prompts.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)
        if _MASK_ARGUMENT in signature.parameters:
            mask = bound.arguments.get(_MASK_ARGUMENT,
                                       signature.parameters[_MASK_ARGUMENT].default)
            bound.arguments[_MASK_ARGUMENT] = self._extend_mask(mask, count, x)
        self._pending[name] = count
        return bound.args, bound.kwargs

    def _extend_mask(self, mask: torch.Tensor | None, count: int,
                     x: torch.Tensor) -> torch.Tensor | None:
        """(nW, N, N) → (nW, P+N, P+N): zero prompt rows, ``key_bias`` prompt columns."""
        if mask is None and self.key_bias == 0.0:
            return None
        size = count + x.shape[1]
        if mask is None:
            extended = x.new_zeros((1, size, size))
        else:
            extended = mask.new_zeros((mask.shape[0], size, size))
            extended[:, count:, count:] = mask
        if self.key_bias != 0.0:
            extended[:, :, :count] = self.key_bias
        return extended

    def _after_site(self, name: str, module: torch.nn.Module, args: tuple[Any, ...],
                    output: Any) -> torch.Tensor | None:
        count = self._pending.pop(name, 0)
        if count == 0:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"prompt site '{name}' returned {type(output).__name__}; the "
                            "injector needs a tensor of tokens (B', P+N, C)")
        return output[:, count:].contiguous()


def site_width(name: str, module: torch.nn.Module) -> int:
    """A site's token width: the input width of its first linear layer (Aurora: ``qkv``)."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            return sub.in_features
    raise ValueError(f"prompt site '{name}' has no nn.Linear to read its token width from")
