"""The benchmark: every method × task × budget × seed, trained and scored the same way.

A *profile* fixes the grid and the training protocol; the command line can narrow it.
Every run is :func:`weatherpeft.finetune.run_finetune` with the same Trainer settings, so
methods differ only in what they train. One learning-rate protocol holds for every method:
entries of pretrained weights (full fine-tuning, Child-Tuning, random masks, SFAS) move with
``lr``; parameters a method adds (LoRA, prompts, adapters, SSF scales) and task heads with
``new_lr``. ``full`` and ``frozen`` have no budget and run once per task and seed.

Protocols (``encoder_decoder``): every grid runs under "frozen" (the default: the encoder/decoder
are pretrained weights inside the budget), "train" (the paper's: every method trains them whole,
outside the budget, at ``lr``), or both; each record says which. Wherever ``frozen`` is
benchmarked, "encoder/decoder only" (the frozen method under "train") runs too: the reference
row that says how much of a task the encoder/decoder alone can learn.

Runs go to a pool of ``workers`` fresh processes (one run per process, so each run's peak
memory is its own); under ``torchrun`` every rank runs the grid in order with the profile's
``strategy``. ``DIR/benchmark.json`` is rewritten (atomically) after every run, and
``--resume`` keeps the records it already holds for the same settings.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import resource
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field

from weatherpeft.backbones.base import ENCODER_DECODER_PROTOCOLS
from pathlib import Path
from typing import Any

from weatherpeft.atomic import write_json

__all__ = ["BenchmarkConfig", "PROFILES", "Profile", "Run", "failed_record", "plan", "run_benchmark",
           "run_one",
           "training_protocol"]

log = logging.getLogger(__name__)

#: Methods with no budget: trained (or scored) once per task and seed.
BUDGET_FREE = ("full", "frozen")
#: The paper's comparison, in its table order.
PAPER_METHODS = ("full", "frozen", "lora", "dora", "ssf", "vpt", "adaptformer", "child_tuning",
                 "random_mask", "tadp", "sfas", "weatherpeft")
#: The paper's budgets: ~0.3 % and ~4 % of the backbone.
PAPER_BUDGETS = (0.003, 0.04)
TASK_NAMES = ("downscaling", "postprocessing", "precipitation")
#: Keys every record has (the JSON schema the tests check).
RECORD_KEYS = ("task", "method", "budget", "seed", "encoder_decoder", "steps", "batch_size", "lr",
               "new_lr", "trainable", "stored", "head", "encoder_decoder_parameters", "pretrained",
               "adapter_bytes", "metrics",
               "train_seconds", "step_seconds", "peak_memory_bytes", "error", "crashed")


@dataclass(frozen=True)
class Profile:
    """A benchmark grid and its training protocol (steps and batch size per task)."""

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    steps: dict[str, int]
    batch_size: dict[str, int]
    seeds: tuple[int, ...] = (0,)
    lr: float = 1e-3
    new_lr: float = 6e-3
    workers: int = 2


PROFILES = {
    # Minutes: the core comparison at the small budget, few steps.
    "quick": Profile(tasks=TASK_NAMES, methods=("full", "frozen", "lora", "weatherpeft"),
                     budgets=(0.003,), steps={"downscaling": 30, "postprocessing": 40,
                                              "precipitation": 30},
                     batch_size={"downscaling": 4, "postprocessing": 4, "precipitation": 4}),
    # The paper's tables: every method at both budgets on all three tasks (≤ 60 min, 2 cores).
    # 500 steps: at 200 the methods had not separated from training the encoder/decoder alone
    # (docs/results/tasks/README.md).
    "standard": Profile(tasks=TASK_NAMES, methods=PAPER_METHODS, budgets=PAPER_BUDGETS,
                        steps={"downscaling": 500, "postprocessing": 500, "precipitation": 500},
                        batch_size={"downscaling": 2, "postprocessing": 2, "precipitation": 2}),
}


@dataclass
class BenchmarkConfig:
    """What to run. Empty/zero fields take the profile's value.

    ``options``: JSON object of method → options, e.g. '{"weatherpeft": {"budget_mode": "strict"}}'.
    ``encoder_decoder``: the protocols to run the grid under (default: "frozen").
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
    workers: int = 0
    options: str = "{}"
    backbone: str = "models/aurora-tiny"
    strategy: str = "none"
    resume: bool = False
    encoder_decoder: tuple[str, ...] = field(default=("frozen",), metadata={
        "choices": ENCODER_DECODER_PROTOCOLS,
        "help": "protocol(s) to run the grid under, one or both: 'frozen' (encoder/decoder "
                "pretrained weights inside the budget) or 'train' (the paper's: trained whole by "
                "every method, outside the budget); the report has a section per protocol"})

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
        for name in ("steps", "batch_size", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"BenchmarkConfig.{name} must not be negative, got {getattr(self, name)}")
        if self.lr < 0 or self.new_lr < 0:
            raise ValueError(f"learning rates must not be negative, got lr={self.lr}, new_lr={self.new_lr}")
        self.encoder_decoder = tuple(dict.fromkeys(self.encoder_decoder))
        unknown = [p for p in self.encoder_decoder if p not in ENCODER_DECODER_PROTOCOLS]
        if unknown or not self.encoder_decoder:
            raise ValueError(f"encoder_decoder takes one or both of {list(ENCODER_DECODER_PROTOCOLS)}, "
                             f"got {list(self.encoder_decoder)}")


