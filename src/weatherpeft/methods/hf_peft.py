"""LoRA, DoRA and any other HF ``peft`` tuner, injected in place into the backbone's modules.

``lora`` and ``dora`` are sized to the budget; ``peft`` applies any peft type by name
(``--method peft --options '{"peft_type": "ia3", "config": {...}}'``) with the given config,
unsized, and reports its honest count. peft wraps each targeted layer (``lora.Linear`` with
the original layer as ``base_layer``), so the backbone object, its ``forward(batch)`` and its
pretrained parameters (roles kept by identity) are unchanged; what peft adds inside the
backbone counts as *added* and goes to the adapter file as ``added.*`` tensors.

Targets: full module names matched by ``targets`` (regexes, ``re.fullmatch``); default (empty)
the backbone's :meth:`~weatherpeft.backbones.base.Backbone.linear_targets`: for Aurora the
Swin blocks' ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` — never the Perceiver
encoder/decoder; for Prithvi-WxC every transformer's ``attention.1.qkv_layer``,
``attention.1.w_layer``, ``ff.1.net.0`` and ``ff.1.net.3``.

Sizing (``lora``/``dora`` with ``rank=None``). A targeted Linear l (in_l → out_l) at rank
r_l > 0 costs r_l·(in_l + out_l), plus out_l for DoRA's magnitude vector:

    N = Σ_l r_l·(in_l + out_l) + [DoRA]·Σ_{l: r_l > 0} out_l  ≤  B = budget × pretrained.

Every target gets the largest uniform rank r whose N fits B; the budget left over gives rank
r + 1 to a prefix of the targets in priority order (layer kinds in model order — qkv, proj,
fc1, fc2 by default — each kind across all blocks), as long as the next layer fits. N lands
within one layer's cost under B. Uniform rank alone steps by Σ(in + out) = 24,576 entries on
aurora-tiny (0.4 % of it): budget 0.003 would be unreachable and 0.005–0.02 20 % under. When
r = 0, only the prefix is adapted (a warning says so). ``rank`` given: that rank everywhere,
unsized. ``alpha = alpha_ratio × rank`` per layer, so the scale alpha/r is the same for every
layer and budget.

peft (and the transformers it pulls in, ~1 s) is imported on first use, not by every CLI start.

Merging (``save_merged``): every peft layer merges its update into ``base_layer``'s
parameters in place — the same Parameter objects, so ``save_checkpoint`` writes merged
weights under the original names — and from then on skips its adapter path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from weatherpeft.backbones.aurora import SWIN_FEEDFORWARD
from weatherpeft.backbones.aurora import SWIN_LINEARS as AURORA_SWIN_LINEARS
from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.base import BUDGET_TOLERANCE, Adaptation, BudgetError, budget_entries, register_method

__all__ = ["LoRAOptions", "PeftOptions", "SWIN_LINEARS", "apply_dora", "apply_lora",
           "apply_peft", "lora_entries", "peft_types", "size_lora", "target_modules"]

if TYPE_CHECKING:
    from peft import PeftConfig

log = logging.getLogger(__name__)

#: Aurora's default targets (kept here under their old names; backbones now name their own).
SWIN_LINEARS = AURORA_SWIN_LINEARS
IA3_FEEDFORWARD = SWIN_FEEDFORWARD
ADAPTER_NAME = "default"
#: Config keys the ``peft`` method refuses: targets come from ``targets``; module copies
#: would be trained outside the merge (the task head is trained by every method anyway).
_REFUSED_CONFIG_KEYS = ("target_modules", "modules_to_save", "trainable_token_indices")
#: In-place peft types that inject but cannot run on a weather backbone (peft 0.21), and why.
_UNRUNNABLE = {"poly": "its forward needs per-sample task_ids",
               "trainable_tokens": "it trains rows of a token-embedding matrix",
               "xlora": "it mixes LoRA experts inside a transformers model"}


def _regexes(targets: str | Sequence[str]) -> tuple[str, ...]:
    """``targets`` as a tuple of regexes; empty means the backbone's default targets."""
    return (targets,) if isinstance(targets, str) else tuple(targets)


