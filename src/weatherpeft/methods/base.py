"""The Method contract: how a fine-tuning method turns a Backbone into a trainable model.

A method is one registered function ``build(backbone, budget, options) -> Adaptation``. The
:class:`Adaptation` is the backbone with the method's parts attached (a module whose
``forward(batch)`` is the adapted model), plus what the Trainer needs (parameter groups,
hooks) and what the adapter file needs (which tensors the method trained).

Every parameter of an Adaptation has exactly one role, decided by identity:

- *head*: the backbone's task-head parameters (new variables' embeddings and output heads),
  trained by every method and counted apart, like a classifier head;
- *encoder_decoder*: under the "train" protocol (the authors'), the backbone's encoder/decoder
  (:meth:`~weatherpeft.backbones.base.Backbone.encoder_decoder_parameters`), trained whole by
  every method, outside the budget and the selection pools, counted apart; under "frozen"
  (the default) they are ordinary pretrained parameters and this role is empty;
- *dense*: pretrained parameters the method trains whole (full fine-tuning);
- *masked*: pretrained parameters of which only selected entries move (SFAS, Child-Tuning),
  updated by a :class:`~weatherpeft.methods.masked_update.MaskedUpdate` hook;
- *added*: parameters the method created (TADP generators, LoRA matrices, prompts);
- frozen: everything else.

Budgets are fractions of the backbone's pretrained parameter count (under "train", the
encoder/decoder excluded: the paper's accounting, whose "Full-Tuning" count is Aurora's Swin).
:class:`ParameterReport` says what a method trains per step (``trainable``) and what its
adapter file must hold (``stored``) — for SFAS the union of every entry that ever moved, not
the per-step k.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from aurora import Batch

from weatherpeft.backbones.base import ENCODER_DECODER_PROTOCOLS, Backbone
from weatherpeft.training.hooks import TrainingHook

__all__ = [
    "BUDGET_TOLERANCE",
    "ENCODER_DECODER_PROTOCOLS",
    "Adaptation",
    "BudgetError",
    "MethodSpec",
    "ParameterReport",
    "budget_entries",
    "check_budget",
    "match_names",
    "register_method",
    "registered_methods",
]

log = logging.getLogger(__name__)

#: How far a method's size may land from its budget (relative) before it must say so.
BUDGET_TOLERANCE = 0.10


class BudgetError(ValueError):
    """A method cannot reach the requested budget on this backbone (the message says what can)."""


@dataclass(frozen=True)
class ParameterReport:
    """Honest parameter accounting of one adapted model (counts of scalar entries).

    ``pretrained``: the backbone's pretrained parameter count, the budget's denominator
    (encoder/decoder excluded under the "train" protocol). ``trainable``: entries an optimizer
    step may change, task head and encoder/decoder excluded (for SFAS the per-step k).
    ``stored``: entries the adapter file holds, task head and encoder/decoder excluded (for
    SFAS the union of every entry that ever moved). ``head``: task-head parameters.
    ``encoder_decoder``: encoder/decoder parameters trained whole under the "train" protocol
    (0 under "frozen"); the adapter file holds them too.
    """

    pretrained: int
    trainable: int
    stored: int
    head: int
    encoder_decoder: int = 0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / max(self.pretrained, 1)

    @property
    def stored_fraction(self) -> float:
        return self.stored / max(self.pretrained, 1)

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "trainable_fraction": self.trainable_fraction,
                "stored_fraction": self.stored_fraction}


def check_budget(budget: Any) -> float:
    """``budget`` as a float; ``ValueError`` unless it is a number in (0, 1] (a fraction of the
    pretrained parameters: not NaN, inf, 0, negative or above 1)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget is a fraction of the pretrained parameters in (0, 1], got {budget!r}")
    return float(budget)


def budget_entries(backbone: Backbone, budget: float) -> int:
    """Scalar entries a budget (fraction of pretrained parameters) allows on ``backbone``."""
    budget = check_budget(budget)
    total = backbone.pretrained_count()
    return max(1, round(budget * total))


