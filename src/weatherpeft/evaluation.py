"""Scoring a model (``weatherpeft evaluate``): a backbone checkpoint's forecast skill, or a
fine-tuned model's test-split scores on its task.

A checkpoint alone is rolled out on a store against persistence and climatology (the
climatology from the reference years before it), and may get its model card
(:mod:`weatherpeft.model_card`). With adapters (or a task) each adapter is scored on its
task with the task's references and written as metrics.json, metrics.md and maps.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import xarray as xr

from weatherpeft import model_card
from weatherpeft.adapters import load_adapter, read_adapter_config
from weatherpeft.backbones import Backbone, backbone_statistics, load_backbone
from weatherpeft.data import builtin, wb2
from weatherpeft.data.paths import CHECKOUT
from weatherpeft.finetune import build_task, task_backbone
from weatherpeft.plots import save_task_map
from weatherpeft.results import write_results
from weatherpeft.serving import MultiAdapterModel
from weatherpeft.tasks.forecasting import ForecastingTask
from weatherpeft.tasks.grid import backbone_grid

__all__ = ["AdapterScores", "EvaluateConfig", "checkpoint_card", "evaluate_adapters",
           "evaluation_task", "named_adapters", "score_checkpoint"]

log = logging.getLogger("weatherpeft")


@dataclass
class EvaluateConfig:
    """Which model to score on which task and data.

    Without ``adapter`` and ``task``: the backbone checkpoint's forecast skill on ``store``
    against persistence and climatology (``write_card`` makes its model card). With an
    ``adapter`` (or a ``task``): the fine-tuned model's test-split scores on its task, with the
    task's references, written to ``out`` as metrics.json and metrics.md, plus maps of
    ``map_variable`` for test sample ``map_sample``. Several adapters (comma-separated, each
    ``PATH`` or ``NAME=PATH``) are loaded onto one backbone and scored in turn, each into
    ``out/NAME``.
    """

    checkpoint: str = "models/aurora-tiny"
    adapter: str = field(default="", metadata={
        "help": "adapter folder(s): PATH, or several as NAME=PATH,NAME=PATH (one backbone, "
                "each scored into OUT/NAME; a NAME defaults to the folder's name, or its "
                "parent's for a folder named 'adapter')"})
    task: str = ""  # default: the adapter's task
    data: str = ""  # the task's data (default: its built-in store)
    task_options: str = field(default="", metadata={
        "json": True, "help": "the task's options as a JSON object (default: the adapter's; "
                              "`weatherpeft tasks` lists them)"})
    out: str = ""
    map_variable: str = ""
    map_sample: int = 0
    store: str = ""  # default: the built-in downstream year
    reference_store: str = "data/pretraining/pretraining.zarr"  # climatology from its years
    reference_start: str = "2000-01-01T06:00"
    reference_end: str = "2002-12-31T18:00"
    stride: int = 8  # score every stride-th initialisation (8 = every 48 h)
    batch_size: int = 4
    write_card: bool = False
    refresh_card: str = ""  # re-measure the card's model rows; the text says why (kept in the card)
    threads: int = 1


# --------------------------------------------------------------------------------------
# A backbone checkpoint: forecast skill and its model card
# --------------------------------------------------------------------------------------


def evaluation_task(cfg: EvaluateConfig, stats) -> tuple[ForecastingTask, bool]:
    """A forecasting task whose test period is the store and whose climatology is the reference
    years; and whether the reference store was found (without it: no persistence/climatology)."""
    target = wb2.open_store(cfg.store or builtin.store_path("downstream"))
    start, end = str(target.time.values[0]), str(target.time.values[-1])
    reference = Path(cfg.reference_store)  # as every path: the working folder, else the checkout
    if not reference.exists() and not reference.is_absolute():
        reference = CHECKOUT / reference if (CHECKOUT / reference).exists() else reference
    if reference.exists():
        past = wb2.open_store(reference)
        past = past.sel(time=past.time < target.time.values[0])  # only the years before the evaluated store
        dynamic = [n for n, v in target.data_vars.items() if "time" in v.dims]
        world = xr.concat([past[dynamic], target[dynamic]], dim="time", data_vars="all", join="exact")
        world = world.merge(target.drop_vars(dynamic + ["time"]), join="exact")
        periods = {"train": (cfg.reference_start, cfg.reference_end), "val": (start, end), "test": (start, end)}
        return ForecastingTask(world, periods, stats), True
    log.warning("reference store %s not found: scoring without persistence/climatology", reference)
    return ForecastingTask(target, {"train": (start, end), "val": (start, end), "test": (start, end)}, stats), False


def _checkpoint_and_task(cfg: EvaluateConfig) -> tuple[Backbone, ForecastingTask, bool]:
    backbone = load_backbone(cfg.checkpoint)
    return (backbone, *evaluation_task(cfg, backbone.stats))


def checkpoint_card(cfg: EvaluateConfig) -> dict:
    """The checkpoint's model card, re-measured (``cfg.refresh_card``: its model rows) or made
    anew (``cfg.write_card``), written into the checkpoint folder; returns it."""
    backbone, task, references = _checkpoint_and_task(cfg)
    folder = Path(cfg.checkpoint)
    if cfg.refresh_card:
        card = model_card.refresh_model_rows(model_card.load_card(folder), backbone, task,
                                             note=cfg.refresh_card)
    else:
        if not references:
            raise ValueError("a model card needs the reference store for persistence and climatology")
        card = model_card.build_card(backbone, task, stride=cfg.stride,
                                     about=model_card.pretrained_about(backbone, folder))
    model_card.write_card(card, folder)
    return card


def score_checkpoint(cfg: EvaluateConfig) -> dict[str, float]:
    """The checkpoint's roll-out RMSE on every ``cfg.stride``-th initialisation of the store,
    with persistence and climatology where the reference store is found."""
    backbone, task, references = _checkpoint_and_task(cfg)
    return model_card.score(backbone, task, model_card.evaluation_windows(task, cfg.stride),
                            batch_size=cfg.batch_size, references=references)


# --------------------------------------------------------------------------------------
# Fine-tuned models on their task
# --------------------------------------------------------------------------------------


@dataclass
class AdapterScores:
    """One adapter's test-split scores, and where they (and its map) were written."""

    name: str  # "" for a single adapter (or none)
    path: Path | str
    scores: dict[str, float]
    seconds: float
    json_path: Path | None = None
    map_path: Path | None = None


