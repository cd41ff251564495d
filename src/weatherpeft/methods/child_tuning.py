"""Child-Tuning_D (Xu et al., EMNLP 2021) and a random-mask baseline: a fixed child network.

Both train only a fixed set of k = B entries of the pretrained weights (B the budget in
entries; the selectable tensors and ``include``/``exclude`` regexes as SFAS's), through
:class:`~weatherpeft.methods.masked_update.MaskedUpdate` (masked AdamW: nothing outside the
mask moves, no optimizer state outside it). The mask is chosen once, at ``on_fit_start``
(before the first step; a resumed run keeps the mask its checkpoint holds):

- ``child_tuning`` (Child-Tuning_D): the diagonal empirical Fisher of the task loss,
  F(w) = Σ_j (∂L_j/∂w)², summed over the first ``fisher_batches`` batches j of the training
  split in the task's (sequential) order, at the training batch size (per-batch gradients,
  as in the authors' code; they use the whole training set: ``fisher_batches=0``),
  computed with the model in training mode under a forked RNG;
  the child network is the exact top-k of F (:func:`~weatherpeft.methods.selection.select_top_k`).
  Unlike the authors' optimizer, weight decay does not move entries outside the mask.
- ``random_mask``: k entries chosen uniformly at random — the top-k of seeded U(0, 1) scores,
  generated block by block (no permutation of every entry is materialised; ties at the
  threshold, rare, go to the lower index).

After :func:`~weatherpeft.adapters.load_adapter` only the moved values matter: inference
needs no mask, so none is rebuilt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.base import Adaptation, budget_entries, register_method
from weatherpeft.methods.masked_update import MaskedUpdate
from weatherpeft.methods.selection import select_top_k
from weatherpeft.methods.sfas import selectable_parameters
from weatherpeft.training.batches import move_to

__all__ = ["ChildTuningD", "ChildTuningOptions", "FixedMask", "RandomMask", "RandomMaskOptions",
           "apply_child_tuning", "apply_random_mask"]


class FixedMask(MaskedUpdate):
    """A MaskedUpdate whose selection of ``per_step_entries`` entries is chosen once, at
    ``on_fit_start``, by :meth:`choose`, and never changes."""

    def choose(self, trainer: Any) -> dict[str, torch.Tensor]:
        """name → flat indices of the mask (subclasses)."""
        raise NotImplementedError

    def top_k(self, scores: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global top-k of ``scores(name)`` (flat float32 per parameter, called in order)."""
        names = list(self.parameters)
        chosen = select_top_k(lambda i: scores(names[i]),
                              [self.parameters[n].numel() for n in names], self.per_step_entries)
        return dict(zip(names, chosen))

    def on_fit_start(self, trainer: Any) -> None:
        if not self.selection:  # a resumed run has its mask back from the checkpoint
            self.set_selection(self.choose(trainer))


class ChildTuningD(FixedMask):
    """Child-Tuning_D's mask: the top-k of the Fisher summed over ``fisher_batches`` training
    batches (0: every batch) before training."""

    def __init__(self, parameters: Mapping[str, torch.nn.Parameter], entries: int,
                 fisher_batches: int) -> None:
        super().__init__(parameters, entries)
        self.fisher_batches = int(fisher_batches)
        #: How many batches the Fisher was summed over (set by :meth:`fisher`).
        self.fisher_batches_used = 0

    def fisher(self, trainer: Any) -> dict[str, torch.Tensor]:
        """Σ g² per selectable entry over the first training batches, in float32. The
        trainer's RNG streams are forked, the model's mode restored, gradients cleared."""
        model = trainer.model
        loader = trainer.task.dataloader("train", trainer.config.batch_size)
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.parameters.items()}
        devices = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
        was_training = model.training
        used = 0
        try:
            model.train()
            with torch.random.fork_rng(devices=devices):
                for batch in loader:
                    if self.fisher_batches and used == self.fisher_batches:
                        break
                    model.zero_grad(set_to_none=True)
                    with trainer.autocast():
                        loss = trainer.task.training_loss(model, move_to(batch, trainer.device))
                    loss.backward()
                    for name, parameter in self.parameters.items():
                        if parameter.grad is not None:
                            grad = parameter.grad.float()
                            fisher[name].addcmul_(grad, grad)
                    used += 1
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        if used == 0:
            raise ValueError("Child-Tuning_D: the training set has no batch to compute the Fisher on")
        self.fisher_batches_used = used
        return fisher

    def choose(self, trainer: Any) -> dict[str, torch.Tensor]:
        fisher = self.fisher(trainer)
        return self.top_k(lambda name: fisher.pop(name).reshape(-1))


class RandomMask(FixedMask):
    """A uniformly random mask of k entries: the top-k of U(0, 1) scores drawn block by block
    from one generator seeded by ``seed`` (reproducible; the global RNG is not drawn from)."""

    def __init__(self, parameters: Mapping[str, torch.nn.Parameter], entries: int, seed: int) -> None:
        super().__init__(parameters, entries)
        self.seed = int(seed)

    def choose(self, trainer: Any) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)

        def scores(name: str) -> torch.Tensor:
            parameter = self.parameters[name]
            return torch.rand(parameter.numel(), generator=generator).to(parameter.device)

        return self.top_k(scores)


@dataclass
class ChildTuningOptions:
    """``fisher_batches``: training batches the Fisher is summed over before training (0: the
    whole training set, the paper's setting); ``include`` / ``exclude``: regexes on
    pretrained parameter names, as SFAS's (default: every pretrained entry)."""

    fisher_batches: int = 16
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.fisher_batches, bool) or not isinstance(self.fisher_batches, int) \
                or self.fisher_batches < 0:
            raise ValueError(f"Child-Tuning fisher_batches must be an integer ≥ 0, got "
                             f"{self.fisher_batches!r}")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)


@dataclass
class RandomMaskOptions:
    """``seed``: of the mask; ``include`` / ``exclude``: regexes on pretrained parameter
    names, as SFAS's (default: every pretrained entry)."""

    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)


@register_method("child_tuning", ChildTuningOptions,
                 "Child-Tuning_D: a fixed mask of the pretrained weights, the top-k of the "
                 "Fisher over training batches computed before training")
def apply_child_tuning(backbone: Backbone, budget: float, options: ChildTuningOptions) -> Adaptation:
    adaptation = Adaptation(backbone, "child_tuning", budget, dataclasses.asdict(options))
    parameters = selectable_parameters(backbone, options.include, options.exclude)
    adaptation.add_masked_update(ChildTuningD(parameters, budget_entries(backbone, budget),
                                              options.fisher_batches))
    return adaptation


@register_method("random_mask", RandomMaskOptions,
                 "random mask: a fixed, seeded, uniformly random set of k pretrained entries "
                 "trained by the same masked AdamW (Child-Tuning's control)")
def apply_random_mask(backbone: Backbone, budget: float, options: RandomMaskOptions) -> Adaptation:
    adaptation = Adaptation(backbone, "random_mask", budget, dataclasses.asdict(options))
    parameters = selectable_parameters(backbone, options.include, options.exclude)
    adaptation.add_masked_update(RandomMask(parameters, budget_entries(backbone, budget),
                                            options.seed))
    return adaptation
