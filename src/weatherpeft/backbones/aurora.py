"""Aurora as a :class:`~weatherpeft.backbones.base.Backbone`, over the unmodified ``aurora.Aurora``.

Presets name configurations of aurora's own classes, always with ``use_lora=False``:
``aurora-tiny`` (a CPU-sized model for the built-in 5.625° world, weatherpeft's own checkpoint
format) and Microsoft's published models, which load only from a local file (no downloads).

The wrapper adopts Aurora's ``encoder``, ``backbone`` and ``decoder`` as its own children, so
parameter and module names are exactly Aurora's (``backbone.encoder_layers.0.blocks.0.attn``)
and a state dict is an Aurora state dict.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import os
import re
import types
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aurora.normalisation as aurora_normalisation
import torch
import torch.utils.checkpoint
from aurora import Aurora, AuroraHighRes, AuroraPretrained, AuroraSmallPretrained, Batch
from aurora.model.swin3d import Swin3DTransformerBlock, WindowAttention

from weatherpeft.backbones.base import Backbone, LoadReport, hash_weights
from weatherpeft.backbones.checkpoint import (
    VARIABLE_KEYS,
    CheckpointFolder,
    config_differences,
    from_json,
    level_list,
    load_with_report,
    open_checkpoint,
    resolve_local,
    split_extra_variables,
    to_json,
    verify_fingerprint,
    write_checkpoint,
)
from weatherpeft.data.stats import NormalisationStats, model_statistics

__all__ = ["AURORA_PRESETS", "AuroraBackbone", "AuroraPreset", "ERA5_LEVELS", "SWIN_FEEDFORWARD",
           "SWIN_LINEARS"]

logger = logging.getLogger(__name__)

#: The Swin blocks' attention and MLP Linear layers (full module names in the backbone).
SWIN_LINEARS = (r"backbone\.(encoder|decoder)_layers\.\d+\.blocks\.\d+\."
                r"(attn\.(qkv|proj)|mlp\.(fc1|fc2))")
#: The Swin blocks' second MLP layers (IA3's feed-forward modules).
SWIN_FEEDFORWARD = r"backbone\.(encoder|decoder)_layers\.\d+\.blocks\.\d+\.mlp\.fc2"

#: The 13 pressure levels (hPa) of WeatherBench2's ERA5 and of Aurora's pretraining.
ERA5_LEVELS: tuple[int, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)

#: Aurora arguments a preset or ``architecture`` may not set (forced, or given another way).
_FORBIDDEN_KWARGS = {"surf_stats": "pass `stats=` (a NormalisationStats) instead",
                     "use_lora": "weatherpeft always builds Aurora with use_lora=False"}


@dataclasses.dataclass(frozen=True)
class AuroraPreset:
    """A named configuration of one of aurora's model classes.

    ``kwargs`` are passed to ``model_class`` on top of its defaults (``use_lora=False`` is always
    added); ``levels`` are the default pressure levels; ``published`` presets have weights on
    Hugging Face that the user downloads and passes as a local path.
    """

    model_class: type[Aurora]
    kwargs: Mapping[str, Any]
    levels: tuple[int | float, ...]
    published: bool

    def build_kwargs(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The keyword arguments for ``model_class``: preset, then overrides, then use_lora=False."""
        return {**self.kwargs, **(overrides or {}), "use_lora": False}