def _targets(backbone: Backbone, targets: Sequence[str]) -> tuple[str, ...]:
    """The given target regexes, or (none given) the backbone's ``linear_targets()``."""
    return tuple(targets) or tuple(backbone.linear_targets())


@dataclass
class LoRAOptions:
    """``rank``: None = sized to the budget (see module doc), or one rank for every target;
    ``alpha_ratio``: alpha = ratio × rank (default 1, Aurora's own LoRA: r = alpha = 8, so
    the update is B·A unscaled at any rank); ``dropout`` on the LoRA input; ``targets``:
    regexes on full module names (default, empty: the backbone's ``linear_targets()``, its
    blocks' Linear layers); ``seed``: of the initialisation (A is random, B zero)."""

    rank: int | None = None
    alpha_ratio: float = 1.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1 (or None to size it), got {self.rank}")
        if self.alpha_ratio <= 0:
            raise ValueError(f"LoRA alpha_ratio must be positive, got {self.alpha_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        self.targets = _regexes(self.targets)


@dataclass
class PeftOptions:
    """``peft_type``: a peft tuner by name (ia3, vera, boft, oft, loha, lokr, fourierft, ...);
    ``config``: keyword arguments of its peft config class (``IA3Config``, ...), minus
    target_modules; ``targets``: regexes on full module names (default, empty: the backbone's
    ``linear_targets()``; IA3's feedforward_modules default to its ``feedforward_targets()``);
    ``seed``: of the initialisation."""

    peft_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.peft_type:
            raise ValueError(f"method 'peft' needs the option peft_type, one of {peft_types()}")
        refused = sorted(set(self.config) & set(_REFUSED_CONFIG_KEYS))
        if refused:
            raise ValueError(f"method 'peft' does not take {refused} in its config: targets come "
                             "from the 'targets' option, and the task head already trains")
        self.config = dict(self.config)
        self.targets = _regexes(self.targets)


def peft_types() -> list[str]:
    """peft types that inject into any torch module in place (prompt learning needs a PeftModel)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTuner

    return sorted(t.value.lower() for t, tuner in PEFT_TYPE_TO_TUNER_MAPPING.items()
                  if issubclass(tuner, BaseTuner) and t.value.lower() not in _UNRUNNABLE)


# --------------------------------------------------------------------------------------
# Targets and sizing
# --------------------------------------------------------------------------------------


def target_modules(backbone: Backbone, targets: Sequence[str]) -> dict[str, torch.nn.Module]:
    """Modules whose full name matches any of ``targets`` (re.fullmatch), in model order."""
    found = {name: module for name, module in backbone.named_modules()
             if any(re.fullmatch(pattern, name) for pattern in targets)}
    if not found:
        raise ValueError(f"no module of {type(backbone).__name__} matches targets {list(targets)}")
    return found


def _linear_targets(backbone: Backbone, targets: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The targets, which LoRA sizing needs to be Linear layers."""
    found = target_modules(backbone, targets)
    others = [name for name, module in found.items() if not isinstance(module, torch.nn.Linear)]
    if others:
        raise ValueError(f"LoRA targets must be nn.Linear layers; targets {list(targets)} also "
                         f"match {others[:5]}{' ...' if len(others) > 5 else ''}")
    return found


def _priority(names: Sequence[str]) -> list[str]:
    """Layer kinds (last name component) in order of first appearance, each in model order."""
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
    return sorted(names, key=lambda name: kinds.index(name.rsplit(".", 1)[-1]))


def lora_entries(layers: Mapping[str, torch.nn.Linear], ranks: Mapping[str, int], dora: bool) -> int:
    """Parameters of LoRA (or DoRA) at ``ranks`` (layer name → rank; 0 or absent: not adapted)."""
    return sum(rank * (layers[name].in_features + layers[name].out_features)
               + (layers[name].out_features if dora else 0)
               for name, rank in ranks.items() if rank > 0)


def size_lora(layers: Mapping[str, torch.nn.Linear], entries: int, dora: bool,
              pretrained: int) -> dict[str, int]:
    """Ranks per layer that fit ``entries`` (see module doc): uniform r, then r + 1 on a prefix."""
    width = sum(layer.in_features + layer.out_features for layer in layers.values())
    magnitude = sum(layer.out_features for layer in layers.values()) if dora else 0
    rank = max(0, (entries - magnitude) // width)
    ranks = dict.fromkeys(layers, rank)
    left = entries - lora_entries(layers, ranks, dora)
    for name in _priority(list(layers)):
        cost = layers[name].in_features + layers[name].out_features
        cost += layers[name].out_features if dora and rank == 0 else 0
        if cost > left:
            break
        ranks[name] = rank + 1
        left -= cost
    ranks = {name: r for name, r in ranks.items() if r > 0}
    if not ranks:
        first = layers[_priority(list(layers))[0]]
        smallest = first.in_features + first.out_features + (first.out_features if dora else 0)
        raise BudgetError(f"{'DoRA' if dora else 'LoRA'} needs {smallest:,} parameters for rank 1 "
                          f"on one layer, more than the budget's {entries:,}; nearest feasible "
                          f"budget: {smallest / pretrained:.4%}")
    return ranks


# --------------------------------------------------------------------------------------
# Injection and merging
# --------------------------------------------------------------------------------------


def _merge(peft_type: str, adaptation: Adaptation) -> None:
    """Merge every peft layer's update into its base layer's parameters (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in adaptation.backbone.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            try:
                module.merge()
            except NotImplementedError as error:
                raise ValueError(f"peft type '{peft_type}' cannot be merged into the weights: "
                                 f"{error}") from error


def _inject(adaptation: Adaptation, config: PeftConfig, seed: int) -> None:
    """Inject ``config``'s adapters into the backbone in place and declare what trains."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTunerLayer

    backbone = adaptation.backbone
    peft_type = config.peft_type.value.lower()
    if any(isinstance(module, BaseTunerLayer) for module in backbone.modules()):
        raise ValueError(f"{type(backbone).__name__} already carries peft adapters; apply "
                         f"'{peft_type}' to a freshly loaded backbone")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](backbone, config, adapter_name=ADAPTER_NAME)
        except Exception as error:  # peft's errors, whatever their class: name the type
            raise ValueError(f"peft type '{peft_type}' cannot be applied to "
                             f"{type(backbone).__name__} ({error}); load a fresh backbone before "
                             "trying again") from error
    # peft freezes everything but its adapters; the task head (and encoder/decoder under the
    # "train" protocol) trains under every method.
    adaptation.enable_always_trained()
    # Pretrained tensors peft leaves trainable (bias="all", ...) train whole, declared as dense.
    adaptation.train_densely([name for name, parameter in backbone.pretrained_parameters().items()
                              if parameter.requires_grad])
    adaptation.merge_steps.append(functools.partial(_merge, peft_type))


# --------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------


def _apply_lora(backbone: Backbone, budget: float, options: LoRAOptions, dora: bool) -> Adaptation:
    from peft import LoraConfig

    method = "dora" if dora else "lora"
    layers = _linear_targets(backbone, _targets(backbone, options.targets))
    entries = budget_entries(backbone, budget)
    pretrained = backbone.pretrained_count()
    if options.rank is None:
        ranks = size_lora(layers, entries, dora, pretrained)
    else:
        ranks = dict.fromkeys(layers, options.rank)
    count = lora_entries(layers, ranks, dora)
    if abs(count - entries) > BUDGET_TOLERANCE * entries:
        reason = (f"rank {options.rank} was given" if options.rank is not None else
                  "the next layer's rank step does not fit")
        log.warning("%s at budget %s trains %d parameters, %.1f%% of its %d (%s)", method, budget,
                    count, 100 * count / entries, entries, reason)
    if len(ranks) < len(layers):
        log.warning("%s at budget %s adapts %d of %d target layers at rank 1 (the budget is below "
                    "rank 1 on every target)", method, budget, len(ranks), len(layers))

    # One rank for most layers, rank_pattern (exact names) for the others; alpha follows rank.
    counts = Counter(ranks.values())
    common = max(counts, key=lambda rank: (counts[rank], rank))
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != common}
    alphas = {key: options.alpha_ratio * rank for key, rank in pattern.items()}
    config = LoraConfig(r=common, lora_alpha=options.alpha_ratio * common,
                        lora_dropout=options.dropout, target_modules=list(ranks), use_dora=dora,
                        rank_pattern=pattern, alpha_pattern=alphas)
    adaptation = Adaptation(backbone, method, budget, dataclasses.asdict(options))
    _inject(adaptation, config, options.seed)
    adaptation.resolved.update(rank_counts={str(rank): n for rank, n in sorted(counts.items())},
                               adapted_layers=len(ranks), target_layers=len(layers),
                               parameters=count)
    return adaptation


