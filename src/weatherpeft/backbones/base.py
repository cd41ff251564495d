"""The Backbone contract: what weatherpeft needs from a weather foundation model, and no more.

A :class:`Backbone` wraps a real, unmodified foundation model (Aurora, Prithvi-WxC) so that
methods (TADP, SFAS, LoRA, ...) and tasks can work on any of them: a forward pass on
``aurora.Batch``, the per-variable patch embeddings (TADP's task repository), the attention
modules where prompts go, the split of parameters into pretrained and task head, and a
fingerprint that adapter files record so that they refuse the wrong backbone.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from aurora import Batch

__all__ = ["BLOCK_PARTS", "ENCODER_DECODER_PROTOCOLS", "Backbone", "LoadReport", "PromptSiteCall",
           "check_encoder_decoder", "compare_state", "hash_weights"]

#: The parts of a transformer block that baseline methods adapt, under their canonical names
#: (Aurora's Swin block paths). A backbone maps each to its own path inside a block
#: (:meth:`Backbone.block_parts`): attention input/output projections, MLP layers, the norms
#: before/after attention and MLP, and the MLP as a whole.
BLOCK_PARTS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2", "mlp")

#: How many keys of one kind an error message lists before it summarises the rest.
_LISTED_KEYS = 25

#: What happens to a backbone's encoder/decoder (:meth:`Backbone.encoder_decoder_parameters`)
#: under fine-tuning. "frozen": they are ordinary pretrained parameters — frozen unless a
#: method trains them, inside the budget and the selection pools. "train" (the authors'
#: protocol): trained whole under every method, a role of their own outside the budget and
#: the selection pools, like the task head.
ENCODER_DECODER_PROTOCOLS = ("frozen", "train")


def check_encoder_decoder(protocol: Any) -> str:
    """``protocol`` if it is one of :data:`ENCODER_DECODER_PROTOCOLS`, else ``ValueError``."""
    if protocol not in ENCODER_DECODER_PROTOCOLS:
        raise ValueError(f"encoder_decoder must be one of {ENCODER_DECODER_PROTOCOLS} ('frozen': "
                         f"inside the budget as today; 'train': the authors' protocol, trained "
                         f"whole outside the budget), got {protocol!r}")
    return protocol


class PromptSiteCall(abc.ABC):
    """How a backbone calls one of its prompt sites, for the prompt injector.

    The injector (:mod:`weatherpeft.methods.prompts`) prepends P prompt tokens to a site's
    tokens along the attended axis (−2; every leading axis is a batch of sequences) and drops
    the P outputs after the call. A backbone whose sites are not called as
    ``site(x, mask=None, ...)`` (the injector's default convention) returns one of these from
    :meth:`Backbone.prompt_site_call`.
    """

    @abc.abstractmethod
    def tokens(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The tokens of one call of the site, shape (..., N, C), attention along axis −2."""

    @abc.abstractmethod
    def with_prompts(self, args: tuple[Any, ...], kwargs: dict[str, Any], tokens: torch.Tensor,
                     count: int, key_bias: float) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with ``tokens`` (..., P+N, C; the first ``count`` are prompts)
        in place of the originals, and, if ``key_bias`` ≠ 0, that additive bias on the prompt
        keys for every query."""

    def enable_key_bias(self) -> Callable[[], None]:
        """Make the site honour a key bias (called when an injector with ``key_bias`` ≠ 0
        attaches); returns the undo. Raise ValueError if the site cannot."""
        return lambda: None


@dataclass(frozen=True)
class LoadReport:
    """What a checkpoint load could not take as it was, and what it changed on the way.

    ``missing``: model keys the checkpoint lacks (left as initialised), task-head keys excluded;
    ``unexpected``: checkpoint keys the model lacks (ignored); ``shape_mismatches``:
    (key, checkpoint shape, model shape), skipped; ``config_differences``: settings that differ
    between the checkpoint's record and the model; ``notes``: conversions done (not problems).
    """

    source: str
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    config_differences: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """True when every model weight came from the checkpoint and everything matched."""
        return not (self.missing or self.unexpected or self.shape_mismatches
                    or self.config_differences)

    def problems(self) -> str:
        """The mismatches as readable lines (empty when :attr:`exact`)."""

        def listing(keys: Sequence[str]) -> str:
            shown = ", ".join(keys[:_LISTED_KEYS])
            more = len(keys) - _LISTED_KEYS
            return shown + (f", ... and {more} more" if more > 0 else "")

        lines = []
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)}): {listing(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}): "
                         f"{listing(self.unexpected)}")
        if self.shape_mismatches:
            shapes = [f"{key} (checkpoint {list(saved)} vs model {list(model)})"
                      for key, saved, model in self.shape_mismatches]
            lines.append(f"  shape differs ({len(shapes)}): {listing(shapes)}")
        for difference in self.config_differences:
            lines.append(f"  config differs: {difference}")
        return "\n".join(lines)


def compare_state(model_shapes: Mapping[str, tuple[int, ...]],
                  checkpoint_shapes: Mapping[str, tuple[int, ...]],
                  expected_missing: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...],
                                                                 tuple[tuple[str, tuple[int, ...],
                                                                             tuple[int, ...]], ...]]:
    """(missing, unexpected, shape mismatches) between a model's and a checkpoint's tensors.

    ``expected_missing`` (new variables' heads) are not reported when the checkpoint lacks them.
    """
    allowed = set(expected_missing)
    missing = tuple(sorted(k for k in model_shapes if k not in checkpoint_shapes and k not in allowed))
    unexpected = tuple(sorted(k for k in checkpoint_shapes if k not in model_shapes))
    mismatches = tuple(sorted(
        (k, tuple(checkpoint_shapes[k]), tuple(model_shapes[k]))
        for k in model_shapes
        if k in checkpoint_shapes and tuple(checkpoint_shapes[k]) != tuple(model_shapes[k])))
    return missing, unexpected, mismatches


def hash_weights(config: Mapping[str, Any],
                  named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over canonical JSON of ``config``, then every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        if tensor.is_meta:
            raise RuntimeError(f"cannot fingerprint '{name}': it is on the meta device (no data)")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\n{name}|{data.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


class Backbone(torch.nn.Module, abc.ABC):
    """A pretrained weather foundation model behind the interface methods and tasks rely on.

    Subclasses build the wrapped model, then call :meth:`_record_parameter_roles` once its
    weights are loaded. Roles are kept by parameter identity, so they survive renaming by
    methods that wrap submodules (HF peft); parameters added later (adapters) belong to neither.
    """

    #: Config keys that do not change what the backbone computes; the fingerprint ignores them.
    unfingerprinted_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._config: dict[str, Any] = {}
        self._pretrained_named: list[tuple[str, torch.nn.Parameter]] = []
        self._head_named: list[tuple[str, torch.nn.Parameter]] = []
        self._fingerprint: str | None = None
        self._encoder_decoder = "frozen"

    # -- the model ------------------------------------------------------------------------

    @abc.abstractmethod
    def forward(self, batch: Batch) -> Batch:
        """Predict from ``batch`` (physical units in, physical units out)."""

    @abc.abstractmethod
    def embedding_weights(self, variables: Sequence[str]) -> torch.Tensor:
        """Per-variable patch-embedding weights, shape (D, V, S) with S = T·Ph·Pw, in order.

        A differentiable function of the live parameters: gradients reach the embeddings.
        """

    @property
    @abc.abstractmethod
    def embedding_variables(self) -> tuple[str, ...]:
        """Every name :meth:`embedding_weights` accepts, in the model's order (a task's default
        variable set for TADP)."""

    @abc.abstractmethod
    def prompt_sites(self) -> list[tuple[str, torch.nn.Module]]:
        """(qualified name, module) of every attention module where prompt tokens can go."""

    def prompt_site_call(self, name: str, module: torch.nn.Module) -> PromptSiteCall | None:
        """How the site ``name`` is called; None (default): ``site(x, mask=None, ...)`` with
        tokens x (B', N, C) first and an optional additive mask (nW, N, N)."""
        return None

    # -- where baseline methods adapt ------------------------------------------------------

    def transformer_blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """(name, module) of every transformer block in model order. Default: the parent of
        each prompt site (Aurora's Swin blocks)."""
        names = [name.rpartition(".")[0] for name, _ in self.prompt_sites()]
        return [(name, self.get_submodule(name)) for name in names]

    def block_parts(self) -> dict[str, str]:
        """Canonical part name (:data:`BLOCK_PARTS`) → its path inside every block; parts a
        block lacks (or that methods cannot adapt) are left out. Default: Aurora's paths."""
        return {part: part for part in BLOCK_PARTS}

    def linear_targets(self) -> tuple[str, ...]:
        """Regexes (``re.fullmatch`` on module names) of the blocks' Linear layers: attention
        projections and MLP layers, LoRA's and HF peft's default targets."""
        return self._part_regexes(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))

    def feedforward_targets(self) -> tuple[str, ...]:
        """Regexes of the blocks' second MLP layers (IA3's feed-forward modules)."""
        return self._part_regexes(("mlp.fc2",))

    def _part_regexes(self, parts: Sequence[str]) -> tuple[str, ...]:
        paths = self.block_parts()
        return tuple(re.escape(f"{block}.{paths[part]}") for block, _ in self.transformer_blocks()
                     for part in parts if part in paths)

    # -- configuration and identity -------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able description: preset, variables, levels, architecture (a copy)."""
        return copy.deepcopy(self._config)

    def fingerprint_config(self, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The part of a config (default :attr:`config`) that defines the pretrained model."""
        config = self.config if config is None else config
        return {k: v for k, v in config.items() if k not in self.unfingerprinted_keys}

    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 of the fingerprint config and the pretrained weights as loaded (cached).

        ``refresh=True`` rehashes the current weights (and caches that instead).
        """
        if self._fingerprint is None or refresh:
            self._fingerprint = hash_weights(self.fingerprint_config(), self._pretrained_named)
        return self._fingerprint

    # -- parameter roles ------------------------------------------------------------------

    def _record_parameter_roles(self, task_head_names: Iterable[str]) -> None:
        """Split ``named_parameters()`` into task head (the given names) and pretrained (the rest)."""
        named = dict(self.named_parameters())
        head = set(task_head_names)
        unknown = sorted(head - set(named))
        if unknown:
            raise KeyError(f"task-head parameters not in the model: {unknown}")
        self._head_named = [(n, p) for n, p in named.items() if n in head]
        self._pretrained_named = [(n, p) for n, p in named.items() if n not in head]
        self._fingerprint = None

    def _select(self, recorded: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.nn.Parameter]:
        wanted = {id(p) for _, p in recorded}
        return {n: p for n, p in self.named_parameters() if id(p) in wanted}

    def pretrained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Everything that came pretrained and is not task head — nor, under the "train"
        protocol, encoder/decoder: what budgets count and SFAS selects from."""
        pretrained = self._select(self._pretrained_named)
        if self._encoder_decoder == "frozen":
            return pretrained
        apart = {id(p) for p in self.encoder_decoder_parameters().values()}
        return {n: p for n, p in pretrained.items() if id(p) not in apart}

    def pretrained_count(self) -> int:
        """Entries of :meth:`pretrained_parameters`: what a budget is a fraction of."""
        return sum(p.numel() for p in self.pretrained_parameters().values())

    def encoder_decoder_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The pretrained parameters that map fields to tokens and tokens back to fields (the
        authors train them under every method as the task's "head"); whatever the protocol.

        Backbones that can name them override :meth:`_is_encoder_decoder`; the default raises
        ``ValueError``, so the "train" protocol is refused before any data are read.
        """
        chosen = [(n, p) for n, p in self._pretrained_named if self._is_encoder_decoder(n)]
        if not chosen:
            raise ValueError(f"{type(self).__name__} names no encoder/decoder parameters: "
                             "encoder_decoder='train' needs them")
        return self._select(chosen)

    def _is_encoder_decoder(self, name: str) -> bool:
        """Whether pretrained parameter ``name`` (as recorded at load) is encoder/decoder."""
        raise ValueError(f"{type(self).__name__} cannot name its encoder/decoder parameters, so "
                         "it cannot honour encoder_decoder='train'; use 'frozen'")

    @property
    def encoder_decoder(self) -> str:
        """The protocol the parameter roles follow: "frozen" (default) or "train"."""
        return self._encoder_decoder

    def set_encoder_decoder(self, protocol: str) -> None:
        """Follow ``protocol`` (see :data:`ENCODER_DECODER_PROTOCOLS`); set before a method is
        applied. ``ValueError`` for an unknown protocol or one this backbone cannot honour."""
        protocol = check_encoder_decoder(protocol)
        if protocol == "train":
            self.encoder_decoder_parameters()  # raises if the backbone cannot name them
        self._encoder_decoder = protocol

    def task_head_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Embeddings and output heads of variables the checkpoint lacked: trained by every method."""
        return self._select(self._head_named)