#: aurora-tiny: 6.14 M parameters; forward+backward for batch 4 takes 0.17-0.27 s on one
#: shared CPU core. On the 64 × 32 grid with patch 4 the token grid is 2 latent levels × 8 lat ×
#: 16 lon, then 2 × 4 × 8: the (2, 4, 8) window holds a quarter of the globe in stage 1 and all
#: of it in stage 2. Aurora rejects some windows on this grid: (2, 4, 4), (2, 8, 8) and (2, 4, 6)
#: fail in its shifted-window mask (``.view`` on a non-contiguous tensor) whenever a stage's
#: window covers all of one horizontal axis but not the other; ws[0] must divide latent_levels.
AURORA_TINY: dict[str, Any] = dict(
    surf_vars=("2t", "10u", "10v", "msl"),
    static_vars=("lsm", "z"),
    atmos_vars=("z", "u", "v", "t", "q"),
    patch_size=4,
    embed_dim=128,
    num_heads=4,
    encoder_depths=(2, 2),
    encoder_num_heads=(4, 8),
    decoder_depths=(2, 2),
    decoder_num_heads=(8, 4),
    latent_levels=2,
    window_size=(2, 4, 8),
    max_history_size=2,
    timestep=timedelta(hours=6),
)

#: Preset name → configuration. Add an entry to offer another configuration by name.
AURORA_PRESETS: dict[str, AuroraPreset] = {
    "aurora-tiny": AuroraPreset(Aurora, AURORA_TINY, (500, 850), published=False),
    "aurora-0.25-pretrained": AuroraPreset(AuroraPretrained, {}, ERA5_LEVELS, published=True),
    "aurora-0.25-small-pretrained": AuroraPreset(AuroraSmallPretrained, {}, ERA5_LEVELS,
                                                 published=True),
    "aurora-0.25-finetuned": AuroraPreset(Aurora, {}, ERA5_LEVELS, published=True),
    "aurora-0.1-finetuned": AuroraPreset(AuroraHighRes, {}, ERA5_LEVELS, published=True),
}


# -- small helpers ------------------------------------------------------------------------


def _class_default(model_class: type, name: str) -> Any:
    """Default of keyword ``name`` for ``model_class``, following ``**kw_args`` up the MRO."""
    for klass in model_class.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameter = inspect.signature(klass.__init__).parameters.get(name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    raise KeyError(f"{model_class.__name__} has no keyword argument '{name}'")


@functools.cache
def _aurora_keywords() -> frozenset[str]:
    return frozenset(p for p in inspect.signature(Aurora.__init__).parameters if p != "self")


def _required_statistics(surf_vars: Sequence[str], static_vars: Sequence[str],
                         atmos_vars: Sequence[str], levels: Sequence[int | float]) -> list[str]:
    """The normalisation keys a model with these variables and levels reads."""
    keys = list(dict.fromkeys([*surf_vars, *static_vars]))
    keys += [f"{name}_{aurora_normalisation.level_to_str(level)}"
             for name in atmos_vars for level in levels]
    return keys


@functools.cache
def _aurora_default_statistics() -> tuple[dict[str, float], dict[str, float]]:
    """Aurora's built-in ERA5 statistics, read from a private copy of ``aurora.normalisation``.

    The shared module's dicts may already hold another data set's statistics (installed by
    some backbone); a fresh copy of the module always has the published values.
    """
    spec = importlib.util.find_spec("aurora.normalisation")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.locations), dict(module.scales)


def _with_times(batch: Batch, times: tuple[datetime, ...]) -> Batch:
    """``batch`` with other metadata times (the tensors are shared, not copied)."""
    return dataclasses.replace(batch, metadata=dataclasses.replace(batch.metadata, time=times))


def _checkpointed_forward(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A Swin block's own forward under activation checkpointing (recomputed in backward)."""
    forward = functools.partial(type(block).forward, block)
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<target>qkv|proj)\.loras\.(?P<step>\d+)\.lora_A$")


