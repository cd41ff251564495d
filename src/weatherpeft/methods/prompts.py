"""Prompt tokens prepended at a backbone's prompt sites, by hooks, without touching its code.

A prompt site (``Backbone.prompt_sites()``) is an attention module. By default it is called as
``site(x, mask=None, ...)`` with tokens ``x`` of shape (B', N, C) — for Aurora B' = nW·B
windows — and an optional additive attention mask (nW, N, N), repeated over B by the site.
A backbone whose sites are called otherwise says how through
``Backbone.prompt_site_call(name, module)`` (a
:class:`~weatherpeft.backbones.base.PromptSiteCall`: where the tokens are, how prompt keys get
a bias); tokens may then have any leading axes (..., N, C), attention along axis −2, and
prompts are prepended to every sequence (Prithvi-WxC: to every mask unit in local blocks,
to every across-unit sequence in global ones).
With prompts E_P of shape (P, C) for that site, the injector runs the site on

    x'    = [E_P ; x]                           E_P expanded over the B' windows → (B', P+N, C)
    mask' = | b  0    |   (rows: queries, columns: keys; nW, P+N, P+N)
            | b  mask |

and returns y'[..., P:, :], dropping the P prompt outputs. b is ``key_bias`` (default 0): 0 is
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

from weatherpeft.backbones.base import PromptSiteCall

__all__ = ["MaskArgumentCall", "PromptInjector", "site_width"]

_MASK_ARGUMENT = "mask"


class MaskArgumentCall(PromptSiteCall):
    """The default convention: ``site(x, mask=None, ...)``, tokens first (B', N, C), an
    optional additive mask (nW, N, N) extended to (nW, P+N, P+N) as the module doc says."""

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        self.name = name
        self.signature = inspect.signature(module.forward)
        if not self.signature.parameters:
            raise ValueError(f"prompt site '{name}' takes no arguments: it needs the tokens as "
                             "its first argument")
        self._tokens_argument = next(iter(self.signature.parameters))

    def enable_key_bias(self) -> Callable[[], None]:
        if _MASK_ARGUMENT not in self.signature.parameters:
            raise ValueError(f"prompt site '{self.name}' has no '{_MASK_ARGUMENT}' argument, so "
                             "a key_bias cannot be applied")
        return lambda: None

    def tokens(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        return self.signature.bind(*args, **kwargs).arguments[self._tokens_argument]

    def with_prompts(self, args: tuple[Any, ...], kwargs: dict[str, Any], tokens: torch.Tensor,
                     count: int, key_bias: float) -> tuple[tuple[Any, ...], dict[str, Any]]:
        bound = self.signature.bind(*args, **kwargs)
        bound.arguments[self._tokens_argument] = tokens
        if _MASK_ARGUMENT in self.signature.parameters:
            mask = bound.arguments.get(_MASK_ARGUMENT,
                                       self.signature.parameters[_MASK_ARGUMENT].default)
            bound.arguments[_MASK_ARGUMENT] = _extend_mask(mask, count, tokens, key_bias)
        return bound.args, bound.kwargs


def _extend_mask(mask: torch.Tensor | None, count: int, tokens: torch.Tensor,
                 key_bias: float) -> torch.Tensor | None:
    """(nW, N, N) → (nW, P+N, P+N): zero prompt rows, ``key_bias`` prompt columns."""
    if mask is None and key_bias == 0.0:
        return None
    size = tokens.shape[-2]
    if mask is None:
        extended = tokens.new_zeros((1, size, size))
    else:
        extended = mask.new_zeros((mask.shape[0], size, size))
        extended[:, count:, count:] = mask
    if key_bias != 0.0:
        extended[:, :, :count] = key_bias
    return extended


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
        self._handles: list[Any] = []  # hook handles, and undos of enable_key_bias
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
        declared = getattr(self.backbone, "prompt_site_call", None)
        calls = {}
        for name, site in self.sites.items():
            call = declared(name, site) if callable(declared) else None
            calls[name] = MaskArgumentCall(name, site) if call is None else call
        undos = []
        if self.key_bias != 0.0:
            try:
                for call in calls.values():
                    undos.append(call.enable_key_bias())
            except ValueError as error:
                for undo in reversed(undos):
                    undo()
                raise ValueError(f"key_bias={self.key_bias}: {error}") from error
        self._handles.extend(_Undo(undo) for undo in undos)
        self._handles.append(self.backbone.register_forward_pre_hook(self._before_backbone))
        for name, site in self.sites.items():
            self._handles.append(site.register_forward_pre_hook(
                functools.partial(self._before_site, name, calls[name]), with_kwargs=True))
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

    def _before_site(self, name: str, call: PromptSiteCall, module: torch.nn.Module,
                     args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        prompts = self.prompts().get(name)
        if prompts is None or prompts.shape[0] == 0:
            self._pending[name] = 0
            return None
        x = call.tokens(args, kwargs)
        if x.ndim < 2 or prompts.ndim != 2 or prompts.shape[1] != x.shape[-1]:
            raise ValueError(f"prompts for site '{name}' have shape {tuple(prompts.shape)}; the "
                             f"site's tokens have shape {tuple(x.shape)} (expected prompts "
                             f"(P, {x.shape[-1]}))")
        count = prompts.shape[0]
        prompts = prompts.to(dtype=x.dtype, device=x.device)
        prompted = torch.cat([prompts.expand(*x.shape[:-2], *prompts.shape), x], dim=-2)
        self._pending[name] = count
        return call.with_prompts(args, kwargs, prompted, count, self.key_bias)

    def _after_site(self, name: str, module: torch.nn.Module, args: tuple[Any, ...],
                    output: Any) -> torch.Tensor | None:
        count = self._pending.pop(name, 0)
        if count == 0:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"prompt site '{name}' returned {type(output).__name__}; the "
                            "injector needs a tensor of tokens (..., P+N, C)")
        return output[..., count:, :].contiguous()


class _Undo:
    """A callable kept with the hook handles, so that ``detach`` runs it like ``remove()``."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self.undo = undo

    def remove(self) -> None:
        self.undo()


def site_width(name: str, module: torch.nn.Module) -> int:
    """A site's token width: the input width of its first linear layer (Aurora: ``qkv``)."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            return sub.in_features
    raise ValueError(f"prompt site '{name}' has no nn.Linear to read its token width from")
