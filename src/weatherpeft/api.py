"""weatherpeft inside your own training loop: adapt a model, train it as usual, save the adapter.

    model = weatherpeft.adapt(model, "weatherpeft", budget=0.003)    # an aurora.Aurora or a Backbone
    model.configure_optimizer(steps=1000, lr=3e-4)                     # AdamW + the Trainer's schedule
    for batch in batches:
        loss = ...(model(batch))
        loss.backward()
        model.step(loss)                       # the method's hooks, clipping, optimizer, zero_grad
    model.save_adapter("my-adapter")

:class:`AdaptedModel` is the adapted module (call it as you called the model) plus the two things
a hand-written loop must call. Its optimizer step is the :class:`~weatherpeft.training.Trainer`'s
own (:meth:`~weatherpeft.training.Trainer.apply_gradients`): the methods' hooks (SFAS's selection
refresh and masked update, prompt recomputation) run in the same order as under
``weatherpeft finetune``, so the same seed, data order and settings give the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from aurora import Aurora, Batch

from weatherpeft.adapters import AdapterError, DeployedModel
from weatherpeft.adapters import load_adapter as load_adapter_file
from weatherpeft.adapters import save_adapter as save_adapter_file
from weatherpeft.backbones.aurora import AuroraBackbone
from weatherpeft.backbones.base import Backbone
from weatherpeft.data.stats import NormalisationStats
from weatherpeft.methods.base import Adaptation, ParameterReport
from weatherpeft.methods.child_tuning import ChildTuningD
from weatherpeft.methods.registry import apply_method
from weatherpeft.training import TrainConfig, Trainer

__all__ = ["AdaptedModel", "AdapterError", "adapt", "as_backbone", "load_adapter"]


def as_backbone(model: Aurora | Backbone, *, stats: NormalisationStats | None = None,
                activation_checkpointing: bool = False) -> Backbone:
    """``model`` as a Backbone: a Backbone as it is, an ``aurora.Aurora`` wrapped in place
    (:meth:`AuroraBackbone.from_aurora`)."""
    if isinstance(model, Backbone):
        return model
    if isinstance(model, Aurora):
        return AuroraBackbone.from_aurora(model, stats=stats,
                                          activation_checkpointing=activation_checkpointing)
    raise TypeError(f"weatherpeft adapts an aurora.Aurora or a weatherpeft Backbone, got "
                    f"{type(model).__name__}")


class AdaptedModel(torch.nn.Module):
    """A model with a fine-tuning method applied; ``forward(batch)`` is the adapted model.

    For a hand-written loop: :meth:`configure_optimizer` once, then after each
    ``loss.backward()`` one :meth:`step`. :attr:`adaptation` is the underlying
    :class:`~weatherpeft.methods.base.Adaptation` (roles, report, hooks).
    """

    def __init__(self, adaptation: Adaptation) -> None:
        super().__init__()
        self.adaptation = adaptation
        self._trainer: Trainer | None = None

    def forward(self, batch: Batch) -> Batch:
        return self.adaptation(batch)

    @property
    def backbone(self) -> Backbone:
        return self.adaptation.backbone

    def report(self) -> ParameterReport:
        """What the method trains per step and stores (see ParameterReport)."""
        return self.adaptation.report()

    # -- training ------------------------------------------------------------------------

    def configure_optimizer(self, steps: int, lr: float = 3e-4, *, weight_decay: float = 0.05,
                            betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                            min_lr_ratio: float = 0.0, grad_clip: float = 0.0,
                            new_lr: float | None = None, encoder_decoder_lr: float | None = None,
                            on_nonfinite: str = "stop") -> torch.optim.Optimizer:
        """Build the optimizer (AdamW over the method's parameter groups; masked entries are
        updated by the method itself) and the Trainer's schedule (linear warm-up, cosine decay
        over ``steps``), and start the method's hooks. Returns the optimizer, for inspection:
        call :meth:`step`, not ``optimizer.step()``. Arguments as in TrainConfig; ``new_lr`` and
        ``encoder_decoder_lr`` as in FinetuneConfig (None: ``lr``)."""
        if any(isinstance(hook, ChildTuningD) for hook in self.adaptation.hooks):
            raise ValueError(f"method '{self.adaptation.method}' computes its mask from a task's "
                             "training data before the first step; train it with "
                             "weatherpeft.training.Trainer (or `weatherpeft finetune`)")
        device = next(self.adaptation.parameters()).device
        config = TrainConfig(steps=steps, lr=lr, weight_decay=weight_decay, betas=betas,
                             warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                             grad_clip=grad_clip, on_nonfinite=on_nonfinite, device=str(device),
                             log_every=0, progress=False)
        groups = self.adaptation.param_groups(weight_decay, new_lr=new_lr,
                                              encoder_decoder_lr=encoder_decoder_lr)
        # A Trainer without a task: only its optimizer step is used, never fit().
        self._trainer = Trainer(self.adaptation, None, config, hooks=self.adaptation.hooks,
                                param_groups=groups)
        self._trainer.start_hooks()
        return self._trainer.optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._require_trainer().optimizer

    def step(self, loss: torch.Tensor | float) -> tuple[float, float] | None:
        """After ``loss.backward()``: the method's hooks, clipping, the optimizer and schedule
        step, then gradients cleared. Returns (loss, gradient norm), or None when a non-finite
        value made it skip the update (``on_nonfinite="skip"``; "stop" raises DivergenceError)."""
        trainer = self._require_trainer()
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        try:
            return trainer.apply_gradients(value, lambda: "the loss came from your own loop "
                                           "(check its inputs, targets and predictions)")
        finally:
            self.adaptation.zero_grad(set_to_none=True)

    @property
    def steps_taken(self) -> int:
        """Optimizer steps completed through :meth:`step`."""
        return 0 if self._trainer is None else self._trainer.step

    def _require_trainer(self) -> Trainer:
        if self._trainer is None:
            raise RuntimeError("call configure_optimizer(steps=...) before step()")
        return self._trainer

    # -- files and deployment ------------------------------------------------------------

    def save_adapter(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write the adapter folder (see :mod:`weatherpeft.adapters`); ``extra`` goes into its
        JSON record."""
        return save_adapter_file(self.adaptation, path, extra=extra)

    def merge(self) -> torch.nn.Module:
        """Fold every trained weight into the backbone in place and return the plain model:
        the ``aurora.Aurora`` (for a wrapped one) or the Backbone, with HF peft's layers
        replaced by their merged base layers — or, where the method prompts, a DeployedModel
        that prepends the fixed prompts. Outputs equal this model's in eval mode; the
        AdaptedModel is spent afterwards."""
        self.adaptation.eval()
        prompts = self.adaptation.prompt_tokens()
        self.adaptation.merge()
        backbone = self.adaptation.backbone
        _unwrap_peft_layers(backbone)
        for injector in self.adaptation._injectors:  # the fixed prompts replace them
            injector.detach()
        if prompts:
            return DeployedModel(backbone, prompts)
        if isinstance(backbone, AuroraBackbone) and backbone.config["preset"].startswith("own "):
            return backbone.aurora
        return backbone