def _merge_aurora_lora(state: dict[str, torch.Tensor]) -> list[str]:
    """Fold Aurora's own LoRA (``attn.lora_{qkv,proj}.loras.0``) into the ``qkv``/``proj`` weights.

    W += (alpha / r)·B·A, with Aurora's fixed alpha. Exact for ``lora_mode="single"`` (the
    published fine-tuned checkpoints) at roll-out steps below ``lora_steps`` (40), after which
    Aurora switches its LoRA off. Mutates ``state``; returns the weights it changed.
    """
    alpha = inspect.signature(WindowAttention.__init__).parameters["lora_alpha"].default
    found = [(match, key) for key in sorted(state) if (match := _LORA_KEY.match(key))]
    per_step = [key for match, key in found if match["step"] != "0"]
    if per_step:
        raise ValueError(f"checkpoint has per-roll-out-step LoRA weights ({per_step[:3]} ...): "
                         "they cannot be folded into one weight for use_lora=False")
    merged = []
    for match, key in found:
        lora_a = state.pop(key).float()
        lora_b = state.pop(key[: -len("A")] + "B").float()
        weight_key = f"{match['prefix']}.{match['target']}.weight"
        weight = state[weight_key]
        state[weight_key] = (weight.float() + alpha / lora_a.shape[0] * lora_b @ lora_a).to(weight.dtype)
        merged.append(weight_key)
    return merged