@dataclass(frozen=True)
class Run:
    """One cell of the grid and how it is trained."""

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

    @property
    def name(self) -> str:
        budget = "nobudget" if self.budget is None else f"b{self.budget:g}"
        protocol = "" if self.encoder_decoder == "frozen" else f"-ed{self.encoder_decoder}"
        return f"{self.task}/{self.method}-{budget}-s{self.seed}{protocol}"

    def settings(self) -> dict[str, Any]:
        """What identifies a finished record (``--resume`` reuses records that match; failed
        runs are tried again). The default protocol is left out, so records written before
        protocols existed still match."""
        settings = dataclasses.asdict(self)
        if self.encoder_decoder == "frozen":
            del settings["encoder_decoder"]
        return settings


def plan(config: BenchmarkConfig) -> list[Run]:
    """The runs of ``config``: its profile narrowed or overridden by the given fields."""
    from weatherpeft.finetune import parse_options
    from weatherpeft.methods.base import method_names

    profile = PROFILES[config.profile]
    methods = config.methods or profile.methods
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {method_names()}")
    options = parse_options(config.options)
    for method, value in options.items():
        if method not in methods or not isinstance(value, dict):
            raise ValueError(f"--options maps a benchmarked method to its options object; got "
                             f"'{method}': {value!r} (methods: {list(methods)})")
    protocols = config.encoder_decoder
    runs = []
    for task in config.tasks or profile.tasks:
        for protocol in protocols:
            for method in methods:
                budgets = (None,) if method in BUDGET_FREE else (config.budgets or profile.budgets)
                for budget in budgets:
                    for seed in config.seeds or profile.seeds:
                        runs.append(_run(config, profile, task, method, budget, seed, protocol,
                                         options.get(method, {})))
        if "frozen" in methods and "train" not in protocols:  # the encoder/decoder-only reference
            runs += [_run(config, profile, task, "frozen", None, seed, "train", options.get("frozen", {}))
                     for seed in config.seeds or profile.seeds]
    return runs


def _run(config: BenchmarkConfig, profile: Profile, task: str, method: str, budget: float | None,
         seed: int, protocol: str, options: dict[str, Any]) -> Run:
    return Run(task=task, method=method, budget=budget, seed=seed,
               # a task outside the profile (registered or a plugin): the downscaling protocol
               steps=config.steps or profile.steps.get(task, profile.steps["downscaling"]),
               batch_size=config.batch_size or profile.batch_size.get(task, profile.batch_size["downscaling"]),
               lr=config.lr or profile.lr, new_lr=config.new_lr or profile.new_lr,
               options=options, encoder_decoder=protocol)


