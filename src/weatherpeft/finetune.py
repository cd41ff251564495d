"""One fine-tuning run: backbone → method at a budget → Trainer → adapter file and scores.

Shared by ``weatherpeft finetune`` and the benchmark. The run folder holds the Trainer's
checkpoints and metric log, ``adapter/`` (see :mod:`weatherpeft.adapters`) and
``result.json`` (parameter report, adapter bytes, timings, validation and test scores).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from weatherpeft import distributed
from weatherpeft.adapters import save_adapter
from weatherpeft.atomic import write_json
from weatherpeft.backbones import Backbone, backbone_statistics, load_backbone
from weatherpeft.backbones.base import ENCODER_DECODER_PROTOCOLS, check_encoder_decoder
from weatherpeft.methods.base import check_budget
from weatherpeft.methods.registry import apply_method, get_method
from weatherpeft.methods.weatherpeft import with_paper_prompt_length
from weatherpeft.tasks import Task, build_task, parse_task_options
from weatherpeft.tasks.grid import backbone_grid, check_aurora_variables
from weatherpeft.training import TrainConfig, Trainer, seed_everything

__all__ = ["FinetuneConfig", "build_task", "parse_options", "run_finetune", "task_backbone"]

@dataclass
class FinetuneConfig:
    """What to fine-tune, how, and on which task.

    ``options``: the method's options as a JSON object (``weatherpeft methods`` lists them).
    ``data``: the task's data (default: its store in the built-in world; post-processing takes
    ``ENSEMBLE,TRUTH``, the ensemble store and the analysis store that verifies it); a
    relative path is found from the working folder, else the checkout (as ``backbone``).
    ``task_options``: the task's options as a JSON object (``weatherpeft tasks`` lists them).
    ``new_lr``: the learning rate of what the method adds and of the task heads (0: the
    Trainer's ``lr``, which entries of pretrained weights always get).
    ``encoder_decoder``: the protocol, "frozen" (default) or "train" (the authors': the
    backbone's encoder/decoder trained whole by every method, outside the budget, stored in
    the adapter); ``encoder_decoder_lr``: their learning rate under "train" (0: ``lr``).
    """

    task: str = "forecasting"
    backbone: str = "models/aurora-tiny"
    method: str = "weatherpeft"
    budget: float = 0.003
    options: str = "{}"
    data: str = ""
    task_options: str = field(default="{}", metadata={
        "json": True,
        "help": "the task's options as a JSON object (a mapping in YAML), e.g. '{\"lead_hours\": "
                "24, \"static_vars\": [\"lsm\"], \"periods\": {\"train\": [\"2003-01-01\", "
                "\"2003-06-30\"], \"val\": [...], \"test\": [...]}, \"region\": [south, north, "
                "west, east]}'; `weatherpeft tasks` lists each task's options"})
    evaluate: bool = True
    threads: int = 1
    new_lr: float = 0.0
    encoder_decoder: str = field(default="frozen", metadata={
        "choices": ENCODER_DECODER_PROTOCOLS,
        "help": "the protocol for the backbone's encoder/decoder (Aurora: the Perceiver encoder "
                "and decoder, patch embeddings and output heads; Prithvi-WxC: patch "
                "embeddings, time embeddings and unembedding). 'frozen': ordinary pretrained "
                "parameters, frozen unless the method trains them, inside the budget (this "
                "package's whole-model protocol). 'train': the paper's protocol, trained whole "
                "by every method (so 'frozen' becomes 'encoder/decoder only'), outside the "
                "budget and the selection pools, reported in their own column and stored in "
                "the adapter"})
    encoder_decoder_lr: float = field(default=0.0, metadata={
        "help": "learning rate of the encoder/decoder under --encoder-decoder train (0: --lr, "
                "as other pretrained weights)"})

    def __post_init__(self) -> None:
        for name in ("new_lr", "encoder_decoder_lr"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"FinetuneConfig.{name} must be ≥ 0 (0: the Trainer's lr), got {value}")
        check_encoder_decoder(self.encoder_decoder)


def parse_options(text: str | Mapping[str, Any]) -> dict[str, Any]:
    """Method options from a JSON object (or a mapping, returned as a dict)."""
    if isinstance(text, Mapping):
        return dict(text)
    try:
        options = json.loads(text or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"--options must be a JSON object, e.g. '{{\"gamma\": 0.1}}': {error}") from error
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {type(options).__name__}")
    return options


def task_backbone(path: str, task: Task) -> Backbone:
    """The backbone checkpoint at ``path`` with heads for the task's new variables and the task's
    statistics (which extend the backbone's); an Aurora backbone's needs are checked first."""
    variables = task.variables
    if backbone_grid(path) is not None:
        check_aurora_variables(variables.surf_vars, variables.atmos_vars, variables.static_vars,
                               f"task '{task.name}'")
    return load_backbone(path, extra_surf_vars=variables.new_surf_vars,
                         extra_atmos_vars=variables.new_atmos_vars, stats=task.stats)


def run_finetune(config: FinetuneConfig, train: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Fine-tune, save the adapter into ``train.out_dir``/adapter, score; returns result.json's content."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    options = with_paper_prompt_length(config.method, parse_options(config.options), config.task)
    check_budget(config.budget)  # bad requests fail now, not after the data are read
    get_method(config.method).make_options(options)
    task_options = parse_task_options(config.task, config.task_options)
    seed_everything(train.seed)
    task = build_task(config.task, backbone_statistics(config.backbone), config.data, task_options,
                      grid=backbone_grid(config.backbone))
    backbone = task_backbone(config.backbone, task)
    adaptation = apply_method(config.method, backbone, config.budget, options,
                              encoder_decoder=config.encoder_decoder)
    if not any(p.requires_grad for p in adaptation.parameters()):
        return _score_untrained(config, train, task, adaptation)
    groups = adaptation.param_groups(train.weight_decay, new_lr=config.new_lr or None,
                                     encoder_decoder_lr=config.encoder_decoder_lr or None)
    trainer = Trainer(adaptation, task, train, hooks=adaptation.hooks, param_groups=groups)
    start = time.perf_counter()
    summary = trainer.fit(resume=resume)
    seconds = time.perf_counter() - start
    out = Path(train.out_dir)
    # Distributed: rank 0 writes; under FSDP from an unsharded copy (gathering is collective).
    saved = distributed.consolidated_copy(adaptation, lambda: apply_method(
        config.method, task_backbone(config.backbone, task), config.budget, options,
        encoder_decoder=config.encoder_decoder))
    result: dict[str, Any] = {"finetune": asdict(config), "fit": summary, "fit_seconds": seconds}
    if distributed.is_main():
        adapter = save_adapter(saved, out / "adapter",
                               extra={"task": config.task, "task_options": task_options,
                                      "train": train.to_dict()})
        result.update(report=saved.report().as_dict(),
                      adapter_bytes=(adapter / "adapter.safetensors").stat().st_size)
    if config.evaluate:
        result["val_loss"] = trainer.validate()
        result["test"] = trainer.evaluate(split="test")
    if distributed.is_main():
        write_json(out / "result.json", result)
    return result


def _score_untrained(config: FinetuneConfig, train: TrainConfig, task: Task, adaptation) -> dict[str, Any]:
    """A method that leaves nothing to train (``frozen`` on a task without new variables):
    the loaded backbone is scored as it is; no adapter is written."""
    result: dict[str, Any] = {"finetune": asdict(config), "fit": {"step": 0.0}, "fit_seconds": 0.0,
                              "report": adaptation.report().as_dict(), "adapter_bytes": 0}
    if config.evaluate:
        loader = task.dataloader("test", train.batch_size)
        with torch.no_grad():
            result["test"] = task.evaluate(adaptation, loader)
    if distributed.is_main():
        write_json(Path(train.out_dir) / "result.json", result)
    return result