def _load_aurora_file(model: Aurora, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read one of Microsoft's ``.ckpt`` files the way ``Aurora.load_checkpoint_local`` does.

    Same steps (``torch.load(weights_only=True)``, the class's ``_adapt_checkpoint`` key
    remapping, history-size padding) but returning the state instead of loading it, so that
    mismatches can be reported by key and Aurora's LoRA folded in.
    """
    # Microsoft publishes pickles: unavoidable, so weights_only=True (tensors and containers only).
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not an Aurora checkpoint (expected a flat dict of tensors)")
    state = model._adapt_checkpoint(dict(state))
    notes = []
    key = "encoder.surf_token_embeds.weights.2t"
    if key in state:
        saved_history = state[key].shape[2]
        if saved_history > model.max_history_size:
            raise ValueError(f"{path} was trained with history {saved_history}; the model has "
                             f"max_history_size {model.max_history_size} (it cannot be smaller)")
        if saved_history < model.max_history_size:
            model.adapt_checkpoint_max_history_size(state)
            notes.append(f"patch embeddings zero-padded from history {saved_history} to "
                         f"{model.max_history_size} (Aurora's own adaptation)")
    merged = _merge_aurora_lora(state)
    if merged:
        notes.append(f"Aurora's LoRA folded into {len(merged)} qkv/proj weights (exact for "
                     "roll-out steps < 40)")
    return state, notes


# -- the backbone -------------------------------------------------------------------------


class AuroraBackbone(Backbone):
    """Aurora (``aurora.Aurora`` and its published subclasses, unmodified) as a Backbone.

    Args:
        preset: a key of :data:`AURORA_PRESETS`.
        stats: normalisation statistics of the data, merged over those that come with the
            weights (a weatherpeft checkpoint's ``normalisation.json``; Aurora's ERA5 values for
            Microsoft's checkpoints): they must cover new variables ("tp") and may override the
            others (with a warning). A fresh aurora-tiny has none of its own: pass them.
        levels: pressure levels (hPa) of the data; default: the checkpoint's, else the preset's.
        checkpoint: local weights: a weatherpeft checkpoint folder, or one of Microsoft's
            ``.ckpt`` files (read as ``Aurora.load_checkpoint_local`` does). Never downloaded.
        strict: refuse any mismatch with a ``ValueError`` listing the keys; ``False`` loads
            what fits, logs the rest and keeps it in :attr:`load_report`.
        extra_surf_vars, extra_atmos_vars: new variables; Aurora creates their patch embeddings
            and output heads, which are the :meth:`task_head_parameters`.
        architecture: Aurora keyword arguments on top of the preset.
        activation_checkpointing: recompute every Swin block in backward to save memory.
        random_init: allow a published preset without weights (tests only: an untrained Aurora's
            blocks are the identity, so PEFT on it is meaningless).

    Normalisation: Aurora keeps statistics in module-level dicts (``aurora.normalisation
    .locations``/``scales``) that every model in the process shares. Surface and static
    statistics go to this model alone (Aurora's ``surf_stats``); atmospheric ones can only go
    through the shared dicts, so they are installed at construction and again before every
    forward: backbones with different statistics stay correct as long as they run in turn.
    """

    unfingerprinted_keys = ("task_head_surf_vars", "task_head_atmos_vars",
                            "activation_checkpointing", "aurora_version")

    def __init__(
        self,
        preset: str = "aurora-tiny",
        *,
        stats: NormalisationStats | None = None,
        levels: Sequence[int | float] | None = None,
        checkpoint: str | os.PathLike | None = None,
        strict: bool = True,
        extra_surf_vars: Sequence[str] = (),
        extra_atmos_vars: Sequence[str] = (),
        architecture: Mapping[str, Any] | None = None,
        activation_checkpointing: bool = False,
        random_init: bool = False,
    ) -> None:
        super().__init__()
        if preset not in AURORA_PRESETS:
            raise ValueError(f"unknown Aurora preset '{preset}'; known: {sorted(AURORA_PRESETS)}")
        spec = AURORA_PRESETS[preset]
        overrides = _check_architecture(architecture or {})
        kwargs = spec.build_kwargs(overrides)
        base = {key: tuple(kwargs[key]) if key in kwargs else
                tuple(_class_default(spec.model_class, key)) for key in VARIABLE_KEYS}
        extra_surf, extra_atmos = _check_extra_variables(base, extra_surf_vars, extra_atmos_vars)
        surf_vars, atmos_vars = base["surf_vars"] + extra_surf, base["atmos_vars"] + extra_atmos
        static_vars = base["static_vars"]

        weights, folder = _locate_weights(checkpoint, preset, spec, random_init)
        levels = _levels(levels, folder, spec)
        required = _required_statistics(surf_vars, static_vars, atmos_vars, levels)
        self.stats = _statistics(preset, spec, folder, stats, required, levels)
        surface_keys = list(dict.fromkeys(surf_vars + static_vars))
        self._levels = levels
        self._atmos_statistics = {k: (self.stats.locations[k], self.stats.scales[k])
                                  for k in required if k not in surface_keys}

        # The unmodified Aurora, with the union of variables; its parts become ours.
        kwargs.update(surf_vars=surf_vars, static_vars=static_vars, atmos_vars=atmos_vars,
                      surf_stats={k: (self.stats.locations[k], self.stats.scales[k])
                                  for k in surface_keys})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The normalisation statics")
            self._adopt(spec.model_class(**kwargs))

        # Weights. Extra variables the checkpoint already has come pretrained: not task head.
        architecture_record = to_json({k: v for k, v in spec.build_kwargs(overrides).items()
                                       if k not in VARIABLE_KEYS})
        self.load_report = LoadReport(source="(random initialisation)")
        new_surf, new_atmos = extra_surf, extra_atmos
        if weights is not None:
            differences = [] if folder is None else config_differences(
                folder.config, {"preset": preset, "model_class": spec.model_class.__name__,
                                "levels": list(levels)}, architecture_record)
            self.load_report, saved_keys = self._load(
                weights, folder, _head_names(extra_surf, extra_atmos), differences, preset, strict)
            new_surf, new_atmos = _without_saved_heads(extra_surf, extra_atmos, saved_keys)

        self._config = {
            "family": "aurora",
            "preset": preset,
            "model_class": spec.model_class.__name__,
            "architecture": architecture_record,
            "surf_vars": [v for v in surf_vars if v not in new_surf],
            "static_vars": list(static_vars),
            "atmos_vars": [v for v in atmos_vars if v not in new_atmos],
            "levels": list(levels),
            "task_head_surf_vars": list(new_surf),
            "task_head_atmos_vars": list(new_atmos),
            "activation_checkpointing": bool(activation_checkpointing),
            "aurora_version": importlib.metadata.version("microsoft-aurora"),
        }
        if activation_checkpointing:
            for _, block in self._swin_blocks():
                block.forward = types.MethodType(_checkpointed_forward, block)
        self.stats.install()
        self._record_parameter_roles(_head_names(new_surf, new_atmos))
        self.fingerprint()  # of the weights as loaded
        verify_fingerprint(self, folder)

    # -- construction ---------------------------------------------------------------------

    def _adopt(self, model: Aurora) -> None:
        """Make Aurora's encoder, backbone and decoder our children (names stay Aurora's)."""
        children = dict(model.named_children())
        own = list(model.named_parameters(recurse=False)) + list(model.named_buffers(recurse=False))
        if set(children) != {"encoder", "backbone", "decoder"} or own:
            raise RuntimeError(f"this aurora version's model has parts {sorted(children)} "
                               f"{[n for n, _ in own]}; weatherpeft expects encoder, backbone "
                               "and decoder only")
        self.__dict__["_aurora"] = model  # not registered: its parts are registered below
        self.encoder = model.encoder
        self.backbone = model.backbone
        self.decoder = model.decoder

    def _load(self, path: Path, folder: CheckpointFolder | None, expected_missing: set[str],
              differences: list[str], preset: str, strict: bool) -> tuple[LoadReport, set[str]]:
        """Load a checkpoint folder or one of Microsoft's files; report (or refuse) mismatches."""
        if folder is not None:
            state, notes = folder.weights(), []
        else:
            state, notes = _load_aurora_file(self._aurora, path)
        report = load_with_report(
            self._aurora, state, model_shapes={k: tuple(v.shape)
                                               for k, v in self._aurora.state_dict().items()},
            source=path, preset=preset, strict=strict, expected_missing=expected_missing,
            differences=differences, notes=notes)
        return report, set(state)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        extra_surf_vars: Sequence[str] = (),
        extra_atmos_vars: Sequence[str] = (),
        strict: bool = True,
        *,
        stats: NormalisationStats | None = None,
        activation_checkpointing: bool = False,
    ) -> AuroraBackbone:
        """Rebuild a backbone saved by :meth:`save_checkpoint` and load its weights.

        The folder's config gives preset, architecture, variables and levels; its
        ``normalisation.json`` the statistics (``stats`` adds to or overrides them).
        """
        folder = open_checkpoint(path, "aurora", "Microsoft's .ckpt files load with "
                                 "AuroraBackbone(preset, checkpoint=...)")
        config = folder.config
        architecture = {k: v for k, v in config["architecture"].items() if k != "use_lora"}
        architecture.update({key: config[key] for key in VARIABLE_KEYS})
        extra_surf, extra_atmos = split_extra_variables(config, folder.path, extra_surf_vars,
                                                        extra_atmos_vars)
        return cls(config["preset"], stats=stats, levels=config["levels"], checkpoint=folder.path,
                   strict=strict, architecture=architecture, extra_surf_vars=extra_surf,
                   extra_atmos_vars=extra_atmos, activation_checkpointing=activation_checkpointing)

    @classmethod
    def from_aurora(cls, model: Aurora, *, stats: NormalisationStats | None = None,
                    activation_checkpointing: bool = False) -> AuroraBackbone:
        """Wrap a user's own ``aurora.Aurora`` (any class, size and weights) in place: its modules
        become this backbone's, nothing is copied, and training the backbone trains ``model``.

        Every parameter counts as pretrained (no task head). Normalisation stays Aurora's
        (its module-level statistics and the model's ``surf_stats``) unless ``stats`` are
        given, which are then installed before every forward; any pressure level is accepted.
        The config records the class, variables and the architecture Aurora keeps (patch size,
        history, timestep, LoRA), so the fingerprint names these weights in this architecture.
        """
        if not isinstance(model, Aurora):
            raise TypeError(f"from_aurora takes an aurora.Aurora, got {type(model).__name__}")
        self = cls.__new__(cls)
        Backbone.__init__(self)
        self._adopt(model)
        self.stats = stats
        self.load_report = LoadReport(source=f"a {type(model).__name__} passed in by the caller")
        self._levels = None
        self._atmos_statistics = {} if stats is None else \
            {k: (stats.locations[k], stats.scales[k]) for k in stats.locations}
        self._config = {
            "family": "aurora",
            "preset": f"own {type(model).__name__}",
            "model_class": type(model).__name__,
            "architecture": to_json({"patch_size": model.patch_size,
                                      "max_history_size": model.max_history_size,
                                      "timestep": model.timestep, "use_lora": model.use_lora}),
            "surf_vars": list(model.surf_vars),
            "static_vars": list(model.static_vars),
            "atmos_vars": list(model.atmos_vars),
            "levels": None,
            "task_head_surf_vars": [],
            "task_head_atmos_vars": [],
            "activation_checkpointing": bool(activation_checkpointing),
            "aurora_version": importlib.metadata.version("microsoft-aurora"),
        }
        if activation_checkpointing:
            for _, block in self._swin_blocks():
                block.forward = types.MethodType(_checkpointed_forward, block)
        self._record_parameter_roles(())
        self.fingerprint()
        return self

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write ``model.safetensors``, ``config.json`` and ``normalisation.json`` into folder ``path``.

        Atomic (a temporary folder, then a rename). Holds the pretrained and task-head weights
        under Aurora's names, never adapters a method added; new variables are ordinary
        variables of the saved model.
        """
        named = self._pretrained_named + self._head_named
        tensors = {name: parameter.detach().to("cpu").contiguous() for name, parameter in named}
        config = self.config
        config["surf_vars"] += config["task_head_surf_vars"]
        config["atmos_vars"] += config["task_head_atmos_vars"]
        config.update(task_head_surf_vars=[], task_head_atmos_vars=[],
                      activation_checkpointing=False)
        fingerprint = hash_weights(self.fingerprint_config(config), tensors.items())
        return write_checkpoint(path, tensors, self.stats, config, fingerprint)

    # -- the contract ---------------------------------------------------------------------

    def forward(self, batch: Batch) -> Batch:
        """Aurora's prediction for ``batch`` (physical units), normalised with :attr:`stats`.

        Times without a time zone are UTC (as in every WeatherBench store). Aurora's
        absolute-time embedding calls ``datetime.timestamp()``, which reads a naive time in
        the machine's local zone, so Aurora receives them as aware UTC times and the
        prediction's times come back naive: the output does not depend on the machine's ``TZ``.
        """
        self._check_batch(batch)
        for key, (location, scale) in self._atmos_statistics.items():
            aurora_normalisation.locations[key] = location
            aurora_normalisation.scales[key] = scale
        naive = all(t.tzinfo is None for t in batch.metadata.time)
        if naive:
            batch = _with_times(batch, tuple(t.replace(tzinfo=UTC)
                                             for t in batch.metadata.time))
        prediction = self._aurora(batch)
        if naive:
            prediction = _with_times(prediction, tuple(t.replace(tzinfo=None)
                                                       for t in prediction.metadata.time))
        return prediction

    def embedding_weights(self, variables: Sequence[str]) -> torch.Tensor:
        """(D, V, S) patch-embedding weights, S = history·patch², in the order given.

        Names resolve to the atmospheric embedding first, then the surface one (which also
        holds the static variables); ``"static_z"`` names static ``z`` where atmospheric ``z``
        takes the plain name. See :attr:`embedding_variables`.
        """
        variables = [variables] if isinstance(variables, str) else list(variables)
        if not variables:
            raise ValueError("embedding_weights needs at least one variable")
        repeated = sorted({v for v in variables if variables.count(v) > 1})
        if repeated:
            raise ValueError(f"variables repeated: {repeated}")
        columns = [self._embedding(name) for name in variables]
        return torch.stack([w.reshape(w.shape[0], -1) for w in columns], dim=1)

    def prompt_sites(self) -> list[tuple[str, torch.nn.Module]]:
        """Every Swin block's window attention, encoder then decoder, with its qualified name."""
        return [(f"{name}.attn", block.attn) for name, block in self._swin_blocks()]

    def linear_targets(self) -> tuple[str, ...]:
        """The Swin blocks' ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` (one regex)."""
        return (SWIN_LINEARS,)

    def feedforward_targets(self) -> tuple[str, ...]:
        """The Swin blocks' ``mlp.fc2``."""
        return (SWIN_FEEDFORWARD,)

    def _is_encoder_decoder(self, name: str) -> bool:
        """Aurora's Perceiver encoder and decoder: everything under ``encoder.`` / ``decoder.``
        (patch embeddings, level aggregation, position/time/scale embeddings, the Perceiver
        decoder and the output heads); the Swin is ``backbone.``."""
        return name.startswith(("encoder.", "decoder."))

    def fingerprint_config(self, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The config minus runtime settings, variable lists sorted (their order changes nothing)."""
        config = dict(self.config if config is None else config)
        record = {k: v for k, v in config.items() if k not in self.unfingerprinted_keys}
        for key in VARIABLE_KEYS:
            record[key] = sorted(record[key])
        return record

    # -- conveniences ---------------------------------------------------------------------

    @property
    def aurora(self) -> Aurora:
        """The wrapped ``aurora.Aurora`` (same modules as this backbone's)."""
        return self._aurora

    @property
    def levels(self) -> tuple[int | float, ...] | None:
        """Pressure levels (hPa) this backbone has statistics for (None: any, see
        :meth:`from_aurora`)."""
        return self._levels

    @property
    def embedding_variables(self) -> tuple[str, ...]:
        """Every name :meth:`embedding_weights` accepts: surface, atmospheric, static."""
        atmos = tuple(self._aurora.atmos_vars)
        static = tuple(f"static_{v}" if v in atmos else v for v in self._aurora.static_vars)
        return tuple(self._aurora.surf_vars) + atmos + static

    def _embedding(self, name: str) -> torch.nn.Parameter:
        surface = self.encoder.surf_token_embeds.weights
        atmospheric = self.encoder.atmos_token_embeds.weights
        if name.startswith("static_") and name[len("static_"):] in self._aurora.static_vars:
            return surface[name[len("static_"):]]
        if name in atmospheric:
            return atmospheric[name]
        if name in surface:
            return surface[name]
        raise ValueError(f"no patch embedding for '{name}'; known: {list(self.embedding_variables)}")

    def _swin_blocks(self) -> list[tuple[str, Swin3DTransformerBlock]]:
        return [(f"backbone.{group}.{i}.blocks.{j}", block)
                for group in ("encoder_layers", "decoder_layers")
                for i, layer in enumerate(getattr(self.backbone, group))
                for j, block in enumerate(layer.blocks)]

    def _check_batch(self, batch: Batch) -> None:
        """Name variables or levels the model cannot take (Aurora would fail with a bare KeyError)."""
        problems = []
        for kind, given, known in (("surface", batch.surf_vars, self._aurora.surf_vars),
                                   ("static", batch.static_vars, self._aurora.static_vars),
                                   ("atmospheric", batch.atmos_vars, self._aurora.atmos_vars)):
            unknown = sorted(set(given) - set(known))
            if unknown:
                problems.append(f"{kind} variables {unknown} (model has {list(known)})")
        levels = [] if self._levels is None else \
            [level for level in batch.metadata.atmos_levels
             if not any(math.isclose(float(level), float(m)) for m in self._levels)]
        if levels:
            problems.append(f"levels {levels} (backbone has statistics for {list(self._levels)})")
        if problems:
            raise ValueError("batch does not fit this backbone: " + "; ".join(problems))


# -- construction helpers ------------------------------------------------------------------


def _check_architecture(architecture: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(architecture) - _aurora_keywords())
    if unknown:
        raise ValueError(f"unknown Aurora argument(s) {unknown} in architecture")
    for key, why in _FORBIDDEN_KWARGS.items():
        if key in architecture and not (key == "use_lora" and architecture[key] is False):
            raise ValueError(f"architecture may not set '{key}': {why}")
    return {k: from_json(v) for k, v in architecture.items() if k != "use_lora"}


def _check_extra_variables(base: Mapping[str, tuple[str, ...]], extra_surf: Sequence[str],
                           extra_atmos: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    extra_surf, extra_atmos = tuple(extra_surf), tuple(extra_atmos)
    for kind, extra, taken in (("surface", extra_surf, base["surf_vars"] + base["static_vars"]),
                               ("atmospheric", extra_atmos, base["atmos_vars"])):
        repeated = sorted({v for v in extra if extra.count(v) > 1})
        clash = sorted(set(extra) & set(taken))
        if repeated or clash:
            raise ValueError(f"extra {kind} variables {repeated + clash} are repeated or already "
                             f"variables of the model ({list(taken)})")
    return extra_surf, extra_atmos


def _head_names(surf_vars: Sequence[str], atmos_vars: Sequence[str]) -> set[str]:
    """Aurora's parameter names for the patch embedding and output head of each variable."""
    names = set()
    for kind, variables in (("surf", surf_vars), ("atmos", atmos_vars)):
        for v in variables:
            names |= {f"encoder.{kind}_token_embeds.weights.{v}", f"decoder.{kind}_heads.{v}.weight",
                      f"decoder.{kind}_heads.{v}.bias"}
    return names


def _without_saved_heads(extra_surf: tuple[str, ...], extra_atmos: tuple[str, ...],
                         saved_keys: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The extra variables whose embedding and head the checkpoint did not have (task heads)."""
    return (tuple(v for v in extra_surf if not _head_names((v,), ()) <= saved_keys),
            tuple(v for v in extra_atmos if not _head_names((), (v,)) <= saved_keys))


def _hub_message(preset: str, spec: AuroraPreset) -> str:
    klass = spec.model_class
    return (f"preset '{preset}' needs Microsoft's pretrained weights, and weatherpeft never "
            f"downloads: fetch {klass.default_checkpoint_name} from "
            f"https://huggingface.co/{klass.default_checkpoint_repo} (revision "
            f"{klass.default_checkpoint_revision}) yourself and pass its local path as "
            f"checkpoint='/path/to/{klass.default_checkpoint_name}'")


def _locate_weights(checkpoint: str | os.PathLike | None, preset: str, spec: AuroraPreset,
                    random_init: bool) -> tuple[Path | None, CheckpointFolder | None]:
    """The local weights (a checkpoint folder, or one of Microsoft's files), or none."""
    hub_message = _hub_message(preset, spec) if spec.published else None
    if checkpoint is None:
        if hub_message and not random_init:
            raise ValueError(hub_message)
        return None, None
    path = resolve_local(checkpoint, hub_message)
    return path, CheckpointFolder(path, "aurora") if path.is_dir() else None


def _levels(levels: Sequence[int | float] | None, folder: CheckpointFolder | None,
            spec: AuroraPreset) -> tuple[int | float, ...]:
    """The given levels, else the checkpoint folder's, else the preset's."""
    if levels is None:
        levels = folder.config["levels"] if folder is not None else spec.levels
    if not levels:
        raise ValueError("an Aurora backbone needs at least one pressure level")
    return tuple(level_list(levels))


def _statistics(preset: str, spec: AuroraPreset, folder: CheckpointFolder | None,
                given: NormalisationStats | None, required: Sequence[str],
                levels: Sequence[int | float]) -> NormalisationStats:
    """``given`` over the statistics that come with the weights (a folder's, or Aurora's ERA5
    values for Microsoft's), for exactly the keys the model reads."""
    carried = folder.stats if folder is not None else None
    if carried is None and spec.published:
        locations, scales = _aurora_default_statistics()
        carried = NormalisationStats(locations={k: locations[k] for k in required if k in locations},
                                     scales={k: scales[k] for k in required if k in scales},
                                     source="Aurora's built-in ERA5 statistics")
    return model_statistics(preset, carried, given, required, levels)