def _peak_memory_bytes() -> int:
    """CUDA: the peak allocated since the run started; CPU: this process's peak resident set."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def training_protocol(steps: int, batch_size: int, lr: float, seed: int, out_dir: str | Path, *,
                      strategy: str = "none", progress: bool = False):
    """The Trainer settings of every benchmark run (and the demo): AdamW, 10 % linear warm-up,
    cosine decay to 0.1 × ``lr``, gradient clipping at norm 1."""
    from weatherpeft.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                       min_lr_ratio=0.1, grad_clip=1.0, log_every=max(1, steps // 5), seed=seed,
                       progress=progress, out_dir=str(out_dir), strategy=strategy)


def _blank_record(run: Run, out: str | Path) -> dict[str, Any]:
    return {**run.settings(), "encoder_decoder": run.encoder_decoder, "settings": run.settings(),
            "run_dir": str(Path(out) / "runs" / run.name),
            "error": None, "crashed": False, "trainable": None, "stored": None, "head": None,
            "encoder_decoder_parameters": None, "pretrained": None, "adapter_bytes": None,
            "metrics": {}, "train_seconds": None, "step_seconds": None, "peak_memory_bytes": None}


def failed_record(run: Run, out: str | Path, error: BaseException | str) -> dict[str, Any]:
    """The record of a run that produced no scores, saying why: a message (the method cannot
    reach the budget) or the exception that crashed it (``crashed``)."""
    crashed = not isinstance(error, str)
    return {**_blank_record(run, out), "crashed": crashed,
            "error": f"{type(error).__name__}: {error}" if crashed else error}


def run_one(run: Run, out: str, backbone: str, strategy: str = "none") -> dict[str, Any]:
    """Train and score one run in ``out``/runs/<name>; returns its record."""
    import torch

    from weatherpeft.finetune import FinetuneConfig, run_finetune
    from weatherpeft.methods.base import BudgetError

    folder = Path(out) / "runs" / run.name
    record = _blank_record(run, out)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    finetune = FinetuneConfig(task=run.task, backbone=backbone, method=run.method,
                              budget=1.0 if run.budget is None else run.budget,
                              options=json.dumps(run.options), new_lr=run.new_lr,
                              encoder_decoder=run.encoder_decoder)
    train = training_protocol(run.steps, run.batch_size, run.lr, run.seed, folder, strategy=strategy)
    if folder.exists():  # an unfinished earlier attempt: start it over
        shutil.rmtree(folder)
    try:
        result = run_finetune(finetune, train)
    except BudgetError as error:  # the method cannot reach this budget: a row saying why
        return failed_record(run, out, str(error))
    report = result.get("report", {})
    steps = int(result["fit"]["step"])
    record.update(trainable=report.get("trainable"), stored=report.get("stored"),
                  head=report.get("head"), pretrained=report.get("pretrained"),
                  encoder_decoder_parameters=report.get("encoder_decoder", 0),
                  adapter_bytes=result.get("adapter_bytes"), metrics=result.get("test", {}),
                  steps=steps, train_seconds=result["fit_seconds"],
                  step_seconds=result["fit_seconds"] / steps if steps else None,
                  peak_memory_bytes=_peak_memory_bytes())
    return record


def _run_in_child(run: Run, out: str, backbone: str) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_one(run, out, backbone)


def _about(config: BenchmarkConfig, workers: int) -> dict[str, Any]:
    import platform

    import torch

    return {"profile": config.profile, "command": "weatherpeft " + shlex.join(sys.argv[1:])
            if Path(sys.argv[0]).name == "weatherpeft" else shlex.join(sys.argv),
            "config": dataclasses.asdict(config), "workers": workers,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
            f"CPU ({platform.processor() or platform.machine()}), 1 thread per run",
            "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_benchmark(config: BenchmarkConfig) -> list[dict[str, Any]]:
    """Run the grid; write ``benchmark.json``, ``benchmark.md`` and the plots into ``config.out``."""
    from weatherpeft import distributed
    from weatherpeft.benchmark_report import write_report

    out = Path(config.out)
    runs = plan(config)
    done: dict[str, dict[str, Any]] = {}
    json_path = out / "benchmark.json"
    if config.resume and json_path.is_file():
        for record in json.loads(json_path.read_text())["records"]:
            if "settings" in record and not record["error"]:
                done[json.dumps(record["settings"], sort_keys=True)] = record
    elif json_path.is_file():
        raise FileExistsError(f"{json_path} exists: pass --resume to continue it, or choose another --out")
    launched = distributed.launched()
    workers = 1 if launched else (config.workers or PROFILES[config.profile].workers)
    about = _about(config, workers)
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for run in runs:
        key = json.dumps(run.settings(), sort_keys=True)
        if key in done:
            records[run.name] = done[key]
        else:
            todo.append(run)
    log.info("benchmark: %d runs (%d already done), %d worker(s)", len(runs), len(runs) - len(todo), workers)

    def finished(record: dict[str, Any]) -> None:
        records[Path(record["run_dir"]).relative_to(out / "runs").as_posix()] = record
        if launched and not distributed.is_main():
            return
        write_json(json_path, {"about": about, "records": [records[r.name] for r in runs
                                                          if r.name in records]}, sort_keys=False)
        status = record["error"] or f"{record['train_seconds']:.0f} s"
        print(f"[{len(records)}/{len(runs)}] {record['task']} {record['method']} "
              f"budget {record['budget']} seed {record['seed']} encoder/decoder "
              f"{record['encoder_decoder']}: {status}", flush=True)

    if launched:
        for run in todo:
            finished(run_one(run, str(out), config.backbone, config.strategy))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                    max_tasks_per_child=1) as pool:
            futures = {pool.submit(_run_in_child, run, str(out), config.backbone): run for run in todo}
            for future in concurrent.futures.as_completed(futures):
                try:
                    finished(future.result())
                except Exception as error:  # one failed run must not lose the others
                    log.exception("run %s failed", futures[future].name)
                    finished(failed_record(futures[future], out, error))
    ordered = [records[r.name] for r in runs]
    if not launched or distributed.is_main():
        about["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(json_path, {"about": about, "records": ordered}, sort_keys=False)
        write_report(ordered, about, out)
    return ordered