def _unwrap_peft_layers(module: torch.nn.Module) -> None:
    """Replace every HF peft layer by its base layer (after its update was merged into it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _unwrap_peft_layers(child)


def adapt(model: Aurora | Backbone, method: str = "weatherpeft", budget: float = 0.003, *,
          encoder_decoder: str = "frozen", stats: NormalisationStats | None = None,
          activation_checkpointing: bool = False, **options: Any) -> AdaptedModel:
    """Apply ``method`` (``weatherpeft methods`` lists them) at ``budget`` (a fraction of the
    pretrained parameters) to ``model``, an ``aurora.Aurora`` of any size (adapted in place) or
    a weatherpeft Backbone. ``encoder_decoder``: "frozen" (default; inside the budget) or
    "train" (the paper's protocol: Aurora's Perceiver encoder/decoder trained whole, outside
    the budget, stored in the adapter). ``stats``, ``activation_checkpointing``: see
    :meth:`AuroraBackbone.from_aurora`. ``options``: the method's options (e.g. ``rank=8`` for
    LoRA, ``prompt_length=30`` for WeatherPEFT). Bad methods, budgets and options raise
    ``ValueError`` before the model is changed."""
    backbone = as_backbone(model, stats=stats, activation_checkpointing=activation_checkpointing)
    return AdaptedModel(apply_method(method, backbone, budget, options,
                                     encoder_decoder=encoder_decoder))


def load_adapter(path: str | os.PathLike, model: Aurora | Backbone, *,
                 force: bool = False) -> AdaptedModel:
    """The adapter folder ``path`` applied to ``model`` (the same pretrained model it was trained
    on: its fingerprint is checked; ``force=True`` overrides); in eval mode."""
    adapted = AdaptedModel(load_adapter_file(path, as_backbone(model), force=force))
    return adapted.eval()

