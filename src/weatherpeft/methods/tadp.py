"""Task-Adaptive Dynamic Prompting (TADP): prompts generated from the patch-embedding weights.

The task repository is E = ``backbone.embedding_weights(variables)``, shape (D, V, S) with
S = T·Ph·Pw (history × patch kernel): it encodes which variables the task has, at what
resolution. A :class:`PromptGenerator` maps it to P prompt tokens:

- internal mode, three residual adapters A(x) = x + Up(GELU(Down(LayerNorm(x)))) on the last
  axis, with π moving the last axis to the front in between:
  E_S = A_S(E) (D, V, S) → E_V = A_V(π E_S) (S, D, V) → E_D = A_D(π E_V) (V, S, D);
  bottlenecks S → s_bottleneck, V → max(1, round(V·v_ratio)), D → d_bottleneck. The Up
  projections start at zero, so every adapter starts as the identity and training moves it
  away (the usual adapter initialisation: the generator starts from E itself);
- external mode, over the V·S tokens T = LayerNorm(E_D reshaped to (V·S, D)):
  A = softmax(T·Tᵀ/√D)·T (parameter-free self-attention coupling variables with
  spatial/resolution features), then E_P = (W·A + b)  with W (P, V·S): a linear map from the
  V·S axis to P tokens → (P, D).

E_P is prepended at every prompt site (:class:`~weatherpeft.methods.prompts.PromptInjector`),
mapped to the site's width C where it differs from D: ``width_map="linear"`` is a
``Linear(D, C)`` (D·C + C parameters — 33 k for 128 → 256, more than a generator), ``"lowrank"``
a ``Linear(D, r, bias=False)`` then ``Linear(r, C)`` with r = d_bottleneck, for small budgets,
``"interpolate"`` parameter-free linear interpolation along the feature axis (the authors map
widths without parameters; the exact interpolation is our reading).
``sharing`` decides how many generators there are: one per site ("block"), one per
encoder/decoder layer ("stage"), or one for all sites ("all"); width maps belong to their
generator, and under "all" there is one per distinct width. E is read from the live embedding
weights, so gradients reach trainable embeddings (new variables' task heads) and a new variable
shapes the prompts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.prompts import PromptInjector, site_width

__all__ = ["PromptGenerator", "ResidualAdapter", "TADP", "TADPConfig", "fit_tadp_config",
           "tadp_parameter_count"]

SHARING_MODES = ("block", "stage", "all")
WIDTH_MAPS = ("linear", "lowrank", "interpolate")
#: The width maps budget sizing chooses among (with parameters, so a budget can size them).
SIZED_WIDTH_MAPS = ("linear", "lowrank")
#: A site's stage: Aurora's ``encoder_layers.i``/``decoder_layers.i``, Prithvi-WxC's encoder
#: or decoder ``lgl_block``.
_STAGE = re.compile(r"(?:^|\.)((?:encoder|decoder)_layers\.\d+|(?:encoder|decoder)\.lgl_block)\.")


@dataclass(frozen=True)
class TADPConfig:
    """TADP's size. Defaults are the authors' settings (P = 30; S→8, V→V/2, D→16).

    ``sharing``: "block" (one generator per prompt site), "stage" (one per encoder/decoder
    layer, i.e. consecutive sites of one width), "all" (one for every site). ``width_map``:
    "linear" or "lowrank" (rank d_bottleneck) map from D to a site's width where they differ.
    """

    prompt_length: int = 30
    sharing: str = "block"
    s_bottleneck: int = 8
    v_ratio: float = 0.5
    d_bottleneck: int = 16
    width_map: str = "linear"

    def __post_init__(self) -> None:
        for name in ("prompt_length", "s_bottleneck", "d_bottleneck"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TADPConfig.{name} must be an integer ≥ 1, got {value!r}")
        if self.sharing not in SHARING_MODES:
            raise ValueError(f"TADPConfig.sharing must be one of {SHARING_MODES}, "
                             f"got {self.sharing!r}")
        if self.width_map not in WIDTH_MAPS:
            raise ValueError(f"TADPConfig.width_map must be one of {WIDTH_MAPS}, "
                             f"got {self.width_map!r}")
        if isinstance(self.v_ratio, bool) or not isinstance(self.v_ratio, (int, float)) \
                or not math.isfinite(self.v_ratio) or self.v_ratio <= 0:
            raise ValueError(f"TADPConfig.v_ratio must be a finite number > 0, "
                             f"got {self.v_ratio!r}")

    def v_bottleneck(self, n_variables: int) -> int:
        """The V-adapter's bottleneck: max(1, round(V·v_ratio))."""
        return max(1, round(n_variables * self.v_ratio))


