"""WeatherPEFT = TADP in the forward pass + SFAS in the backward pass, under one budget.

Also registers ``tadp`` alone (the paper's ablation; ``sfas`` alone lives in
:mod:`weatherpeft.methods.sfas`).

Sizing (``sizing="split"``, the default). The budget B (entries) is split: TADP takes at
most ``tadp_share``·B, SFAS selects the rest. TADP is sized by :func:`size_tadp`: with
``sharing="auto"`` and ``width_map="auto"`` it tries, finest first, (block, linear), (block, lowrank), (stage,
linear), (stage, lowrank), (all, linear), (all, lowrank), each with the longest prompt in
[min_prompt_length, prompt_length] that fits. If even the smallest TADP exceeds its share,
it takes what it needs as long as SFAS keeps ``min_sfas_share`` of B; otherwise the budget
is infeasible and :class:`~weatherpeft.methods.base.BudgetError` names the smallest budget
that works. TADP is never shrunk below ``min_prompt_length`` prompts to fit.

``sizing="paper"`` (the authors'): SFAS keeps k = B and TADP is added on top, unsized: one
generator per block (unless ``sharing`` says otherwise), parameter-free width maps as the
authors' (``"interpolate"``, unless ``width_map`` says otherwise) and ``prompt_length``
prompts — the authors used 30 for downscaling, 5 for post-processing and 20 for
precipitation (:data:`PAPER_PROMPT_LENGTHS`; ``weatherpeft finetune`` and the benchmark fill
it in for the task). WeatherPEFT then trains
and stores more than the budget; the report and ``resolved["over_budget"]`` say by how much.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.base import Adaptation, BudgetError, budget_entries, register_method
from weatherpeft.methods.sfas import SFASConfig, attach_sfas, selectable_parameters
from weatherpeft.methods.tadp import (
    SHARING_MODES,
    SIZED_WIDTH_MAPS,
    TADP,
    WIDTH_MAPS,
    TADPConfig,
    fit_tadp_config,
    tadp_parameter_count,
)

__all__ = ["PAPER_PROMPT_LENGTHS", "SIZINGS", "TADPOptions", "WeatherPEFTOptions", "apply_tadp",
           "apply_weatherpeft", "size_tadp", "with_paper_prompt_length"]

log = logging.getLogger(__name__)

SIZINGS = ("split", "paper")
#: The authors' TADP prompt length per task (their scripts), used by ``sizing="paper"``.
#: The earlier forms of a task (``downscaling-x2``, ``precipitation-rollout``) take its length.
PAPER_PROMPT_LENGTHS = {"downscaling": 30, "downscaling-x2": 30, "postprocessing": 5,
                        "precipitation": 20, "precipitation-rollout": 20}


def with_paper_prompt_length(method: str, options: dict, task: str) -> dict:
    """``options`` with the authors' prompt length for ``task`` when ``method`` is WeatherPEFT
    under ``sizing="paper"`` and no ``prompt_length`` is given (otherwise unchanged)."""
    if method == "weatherpeft" and options.get("sizing") == "paper" \
            and "prompt_length" not in options and task in PAPER_PROMPT_LENGTHS:
        return {**options, "prompt_length": PAPER_PROMPT_LENGTHS[task]}
    return dict(options)


@dataclass
class TADPOptions:
    """TADP options. ``prompt_length``: the longest prompt (authors: 30); ``min_prompt_length``:
    the shortest sizing may choose; ``sharing``: auto | block | stage | all; ``width_map``:
    auto | linear | lowrank | interpolate (parameter-free, never chosen by "auto"); bottlenecks
    as the authors'; ``variables``: the task's variable set (default: every variable the
    backbone embeds)."""

    prompt_length: int = 30
    min_prompt_length: int = 8
    sharing: str = "auto"
    width_map: str = "auto"
    s_bottleneck: int = 8
    v_ratio: float = 0.5
    d_bottleneck: int = 16
    variables: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._check_tadp(sized=True)

    def _check_tadp(self, sized: bool) -> None:
        """Validate; ``sized``: sizing may shorten the prompt (needs min_prompt_length ≤
        prompt_length)."""
        if self.sharing not in ("auto", *SHARING_MODES):
            raise ValueError(f"TADP sharing must be 'auto' or one of {SHARING_MODES}, got {self.sharing!r}")
        if self.width_map not in ("auto", *WIDTH_MAPS):
            raise ValueError(f"TADP width_map must be 'auto' or one of {WIDTH_MAPS}, got {self.width_map!r}")
        if self.prompt_length < 1 or (sized and not 1 <= self.min_prompt_length <= self.prompt_length):
            raise ValueError(f"TADP needs 1 ≤ min_prompt_length ≤ prompt_length, got "
                             f"{self.min_prompt_length} and {self.prompt_length}")
        self.variables = tuple(self.variables)

    def candidates(self) -> list[TADPConfig]:
        """Configurations to try, finest sharing and fullest width map first."""
        sharings = SHARING_MODES if self.sharing == "auto" else (self.sharing,)
        maps = SIZED_WIDTH_MAPS if self.width_map == "auto" else (self.width_map,)
        return [TADPConfig(prompt_length=self.prompt_length, sharing=sharing, width_map=width_map,
                           s_bottleneck=self.s_bottleneck, v_ratio=self.v_ratio,
                           d_bottleneck=self.d_bottleneck)
                for sharing in sharings for width_map in maps]


@dataclass
class WeatherPEFTOptions(TADPOptions, SFASConfig):
    """TADP options, SFAS options (as in ``sfas``), and the sizing: ``"split"`` (default) gives
    TADP ``tadp_share`` of the budget at most (unless its smallest size needs more) and keeps
    ``min_sfas_share`` for SFAS in any case; ``"paper"`` gives SFAS the whole budget and adds
    TADP on top (see the module doc)."""

    tadp_share: float = 0.5
    min_sfas_share: float = 0.1
    sizing: str = "split"

    def __post_init__(self) -> None:
        if self.sizing not in SIZINGS:
            raise ValueError(f"WeatherPEFT sizing must be one of {SIZINGS}, got {self.sizing!r}")
        self._check_tadp(sized=self.sizing == "split")
        SFASConfig.__post_init__(self)
        if not 0.0 < self.tadp_share < 1.0 or not 0.0 < self.min_sfas_share < 1.0:
            raise ValueError(f"tadp_share and min_sfas_share must be in (0, 1), got "
                             f"{self.tadp_share} and {self.min_sfas_share}")

    def sfas_config(self) -> SFASConfig:
        return SFASConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SFASConfig)})


def _variables(backbone: Backbone, options: TADPOptions) -> tuple[str, ...]:
    return options.variables or tuple(backbone.embedding_variables)


def size_tadp(backbone: Backbone, n_variables: int, max_parameters: int,
              options: TADPOptions) -> TADPConfig | None:
    """The first candidate configuration (see module doc) that fits ``max_parameters``."""
    for base in options.candidates():
        config = fit_tadp_config(backbone, n_variables, max_parameters, base,
                                 min_prompt_length=options.min_prompt_length)
        if config is not None:
            return config
    return None


def _smallest_tadp(backbone: Backbone, n_variables: int, options: TADPOptions) -> int:
    return min(tadp_parameter_count(backbone, n_variables,
                                    dataclasses.replace(c, prompt_length=options.min_prompt_length))
               for c in options.candidates())


def _attach_tadp(adaptation: Adaptation, variables: tuple[str, ...], config: TADPConfig) -> TADP:
    tadp = TADP(adaptation.backbone, variables, config)
    adaptation.parts["tadp"] = tadp
    adaptation.add_prompts(tadp.prompts, tadp.injector)
    tadp.attach()
    return tadp


def _resolved(config: TADPConfig) -> dict:
    """What sizing chose (recorded in adapter files and reports)."""
    return {"prompt_length": config.prompt_length, "sharing": config.sharing,
            "width_map": config.width_map}


@register_method("tadp", TADPOptions, "TADP alone: prompts generated from the patch-embedding "
                                      "weights, prepended in every block (paper ablation)")
def apply_tadp(backbone: Backbone, budget: float, options: TADPOptions) -> Adaptation:
    entries = budget_entries(backbone, budget)
    variables = _variables(backbone, options)
    config = size_tadp(backbone, len(variables), entries, options)
    if config is None:
        smallest = _smallest_tadp(backbone, len(variables), options)
        raise BudgetError(
            f"TADP's smallest configuration ({options.min_prompt_length} prompts) needs "
            f"{smallest:,} parameters, more than budget {budget} allows ({entries:,}); "
            f"nearest feasible budget: {smallest / backbone.pretrained_count():.4%}")
    adaptation = Adaptation(backbone, "tadp", budget, dataclasses.asdict(options))
    adaptation.resolved.update(tadp=_resolved(config))
    _attach_tadp(adaptation, variables, config)
    count = tadp_parameter_count(backbone, len(variables), config)
    adaptation.note_budget_shortfall(count, entries, f"{config.prompt_length} prompts is its "
                                                     "longest (prompt_length)")
    return adaptation


@register_method("weatherpeft", WeatherPEFTOptions,
                 "WeatherPEFT: TADP prompts + SFAS annealed Fisher top-k, one budget")
def apply_weatherpeft(backbone: Backbone, budget: float, options: WeatherPEFTOptions) -> Adaptation:
    if options.sizing == "paper":
        return _weatherpeft_paper(backbone, budget, options)
    entries = budget_entries(backbone, budget)
    variables = _variables(backbone, options)
    config = size_tadp(backbone, len(variables), int(options.tadp_share * entries), options)
    if config is None:
        config = size_tadp(backbone, len(variables), int((1 - options.min_sfas_share) * entries),
                           options)
        if config is None:
            smallest = _smallest_tadp(backbone, len(variables), options)
            feasible = smallest / (1 - options.min_sfas_share) / backbone.pretrained_count()
            raise BudgetError(
                f"WeatherPEFT at budget {budget} ({entries:,} entries): TADP's smallest "
                f"configuration needs {smallest:,} parameters and SFAS keeps "
                f"{options.min_sfas_share:.0%} of the budget; nearest feasible budget: {feasible:.4%}")
        log.warning("WeatherPEFT at budget %s: TADP's smallest fitting size exceeds tadp_share=%s "
                    "of the budget; it takes what it needs and SFAS the rest", budget,
                    options.tadp_share)
    adaptation = Adaptation(backbone, "weatherpeft", budget, dataclasses.asdict(options))
    _attach_tadp(adaptation, variables, config)
    tadp_count = tadp_parameter_count(backbone, len(variables), config)
    attach_sfas(adaptation, entries - tadp_count, options.sfas_config())
    adaptation.resolved.update(tadp=_resolved(config), tadp_parameters=tadp_count,
                               sfas_entries=entries - tadp_count, sizing="split")
    return adaptation


def _weatherpeft_paper(backbone: Backbone, budget: float, options: WeatherPEFTOptions) -> Adaptation:
    """The authors' sizing: SFAS keeps k = budget, TADP (unsized) is added on top."""
    entries = budget_entries(backbone, budget)
    sfas = options.sfas_config()
    pool = sum(p.numel() for p in selectable_parameters(backbone, sfas.include, sfas.exclude).values())
    if entries > pool:
        raise BudgetError(f"WeatherPEFT sizing='paper' at budget {budget}: SFAS keeps {entries:,} "
                          f"entries but only {pool:,} are selectable (include/exclude); nearest "
                          f"feasible budget: {pool / backbone.pretrained_count():.4%}")
    variables = _variables(backbone, options)
    base = options.candidates()[0]
    config = dataclasses.replace(base, sharing="block" if options.sharing == "auto" else base.sharing,
                                 width_map="interpolate" if options.width_map == "auto" else base.width_map)
    adaptation = Adaptation(backbone, "weatherpeft", budget, dataclasses.asdict(options))
    _attach_tadp(adaptation, variables, config)
    tadp_count = tadp_parameter_count(backbone, len(variables), config)
    attach_sfas(adaptation, entries, sfas)
    total = entries + tadp_count
    message = (f"WeatherPEFT sizing='paper' at budget {budget}: SFAS keeps the budget's {entries:,} "
               f"entries and TADP adds {tadp_count:,} on top: {total:,} trainable per step, "
               f"{total / adaptation.pretrained_count:.3%} of the backbone, {total / entries:.1f}× "
               "the budget (stored grows further with SFAS's union)")
    log.warning(message)
    adaptation.resolved.update(sizing="paper", tadp=_resolved(config), tadp_parameters=tadp_count,
                               sfas_entries=entries, over_budget=message)
    return adaptation