@register_method("lora", LoRAOptions, "LoRA (HF peft) on the transformer blocks' Linear "
                                      "layers, rank sized to the budget")
def apply_lora(backbone: Backbone, budget: float, options: LoRAOptions) -> Adaptation:
    return _apply_lora(backbone, budget, options, dora=False)


@register_method("dora", LoRAOptions, "DoRA (HF peft, LoRA + magnitude vector) on the "
                                      "transformer blocks' Linear layers, rank sized to the budget")
def apply_dora(backbone: Backbone, budget: float, options: LoRAOptions) -> Adaptation:
    return _apply_lora(backbone, budget, options, dora=True)


def _peft_config(backbone: Backbone, options: PeftOptions) -> PeftConfig:
    """The peft config of ``options.peft_type`` with ``options.config`` and the resolved targets."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils import PeftType

    try:
        peft_type = PeftType(options.peft_type.upper())
    except ValueError:
        raise ValueError(f"unknown peft_type '{options.peft_type}'; known: {peft_types()}") from None
    if not issubclass(PEFT_TYPE_TO_TUNER_MAPPING[peft_type], BaseTuner):
        raise ValueError(f"peft_type '{options.peft_type}' is prompt learning, which needs a "
                         f"transformers model inside a PeftModel; in-place types: {peft_types()}")
    if peft_type.value.lower() in _UNRUNNABLE:
        raise ValueError(f"peft_type '{options.peft_type}' cannot run on a weather backbone: "
                         f"{_UNRUNNABLE[peft_type.value.lower()]}")
    names = list(target_modules(backbone, _targets(backbone, options.targets)))
    kwargs = {**options.config, "target_modules": names}
    if peft_type is PeftType.IA3 and "feedforward_modules" not in kwargs:
        feedforward = backbone.feedforward_targets()
        kwargs["feedforward_modules"] = [n for n in names
                                         if any(re.fullmatch(f, n) for f in feedforward)]
    try:
        return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"peft_type '{options.peft_type}': its config "
                         f"{PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].__name__} rejects "
                         f"{options.config}: {error}") from error


@register_method("peft", PeftOptions, "any HF peft tuner by name (options peft_type, config) on "
                                      "the transformer blocks' Linear layers; not sized to the "
                                      "budget")
def apply_peft(backbone: Backbone, budget: float, options: PeftOptions) -> Adaptation:
    config = _peft_config(backbone, options)
    entries = budget_entries(backbone, budget)
    adaptation = Adaptation(backbone, "peft", budget, dataclasses.asdict(options))
    _inject(adaptation, config, options.seed)
    count = adaptation.report().trainable
    if abs(count - entries) > BUDGET_TOLERANCE * entries:
        log.warning("peft '%s' trains %d parameters, %.1f%% of budget %s (%d): its config, not the "
                    "budget, sets its size", options.peft_type, count, 100 * count / entries,
                    budget, entries)
    adaptation.resolved.update(peft_type=config.peft_type.value.lower(), parameters=count)
    return adaptation
