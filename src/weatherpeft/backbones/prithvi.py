"""Prithvi-WxC as a :class:`~weatherpeft.backbones.base.Backbone`, over the unmodified
``PrithviWxC.model.PrithviWxC`` of the ``prithviwxc`` package.

Prithvi-WxC is a 2-D ViT: one Conv2d patch embedding for all variables × input times, tokens
(B, G, L, D) — G mask units of L patches — and alternating local (within a mask unit) and
global (across mask units) attention, on a fixed grid. The wrapper maps weatherpeft's task data
(``aurora.Batch``, physical units) to Prithvi's batch dict and back:

* ``x`` (B, T, C, H, W): the channels are the surface variables, then every atmospheric
  variable at every level (variable-major), in the order of the backbone's config
  (:attr:`PrithviBackbone.channels`, named like the statistics: ``"2t"``, ``"z_500"``); the
  last T = ``input_size_time`` history steps of the batch. ``y`` (only its shape is read): the
  last input step.
* ``static`` (B, 2 + 4 + S, H, W) as Prithvi's MERRA-2 loader builds it for the Fourier
  position encoding: latitude and longitude in radians, then cos/sin of the day of year (/366)
  and of the hour of day (/24) of the last input time, then the static fields (``lsm``, ``z``);
  for ``positional_encoding="absolute"`` sin(lat), cos(lon), sin(lon) replace the first two.
* ``climate`` (B, C, H, W): a climatology at the target time from :meth:`set_climatology`'s
  function when one is set, else every channel's mean from :attr:`stats` (a constant field).
  Only ``residual="climate"`` reads it (the published models): give them a real climatology.
* ``input_time``: hours between the input steps; ``lead_time``: hours ahead. Batches carry only
  the last input time, so both are settings of the backbone (:attr:`input_time`,
  :attr:`lead_time`, 6 h by default, runtime settings outside the fingerprint); the prediction
  is stamped last input time + lead time.

Normalisation: Prithvi normalises inside its forward with its own buffers
(``input_scalers_mu``/``sigma``, ``static_input_scalers_*``) and de-normalises with
``output_scalers``: weatherpeft fills them from :attr:`stats` (a ``NormalisationStats``) and
the output scales (default: the channels' standard deviations; the published models carry
theirs, the square root of the anomaly variance, in their buffers).

The forward is the package's own unmasked path, ``PrithviWxC.model.masked_inference`` with no
mask: every mask unit in its natural order. (``PrithviWxC.forward`` draws a random order of the
mask units even at masking ratio 0, and with local masking a random order of the patches in
each unit, which changes which tokens attend to each other in the encoder's global blocks.)

Prompts (:meth:`prompt_sites`): every transformer's attention (``attention.1``, a
``MultiheadAttention`` called as ``site((x, mask))``). Tokens are (B, G, L, D) in local blocks
and (B, L, G, D) in global ones, attention along axis −2; the prompts are prepended along that
axis in every attention call: P prompt tokens join every mask unit in local blocks and every
across-unit sequence (one per patch position) in global blocks, and their outputs are dropped.
Prithvi's attention ignores the mask its blocks pass (v1.0.1), so nothing else changes; a key
bias (``PromptInjector(key_bias=...)``) runs the same attention with that additive bias on the
prompt keys.

New variables (task heads): the pretrained Conv2d and output Linear keep their shapes. A new
variable gets a Conv2d (D, T·n, P, P) without bias whose output is added to the patch
embedding's, exactly as extending the pretrained conv by n input channels per time; a Linear
(D, n·P²) beside ``unembed``, exactly as extending its output rows (then Prithvi's own
``from_patching`` and pixel shuffle, de-normalisation and residual); under the climate residual
a Conv2d for their climatology channels beside the static embedding. These are the task-head
parameters. :meth:`save_checkpoint` writes them into the pretrained tensors (channels in
canonical order), so a saved model is a plain ``PrithviWxC`` with more channels.

Grid: the model is built for one grid (``n_lats_px`` × ``n_lons_px``), and the decoder's shifted
windows keep grid-dependent mask buffers (``decoder_shifter.local_mask``/``global_mask``). They
are derived from the configuration, so weatherpeft's checkpoints hold parameters only and
rebuild them; a published ``.pt`` file holds them too, and loads (strictly) only into a model on
the grid it was saved with: another grid fails with the mismatching buffers named.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import logging
import math
import os
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from aurora import Batch, Metadata
from aurora.normalisation import level_to_str
from PrithviWxC.model import MultiheadAttention, PrithviWxC, masked_inference
from torch import nn

from weatherpeft.backbones.base import Backbone, LoadReport, PromptSiteCall, hash_weights
from weatherpeft.backbones.checkpoint import (
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

__all__ = ["MERRA2_LEVELS", "PRITHVI_PRESETS", "PrithviBackbone", "PrithviPreset"]

logger = logging.getLogger(__name__)

_PREFIX = "prithvi."
#: PrithviWxC arguments weatherpeft derives (from the variables, statistics and settings).
_DERIVED = ("in_channels", "in_channels_static", "input_scalers_mu", "input_scalers_sigma",
            "static_input_scalers_mu", "static_input_scalers_sigma", "output_scalers",
            "mask_ratio_inputs", "mask_ratio_targets", "checkpoint_encoder", "checkpoint_decoder")
#: PrithviWxC's modules outside its transformer stacks that map fields to tokens and back.
_ENCODER_DECODER_PARTS = ("patch_embedding", "patch_embedding_static", "input_time_embedding",
                          "lead_time_embedding", "unembed")
#: Time channels of the static input: cos/sin day of year, cos/sin hour of day.
_TIME_CHANNELS = 4
#: Unused leading entries of the static scalers under the Fourier encoding (Prithvi reads [3:]).
_FOURIER_OFFSET = 3

#: MERRA-2 model levels of the published Prithvi-WxC.
MERRA2_LEVELS: tuple[float, ...] = (34.0, 39.0, 41.0, 43.0, 44.0, 45.0, 48.0, 51.0, 53.0, 56.0,
                                    63.0, 68.0, 71.0, 72.0)
_MERRA2_SURFACE = ("EFLUX", "GWETROOT", "HFLUX", "LAI", "LWGAB", "LWGEM", "LWTUP", "PS", "QV2M",
                   "SLP", "SWGNT", "SWTNT", "T2M", "TQI", "TQL", "TQV", "TS", "U10M", "V10M", "Z0M")
_MERRA2_VERTICAL = ("CLOUD", "H", "OMEGA", "PL", "QI", "QL", "QV", "T", "U", "V")
_MERRA2_STATIC = ("FRACI", "FRLAND", "FROCEAN", "PHIS")


@dataclasses.dataclass(frozen=True)
class PrithviPreset:
    """A named configuration of ``PrithviWxC``: its architecture (keyword arguments other than
    the derived ones), variables and levels. ``published`` presets have weights that the user
    downloads (``weights``, from Hugging Face repository ``repository``) and passes as a path."""

    architecture: Mapping[str, Any]
    surf_vars: tuple[str, ...]
    atmos_vars: tuple[str, ...]
    static_vars: tuple[str, ...]
    levels: tuple[int | float, ...]
    published: bool = False
    weights: str = ""
    repository: str = ""


#: prithvi-tiny: 2.0 M parameters on the built-in 64 × 32 grid; patch 2 → 16 × 32 tokens in
#: 4 × 4 mask units of 4 × 8 patches (8 × 16 px). Encoder and decoder 2 local-global pairs
#: each (5 transformers: local, global, local, global, local), shifted windows in the decoder
#: as the published models (an even count: see :func:`_architecture`). The temporal residual
#: (output = last input + scale · network) suits short CPU pretraining.
PRITHVI_TINY: dict[str, Any] = dict(
    input_size_time=2,
    n_lats_px=32,
    n_lons_px=64,
    patch_size_px=(2, 2),
    mask_unit_size_px=(8, 16),
    embed_dim=128,
    n_blocks_encoder=2,
    n_blocks_decoder=2,
    mlp_multiplier=4,
    n_heads=4,
    dropout=0.0,
    drop_path=0.0,
    parameter_dropout=0.0,
    residual="temporal",
    masking_mode="both",
    positional_encoding="fourier",
    encoder_shifting=False,
    decoder_shifting=True,
    input_scalers_epsilon=0.0,
    static_input_scalers_epsilon=0.0,
)

#: The published architecture (the 2300M model's config.yaml on Hugging Face, and the package's
#: ``config_files``). A ``config.yaml`` beside the weights file overrides it.
_PRITHVI_2300M: dict[str, Any] = dict(
    PRITHVI_TINY, n_lats_px=360, n_lons_px=576, patch_size_px=(2, 2), mask_unit_size_px=(30, 32),
    embed_dim=2560, n_blocks_encoder=12, n_blocks_decoder=2, mlp_multiplier=4, n_heads=16,
    residual="climate", masking_mode="both", positional_encoding="fourier",
    encoder_shifting=False, decoder_shifting=True)
#: The package's ``config_files/small.yaml`` (weights ``prithvi.wxc.rollout.600m.v1.pt``).
_PRITHVI_600M: dict[str, Any] = dict(_PRITHVI_2300M, embed_dim=1024, n_blocks_encoder=8,
                                     n_blocks_decoder=2, n_heads=16)

_MERRA2 = dict(surf_vars=_MERRA2_SURFACE, atmos_vars=_MERRA2_VERTICAL, static_vars=_MERRA2_STATIC,
               levels=MERRA2_LEVELS, published=True)

#: Preset name → configuration. Add an entry to offer another configuration by name.
PRITHVI_PRESETS: dict[str, PrithviPreset] = {
    "prithvi-tiny": PrithviPreset(PRITHVI_TINY, ("2t", "10u", "10v", "msl"),
                                  ("z", "u", "v", "t", "q"), ("lsm", "z"), (500, 850)),
    "prithvi-wxc-2300m": PrithviPreset(_PRITHVI_2300M, **_MERRA2, weights="prithvi.wxc.2300m.v1.pt",
                                       repository="ibm-nasa-geospatial/Prithvi-WxC-1.0-2300M"),
    "prithvi-wxc-2300m-rollout": PrithviPreset(
        _PRITHVI_2300M, **_MERRA2, weights="prithvi.wxc.rollout.2300m.v1.pt",
        repository="ibm-nasa-geospatial/Prithvi-WxC-1.0-2300M-rollout"),
    "prithvi-wxc-600m-rollout": PrithviPreset(_PRITHVI_600M, **_MERRA2,
                                              weights="prithvi.wxc.rollout.600m.v1.pt"),
}

_ARCHITECTURE_KEYS = frozenset(p for p in inspect.signature(PrithviWxC.__init__).parameters
                               if p != "self") - set(_DERIVED)


# -- prompt sites ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KeyBias:
    """Passed in the mask slot of a prompted call: additive biases on key ranges, as
    (first key, count, value) segments (one per injector with a key bias; an injector that
    prepends later shifts the segments of those before it)."""

    segments: tuple[tuple[int, int, float], ...]

    def shifted(self, count: int) -> _KeyBias:
        return _KeyBias(tuple((first + count, n, value) for first, n, value in self.segments))


def _attention_with_key_bias(module: MultiheadAttention, d: tuple[torch.Tensor, Any]) -> torch.Tensor:
    """``MultiheadAttention.forward`` with an additive bias on the prompt keys (when asked).

    The same computation (its ``qkv_layer``, heads, scaled dot-product attention, ``w_layer``),
    with ``attn_mask`` = the biases on the prompt keys; a call without a :class:`_KeyBias`
    runs the package's own forward.
    """
    x, mask = d
    if not isinstance(mask, _KeyBias):
        return type(module).forward(module, d)
    passenger, (length, features) = x.shape[:-2], x.shape[-2:]
    batch = passenger.numel()
    x = x.reshape(batch, length, features)
    q, k, v = (module.qkv_layer(x).view(batch, length, module.n_heads,
                                        3 * (features // module.n_heads))
               .transpose(1, 2).chunk(chunks=3, dim=3))
    bias = x.new_zeros(length)
    for first, count, value in mask.segments:
        bias[first:first + count] = value
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, length),
                                       dropout_p=module.dropout)
    x = module.w_layer(x.transpose(1, 2).reshape(batch, length, features))
    return x.view(*passenger, length, features)


class _PairCall(PromptSiteCall):
    """Prithvi's ``MultiheadAttention.forward(d)``, d = (x, attn_mask), x (..., N, D)."""

    _USERS = "_weatherpeft_key_bias_users"

    def __init__(self, module: MultiheadAttention) -> None:
        self.module = module

    @staticmethod
    def _pair(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        pair = args[0] if args else kwargs["d"]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError("a Prithvi attention site is called with one (tokens, mask) pair")
        return pair

    def tokens(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        return self._pair(args, kwargs)[0]

    def with_prompts(self, args: tuple[Any, ...], kwargs: dict[str, Any], tokens: torch.Tensor,
                     count: int, key_bias: float) -> tuple[tuple[Any, ...], dict[str, Any]]:
        mask = self._pair(args, kwargs)[1]  # Prithvi's own is ignored by the site
        if isinstance(mask, _KeyBias):  # another injector's prompts, now after ours
            mask = mask.shifted(count)
            if key_bias != 0.0:
                mask = _KeyBias(((0, count, key_bias),) + mask.segments)
        elif key_bias != 0.0:
            mask = _KeyBias(((0, count, key_bias),))
        return ((tokens, mask),), {}

    def enable_key_bias(self) -> Callable[[], None]:
        """Route the site's calls through :func:`_attention_with_key_bias` while needed."""
        module = self.module
        users = getattr(module, self._USERS, 0)
        if users == 0:
            module.forward = types.MethodType(_attention_with_key_bias, module)
        setattr(module, self._USERS, users + 1)

        def undo() -> None:
            left = getattr(module, self._USERS) - 1
            setattr(module, self._USERS, left)
            if left == 0:
                del module.forward
                delattr(module, self._USERS)

        return undo


# -- small helpers ---------------------------------------------------------------------------


def channel_names(surf_vars: Sequence[str], atmos_vars: Sequence[str],
                  levels: Sequence[int | float]) -> list[str]:
    """Prithvi's channel order: surface variables, then atmospheric ones × levels (statistics
    keys: ``"2t"``, ``"z_500"``)."""
    return [*surf_vars, *(f"{name}_{level_to_str(level)}" for name in atmos_vars for level in levels)]


def _check_variables(surf_vars: Sequence[str], atmos_vars: Sequence[str],
                     static_vars: Sequence[str], extra_surf: Sequence[str],
                     extra_atmos: Sequence[str]) -> None:
    for kind, extra, taken in (("surface", extra_surf, tuple(surf_vars) + tuple(static_vars)),
                               ("atmospheric", extra_atmos, tuple(atmos_vars))):
        repeated = sorted({v for v in extra if list(extra).count(v) > 1})
        clash = sorted(set(extra) & set(taken))
        if repeated or clash:
            raise ValueError(f"extra {kind} variables {repeated + clash} are repeated or already "
                             f"variables of the model ({list(taken)})")


def _architecture(spec: PrithviPreset, overrides: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - _ARCHITECTURE_KEYS)
    if unknown:
        raise ValueError(f"unknown or derived PrithviWxC argument(s) {unknown} in architecture; "
                         f"settable: {sorted(_ARCHITECTURE_KEYS)}")
    architecture = {**spec.architecture, **{k: from_json(v) for k, v in overrides.items()}}
    for key in ("patch_size_px", "mask_unit_size_px"):
        architecture[key] = tuple(int(v) for v in architecture[key])
    if architecture["encoder_shifting"]:
        raise ValueError("encoder_shifting=True is not supported: Prithvi shifts the encoder's "
                         "windows on tokens in mask-unit order, which masking permutes")
    if architecture["decoder_shifting"] and architecture["n_blocks_decoder"] % 2:
        # Prithvi rolls the grid by half a mask unit after every global block and never rolls
        # it back at the end: an odd count leaves the prediction displaced against its input.
        raise ValueError(f"decoder_shifting=True needs an even n_blocks_decoder (got "
                         f"{architecture['n_blocks_decoder']}): Prithvi shifts the windows after "
                         "every global block, so an odd count ends with the output rolled by half "
                         "a mask unit")
    return architecture


def _published_config(weights: Path) -> dict[str, Any]:
    """Architecture from a Hugging Face ``config.yaml`` beside the weights, if there is one."""
    path = weights.parent / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    params = (yaml.safe_load(path.read_text()) or {}).get("params", {})
    return {k: v for k, v in params.items() if k in _ARCHITECTURE_KEYS}


def _read_published(path: Path) -> dict[str, torch.Tensor]:
    """A published ``.pt`` file's state dict (its ``model_state`` when wrapped)."""
    # NASA/IBM publish pickles: unavoidable, so weights_only=True (tensors and containers only).
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state" in state:
        state = state["model_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a Prithvi-WxC checkpoint (expected a dict of tensors, "
                         "or one under 'model_state')")
    return dict(state)


def _published_statistics(state: Mapping[str, torch.Tensor], channels: Sequence[str],
                          static_vars: Sequence[str]) -> tuple[NormalisationStats, dict[str, float]]:
    """The statistics a published checkpoint carries in its scaler buffers."""
    mu, sigma = state["input_scalers_mu"].reshape(-1), state["input_scalers_sigma"].reshape(-1)
    static_mu = state["static_input_scalers_mu"].reshape(-1)
    static_sigma = state["static_input_scalers_sigma"].reshape(-1)
    output = state["output_scalers"].reshape(-1)
    if len(mu) != len(channels) or len(static_mu) < len(static_vars):
        raise ValueError(f"the checkpoint's scalers have {len(mu)} channels and {len(static_mu)} "
                         f"static entries; the preset has {len(channels)} and {len(static_vars)}")
    first = len(static_mu) - len(static_vars)  # statics are the last entries
    locations = {c: float(mu[i]) for i, c in enumerate(channels)}
    scales = {c: float(sigma[i]) for i, c in enumerate(channels)}
    locations.update({v: float(static_mu[first + i]) for i, v in enumerate(static_vars)})
    scales.update({v: float(static_sigma[first + i]) for i, v in enumerate(static_vars)})
    stats = NormalisationStats(locations=locations, scales=scales,
                               source="the Prithvi-WxC checkpoint's scaler buffers")
    return stats, {c: float(output[i]) for i, c in enumerate(channels)}


def _locate_weights(checkpoint: str | os.PathLike | None, preset: str, spec: PrithviPreset,
                    random_init: bool) -> tuple[Path | None, CheckpointFolder | None,
                                                dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(path, checkpoint folder, published state, published architecture) of the weights."""
    hub_message = _hub_message(preset, spec) if spec.published else None
    if checkpoint is None:
        if hub_message and not random_init:
            raise ValueError(hub_message)
        return None, None, None, {}
    path = resolve_local(checkpoint, hub_message)
    if path.is_dir():
        return path, CheckpointFolder(path, "prithvi"), None, {}
    return path, None, _read_published(path), _published_config(path)


def _variable_names(spec: PrithviPreset, folder: CheckpointFolder | None,
                    variables: Mapping[str, Sequence[str]] | None
                    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(surface, atmospheric, static) variables: the preset's or the folder's, then ``variables``."""
    names = dict(surf_vars=spec.surf_vars, atmos_vars=spec.atmos_vars, static_vars=spec.static_vars)
    if folder is not None:
        names = {k: tuple(folder.config[k]) for k in names}
    names.update({k: tuple(v) for k, v in (variables or {}).items()})
    return names["surf_vars"], names["atmos_vars"], names["static_vars"]


def _levels(levels: Sequence[int | float] | None, folder: CheckpointFolder | None,
            spec: PrithviPreset, atmos_vars: Sequence[str]) -> tuple[int | float, ...]:
    """The given levels, else the checkpoint folder's, else the preset's."""
    if levels is None:
        levels = folder.config["levels"] if folder is not None else spec.levels
    if atmos_vars and not levels:
        raise ValueError("a Prithvi backbone with atmospheric variables needs pressure levels")
    return tuple(level_list(levels))


def _hub_message(preset: str, spec: PrithviPreset) -> str:
    where = (f"from https://huggingface.co/{spec.repository} " if spec.repository else "")
    return (f"preset '{preset}' needs the published weights, and weatherpeft never downloads: "
            f"fetch {spec.weights} {where}yourself (with its config.yaml beside it) and pass its "
            f"local path as checkpoint='/path/to/{spec.weights}'")


def _time_features(times: Sequence[datetime]) -> torch.Tensor:
    """(B, 4): cos/sin of day of year (/366) and of hour of day (/24), as Prithvi's loader."""
    rows = []
    for t in times:
        day = t.timetuple().tm_yday
        hour = t.hour + t.minute / 60
        rows.append([math.cos(2 * math.pi * day / 366), math.sin(2 * math.pi * day / 366),
                     math.cos(2 * math.pi * hour / 24), math.sin(2 * math.pi * hour / 24)])
    return torch.tensor(rows, dtype=torch.float32)


def _hours(value: timedelta | float | int) -> float:
    return value.total_seconds() / 3600 if isinstance(value, timedelta) else float(value)


# -- the backbone ----------------------------------------------------------------------------


class PrithviBackbone(Backbone):
    """Prithvi-WxC (``PrithviWxC.model.PrithviWxC``, unmodified) as a Backbone.

    Args:
        preset: a key of :data:`PRITHVI_PRESETS`.
        stats: normalisation statistics of the data, merged over those that come with the
            weights; they must cover every channel and static variable (and new variables).
        levels: pressure levels of the atmospheric channels (default: the checkpoint's, else
            the preset's); they set the channel count.
        checkpoint: a weatherpeft checkpoint folder, or a published ``.pt`` file (published
            presets). Never downloaded.
        strict: refuse any mismatch with a ``ValueError`` listing the keys; ``False`` loads what
            fits and keeps the rest in :attr:`load_report`.
        extra_surf_vars, extra_atmos_vars: new variables (task heads, see the module doc).
        architecture: PrithviWxC keyword arguments on top of the preset (not the derived ones).
        output_scales: de-normalisation scale per channel (default: the carried ones, else the
            statistics' standard deviations).
        lead_time, input_time: Prithvi's lead-time and input-spacing inputs (default 6 h).
        activation_checkpointing: recompute every transformer in backward (Prithvi's own).
        random_init: allow a published preset without weights (tests only).
        variables: ``surf_vars``/``atmos_vars``/``static_vars`` replacing the preset's (a fresh
            model with other channels; the order is the channel order).
    """

    unfingerprinted_keys = ("task_head_surf_vars", "task_head_atmos_vars",
                            "activation_checkpointing", "prithviwxc_version", "lead_time_hours",
                            "input_time_hours")

    def __init__(
        self,
        preset: str = "prithvi-tiny",
        *,
        stats: NormalisationStats | None = None,
        levels: Sequence[int | float] | None = None,
        checkpoint: str | os.PathLike | None = None,
        strict: bool = True,
        extra_surf_vars: Sequence[str] = (),
        extra_atmos_vars: Sequence[str] = (),
        architecture: Mapping[str, Any] | None = None,
        output_scales: Mapping[str, float] | None = None,
        lead_time: timedelta | float = timedelta(hours=6),
        input_time: timedelta | float = timedelta(hours=6),
        activation_checkpointing: bool = False,
        random_init: bool = False,
        variables: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        if preset not in PRITHVI_PRESETS:
            raise ValueError(f"unknown Prithvi preset '{preset}'; known: {sorted(PRITHVI_PRESETS)}")
        spec = PRITHVI_PRESETS[preset]
        overrides = dict(architecture or {})

        weights, folder, published_state, published_overrides = _locate_weights(
            checkpoint, preset, spec, random_init)
        arch = _architecture(spec, {**published_overrides, **overrides})
        surf_vars, atmos_vars, static_vars = _variable_names(spec, folder, variables)
        levels = _levels(levels, folder, spec, atmos_vars)
        extra_surf, extra_atmos = tuple(extra_surf_vars), tuple(extra_atmos_vars)
        _check_variables(surf_vars, atmos_vars, static_vars, extra_surf, extra_atmos)
        channels = channel_names(surf_vars, atmos_vars, levels)
        head_channels = channel_names(extra_surf, extra_atmos, levels)
        carried = folder.stats if folder is not None else None
        carried_scales = dict(folder.config.get("output_scales", {})) if folder else {}
        if published_state is not None:
            carried, carried_scales = _published_statistics(published_state, channels, static_vars)

        # Statistics and output scales for exactly the channels and statics the model reads.
        self.stats = model_statistics(preset, carried, stats,
                                      [*channels, *head_channels, *static_vars], levels)
        scales = {c: self.stats.scales[c] for c in [*channels, *head_channels]}
        scales.update(carried_scales)
        scales.update({k: float(v) for k, v in (output_scales or {}).items()})
        self._output_scales = scales

        # The unmodified PrithviWxC.
        self._channels, self._head_channels = tuple(channels), tuple(head_channels)
        self._static_vars, self._levels = tuple(static_vars), levels
        self.lead_time = _hours(lead_time)
        self.input_time = _hours(input_time)
        self._climatology: Callable[..., torch.Tensor] | None = None
        kwargs = self._model_kwargs(arch, activation_checkpointing)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            self.prithvi = PrithviWxC(**kwargs)
        self._build_heads()

        # Weights.
        architecture_record = to_json(arch)
        self.load_report = LoadReport(source="(random initialisation)")
        if weights is not None:
            differences = [] if folder is None else config_differences(
                folder.config, {"preset": preset, "levels": list(levels)}, architecture_record)
            state = published_state if published_state is not None else folder.weights()
            self.load_report = self._load(weights, state, differences, preset, strict,
                                          buffers=published_state is not None)

        self._config = {
            "family": "prithvi",
            "preset": preset,
            "model_class": "PrithviWxC",
            "architecture": architecture_record,
            "surf_vars": list(surf_vars),
            "static_vars": list(static_vars),
            "atmos_vars": list(atmos_vars),
            "levels": list(levels),
            "output_scales": {c: scales[c] for c in channels},
            "task_head_surf_vars": list(extra_surf),
            "task_head_atmos_vars": list(extra_atmos),
            "activation_checkpointing": bool(activation_checkpointing),
            "lead_time_hours": self.lead_time,
            "input_time_hours": self.input_time,
            "prithviwxc_version": importlib.metadata.version("prithviwxc"),
        }
        self._record_parameter_roles(self._head_parameter_names())
        self.fingerprint()
        verify_fingerprint(self, folder)

    # -- construction ------------------------------------------------------------------------

    def _model_kwargs(self, arch: Mapping[str, Any], checkpointing: bool) -> dict[str, Any]:
        """PrithviWxC's arguments: the architecture plus the derived channels and scalers."""
        fourier = arch["positional_encoding"] == "fourier"
        static_count = _TIME_CHANNELS + len(self._static_vars) + (0 if fourier else 3)
        offset = _FOURIER_OFFSET if fourier else 0
        static_mu = torch.zeros(static_count + offset)
        static_sigma = torch.ones(static_count + offset)
        first = static_count + offset - len(self._static_vars)
        for i, name in enumerate(self._static_vars):
            static_mu[first + i] = self.stats.locations[name]
            static_sigma[first + i] = self.stats.scales[name]
        n_transformers = {"encoder": 2 * arch["n_blocks_encoder"] + 1,
                          "decoder": 2 * arch["n_blocks_decoder"] + 1}
        return {**arch,
                "in_channels": len(self._channels),
                "in_channels_static": static_count,
                "input_scalers_mu": self._vector(self._channels, self.stats.locations),
                "input_scalers_sigma": self._vector(self._channels, self.stats.scales),
                "static_input_scalers_mu": static_mu,
                "static_input_scalers_sigma": static_sigma,
                "output_scalers": self._vector(self._channels, self._output_scales),
                "mask_ratio_inputs": 0.0,
                "mask_ratio_targets": 0.0,
                "checkpoint_encoder": list(range(n_transformers["encoder"])) if checkpointing else [],
                "checkpoint_decoder": list(range(n_transformers["decoder"])) if checkpointing else []}

    @staticmethod
    def _vector(channels: Sequence[str], values: Mapping[str, float]) -> torch.Tensor:
        return torch.tensor([float(values[c]) for c in channels], dtype=torch.float32)

    def _build_heads(self) -> None:
        """Task-head modules for the new channels, and their scalers (see the module doc)."""
        model, count = self.prithvi, len(self._head_channels)
        self.head_embedding = self.head_unembed = self.head_climate = None
        if count:
            patch = model.patch_size_px
            self.head_embedding = nn.Conv2d(model.input_size_time * count, model.embed_dim,
                                            kernel_size=patch, stride=patch, bias=False)
            self.head_unembed = nn.Linear(model.embed_dim, count * patch[0] * patch[1])
            if model.residual == "climate":
                self.head_climate = nn.Conv2d(count, model.embed_dim, kernel_size=patch,
                                              stride=patch, bias=False)
        channels = self._head_channels
        self.register_buffer("head_mu", self._vector(channels, self.stats.locations), persistent=False)
        self.register_buffer("head_sigma", self._vector(channels, self.stats.scales), persistent=False)
        self.register_buffer("head_output_scales", self._vector(channels, self._output_scales),
                             persistent=False)
        self._head_inputs: dict[str, torch.Tensor] = {}
        if count:
            model.patch_embedding.register_forward_hook(self._add_head_embedding)
            model.unembed.register_forward_hook(self._run_head_unembed)
            if self.head_climate is not None:
                model.patch_embedding_static.register_forward_hook(self._add_head_climate)

    def _is_encoder_decoder(self, name: str) -> bool:
        """Prithvi-WxC's counterparts of Aurora's Perceiver encoder/decoder: everything that maps
        fields to tokens and back outside its transformer stacks (``prithvi.encoder`` and
        ``prithvi.decoder``, which are the backbone proper) — the patch embedding, the static
        (and climate) patch embedding, the input-time and lead-time embeddings, and ``unembed``.
        ``mask_token`` is left out: only masked pretraining reads it."""
        return name.startswith(tuple(f"{_PREFIX}{part}." for part in _ENCODER_DECODER_PARTS))

    def _head_parameter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if name.startswith("head_")]

    def _load(self, path: Path, state: dict[str, torch.Tensor], differences: list[str],
              preset: str, strict: bool, buffers: bool) -> LoadReport:
        """Load ``state`` (PrithviWxC's names) into the model; report (or refuse) mismatches.

        A weatherpeft folder holds parameters only (buffers are rebuilt); a published file
        also holds the buffers, whose grid-dependent masks must match (see the module doc).
        """
        expected = dict(self.prithvi.named_parameters())
        if buffers:
            expected.update(self.prithvi.state_dict(keep_vars=True))

        def grid_hint(report: LoadReport) -> str:
            grid = [k for k, _, _ in report.shape_mismatches
                    if k.endswith(("local_mask", "global_mask"))]
            return (f"\n(the shifted-window mask buffers depend on the grid: these weights load "
                    f"only on the grid they were saved with, not on "
                    f"{self.prithvi.n_lats_px} × {self.prithvi.n_lons_px})" if grid else "")

        return load_with_report(self.prithvi, state,
                                model_shapes={k: tuple(v.shape) for k, v in expected.items()},
                                source=path, preset=preset, strict=strict,
                                differences=differences, hint=grid_hint)

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
        **settings: Any,
    ) -> PrithviBackbone:
        """Rebuild a backbone saved by :meth:`save_checkpoint` and load its weights.

        Variables the checkpoint already has load as pretrained, not new. ``settings``:
        ``lead_time``, ``input_time``.
        """
        folder = open_checkpoint(path, "prithvi", "published .pt files load with "
                                 "PrithviBackbone(preset, checkpoint=...)")
        config = folder.config
        extra_surf, extra_atmos = split_extra_variables(config, folder.path, extra_surf_vars,
                                                        extra_atmos_vars)
        unknown = sorted(set(settings) - {"lead_time", "input_time"})
        if unknown:
            raise TypeError(f"from_checkpoint got unexpected settings {unknown}")
        for key in ("lead_time", "input_time"):
            settings.setdefault(key, config.get(f"{key}_hours", 6.0))
        return cls(config["preset"], stats=stats, levels=config["levels"], checkpoint=folder.path,
                   strict=strict, architecture=config["architecture"], extra_surf_vars=extra_surf,
                   extra_atmos_vars=extra_atmos, activation_checkpointing=activation_checkpointing,
                   **settings)

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write ``model.safetensors``, ``config.json`` and ``normalisation.json`` into ``path``.

        Atomic. The tensors are PrithviWxC's parameters under its own names; task heads are
        written into them (new channels in canonical order), so a saved model is a plain
        PrithviWxC with more channels and its new variables are ordinary variables.
        """
        config = self.config
        config["surf_vars"] += config["task_head_surf_vars"]
        config["atmos_vars"] += config["task_head_atmos_vars"]
        channels = channel_names(config["surf_vars"], config["atmos_vars"], config["levels"])
        config["output_scales"] = {c: float(self._output_scales[c]) for c in channels}
        config.update(task_head_surf_vars=[], task_head_atmos_vars=[],
                      activation_checkpointing=False)
        tensors = self._merged_parameters(channels)
        fingerprint = hash_weights(self.fingerprint_config(config),
                                   [(_PREFIX + name, tensor) for name, tensor in tensors.items()])
        return write_checkpoint(path, tensors, self.stats, config, fingerprint)

    @torch.no_grad()
    def _merged_parameters(self, channels: Sequence[str]) -> dict[str, torch.Tensor]:
        """PrithviWxC's parameters with the task heads written in, channels in ``channels`` order."""
        tensors = {name: p.detach().to("cpu").contiguous()
                   for name, p in self.prithvi.named_parameters()}
        if not self._head_channels:
            return tensors
        model, time = self.prithvi, self.prithvi.input_size_time
        old, new = len(self._channels), len(self._head_channels)
        source = {c: ("old", i) for i, c in enumerate(self._channels)}
        source.update({c: ("new", i) for i, c in enumerate(self._head_channels)})
        order = [source[c] for c in channels]

        def pick(old_tensor: torch.Tensor, new_tensor: torch.Tensor, dim: int) -> torch.Tensor:
            """Channels of old (… old …) and new (… new …) along ``dim``, in ``order``."""
            parts = {"old": old_tensor, "new": new_tensor}
            return torch.cat([parts[kind].narrow(dim, i, 1) for kind, i in order], dim=dim)

        def per_time(tensor: torch.Tensor, count: int) -> torch.Tensor:
            return tensor.reshape(tensor.shape[0], time, count, *tensor.shape[2:])

        embedding = pick(per_time(tensors["patch_embedding.proj.weight"], old),
                         per_time(self.head_embedding.weight.detach().cpu(), new), dim=2)
        tensors["patch_embedding.proj.weight"] = embedding.reshape(
            embedding.shape[0], -1, *embedding.shape[3:]).contiguous()
        pixels = model.patch_size_px[0] * model.patch_size_px[1]
        for suffix in ("weight", "bias"):
            pretrained = tensors[f"unembed.{suffix}"]
            head = getattr(self.head_unembed, suffix).detach().cpu()
            rows = pick(pretrained.reshape(old, pixels, *pretrained.shape[1:]),
                        head.reshape(new, pixels, *head.shape[1:]), dim=0)
            tensors[f"unembed.{suffix}"] = rows.reshape(-1, *pretrained.shape[1:]).contiguous()
        if self.head_climate is not None:
            weight = tensors["patch_embedding_static.proj.weight"]
            statics = weight.shape[1] - old
            climate = pick(weight[:, statics:], self.head_climate.weight.detach().cpu(), dim=1)
            tensors["patch_embedding_static.proj.weight"] = torch.cat(
                [weight[:, :statics], climate], dim=1).contiguous()
        return tensors

    # -- the contract ------------------------------------------------------------------------

    def forward(self, batch: Batch) -> Batch:
        """Prithvi's prediction for ``batch`` (physical units), stamped input time + lead time."""
        inputs = self._prepare(batch)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*sdp_kernel.*", category=FutureWarning)
                output = masked_inference(self.prithvi, inputs)
            if self._head_channels:
                output = torch.cat([output, self._head_prediction(inputs)], dim=1)
        finally:
            self._head_inputs.clear()
        return self._to_batch(output, batch)

    def embedding_weights(self, variables: Sequence[str]) -> torch.Tensor:
        """(D, V, S) slices of ``patch_embedding.proj`` (D, T·C, P, P), S = T·P·P, per channel
        (``"2t"``, ``"z_500"``; task-head channels from their own conv), in the order given."""
        variables = [variables] if isinstance(variables, str) else list(variables)
        if not variables:
            raise ValueError("embedding_weights needs at least one variable")
        repeated = sorted({v for v in variables if variables.count(v) > 1})
        if repeated:
            raise ValueError(f"variables repeated: {repeated}")
        unknown = [v for v in variables if v not in self.embedding_variables]
        if unknown:
            raise ValueError(f"no patch embedding for {unknown}; known: "
                             f"{list(self.embedding_variables)}")
        time = self.prithvi.input_size_time
        pretrained = self.prithvi.patch_embedding.proj.weight
        pretrained = pretrained.reshape(pretrained.shape[0], time, len(self._channels),
                                        *pretrained.shape[2:])
        columns = []
        for name in variables:
            if name in self._channels:
                column = pretrained[:, :, self._channels.index(name)]
            else:
                head = self.head_embedding.weight
                head = head.reshape(head.shape[0], time, len(self._head_channels), *head.shape[2:])
                column = head[:, :, self._head_channels.index(name)]
            columns.append(column.reshape(column.shape[0], -1))
        return torch.stack(columns, dim=1)

    @property
    def embedding_variables(self) -> tuple[str, ...]:
        """Every channel (pretrained, then task heads). Static fields have their own
        embedding without a time axis (another S), so they are not among them."""
        return self._channels + self._head_channels

    def prompt_sites(self) -> list[tuple[str, torch.nn.Module]]:
        """Every transformer's attention (local and global blocks), encoder then decoder."""
        return [(f"{name}.attention.1", block.attention[1])
                for name, block in self.transformer_blocks()]

    def prompt_site_call(self, name: str, module: torch.nn.Module) -> PromptSiteCall:
        """Prithvi's attention takes one (tokens, mask) pair (see the module doc)."""
        return _PairCall(module)

    def transformer_blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """Every ``Transformer`` of the encoder's then the decoder's local-global block."""
        parts = ["encoder"] + (["decoder"] if self.prithvi.n_blocks_decoder else [])
        return [(f"{_PREFIX}{part}.lgl_block.transformers.{i}", block)
                for part in parts
                for i, block in enumerate(getattr(self.prithvi, part).lgl_block.transformers)]

    def block_parts(self) -> dict[str, str]:
        """Prithvi's paths; no ``norm1``: its attention norm passes a (tokens, mask) pair on."""
        return {"attn.qkv": "attention.1.qkv_layer", "attn.proj": "attention.1.w_layer",
                "mlp.fc1": "ff.1.net.0", "mlp.fc2": "ff.1.net.3", "norm2": "ff.0", "mlp": "ff.1"}

    def linear_targets(self) -> tuple[str, ...]:
        """``attention.1.qkv_layer``, ``attention.1.w_layer``, ``ff.1.net.0``, ``ff.1.net.3``."""
        return (r"prithvi\.(encoder|decoder)\.lgl_block\.transformers\.\d+\."
                r"(attention\.1\.(qkv_layer|w_layer)|ff\.1\.net\.(0|3))",)

    def feedforward_targets(self) -> tuple[str, ...]:
        return (r"prithvi\.(encoder|decoder)\.lgl_block\.transformers\.\d+\.ff\.1\.net\.3",)

    def fingerprint_config(self, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The config minus runtime settings (variable order matters: it is the channel order)."""
        config = dict(self.config if config is None else config)
        return {k: v for k, v in config.items() if k not in self.unfingerprinted_keys}

    # -- conveniences ------------------------------------------------------------------------

    @property
    def channels(self) -> tuple[str, ...]:
        """The model's channels in order: pretrained, then task heads."""
        return self._channels + self._head_channels

    @property
    def levels(self) -> tuple[int | float, ...]:
        return self._levels

    def set_climatology(self, climatology: Callable[..., torch.Tensor] | None) -> None:
        """Use ``climatology(times, channels, lat, lon) -> (B, C, H, W)`` (physical units, at the
        target times) for Prithvi's ``climate`` input; None: the statistics' means."""
        self._climatology = climatology

    # -- the mapping -------------------------------------------------------------------------

    def _check_batch(self, batch: Batch) -> None:
        problems = []
        surf = set(self._config["surf_vars"]) | set(self._config["task_head_surf_vars"])
        atmos = set(self._config["atmos_vars"]) | set(self._config["task_head_atmos_vars"])
        for kind, given, known in (("surface", batch.surf_vars, surf),
                                   ("static", batch.static_vars, set(self._static_vars)),
                                   ("atmospheric", batch.atmos_vars, atmos)):
            unknown, absent = sorted(set(given) - known), sorted(known - set(given))
            if unknown:
                problems.append(f"unknown {kind} variables {unknown}")
            if absent:
                problems.append(f"{kind} variables {absent} missing (Prithvi needs every channel)")
        levels = tuple(float(level) for level in batch.metadata.atmos_levels)
        if atmos and sorted(levels) != sorted(float(level) for level in self._levels):
            problems.append(f"levels {list(batch.metadata.atmos_levels)} (the backbone has "
                            f"{list(self._levels)})")
        shape = tuple(batch.spatial_shape)
        grid = (self.prithvi.n_lats_px, self.prithvi.n_lons_px)
        if shape != grid:
            problems.append(f"grid {shape[0]} × {shape[1]} (Prithvi is built for {grid[0]} × "
                            f"{grid[1]})")
        history = next(iter({**batch.surf_vars, **batch.atmos_vars}.values())).shape[1]
        if history < self.prithvi.input_size_time:
            problems.append(f"history {history} (the model takes {self.prithvi.input_size_time} "
                            "input times)")
        if problems:
            raise ValueError("batch does not fit this Prithvi backbone: " + "; ".join(problems))

    def _fields(self, batch: Batch, channels: Sequence[str]) -> torch.Tensor:
        """(B, T, C, H, W) of ``channels`` from the last T input steps, physical units."""
        time = self.prithvi.input_size_time
        level_index = {level_to_str(level): i for i, level in enumerate(batch.metadata.atmos_levels)}
        fields = []
        for channel in channels:
            if channel in batch.surf_vars:
                fields.append(batch.surf_vars[channel][:, -time:])
            else:
                name, _, level = channel.rpartition("_")
                fields.append(batch.atmos_vars[name][:, -time:, level_index[level]])
        return torch.stack(fields, dim=2)

    def _prepare(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Prithvi's batch dict for ``batch``; stashes the task-head inputs for the hooks."""
        self._check_batch(batch)
        model = self.prithvi
        device = model.input_scalers_mu.device
        dtype = model.input_scalers_mu.dtype
        x = self._fields(batch, self._channels).to(device=device, dtype=dtype)
        size = x.shape[0]
        times = tuple(batch.metadata.time)
        if len(times) == 1 and size > 1:
            times = times * size
        if len(times) != size:
            raise ValueError(f"batch metadata has {len(times)} times for {size} samples")
        targets = [t + timedelta(hours=self.lead_time) for t in times]

        lat = torch.deg2rad(batch.metadata.lat.to(device=device, dtype=dtype))
        lon = torch.deg2rad(batch.metadata.lon.to(device=device, dtype=dtype))
        lat, lon = torch.meshgrid(lat, lon, indexing="ij")
        if model.positional_encoding == "fourier":
            position = [lat, lon]
        else:
            position = [torch.sin(lat), torch.cos(lon), torch.sin(lon)]
        position = torch.stack(position).expand(size, -1, -1, -1)
        clock = _time_features(times).to(device=device, dtype=dtype)[:, :, None, None]
        clock = clock.expand(-1, -1, *lat.shape)
        statics = torch.stack([batch.static_vars[v].to(device=device, dtype=dtype)
                               for v in self._static_vars]) if self._static_vars else \
            lat.new_zeros((0, *lat.shape))
        static = torch.cat([position, clock, statics.expand(size, -1, -1, -1)], dim=1)

        climate = self._climate(targets, self.channels, batch, device, dtype)
        count = len(self._channels)
        if self._head_channels:
            fields = self._fields(batch, self._head_channels).to(device=device, dtype=dtype)
            mu, sigma = self.head_mu.view(1, 1, -1, 1, 1), self.head_sigma.view(1, 1, -1, 1, 1)
            epsilon = model.input_scalers_epsilon
            self._head_inputs.update(
                x=fields, embedding=((fields - mu) / (sigma + epsilon)).flatten(1, 2),
                climate=climate[:, count:],
                climate_scaled=(climate[:, count:] - mu[0]) / (sigma[0] + epsilon))
        lead = torch.full((size,), float(self.lead_time), device=device, dtype=dtype)
        return {"x": x, "y": x[:, -1], "static": static, "climate": climate[:, :count],
                "input_time": torch.full((size,), float(self.input_time), device=device,
                                         dtype=dtype),
                "lead_time": lead}

    def _climate(self, targets: Sequence[datetime], channels: Sequence[str], batch: Batch,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, C, H, W): the climatology at the target times, or the channels' means."""
        size, shape = len(targets), tuple(batch.spatial_shape)
        if self._climatology is not None:
            climate = self._climatology(targets, list(channels), batch.metadata.lat,
                                        batch.metadata.lon)
            climate = torch.as_tensor(climate).to(device=device, dtype=dtype)
            if tuple(climate.shape) != (size, len(channels), *shape):
                raise ValueError(f"the climatology returned shape {tuple(climate.shape)}; "
                                 f"expected {(size, len(channels), *shape)}")
            return climate
        means = self._vector(channels, self.stats.locations).to(device=device, dtype=dtype)
        return means.view(1, -1, 1, 1).expand(size, -1, *shape)

    def _to_batch(self, output: torch.Tensor, batch: Batch) -> Batch:
        """(B, C, H, W) physical → Batch at the target time (history axis of length 1)."""
        index = {c: i for i, c in enumerate(self.channels)}
        surf_vars = self._config["surf_vars"] + self._config["task_head_surf_vars"]
        atmos_vars = self._config["atmos_vars"] + self._config["task_head_atmos_vars"]
        surface = {v: output[:, index[v]][:, None] for v in surf_vars}
        atmospheric = {v: torch.stack([output[:, index[f"{v}_{level_to_str(level)}"]]
                                       for level in self._levels], dim=1)[:, None]
                       for v in atmos_vars}
        meta = batch.metadata
        times = tuple(t + timedelta(hours=self.lead_time) for t in meta.time)
        return Batch(surf_vars=surface, static_vars=dict(batch.static_vars), atmos_vars=atmospheric,
                     metadata=Metadata(lat=meta.lat, lon=meta.lon, time=times,
                                       atmos_levels=tuple(self._levels),
                                       rollout_step=meta.rollout_step + 1))

    # -- task heads (hooks on the pretrained modules; see the module doc) ----------------------

    def _add_head_embedding(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + self.head_embedding(self._head_inputs["embedding"])

    def _add_head_climate(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + self.head_climate(self._head_inputs["climate_scaled"])

    def _run_head_unembed(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._head_inputs["output"] = self.head_unembed(args[0])

    def _head_prediction(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The new channels' (B, n, H, W): Prithvi's un-patching, pixel shuffle and residual."""
        raw = self._head_inputs.get("output")
        if raw is None:
            raise RuntimeError("the task-head output hook did not run")
        model = self.prithvi
        raw = F.pixel_shuffle(model.from_patching(raw), model.patch_size_px[0])
        scales = self.head_output_scales.view(1, -1, 1, 1)
        if model.residual == "temporal":
            last = model.input_size_time - 1
            index = torch.where(inputs["lead_time"] > 0, last, 0)
            base = self._head_inputs["x"][torch.arange(raw.shape[0], device=raw.device), index]
        elif model.residual == "climate":
            base = self._head_inputs["climate"]
        else:
            base = self.head_mu.view(1, -1, 1, 1)
        return scales * raw + base