class ResidualAdapter(nn.Module):
    """x + Up(GELU(Down(LayerNorm(x)))) on the last axis; Up is zero-initialised (identity)."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(nn.functional.gelu(self.down(self.norm(x))))

    @staticmethod
    def parameter_count(width: int, bottleneck: int) -> int:
        """LayerNorm (2w) + Down (w·b + b) + Up (b·w + w)."""
        return 3 * width + 2 * width * bottleneck + bottleneck


class PromptGenerator(nn.Module):
    """E (D, V, S) → E_P (P, D): internal mode (three adapters), then external mode.

    ``kernel_size`` is S = T·Ph·Pw, the flattened history × patch kernel of one embedding.
    """

    def __init__(self, embed_dim: int, n_variables: int, kernel_size: int, prompt_length: int,
                 config: TADPConfig) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("n_variables", n_variables),
                            ("kernel_size", kernel_size), ("prompt_length", prompt_length)):
            if value < 1:
                raise ValueError(f"PromptGenerator {name} must be ≥ 1, got {value}")
        self.shape = (embed_dim, n_variables, kernel_size)
        self.s_adapter = ResidualAdapter(kernel_size, config.s_bottleneck)
        self.v_adapter = ResidualAdapter(n_variables, config.v_bottleneck(n_variables))
        self.d_adapter = ResidualAdapter(embed_dim, config.d_bottleneck)
        self.norm = nn.LayerNorm(embed_dim)
        self.to_prompts = nn.Linear(n_variables * kernel_size, prompt_length)

    @staticmethod
    def parameter_count(embed_dim: int, n_variables: int, kernel_size: int, prompt_length: int,
                        config: TADPConfig) -> int:
        """Exactly ``sum(p.numel() for p in PromptGenerator(...).parameters())``."""
        return (ResidualAdapter.parameter_count(kernel_size, config.s_bottleneck)
                + ResidualAdapter.parameter_count(n_variables, config.v_bottleneck(n_variables))
                + ResidualAdapter.parameter_count(embed_dim, config.d_bottleneck)
                + 2 * embed_dim
                + (n_variables * kernel_size + 1) * prompt_length)

    def internal_mode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(D, V, S) → (V·S, D): HW-, V- and D-adapter in turn, π between them."""
        if tuple(embeddings.shape) != self.shape:
            raise ValueError(f"embedding weights have shape {tuple(embeddings.shape)}; this "
                             f"generator was built for (D, V, S) = {self.shape}")
        x = self.s_adapter(embeddings)                  # (D, V, S)
        x = self.v_adapter(x.permute(2, 0, 1))          # (S, D, V)
        x = self.d_adapter(x.permute(2, 0, 1))          # (V, S, D)
        return x.reshape(-1, x.shape[-1])

    def external_mode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(V·S, D) → (P, D): LayerNorm, parameter-free self-attention, linear map V·S → P."""
        normed = self.norm(tokens)
        attention = torch.softmax(normed @ normed.T / math.sqrt(normed.shape[-1]), dim=-1)
        coupled = attention @ normed                    # (V·S, D)
        return self.to_prompts(coupled.T).T             # (P, D)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.external_mode(self.internal_mode(embeddings))


@dataclass(frozen=True)
class _SitePlan:
    """Where one site's prompts come from: a generator, then maybe a projection to its width."""

    site: str
    width: int
    generator: str
    projection: str | None


def _key(name: str) -> str:
    """A ModuleDict key for a dotted name."""
    return name.replace(".", "_")


def _stage(site: str) -> str:
    match = _STAGE.search(site)
    if match is None:
        raise ValueError(f"prompt site '{site}' is not inside an encoder_layers.i / "
                         "decoder_layers.i (or encoder/decoder.lgl_block) stage; use "
                         "sharing='block' or 'all'")
    return match.group(1)


def _plan(backbone: Backbone, embed_dim: int, sharing: str) -> list[_SitePlan]:
    """Generator and projection keys of every prompt site, for one sharing mode."""
    sites = [(name, site_width(name, module)) for name, module in backbone.prompt_sites()]
    if not sites:
        raise ValueError(f"{type(backbone).__name__} has no prompt sites")
    plans = []
    stage_widths: dict[str, int] = {}
    for name, width in sites:
        if sharing == "block":
            generator = _key(name)
        elif sharing == "stage":
            generator = _key(_stage(name))
            if stage_widths.setdefault(generator, width) != width:
                raise ValueError(f"stage '{_stage(name)}' has sites of widths "
                                 f"{stage_widths[generator]} and {width}: sharing='stage' needs "
                                 "one width per stage")
        else:
            generator = "all"
        projection = None
        if width != embed_dim:
            projection = f"width_{width}" if sharing == "all" else generator
        plans.append(_SitePlan(name, width, generator, projection))
    return plans