def evaluate_adapters(cfg: EvaluateConfig) -> Iterator[AdapterScores]:
    """Test-split scores of a (fine-tuned) model on its task, adapter by adapter as each is
    scored; JSON, Markdown and maps in ``cfg.out`` (``cfg.out/NAME`` for several adapters)."""
    adapters = named_adapters(cfg.adapter)
    task_name, options = _task_of(cfg, [read_adapter_config(path) for _, path in adapters])
    task = build_task(task_name, backbone_statistics(cfg.checkpoint), cfg.data, options,
                      grid=backbone_grid(cfg.checkpoint))
    model = _adapted_model(cfg.checkpoint, task, adapters).eval()
    runs = adapters if len(adapters) > 1 else [("", adapters[0][1] if adapters else "")]
    for name, path in runs:
        if name:
            model.set_adapter(name)
        start = time.perf_counter()
        with torch.no_grad():
            scores = task.evaluate(model, task.dataloader("test", cfg.batch_size))
        result = AdapterScores(name, path, scores, time.perf_counter() - start)
        if cfg.out:
            out = str(Path(cfg.out) / name) if name else cfg.out
            about = {"task": task_name, "checkpoint": cfg.checkpoint, "adapter": str(path),
                     "data": cfg.data or "built-in", "evaluate_seconds": result.seconds}
            result.json_path, _ = write_results(scores, out, about)
            if cfg.map_variable:
                result.map_path = _write_map(model, task, replace(cfg, out=out))
        yield result


def _adapted_model(checkpoint: str, task, adapters: list[tuple[str, Path]]) -> torch.nn.Module:
    """The checkpoint with the task's heads and one adapter loaded, or several on one backbone."""
    model = task_backbone(checkpoint, task)
    if len(adapters) == 1:
        return load_adapter(adapters[0][1], model)
    if adapters:
        model = MultiAdapterModel(model)
        for name, path in adapters:
            model.add_adapter(name, path)
    return model


def _task_of(cfg: EvaluateConfig, saved: list[dict]) -> tuple[str, dict | None]:
    """The task name and options to score on: ``cfg``'s, else the adapters' (which must agree)."""
    saved_tasks = {config.get("task") for config in saved}
    if len(saved_tasks) > 1 and not cfg.task:
        raise ValueError(f"the adapters were trained for different tasks "
                         f"{sorted(map(str, saved_tasks))}: score them on one with --task")
    task_name = cfg.task or next(iter(saved_tasks), None) or "forecasting"
    saved_options = {json.dumps(config.get("task_options"), sort_keys=True) for config in saved
                     if config.get("task") == task_name}
    if len(saved_options) > 1 and not cfg.task_options:
        raise ValueError("the adapters were trained with different task options: score them on "
                         "one setting with --task-options")
    return task_name, cfg.task_options or (json.loads(saved_options.pop()) if saved_options else None)


def named_adapters(text: str) -> list[tuple[str, Path]]:
    """``--adapter``'s (name, folder) pairs: ``PATH`` or ``NAME=PATH``, comma-separated; a name
    defaults to the folder's name (its parent's for a folder named ``adapter``)."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, path = item.rpartition("=")
        folder = Path(path)
        pairs.append((name or (folder.resolve().parent.name if folder.name == "adapter"
                               else folder.name), folder))
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--adapter: the name(s) {repeated} are given to more than one adapter; "
                         "name each as NAME=PATH")
    return pairs


def _write_map(model, task, cfg: EvaluateConfig) -> Path:
    """Prediction, truth and error of ``cfg.map_variable`` for test sample ``cfg.map_sample``."""
    path = Path(cfg.out) / f"map_{cfg.map_variable}_sample{cfg.map_sample}.png"
    return save_task_map(model, task, cfg.map_variable, path, sample=cfg.map_sample)
