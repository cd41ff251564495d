"""The benchmark: every method × task × budget × seed, trained and scored the same way.

A *profile* fixes the grid and the training protocol; the command line can narrow it.
Every run is :func:`weatherpeft.finetune.run_finetune` with the same Trainer settings, so
methods differ only in what they train. Entries of pretrained weights (full fine-tuning,
Child-Tuning, random masks, SFAS, and the encoder/decoder under "train") move with ``lr``;
parameters a method adds (LoRA, prompts, adapters, SSF scales) and task heads with ``new_lr``.
``full`` and ``frozen`` have no budget and run once per task and seed.

Stages. (1) *Selection*: where the profile has a learning-rate grid (``lr_grid``, pairs
(lr, new_lr)), every method picks its pair on the validation split — one run per candidate
at the first seed and the first budget, ``select_steps`` long, scored by the task loss over
the whole validation split at its last step; no test score is computed. The choice holds per
task, method and protocol (for every budget, seed and accounting). (2) *Test*: every cell
of the grid at its chosen pair, with the validation loss logged ``val_points`` times along
the way (the learning curves), then scored on the test split. ``--lr``/``--new-lr`` fix the
pair and skip the selection.

Protocols (``encoder_decoder``): "frozen" (the encoder/decoder are pretrained weights inside
the budget), "train" (the paper's: every method trains them whole, outside the budget, at
``lr``), or both (a profile may run its second protocol for some methods only); each record
says which. Wherever ``frozen`` is benchmarked, "encoder/decoder only" (the frozen method
under "train") runs too: the reference row that says how much the encoder/decoder alone learn.

Accountings: "trainable" (the paper's: equal entries trained per step; SFAS and WeatherPEFT
store the union of what they moved) and "stored" (equal entries stored: SFAS and WeatherPEFT
run with ``budget_mode="strict"``). Other methods store what they train, so their records
serve both.

Runs go to a pool of ``workers`` fresh processes (one run per process, so each run's peak
memory is its own); under ``torchrun`` every rank runs the grid in order with the profile's
``strategy``. ``DIR/benchmark.json`` is rewritten (atomically) after every run, and
``--resume`` reuses the records (selection and test) it already holds for the same settings
and keeps those of cells outside this command's grid, so a long grid can run in chunks
(``--tasks``, ``--seeds``, ``--encoder-decoder`` …) into one folder.
Before starting, the cost model (:func:`estimate_seconds`) prints the expected wall time;
``--dry-run`` prints it and stops.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import heapq
import json
import logging
import math
import multiprocessing
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weatherpeft.atomic import write_json
from weatherpeft.backbones.base import ENCODER_DECODER_PROTOCOLS
from weatherpeft.benchmark_report import PAPER_METHODS, write_report

__all__ = ["ACCOUNTINGS", "BenchmarkConfig", "PROFILES", "Profile", "Run", "choose_learning_rates",
           "describe_plan",
           "estimate_seconds", "estimate_wall", "failed_record", "plan", "run_benchmark", "run_one",
           "selection_plan", "training_protocol"]

log = logging.getLogger(__name__)

#: Methods with no budget: trained (or scored) once per task and seed.
BUDGET_FREE = ("full", "frozen")
#: The paper's budgets: ~0.3 % and ~4 % of the backbone.
PAPER_BUDGETS = (0.003, 0.04)
TASK_NAMES = ("downscaling", "postprocessing", "precipitation")
ACCOUNTINGS = ("trainable", "stored")
#: Methods that store more than they train per step (SFAS's union); the "stored" accounting
#: runs them with this option.
UNION_METHODS = {"sfas": {"budget_mode": "strict"}, "weatherpeft": {"budget_mode": "strict"}}
#: Keys every record has (the JSON schema the tests check).
RECORD_KEYS = ("task", "method", "budget", "seed", "encoder_decoder", "accounting", "stage", "steps",
               "batch_size", "lr", "new_lr", "trainable", "stored", "head",
               "encoder_decoder_parameters", "pretrained", "adapter_bytes", "metrics", "val_loss",
               "curve", "train_seconds", "step_seconds", "wall_seconds", "estimated_seconds",
               "peak_memory_bytes", "error", "crashed")
#: The whole validation split (the selection's score): more batches than any split holds.
WHOLE_SPLIT = 10**6
#: WeatherPEFT's options in every profile: at 0.3 % under "train" (15,154 entries on aurora-tiny)
#: TADP's smallest 8-prompt form (downscaling 14,763; post-processing, more variables, more)
#: leaves SFAS less than its 10 % floor (BudgetError). Allowing shorter prompts, sizing takes the
#: longest that leaves SFAS 10 %: downscaling 4 prompts (13,351 + SFAS 1,803), so the method
#: keeps the budget exactly. Larger budgets are unchanged (the longest prompt that fits).
WEATHERPEFT_OPTIONS = {"weatherpeft": {"min_prompt_length": 1}}
#: The methods the standard profile keeps.
HEADLINE_METHODS = ("full", "frozen", "lora", "tadp", "sfas", "weatherpeft")
#: One learning-rate grid for every method: (lr, new_lr) pairs around the default (1e-3, 6e-3).
LR_GRID = ((3e-4, 2e-3), (1e-3, 6e-3), (3e-3, 2e-2))


@dataclass(frozen=True)
class Profile:
    """A benchmark grid, its training protocol (steps and batch size per task) and its stages.

    ``protocol_methods``: protocol → the methods run under it (a protocol not named: all).
    ``lr_grid``: the (lr, new_lr) candidates of the selection stage (empty: none, the
    profile's ``lr``/``new_lr``); ``select_steps``: its schedule per task (default: ``steps``).
    ``val_points``/``val_batches``: the learning curve of each test run (validation loss
    that many times, on the first ``val_batches`` validation batches); ``select_val_batches``:
    the validation batches that score a selection run (default: the whole split);
    ``select_once``: select under the first protocol only, the choice holding for both.
    ``options``: method → options every run of it takes (the command line's win per key).
    """

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    steps: dict[str, int]
    batch_size: dict[str, int]
    seeds: tuple[int, ...] = (0,)
    lr: float = 1e-3
    new_lr: float = 6e-3
    workers: int = 2
    encoder_decoder: tuple[str, ...] = ("frozen",)
    protocol_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    accountings: tuple[str, ...] = ("trainable",)
    lr_grid: tuple[tuple[float, float], ...] = ()
    select_steps: dict[str, int] = field(default_factory=dict)
    val_points: int = 8
    val_batches: int = 6
    select_val_batches: int = WHOLE_SPLIT
    select_once: bool = False
    options: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(WEATHERPEFT_OPTIONS))


PROFILES = {
    # ≤ 10 min on the 2-core machine (~4 min quiet by the cost model; 18.7 min measured at load ≈ 9, in
    # docs/results/benchmark_costs/README.md): the core comparison at the small budget under the
    # paper's protocol, both accountings (WeatherPEFT's strict form is one more run per task), 20
    # steps, a 2-point learning curve; no selection stage (the profile's pair). Too short to rank
    # methods: it checks that everything runs and renders.
    "quick": Profile(tasks=TASK_NAMES, methods=("full", "frozen", "lora", "weatherpeft"),
                     budgets=(0.003,), steps=dict.fromkeys(TASK_NAMES, 20),
                     batch_size=dict.fromkeys(TASK_NAMES, 2), encoder_decoder=("train",),
                     accountings=("trainable", "stored"), select_steps=dict.fromkeys(TASK_NAMES, 10),
                     val_points=2, val_batches=2, select_val_batches=4),
    # ≤ 60 min on 2 cores (~52 min quiet by the cost model): the paper's protocol only, the
    # headline methods (full, encoder/decoder only, LoRA, TADP-only, SFAS-only, WeatherPEFT:
    # the claims against full and LoRA and the first two steps of the ablation order; the other
    # rivals and ablation baselines are the paper profile's), both budgets, both accountings, one
    # seed; learning rates chosen from the grid on a quarter-length schedule (16 validation
    # batches). Lengths: downscaling 150 steps (~0.3 epoch; the lead's 2,000-step curve of full
    # fine-tuning flattens only from ~1,500: validation loss 0.153 at 200, 0.136 at 300, 0.119 at
    # 500, 0.107 at 800, 0.099 at 1,500), post-processing 60 (one epoch of its 121 samples; the task does not
    # separate methods), precipitation 300 (cheap steps; full fine-tuning's curve flattens from
    # ~500, 0.275, to 0.244 at 2,000).
    "standard": Profile(tasks=TASK_NAMES, methods=HEADLINE_METHODS, budgets=PAPER_BUDGETS,
                        steps={"downscaling": 150, "postprocessing": 60, "precipitation": 300},
                        batch_size=dict.fromkeys(TASK_NAMES, 2), encoder_decoder=("train",),
                        accountings=("trainable", "stored"), lr_grid=LR_GRID,
                        select_steps={"downscaling": 40, "postprocessing": 20, "precipitation": 80},
                        val_points=5, val_batches=4, select_val_batches=16),
    # Every method of the paper's tables, both budgets, both accountings, 2 seeds under the paper's
    # protocol; the "frozen" protocol for full, frozen, LoRA, SFAS-only and WeatherPEFT. The
    # learning rates are chosen once per method and task (under "train", holding for both
    # protocols) on seed 0 with a quarter-length schedule and 32 validation batches. ~7.3 h quiet
    # by the cost model (`--dry-run`; 108 + 228 runs): the grid's fixed cost alone (set-up, test
    # evaluation, validation) is over an hour, so a 2-hour run (`--step-scale 0.25`: 100 / 30 / 150
    # steps) trains less than the standard profile. Lengths: downscaling 400 (the task that
    # separates methods; still improving there, flat from ~1,500), post-processing 120 (2 epochs; it does not
    # separate methods), precipitation 600 (past the flattening at ~500).
    "paper": Profile(tasks=TASK_NAMES, methods=PAPER_METHODS, budgets=PAPER_BUDGETS,
                     steps={"downscaling": 400, "postprocessing": 120, "precipitation": 600},
                     batch_size=dict.fromkeys(TASK_NAMES, 2), seeds=(0, 1),
                     encoder_decoder=("train", "frozen"),
                     protocol_methods={"frozen": ("full", "frozen", "lora", "sfas", "weatherpeft")},
                     accountings=("trainable", "stored"), lr_grid=LR_GRID,
                     select_steps={"downscaling": 100, "postprocessing": 40, "precipitation": 150},
                     select_once=True, val_points=8, val_batches=4, select_val_batches=32),
}


def _parse_pair(text: str) -> tuple[float, float]:
    try:
        lr, new_lr = (float(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--lr-grid takes pairs LR/NEW_LR such as 1e-3/6e-3, got {text!r}") from None
    if not (lr > 0 and new_lr > 0 and math.isfinite(lr) and math.isfinite(new_lr)):
        raise ValueError(f"--lr-grid learning rates must be positive, got {text!r}")
    return lr, new_lr


@dataclass
class BenchmarkConfig:
    """What to run. Empty/zero fields take the profile's value.

    ``options``: JSON object of method → options, e.g. '{"sfas": {"gamma": 0.1}}'.
    ``lr``/``new_lr``: fix the learning rates (no selection stage); ``lr_grid``: the selection's
    candidates as LR/NEW_LR pairs; ``select_steps``: the selection's schedule.
    """

    profile: str = "quick"
    out: str = "runs/benchmark"
    tasks: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    budgets: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()
    steps: int = 0
    batch_size: int = 0
    lr: float = 0.0
    new_lr: float = 0.0
    lr_grid: tuple[str, ...] = ()
    select_steps: int = 0
    step_scale: float = field(default=1.0, metadata={
        "help": "multiply the profile's training and selection lengths (e.g. 0.5 for a quicker, 2 "
                "for a longer run; --steps and --select-steps override it)"})
    workers: int = 0
    options: str = "{}"
    backbone: str = "models/aurora-tiny"
    strategy: str = "none"
    resume: bool = False
    dry_run: bool = field(default=False, metadata={
        "help": "print the runs and the cost model's wall-time estimate, run nothing"})
    encoder_decoder: tuple[str, ...] = field(default=(), metadata={
        "choices": ENCODER_DECODER_PROTOCOLS,
        "help": "protocol(s) to run the grid under, one or both: 'frozen' (encoder/decoder "
                "pretrained weights inside the budget) or 'train' (the paper's: trained whole by "
                "every method, outside the budget); the report has a section per protocol "
                "(empty: the profile's)"})
    accounting: tuple[str, ...] = field(default=(), metadata={
        "choices": ACCOUNTINGS,
        "help": "budget accounting(s): 'trainable' (the paper's: equal entries per step; SFAS and "
                "WeatherPEFT store their union) and/or 'stored' (equal entries stored: SFAS and "
                "WeatherPEFT capped, budget_mode strict); a report section each (empty: the profile's)"})

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown benchmark profile '{self.profile}'; known: {sorted(PROFILES)}")
        from weatherpeft.tasks import task_names

        unknown = sorted(set(self.tasks) - set(task_names()))  # registered and plugin tasks too
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the benchmark's tasks are {list(TASK_NAMES)}, "
                             f"known tasks {task_names()}")
        for budget in self.budgets:
            if not 0 < budget <= 1:
                raise ValueError(f"a budget is a fraction in (0, 1], got {budget}")
        for name in ("steps", "batch_size", "workers", "select_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"BenchmarkConfig.{name} must not be negative, got {getattr(self, name)}")
        if self.lr < 0 or self.new_lr < 0:
            raise ValueError(f"learning rates must not be negative, got lr={self.lr}, new_lr={self.new_lr}")
        if not (self.step_scale > 0 and math.isfinite(self.step_scale)):
            raise ValueError(f"--step-scale must be a positive number, got {self.step_scale}")
        for pair in self.lr_grid:
            _parse_pair(pair)
        for name, known in (("encoder_decoder", ENCODER_DECODER_PROTOCOLS), ("accounting", ACCOUNTINGS)):
            values = tuple(dict.fromkeys(getattr(self, name)))
            setattr(self, name, values)
            if any(v not in known for v in values):
                raise ValueError(f"{name} takes one or more of {list(known)}, got {list(values)}")


@dataclass(frozen=True)
class Run:
    """One cell of the grid (``stage`` "test") or one candidate of the selection ("select")."""

    task: str
    method: str
    budget: float | None
    seed: int
    steps: int
    batch_size: int
    lr: float
    new_lr: float
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    encoder_decoder: str = "frozen"
    accounting: str = "trainable"
    stage: str = "test"
    val_every: int = 0
    val_batches: int = 0

    @property
    def name(self) -> str:
        budget = "nobudget" if self.budget is None else f"b{self.budget:g}"
        protocol = "" if self.encoder_decoder == "frozen" else f"-ed{self.encoder_decoder}"
        accounting = "" if self.accounting == "trainable" else f"-{self.accounting}"
        if self.stage == "select":
            return f"select/{self.task}/{self.method}-{budget}{protocol}-lr{self.lr:g}-newlr{self.new_lr:g}"
        return f"{self.task}/{self.method}-{budget}-s{self.seed}{protocol}{accounting}"

    @property
    def selection_key(self) -> tuple[str, str, str]:
        """What one learning-rate choice holds for: task, method, protocol."""
        return self.task, self.method, self.encoder_decoder

    def settings(self) -> dict[str, Any]:
        """What identifies a finished record (``--resume`` reuses records that match; failed
        runs are tried again). Fields at their defaults are left out, so records written
        before those fields existed still match."""
        settings = dataclasses.asdict(self)
        for spec in dataclasses.fields(self):
            if spec.name in _OPTIONAL_SETTINGS and settings[spec.name] == spec.default:
                del settings[spec.name]
        return settings


_OPTIONAL_SETTINGS = ("encoder_decoder", "accounting", "stage", "val_every", "val_batches")


def _method_options(config: BenchmarkConfig, profile: Profile, methods: Sequence[str]) -> dict[str, dict]:
    from weatherpeft.finetune import parse_options

    given = parse_options(config.options)
    for method, value in given.items():
        if method not in methods or not isinstance(value, dict):
            raise ValueError(f"--options maps a benchmarked method to its options object; got "
                             f"'{method}': {value!r} (methods: {list(methods)})")
    return {m: {**profile.options.get(m, {}), **given.get(m, {})} for m in methods}


def _accounted(options: dict[str, Any], method: str, accounting: str) -> dict[str, Any]:
    """``options`` under ``accounting``: the strict cap of a union method under "stored"."""
    if accounting != "stored" or method not in UNION_METHODS:
        return options
    clash = sorted(set(options) & set(UNION_METHODS[method]))
    if clash:
        raise ValueError(f"{method}: {clash} is set by the accounting (--accounting stored runs "
                         f"{UNION_METHODS[method]}); leave it out of --options")
    return {**options, **UNION_METHODS[method]}


def _val_every(steps: int, points: int) -> int:
    """The largest step interval ≤ steps / points that divides ``steps`` (the last step logs)."""
    return next(d for d in range(max(1, steps // max(points, 1)), 0, -1) if steps % d == 0)


# Above radon C on purpose: one check per overridable field (each with its own message) then the grid's nested loops.
def plan(config: BenchmarkConfig) -> list[Run]:
    """The test runs of ``config`` (its profile narrowed or overridden by the given fields), at
    the fixed or default learning rates; :func:`run_benchmark` sets each to its chosen pair."""
    from weatherpeft.methods.registry import method_names

    profile = PROFILES[config.profile]
    methods = config.methods or profile.methods
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {method_names()}")
    options = _method_options(config, profile, methods)
    protocols = config.encoder_decoder or profile.encoder_decoder
    accountings = config.accounting or profile.accountings
    seeds = config.seeds or profile.seeds
    runs = []
    for task in config.tasks or profile.tasks:
        # a task outside the profile (registered or a plugin) takes the downscaling protocol
        steps = config.steps or _scaled(profile.steps.get(task, profile.steps["downscaling"]),
                                        config.step_scale)
        batch_size = config.batch_size or profile.batch_size.get(task, profile.batch_size["downscaling"])
        common = dict(task=task, steps=steps, batch_size=batch_size,
                      lr=config.lr or profile.lr, new_lr=config.new_lr or profile.new_lr,
                      val_every=_val_every(steps, profile.val_points), val_batches=profile.val_batches)
        for protocol in protocols:
            chosen = profile.protocol_methods.get(protocol)
            for accounting in accountings:
                for method in methods:
                    if (chosen is not None and method not in chosen) or \
                            (accounting != accountings[0] and method not in UNION_METHODS):
                        continue
                    for budget in (None,) if method in BUDGET_FREE else (config.budgets or profile.budgets):
                        runs += [Run(method=method, budget=budget, seed=seed, encoder_decoder=protocol,
                                     accounting=accounting,
                                     options=_accounted(options[method], method, accounting), **common)
                                 for seed in seeds]
        if "frozen" in methods and "train" not in protocols:  # the encoder/decoder-only reference
            runs += [Run(method="frozen", budget=None, seed=seed, encoder_decoder="train",
                         accounting=accountings[0], options=options["frozen"], **common)
                     for seed in seeds]
    return runs


def _scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def _lr_grid(config: BenchmarkConfig) -> tuple[tuple[float, float], ...]:
    """The selection's candidates: none when ``lr``/``new_lr`` are fixed on the command line."""
    if config.lr or config.new_lr:
        return ()
    return tuple(_parse_pair(p) for p in config.lr_grid) or PROFILES[config.profile].lr_grid


def selection_plan(config: BenchmarkConfig, runs: Sequence[Run]) -> list[Run]:
    """The selection stage for the test ``runs``: each (task, method, protocol) trains every
    candidate of the grid once (first seed, first budget, first accounting), for ``select_steps``,
    validated at the last step only (on the profile's ``select_val_batches``)."""
    grid = _lr_grid(config)
    if len(grid) < 2:
        return []
    profile = PROFILES[config.profile]
    first: dict[tuple, Run] = {}
    for run in runs:
        if not profile.select_once or run.encoder_decoder == runs[0].encoder_decoder:
            first.setdefault(run.selection_key, run)
    selection = []
    for run in first.values():
        scheduled = profile.select_steps.get(run.task)
        steps = config.select_steps or (_scaled(scheduled, config.step_scale) if scheduled else run.steps)
        selection += [dataclasses.replace(run, lr=lr, new_lr=new_lr, stage="select", steps=steps,
                                          val_every=steps, val_batches=profile.select_val_batches)
                      for lr, new_lr in grid]
    return selection


def choose_learning_rates(selection: Iterable[Mapping[str, Any]], default: tuple[float, float]
                          ) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(task, method, protocol) → the chosen pair and every candidate's validation loss.

    Reads only each selection record's ``val_loss`` (the whole validation split): the pair with
    the lowest wins. Where no candidate trained or every one failed, ``default`` holds and
    ``reason`` says why."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in selection:
        key = (record["task"], record["method"], record.get("encoder_decoder") or "frozen")
        groups.setdefault(key, []).append(record)
    choices = {}
    for key, records in groups.items():
        candidates = [{"lr": r["lr"], "new_lr": r["new_lr"], "val_loss": r.get("val_loss"),
                       "error": r.get("error")} for r in records]
        scored = [c for c in candidates if c["val_loss"] is not None and math.isfinite(c["val_loss"])]
        if scored:
            best = min(scored, key=lambda c: c["val_loss"])
            choice = {"lr": best["lr"], "new_lr": best["new_lr"], "reason": "lowest validation loss"}
        else:
            why = "every candidate failed" if any(c["error"] for c in candidates) else "nothing to train"
            choice = {"lr": default[0], "new_lr": default[1], "reason": f"{why}: the profile's pair"}
        choices[key] = {"task": key[0], "method": key[1], "encoder_decoder": key[2], **choice,
                        "candidates": candidates}
    return choices


def _with_choices(runs: Sequence[Run], choices: Mapping[tuple, Mapping[str, Any]]) -> list[Run]:
    """``runs`` at their chosen pairs; a protocol selected under another (``select_once``) takes
    that protocol's choice."""
    shared = {key[:2]: choice for key, choice in reversed(list(choices.items()))}
    chosen = []
    for run in runs:
        choice = choices.get(run.selection_key) or shared.get(run.selection_key[:2])
        chosen.append(dataclasses.replace(run, lr=choice["lr"], new_lr=choice["new_lr"]) if choice else run)
    return chosen


# -- the cost model --------------------------------------------------------------------------

#: Seconds per step of full fine-tuning at batch 2 under "train", one thread, two runs side by
#: side on the otherwise quiet 2-core machine (docs/results/benchmark_costs/README.md: the lead's
#: 2,000-step runs for downscaling and precipitation; post-processing from its ratio to
#: downscaling measured side by side under load).
FULL_STEP_SECONDS = {"downscaling": 0.53, "postprocessing": 0.8, "precipitation": 0.16}
#: A method's step time relative to full fine-tuning's on the same task, per protocol (1 when
#: absent). Under "train" every method back-propagates through the whole backbone to the
#: encoder, so most cost what full fine-tuning costs; SFAS-type methods add their Fisher
#: scoring and masked update. Under "frozen": the committed 200-step benchmark's ratios.
STEP_FACTOR = {
    "train": {"frozen": 0.85, "lora": 1.05, "dora": 1.1, "vpt": 1.05, "tadp": 1.05, "child_tuning": 1.1,
              "random_mask": 1.1, "sfas": 1.5, "weatherpeft": 1.7},
    "frozen": {"frozen": 0.5, "lora": 0.7, "dora": 0.85, "ssf": 0.65, "vpt": 0.8, "adaptformer": 0.65,
               "child_tuning": 1.0, "random_mask": 1.05, "tadp": 0.85, "sfas": 1.8, "weatherpeft": 1.9}}
#: In full-step units: one validation batch (a forward), and the test evaluation per task.
VAL_BATCH_STEPS = 0.35
TEST_STEPS = {"downscaling": 30, "postprocessing": 4, "precipitation": 25}
#: Seconds to start a run's process and build its task (post-processing reads its ensemble).
SETUP_SECONDS = {"downscaling": 10.0, "postprocessing": 20.0, "precipitation": 10.0}
#: Batches of 2 in each task's validation split (the built-in world).
VAL_SPLIT_BATCHES = {"downscaling": 122, "postprocessing": 13, "precipitation": 118}


def estimate_seconds(run: Run) -> float:
    """The cost model: seconds one run takes on the quiet 2-core machine, two runs side by side
    (steps × step time + validation + test evaluation + set-up)."""
    unit = FULL_STEP_SECONDS.get(run.task, max(FULL_STEP_SECONDS.values())) * run.batch_size / 2
    steps = run.steps * STEP_FACTOR.get(run.encoder_decoder, {}).get(run.method, 1.0)
    split = VAL_SPLIT_BATCHES.get(run.task, max(VAL_SPLIT_BATCHES.values())) * 2 / run.batch_size
    if run.stage == "select":
        forwards = min(run.val_batches, split) * VAL_BATCH_STEPS
    else:
        points = run.steps // run.val_every + 1 if run.val_every else 1  # + the final validation
        forwards = points * min(run.val_batches or 8, split) * VAL_BATCH_STEPS \
            + TEST_STEPS.get(run.task, 30)
    return SETUP_SECONDS.get(run.task, 20.0) + unit * (steps + forwards)


def estimate_wall(runs: Sequence[Run], workers: int) -> float:
    """Seconds ``workers`` processes take for ``runs`` handed out in order (the pool's way)."""
    finish = [0.0] * max(1, workers)
    for run in runs:
        heapq.heappush(finish, heapq.heappop(finish) + estimate_seconds(run))
    return max(finish)


def _peak_memory_bytes() -> int:
    """CUDA: the peak allocated since the run started; CPU: this process's peak resident set."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def training_protocol(steps: int, batch_size: int, lr: float, seed: int, out_dir: str | Path, *,
                      strategy: str = "none", progress: bool = False, val_every: int = 0,
                      val_batches: int = 0):
    """The Trainer settings of every benchmark run (and the demo): AdamW, 10 % linear warm-up,
    cosine decay to 0.1 × ``lr``, gradient clipping at norm 1; the validation loss every
    ``val_every`` steps on ``val_batches`` batches (0: never / the Trainer's default)."""
    from weatherpeft.train import TrainConfig

    extra = {"val_batches": val_batches} if val_batches else {}
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                       min_lr_ratio=0.1, grad_clip=1.0, log_every=max(1, steps // 5), seed=seed,
                       progress=progress, out_dir=str(out_dir), strategy=strategy,
                       val_every=val_every, **extra)


def _blank_record(run: Run, out: str | Path) -> dict[str, Any]:
    return {**run.settings(), "encoder_decoder": run.encoder_decoder, "accounting": run.accounting,
            "stage": run.stage, "settings": run.settings(),
            "run_dir": str(Path(out) / "runs" / run.name),
            "error": None, "crashed": False, "trainable": None, "stored": None, "head": None,
            "encoder_decoder_parameters": None, "pretrained": None, "adapter_bytes": None,
            "metrics": {}, "val_loss": None, "curve": [], "train_seconds": None, "step_seconds": None,
            "wall_seconds": None, "estimated_seconds": round(estimate_seconds(run), 1),
            "peak_memory_bytes": None}


def failed_record(run: Run, out: str | Path, error: BaseException | str) -> dict[str, Any]:
    """The record of a run that produced no scores, saying why: a message (the method cannot
    reach the budget) or the exception that crashed it (``crashed``)."""
    crashed = not isinstance(error, str)
    return {**_blank_record(run, out), "crashed": crashed,
            "error": f"{type(error).__name__}: {error}" if crashed else error}


def _curve(folder: Path) -> list[list[float]]:
    """[step, validation loss] pairs of a run's metric log."""
    from weatherpeft.train import METRICS_FILE

    path = folder / METRICS_FILE
    if not path.is_file():
        return []
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [[int(r["step"]), float(r["val_loss"])] for r in lines if "val_loss" in r]


def run_one(run: Run, out: str, backbone: str, strategy: str = "none") -> dict[str, Any]:
    """Train and score one run in ``out``/runs/<name>; returns its record. A selection run
    is scored on the validation split only (its ``val_loss``); a test run on the test split."""
    import torch

    from weatherpeft.finetune import FinetuneConfig, run_finetune
    from weatherpeft.methods.base import BudgetError

    start = time.perf_counter()
    folder = Path(out) / "runs" / run.name
    record = _blank_record(run, out)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    finetune = FinetuneConfig(task=run.task, backbone=backbone, method=run.method,
                              budget=1.0 if run.budget is None else run.budget,
                              options=json.dumps(run.options), new_lr=run.new_lr,
                              encoder_decoder=run.encoder_decoder, evaluate=run.stage == "test")
    train = training_protocol(run.steps, run.batch_size, run.lr, run.seed, folder, strategy=strategy,
                              val_every=run.val_every, val_batches=run.val_batches)
    if folder.exists():  # an unfinished earlier attempt: start it over
        shutil.rmtree(folder)
    try:
        result = run_finetune(finetune, train)
    except BudgetError as error:  # the method cannot reach this budget: a row saying why
        return failed_record(run, out, str(error))
    report = result.get("report", {})
    steps = int(result["fit"]["step"])
    val_loss = result["fit"].get("val_loss") if run.stage == "select" else result.get("val_loss")
    record.update(trainable=report.get("trainable"), stored=report.get("stored"),
                  head=report.get("head"), pretrained=report.get("pretrained"),
                  encoder_decoder_parameters=report.get("encoder_decoder", 0),
                  adapter_bytes=result.get("adapter_bytes"), metrics=result.get("test", {}),
                  val_loss=val_loss, curve=_curve(folder),
                  steps=steps, train_seconds=result["fit_seconds"],
                  step_seconds=result["fit_seconds"] / steps if steps else None,
                  wall_seconds=time.perf_counter() - start, peak_memory_bytes=_peak_memory_bytes())
    return record


def _run_in_child(run: Run, out: str, backbone: str) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_one(run, out, backbone)


def _about(config: BenchmarkConfig, workers: int) -> dict[str, Any]:
    import os
    import platform

    import torch

    return {"profile": config.profile, "command": "weatherpeft " + shlex.join(sys.argv[1:])
            if Path(sys.argv[0]).name == "weatherpeft" else shlex.join(sys.argv),
            "config": dataclasses.asdict(config), "workers": workers,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
            f"CPU ({platform.processor() or platform.machine()}), 1 thread per run",
            "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average": os.getloadavg()[0]}


def describe_plan(selection: Sequence[Run], runs: Sequence[Run], workers: int) -> str:
    """What will run and the cost model's estimate of how long (printed before starting)."""
    selection_wall, test_wall = estimate_wall(selection, workers), estimate_wall(runs, workers)
    lines = [f"selection: {len(selection)} runs ({len({r.selection_key for r in selection})} learning-rate "
             f"choices), ~{selection_wall / 60:.0f} min" if selection else
             "selection: none (fixed learning rates)",
             f"test: {len(runs)} runs, ~{test_wall / 60:.0f} min",
             f"estimated wall time: ~{(selection_wall + test_wall) / 60:.0f} min with {workers} "
             "worker(s) (cost model calibrated on a quiet 2-core machine, two runs side by side; "
             "a loaded machine takes longer)"]
    return "\n".join(lines)


def _previous_benchmark(path: Path, resume: bool) -> dict[str, Any]:
    """The earlier ``benchmark.json`` in ``--out`` (empty without one); refused without ``--resume``."""
    if not path.is_file():
        return {}
    if not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue it, or choose another --out")
    return json.loads(path.read_text())


def _settings_key(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True)


def _cell(settings: Mapping[str, Any]) -> tuple:
    """What a record stands for in the tables, whatever its schedule: a test cell, or one
    selection candidate (its learning rates)."""
    stage = settings.get("stage", "test")
    pair = (settings["lr"], settings["new_lr"]) if stage == "select" else ()
    return (stage, settings["task"], settings["method"], settings["budget"],
            settings["seed"] if stage == "test" else None, settings.get("encoder_decoder", "frozen"),
            settings.get("accounting", "trainable"), *pair)


def _carried(previous: Mapping[str, Any], planned: Sequence[Run]) -> tuple[list, list, list]:
    """The earlier selection records, test records and choices this command's grid does not
    cover: they stay, so a grid run in chunks (``--tasks``, ``--seeds``, …) into one ``--out``
    accumulates. A record of a cell this command plans (at any schedule) gives way to it."""
    cells = {_cell(run.settings()) for run in planned}
    keep = [r for r in previous.get("selection", []) + previous.get("records", [])
            if "settings" in r and not r["error"] and _cell(r["settings"]) not in cells]
    chosen = {run.selection_key for run in planned}
    choices = [c for c in previous.get("choices", [])
               if (c["task"], c["method"], c["encoder_decoder"]) not in chosen]
    return ([r for r in keep if r.get("stage") == "select"], [r for r in keep if r.get("stage") != "select"],
            choices)


def _chunks(previous: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The commands that wrote an earlier ``benchmark.json`` (for the report's set-up line)."""
    about = previous.get("about")
    if not about:
        return []
    return [*about.get("earlier", []),
            {key: about[key] for key in ("command", "started", "finished") if key in about}]


def run_benchmark(config: BenchmarkConfig) -> list[dict[str, Any]]:
    """Select the learning rates, run the grid; write ``benchmark.json``, ``benchmark.md`` and
    the plots into ``config.out``. Returns the test records."""
    from weatherpeft import distributed

    out = Path(config.out)
    runs = plan(config)
    selection = selection_plan(config, runs)
    launched = distributed.launched()
    workers = 1 if launched else (config.workers or PROFILES[config.profile].workers)
    main = not launched or distributed.is_main()
    if main:
        print(describe_plan(selection, runs, workers), flush=True)
    if config.dry_run:
        for run in selection + runs:
            print(f"  {run.name}: {run.steps} steps × batch {run.batch_size}, "
                  f"~{estimate_seconds(run):.0f} s", flush=True)
        return []
    json_path = out / "benchmark.json"
    previous = _previous_benchmark(json_path, config.resume)
    done = {_settings_key(r["settings"]): r for r in previous.get("selection", []) + previous.get("records", [])
            if "settings" in r and not r["error"]}
    kept_selection, kept_records, kept_choices = _carried(previous, [*selection, *runs])
    about = _about(config, workers)
    if _chunks(previous):
        about["earlier"] = _chunks(previous)
    records: dict[str, dict[str, Any]] = {}
    choices: dict[tuple, dict[str, Any]] = {}

    def save() -> None:
        if main:
            write_json(json_path, {
                "about": about,
                "selection": kept_selection + [records[r.name] for r in selection if r.name in records],
                "choices": kept_choices + list(choices.values()),
                "records": kept_records + [records[r.name] for r in runs if r.name in records]}, sort_keys=False)

    def finished(record: dict[str, Any]) -> None:
        records[Path(record["run_dir"]).relative_to(out / "runs").as_posix()] = record
        save()
        if main:
            status = record["error"] or (f"{record['wall_seconds']:.0f} s (estimated "
                                         f"{record['estimated_seconds']:.0f} s)")
            print(f"[{len(records)}/{len(selection) + len(runs)}] {record['stage']} {record['task']} "
                  f"{record['method']} budget {record['budget']} seed {record['seed']} lr {record['lr']:g}/"
                  f"{record['new_lr']:g} encoder/decoder {record['encoder_decoder']} "
                  f"{record['accounting']}: {status}", flush=True)

    _execute(selection, done, records, finished, out, config, launched, workers)
    choices.update(choose_learning_rates([records[r.name] for r in selection],
                                         (runs[0].lr, runs[0].new_lr) if runs else (0.0, 0.0)))
    runs = _with_choices(runs, choices)
    _execute(runs, done, records, finished, out, config, launched, workers)
    about["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    ordered = [records[r.name] for r in runs]
    if main:
        write_report(kept_records + ordered, about, out,
                     selection=kept_selection + [records[r.name] for r in selection],
                     choices=kept_choices + list(choices.values()))
    return ordered


def _execute(runs: Sequence[Run], done: Mapping[str, dict[str, Any]], records: dict[str, dict[str, Any]],
             finished: Callable[[dict[str, Any]], None], out: Path, config: BenchmarkConfig,
             launched: bool, workers: int) -> None:
    """Run what ``done`` does not already hold; ``finished`` gets each record as it comes."""
    from weatherpeft import distributed

    todo = []
    for run in runs:
        key = _settings_key(run.settings())
        if key in done:
            records[run.name] = done[key]
        else:
            todo.append(run)
    log.info("benchmark: %d runs (%d already done), %d worker(s)", len(runs), len(runs) - len(todo), workers)
    if launched:
        for run in todo:
            record = run_one(run, str(out), config.backbone, config.strategy)
            if distributed.is_main():
                finished(record)
            else:
                records[run.name] = record
        return
    if not todo:
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_run_in_child, run, str(out), config.backbone): run for run in todo}
        for future in concurrent.futures.as_completed(futures):
            try:
                finished(future.result())
            except Exception as error:  # one failed run must not lose the others
                log.exception("run %s failed", futures[future].name)
                finished(failed_record(futures[future], out, error))