def match_names(names: Iterable[str], include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """Names matching any ``include`` regex (all when empty) and no ``exclude`` regex (re.search)."""
    def hits(name: str, patterns: Sequence[str]) -> bool:
        return any(re.search(pattern, name) for pattern in patterns)

    return [n for n in names if (not include or hits(n, include)) and not hits(n, exclude)]


class Adaptation(torch.nn.Module):
    """A backbone with one method applied; ``forward(batch)`` is the adapted model.

    Methods attach their modules under :attr:`parts` (or inside the backbone, as HF peft
    does), declare dense and masked pretrained parameters, and add Trainer hooks. The
    backbone's own parameters start frozen except for its task head.
    """

    def __init__(self, backbone: Backbone, method: str, budget: float,
                 options: Mapping[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.parts = torch.nn.ModuleDict()
        self.method = method
        self.budget = float(budget)
        self.options = dict(options)
        #: The protocol (see ENCODER_DECODER_PROTOCOLS), as the backbone was set to follow.
        self.encoder_decoder = backbone.encoder_decoder
        self.masked_updates: list[Any] = []
        self.hooks: list[TrainingHook] = []
        self.merge_steps: list[Callable[[Adaptation], None]] = []
        #: What sizing chose (prompt length, split, ...): recorded, never read back as options.
        self.resolved: dict[str, Any] = {}
        self._prompt_sources: list[Callable[[], Mapping[str, torch.Tensor]]] = []
        self._injectors: list[Any] = []
        self._dense_ids: set[int] = set()
        self.pretrained_count = backbone.pretrained_count()
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        self.enable_always_trained()

    def forward(self, batch: Batch) -> Batch:
        return self.backbone(batch)

    # -- declaring roles ------------------------------------------------------------------

    def enable_always_trained(self) -> None:
        """Make the parameters every method trains trainable: task head, and encoder/decoder
        under the "train" protocol (for methods whose injection freezes everything, HF peft)."""
        for parameter in (*self.head_parameters().values(),
                          *self.encoder_decoder_parameters().values()):
            parameter.requires_grad_(True)

    def train_densely(self, names: Iterable[str]) -> None:
        """Make these pretrained parameters (backbone names) trainable as whole tensors."""
        pretrained = self.backbone.pretrained_parameters()
        for name in names:
            if name not in pretrained:
                raise KeyError(f"'{name}' is not a pretrained parameter of the backbone")
            pretrained[name].requires_grad_(True)
            self._dense_ids.add(id(pretrained[name]))

    def add_masked_update(self, update: Any) -> None:
        """Register a MaskedUpdate: its parameters get gradients, only selected entries move."""
        for parameter in update.parameters.values():
            parameter.requires_grad_(True)
        self.masked_updates.append(update)
        self.hooks.append(update)

    def add_prompts(self, source: Callable[[], Mapping[str, torch.Tensor]], injector: Any) -> None:
        """Register a prompt source (site → (P, C)) and the injector that prepends it."""
        self._prompt_sources.append(source)
        self._injectors.append(injector)

    def prompt_tokens(self) -> dict[str, list[torch.Tensor]]:
        """Every site's prompts as fixed tensors, in injection order (for deployment)."""
        tokens: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for source in self._prompt_sources:
                for site, prompts in source().items():
                    tokens.setdefault(site, []).append(prompts.detach().clone())
        return tokens

    def invalidate_prompts(self) -> None:
        """Forget prompts cached for inference (after weights changed outside training)."""
        for injector in self._injectors:
            injector.invalidate()

    @contextlib.contextmanager
    def prompts_hidden(self) -> Iterator[Adaptation]:
        """Inside the block, the adapted model without its prompts — every other change kept
        (a diagnostic: what do the prompts add?)."""
        attached = [injector for injector in self._injectors if injector.attached]
        for injector in attached:
            injector.detach()
        try:
            yield self
        finally:
            for injector in attached:
                injector.attach()

    # -- roles ----------------------------------------------------------------------------

    def _masked_ids(self) -> set[int]:
        return {id(p) for update in self.masked_updates for p in update.parameters.values()}

    def head_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Task-head parameters under backbone names."""
        return self.backbone.task_head_parameters()

    def encoder_decoder_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Encoder/decoder parameters trained whole under "train", under backbone names
        (empty under "frozen")."""
        return {} if self.encoder_decoder == "frozen" else self.backbone.encoder_decoder_parameters()

    def dense_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Pretrained parameters trained whole, under backbone names."""
        return {n: p for n, p in self.backbone.pretrained_parameters().items()
                if id(p) in self._dense_ids}

    def added_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Parameters the method created, under names relative to this module."""
        known = {id(p) for p in self.backbone.pretrained_parameters().values()}
        known |= {id(p) for p in self.backbone.task_head_parameters().values()}
        known |= {id(p) for p in self.encoder_decoder_parameters().values()}
        return {n: p for n, p in self.named_parameters() if id(p) not in known}

    # -- what the Trainer needs -----------------------------------------------------------

    # Above radon C on purpose: one group per role (masked, dense, added, head, enc/dec) × decay, each its lr.
    def param_groups(self, weight_decay: float, new_lr: float | None = None,
                     encoder_decoder_lr: float | None = None) -> list[dict[str, Any]]:
        """AdamW groups: decay on ≥2-D tensors, none on vectors; masked parameters in their own
        groups, which the MaskedUpdate hook reads (lr, betas, eps, weight decay) and updates
        itself — AdamW never sees their gradients, so it keeps no dense state for them.

        ``new_lr``: a learning rate of its own for the parameters the method added and the task
        heads ("new_*" groups); pretrained entries keep the optimizer's. Encoder/decoder
        parameters under "train" have groups of their own ("encoder_decoder_*"), at
        ``encoder_decoder_lr`` (None: the optimizer's, as pretrained entries).
        """
        masked = self._masked_ids()
        new = {id(p) for p in self.added_parameters().values()} | \
            {id(p) for p in self.head_parameters().values()} if new_lr is not None else set()
        apart = {id(p) for p in self.encoder_decoder_parameters().values()}
        dense = [p for p in self.parameters() if p.requires_grad and id(p) not in masked
                 and id(p) not in new and id(p) not in apart]
        fresh = [p for p in self.parameters() if p.requires_grad and id(p) in new]
        coder = [p for p in self.parameters() if p.requires_grad and id(p) in apart]
        coder_lr = {} if encoder_decoder_lr is None else {"lr": encoder_decoder_lr}
        sparse = [p for update in self.masked_updates for p in update.parameters.values()]
        candidates = (("decay", [p for p in dense if p.ndim >= 2], weight_decay, {}),
                      ("no_decay", [p for p in dense if p.ndim < 2], 0.0, {}),
                      ("new_decay", [p for p in fresh if p.ndim >= 2], weight_decay, {"lr": new_lr}),
                      ("new_no_decay", [p for p in fresh if p.ndim < 2], 0.0, {"lr": new_lr}),
                      ("encoder_decoder_decay", [p for p in coder if p.ndim >= 2], weight_decay,
                       coder_lr),
                      ("encoder_decoder_no_decay", [p for p in coder if p.ndim < 2], 0.0, coder_lr),
                      ("masked_decay", [p for p in sparse if p.ndim >= 2], weight_decay, {}),
                      ("masked_no_decay", [p for p in sparse if p.ndim < 2], 0.0, {}))
        groups = [{"params": params, "weight_decay": decay, "name": name, **extra}
                  for name, params, decay, extra in candidates if params]
        if not groups:
            raise ValueError(f"method '{self.method}' left nothing trainable")
        return groups

    # -- accounting -----------------------------------------------------------------------

    def report(self) -> ParameterReport:
        """Trainable per step, stored in the adapter file, task head and encoder/decoder (see
        ParameterReport)."""
        added = sum(p.numel() for p in self.added_parameters().values())
        dense = sum(p.numel() for p in self.dense_parameters().values())
        per_step = sum(update.per_step_entries for update in self.masked_updates)
        stored_masked = sum(update.stored_entries() for update in self.masked_updates)
        head = sum(p.numel() for p in self.head_parameters().values())
        coder = sum(p.numel() for p in self.encoder_decoder_parameters().values())
        return ParameterReport(pretrained=self.pretrained_count, trainable=added + dense + per_step,
                               stored=added + dense + stored_masked, head=head,
                               encoder_decoder=coder)

    def note_budget_shortfall(self, count: int, entries: int, why: str) -> None:
        """Record and log that the method trains ``count`` of the budget's ``entries`` when that
        is more than BUDGET_TOLERANCE short; ``why`` says what stops it from growing."""
        if count >= (1 - BUDGET_TOLERANCE) * entries:
            return
        message = (f"{self.method} at budget {self.budget} trains {count:,} of {entries:,} "
                   f"parameters: {why}")
        log.warning(message)
        self.resolved["budget_exception"] = message

    def merge(self) -> None:
        """Fold what can be folded into the backbone for deployment (method-specific steps)."""
        for step in self.merge_steps:
            step(self)


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, options dataclass, builder and a one-line summary."""

    name: str
    options: type
    build: Callable[[Backbone, float, Any], Adaptation]
    summary: str

    def make_options(self, options: Mapping[str, Any] | None = None) -> Any:
        """The options dataclass from a mapping (JSON lists become tuples); ``ValueError`` for
        an unknown name (listing the known ones) or a value of the wrong type."""
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"options of method '{self.name}' must be a mapping of name → value, "
                             f"got {type(options).__name__}")
        options = dict(options or {})
        hints = typing.get_type_hints(self.options)
        unknown = sorted(map(repr, set(options) - set(hints)))
        if unknown:
            raise ValueError(f"method '{self.name}' has no option(s) {', '.join(unknown)}; "
                             f"its options: {sorted(hints)}")
        values = {}
        for key, value in options.items():
            try:
                values[key] = _as_option_type(value, hints[key])
            except TypeError as expected:
                raise ValueError(f"option '{key}' of method '{self.name}' must be {expected}, "
                                 f"got {value!r}") from None
        return self.options(**values)


# Above radon C on purpose: one branch per option annotation form, each with its own TypeError.
def _as_option_type(value: Any, annotation: Any) -> Any:
    """``value`` as an option of type ``annotation`` (JSON lists become tuples, a string alone a
    tuple of one, integers floats); ``TypeError`` saying what was expected. Other annotations
    are left to the class."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for choice in args:
            try:
                return _as_option_type(value, choice)
            except TypeError:
                pass
        raise TypeError(" or ".join(_expected(choice) for choice in args))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {type(None): value is None, bool: isinstance(value, bool), str: isinstance(value, str),
              int: number and isinstance(value, int), float: number and math.isfinite(value)}
    if annotation in checks:
        if not checks[annotation]:
            raise TypeError(_expected(annotation))
        return float(value) if annotation is float else value
    if origin is tuple:
        if isinstance(value, str) and args == (str, Ellipsis):
            value = [value]  # one pattern or name
        if not isinstance(value, (list, tuple)):
            raise TypeError(_expected(annotation))
        kinds = [args[0]] * len(value) if args[1:] == (Ellipsis,) else list(args)
        if len(value) != len(kinds):
            raise TypeError(_expected(annotation))
        try:
            return tuple(_as_option_type(item, kind) for item, kind in zip(value, kinds))
        except TypeError:
            raise TypeError(_expected(annotation)) from None
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise TypeError(_expected(annotation))
        return dict(value)
    return value


def _expected(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        return (f"a list of {_expected(args[0]).split(' ', 1)[-1]} values" if args[1:] == (Ellipsis,)
                else f"a list of {len(args)} values")
    return {type(None): "null", bool: "true or false", str: "a string", int: "an integer",
            float: "a finite number", dict: "an object"}.get(origin or annotation, str(annotation))


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, options: type, summary: str) -> Callable:
    """Decorator: register ``build(backbone, budget, options) -> Adaptation`` under ``name``."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of method '{name}' must be a dataclass")

    def decorate(build: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is already registered")
        _METHODS[name] = MethodSpec(name, options, build, summary)
        return build

    return decorate


def registered_methods() -> dict[str, MethodSpec]:
    """The methods registered so far, by name (the built-in ones once
    :mod:`weatherpeft.methods` is imported; :mod:`weatherpeft.methods.registry` looks them up)."""
    return dict(_METHODS)