class _InterpolatedWidth(nn.Module):
    """(P, D) → (P, C) by linear interpolation along the last axis: no parameters."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x.unsqueeze(0), size=self.width, mode="linear",
                                         align_corners=False).squeeze(0)


def _width_map(embed_dim: int, width: int, config: TADPConfig) -> nn.Module:
    """D → C: one linear layer, two through rank d_bottleneck ("lowrank"), or interpolation."""
    if config.width_map == "linear":
        return nn.Linear(embed_dim, width)
    if config.width_map == "interpolate":
        return _InterpolatedWidth(width)
    return nn.Sequential(nn.Linear(embed_dim, config.d_bottleneck, bias=False),
                         nn.Linear(config.d_bottleneck, width))


def _width_map_count(embed_dim: int, width: int, config: TADPConfig) -> int:
    if config.width_map == "linear":
        return (embed_dim + 1) * width
    if config.width_map == "interpolate":
        return 0
    return embed_dim * config.d_bottleneck + (config.d_bottleneck + 1) * width


def _embedding_shape(backbone: Backbone) -> tuple[int, int]:
    """(D, S) of the backbone's patch embeddings, read from its first embedding variable."""
    embed_dim, _, kernel_size = backbone.embedding_weights(backbone.embedding_variables[:1]).shape
    return embed_dim, kernel_size


class TADP(nn.Module):
    """TADP's generators and width projections for one backbone and one variable set.

    The backbone is referenced, not registered: TADP's parameters, state dict and ``.to()``
    cover only what TADP created. ``prompts()`` gives every site's (P, C) prompts;
    ``attach()`` makes the backbone use them (once per forward, cached at inference: see
    :mod:`weatherpeft.methods.prompts`); call ``invalidate()`` after loading TADP weights
    into an attached model in eval mode.
    """

    def __init__(self, backbone: Backbone, variables: Sequence[str],
                 config: TADPConfig | None = None) -> None:
        super().__init__()
        config = TADPConfig() if config is None else config
        self.__dict__["backbone"] = backbone  # a reference, not a submodule
        self.variables = (variables,) if isinstance(variables, str) else tuple(variables)
        self.config = config
        embed_dim, n_variables, kernel_size = backbone.embedding_weights(self.variables).shape
        self.plan = _plan(backbone, embed_dim, config.sharing)
        self.generators = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        for site in self.plan:
            if site.generator not in self.generators:
                self.generators[site.generator] = PromptGenerator(
                    embed_dim, n_variables, kernel_size, config.prompt_length, config)
            if site.projection is not None and site.projection not in self.projections:
                self.projections[site.projection] = _width_map(embed_dim, site.width, config)
        self._projected_generator = {site.projection: site.generator for site in self.plan
                                     if site.projection is not None}
        self.injector = PromptInjector(backbone, self.prompts)

    def prompts(self) -> dict[str, torch.Tensor]:
        """{site name: (P, C)}: E read once, each generator and projection run once."""
        embeddings = self.backbone.embedding_weights(self.variables)
        generated = {key: generator(embeddings) for key, generator in self.generators.items()}
        projected = {key: projection(generated[self._projected_generator[key]])
                     for key, projection in self.projections.items()}
        return {site.site: generated[site.generator] if site.projection is None
                else projected[site.projection] for site in self.plan}

    def attach(self) -> TADP:
        """Prepend the prompts at every prompt site of the backbone."""
        self.injector.attach()
        return self

    def detach(self) -> None:
        """Remove the prompts: the backbone computes exactly what it did before."""
        self.injector.detach()

    def invalidate(self) -> None:
        """Forget prompts cached for inference (after changing weights in eval mode)."""
        self.injector.invalidate()

    def extra_repr(self) -> str:
        return (f"variables={list(self.variables)}, prompt_length={self.config.prompt_length}, "
                f"sharing={self.config.sharing!r}")


def tadp_parameter_count(backbone: Backbone, n_variables: int, config: TADPConfig) -> int:
    """Parameters ``TADP(backbone, <n_variables names>, config)`` creates, without building it."""
    if n_variables < 1:
        raise ValueError(f"n_variables must be ≥ 1, got {n_variables}")
    embed_dim, kernel_size = _embedding_shape(backbone)
    plan = _plan(backbone, embed_dim, config.sharing)
    generator = PromptGenerator.parameter_count(embed_dim, n_variables, kernel_size,
                                                config.prompt_length, config)
    widths = {site.projection: site.width for site in plan if site.projection is not None}
    return (len({site.generator for site in plan}) * generator
            + sum(_width_map_count(embed_dim, width, config) for width in widths.values()))


def fit_tadp_config(backbone: Backbone, n_variables: int, max_parameters: int,
                    base: TADPConfig, min_prompt_length: int = 4) -> TADPConfig | None:
    """``base`` with the largest prompt length in [min_prompt_length, base.prompt_length] whose
    TADP fits ``max_parameters``; None if none does with ``base.sharing``."""
    if not 1 <= min_prompt_length <= base.prompt_length:
        raise ValueError(f"min_prompt_length must be in [1, base.prompt_length = "
                         f"{base.prompt_length}], got {min_prompt_length}")
    for length in range(base.prompt_length, min_prompt_length - 1, -1):
        config = dataclasses.replace(base, prompt_length=length)
        if tadp_parameter_count(backbone, n_variables, config) <= max_parameters:
            return config
    return None
