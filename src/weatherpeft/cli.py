"""The ``weatherpeft`` command line: ``data generate|check|info|card``, ``pretrain``, ``evaluate``,
``finetune``, ``benchmark``, ``adapter info|merge``, ``methods``, ``demo``."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

from weatherpeft.atomic import write_json
from weatherpeft.config import add_dataclass_arguments, build_config

log = logging.getLogger("weatherpeft")


def _forecast_layout(ds) -> bool:
    return "prediction_timedelta" in ds.dims or "number" in ds.dims


def _spec_for_store(ds):
    """A SampleSpec of every variable of a canonical analysis store that a sample can hold (one
    with an Aurora name, on time, level, latitude, longitude), and the names of the others."""
    from weatherpeft.data.wb2 import AURORA_NAMES, SampleSpec

    usable = {n: v for n, v in ds.data_vars.items()
              if n in AURORA_NAMES and set(v.dims) <= {"time", "level", "latitude", "longitude"}}
    surface = tuple(n for n, v in usable.items() if "time" in v.dims and "level" not in v.dims)
    atmospheric = tuple(n for n, v in usable.items() if "time" in v.dims and "level" in v.dims)
    static = tuple(n for n, v in usable.items() if "time" not in v.dims)
    spec = SampleSpec(surf_vars=surface, atmos_vars=atmospheric, static_vars=static, history=1,
                      lead=timedelta(0), in_memory=False)
    return spec, sorted(set(map(str, ds.data_vars)) - set(usable))


def _check_forecast_store(ds, path: Path) -> str:
    """Every field of an ensemble forecast store, init by init: readable and plausible."""
    from weatherpeft.data import wb2
    from weatherpeft.data.readers import plausible_range

    for name, variable in ds.data_vars.items():
        bounds = plausible_range(name, variable.attrs.get("units"))
        timed = "time" in variable.dims
        for index in range(ds.sizes["time"] if timed else 1):
            field = variable.isel(time=index) if timed else variable
            init = f"init {str(ds.time.values[index])[:16]} (time index {index})" if timed else "its field"
            found = wb2.find_bad_value(wb2.read_array(field, str(path), init), bounds)
            if found is not None:
                where, what = found
                raise wb2.DataError(f"{what} in variable '{name}' at {init}, "
                                    f"{wb2.describe_index(field, where)}, in {path}")
    return f"{ds.sizes['time']} inits, {ds.sizes.get('number', 1)} members, all finite and plausible"


def check_store(path: Path) -> str:
    """Validate one store (files, grid, times, finite and plausible values); returns a one-line
    summary, or raises :class:`~weatherpeft.data.wb2.DataError`."""
    from weatherpeft.data import wb2

    ds = wb2.open_store(path)
    if _forecast_layout(ds):
        return _check_forecast_store(ds, path)
    spec, ignored = _spec_for_store(ds)
    report = wb2.validate(ds, spec)
    summary = (f"{report.n_times} times {str(report.first)[:16]} … {str(report.last)[:16]}, "
               f"step {report.step}, all finite and plausible")
    return summary + (f"; not checked (no Aurora name): {', '.join(ignored)}" if ignored else "")


def cmd_data_check(args) -> int:
    from weatherpeft.data import manifest
    from weatherpeft.data.wb2 import DataError

    path = Path(args.path)
    if (path / manifest.MANIFEST_NAME).is_file():
        problems = manifest.verify_manifest(path)
        if problems:
            for problem in problems:
                print(f"manifest: {problem}")
            return 1
        print(f"manifest: {len(json.loads((path / manifest.MANIFEST_NAME).read_text())['files'])} files match")
        stores = sorted(p for p in path.iterdir() if p.suffix == ".zarr")
    else:
        stores = [path]
    failed = False
    for store in stores:
        try:
            print(f"{store.name}: {check_store(store)}")
        except DataError as error:
            print(f"weatherpeft: error: {error}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def describe_store(path: Path) -> str:
    """Variables, levels, grid and time range of a store, a few lines."""
    from weatherpeft.data import wb2

    ds = wb2.open_store(path)
    lines = [f"{path}"]
    if "time" in ds.dims:
        lines.append(f"  time: {ds.sizes['time']} × {str(ds.time.values[0])[:16]} … {str(ds.time.values[-1])[:16]}")
    if "level" in ds.dims:
        lines.append(f"  level (hPa): {[int(v) for v in ds.level.values]}")
    lat, lon = ds.latitude.values, ds.longitude.values
    lines.append(f"  grid: {len(lon)}×{len(lat)} lon×lat, lat {lat[0]:.4g}…{lat[-1]:.4g}, "
                 f"lon {lon[0]:.4g}…{lon[-1]:.4g}")
    for dim in ("prediction_timedelta", "number"):
        if dim in ds.dims:
            lines.append(f"  {dim}: {ds.sizes[dim]}")
    lines.append("  variables: " + ", ".join(sorted(ds.data_vars)))
    return "\n".join(lines)


def cmd_data_info(args) -> int:
    print(describe_store(Path(args.path)))
    return 0


def cmd_data_generate(args) -> int:
    from weatherpeft.data.simulate import SimulationConfig, generate

    cfg = build_config(SimulationConfig, args)
    timings = generate(cfg)
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return 0


def cmd_data_card(args) -> int:
    from weatherpeft.data.builtin import builtin_dir
    from weatherpeft.data.simulate import write_data_card

    card = write_data_card(Path(args.path) if args.path else builtin_dir())
    print(json.dumps(card, indent=1))
    return 0


def cmd_demo(args) -> int:
    from weatherpeft.demo import DemoConfig, run_demo

    return run_demo(build_config(DemoConfig, args))


@dataclass
class PretrainConfig:
    """What to pretrain on, and where the finished backbone goes."""

    store: str = "data/pretraining/pretraining.zarr"
    preset: str = "aurora-tiny"  # or "prithvi-tiny" (any preset of weatherpeft.backbones)
    train_start: str = "2000-01-01T06:00"
    train_end: str = "2002-11-30T18:00"
    val_start: str = "2002-12-01T00:00"
    val_end: str = "2002-12-31T18:00"
    export: str = "models/aurora-tiny"
    loss_scales: str = "tendency"  # "tendency" (errors / RMS 6-h change) or "state" (errors / std)
    threads: int = 1  # torch threads; 1 is fastest on a shared 2-core machine


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


def _set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def cmd_pretrain(args) -> int:
    from weatherpeft.backbones import PRITHVI_PRESETS, build_backbone
    from weatherpeft.tasks.forecasting import ForecastingTask
    from weatherpeft.train import TrainConfig, Trainer, seed_everything

    pretrain_keys = tuple(f.name for f in fields(PretrainConfig))
    train_keys = tuple(f.name for f in fields(TrainConfig))
    cfg = build_config(PretrainConfig, args, shared_keys=train_keys)
    train_cfg = build_config(TrainConfig, args, shared_keys=pretrain_keys)
    _set_threads(cfg.threads)
    periods = {"train": (cfg.train_start, cfg.train_end), "val": (cfg.val_start, cfg.val_end),
               "test": (cfg.val_start, cfg.val_end)}
    # statistics from the training period; roll-out skill is `weatherpeft evaluate`'s job
    if cfg.loss_scales not in ("tendency", "state"):
        raise ValueError(f"--loss-scales must be 'tendency' or 'state', got {cfg.loss_scales!r}")
    from weatherpeft.tasks.grid import preset_grid

    task = ForecastingTask(cfg.store, periods, lead_steps=(1,),
                           loss_scales="tendency" if cfg.loss_scales == "tendency" else None,
                           grid=preset_grid(cfg.preset))
    stats = task.stats
    seed_everything(train_cfg.seed)
    extra = {}
    if cfg.preset in PRITHVI_PRESETS:
        # Prithvi de-normalises its output per channel; with the temporal residual the analog
        # of its published anomaly scales is the RMS 6-h change the task measured.
        extra["output_scales"] = task.loss_scales
    backbone = build_backbone(cfg.preset, stats=stats, levels=task.variables.levels, random_init=True,
                              activation_checkpointing=train_cfg.activation_checkpointing, **extra)
    trainer = Trainer(backbone, task, train_cfg)
    start = time.perf_counter()
    summary = trainer.fit(resume=args.resume)
    summary["wall_seconds_this_invocation"] = time.perf_counter() - start
    summary["resumed"] = bool(args.resume)
    from weatherpeft import distributed  # under torchrun rank 0 writes; FSDP: from a gathered copy
    backbone = distributed.consolidated_copy(backbone, lambda: build_backbone(
        cfg.preset, stats=stats, levels=task.variables.levels, random_init=True, **extra))
    if not distributed.is_main():
        return 0
    backbone.save_checkpoint(cfg.export)
    about = {"pretraining": {**asdict(cfg), **asdict(train_cfg)}, "fit": summary}
    write_json(Path(cfg.export) / "pretraining.json", about)
    print(f"pretrained {cfg.preset} saved to {cfg.export}")
    return 0


def evaluation_task(cfg: EvaluateConfig, stats):
    """A forecasting task whose test period is the store and whose climatology is the reference years."""
    import xarray as xr

    from weatherpeft.data import builtin, wb2
    from weatherpeft.tasks.forecasting import ForecastingTask

    target = wb2.open_store(cfg.store or builtin.store_path("downstream"))
    start, end = str(target.time.values[0]), str(target.time.values[-1])
    from weatherpeft.data.paths import CHECKOUT

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


def _card_facts(backbone, about: dict) -> dict:
    """The few lines a reader of the card wants first."""
    facts = {"parameters": f"{sum(p.numel() for p in backbone.parameters()):,}"}
    run, fit = about.get("pretraining"), about.get("fit")
    if run and fit:
        facts["pretraining data"] = (f"{run['store']} {run['train_start']} … {run['train_end']} "
                                     f"(validation {run['val_start']} … {run['val_end']})")
        facts["optimisation"] = (f"{int(fit['step'])} AdamW steps × batch {run['batch_size']}, lr {run['lr']} "
                                 f"(warm-up {run['warmup_steps']}, cosine to ×{run['min_lr_ratio']}), "
                                 f"weight decay {run['weight_decay']}, clip {run['grad_clip']}")
        if "wall_seconds_this_invocation" in fit:
            facts["wall time"] = (f"{fit['wall_seconds_this_invocation'] / 60:.1f} min on {run['threads']} CPU "
                                  "thread(s)" + (" (last invocation of a resumed run)" if fit.get("resumed") else ""))
        facts["final training loss / validation loss"] = \
            f"{fit.get('loss', float('nan')):.4f} / {fit.get('val_loss', float('nan')):.4f}"
    return facts


def cmd_evaluate(args) -> int:
    from weatherpeft import model_card
    from weatherpeft.backbones import load_backbone

    cfg = build_config(EvaluateConfig, args)
    _set_threads(cfg.threads)
    if cfg.adapter or cfg.task:
        return _evaluate_on_task(cfg)
    backbone = load_backbone(cfg.checkpoint)
    task, references = evaluation_task(cfg, backbone.stats)
    if cfg.refresh_card:
        card = model_card.refresh_model_rows(model_card.load_card(Path(cfg.checkpoint)), backbone,
                                             task, note=cfg.refresh_card)
        model_card.write_card(card, Path(cfg.checkpoint))
        print(model_card.markdown(card))
        return 0
    if cfg.write_card:
        if not references:
            raise ValueError("a model card needs the reference store for persistence and climatology")
        pretraining_path = Path(cfg.checkpoint) / "pretraining.json"
        about = json.loads(pretraining_path.read_text()) if pretraining_path.exists() else {}
        about.update(name=f"{backbone.config['preset']} pretrained on the built-in world",
                     summary="An Aurora-architecture model (microsoft-aurora's own Aurora class, use_lora=False) "
                             "pretrained on 6-hour forecasting of every variable; the downstream tasks use "
                             "years it never saw. Scores are roll-outs on the evaluated store.",
                     backbone=backbone.config, fingerprint=backbone.fingerprint(),
                     facts=_card_facts(backbone, about))
        card = model_card.build_card(backbone, task, stride=cfg.stride, about=about)
        model_card.write_card(card, Path(cfg.checkpoint))
        print(model_card.markdown(card))
        return 0
    scores = model_card.score(backbone, task, model_card.evaluation_windows(task, cfg.stride),
                              batch_size=cfg.batch_size, references=references)
    print(json.dumps(scores, indent=1, sort_keys=True))
    return 0


def cmd_finetune(args) -> int:
    from weatherpeft.finetune import FinetuneConfig, run_finetune
    from weatherpeft.train import TrainConfig

    finetune_keys = tuple(f.name for f in fields(FinetuneConfig))
    train_keys = tuple(f.name for f in fields(TrainConfig))
    cfg = build_config(FinetuneConfig, args, shared_keys=train_keys)
    train_cfg = build_config(TrainConfig, args, shared_keys=finetune_keys)
    result = run_finetune(cfg, train_cfg, resume=args.resume)
    from weatherpeft.distributed import is_main
    if not is_main():  # under torchrun, rank 0 reports
        return 0
    print(json.dumps({k: result[k] for k in ("report", "adapter_bytes", "fit_seconds", "val_loss", "test")
                      if k in result}, indent=1))
    print(f"adapter saved to {Path(train_cfg.out_dir) / 'adapter'}")
    return 0


def cmd_benchmark(args) -> int:
    from weatherpeft.benchmark import BenchmarkConfig, run_benchmark

    config = build_config(BenchmarkConfig, args)
    _set_threads(1)
    records = run_benchmark(config)
    from weatherpeft.distributed import is_main
    if not is_main() or config.dry_run:
        return 0
    out = Path(config.out)
    crashed = [r for r in records if r["crashed"]]
    print(f"{len(records)} runs: {out / 'benchmark.json'}, {out / 'benchmark.md'}, "
          f"{out / 'learning_curves.png'}, {out}/quality_vs_stored*.png")
    for record in crashed:
        print(f"failed: {record['task']} {record['method']} budget {record['budget']}: {record['error']}")
    return 1 if crashed else 0


def cmd_adapter_info(args) -> int:
    from weatherpeft.adapters import adapter_info

    print(json.dumps(adapter_info(args.path), indent=1))
    return 0


def cmd_adapter_merge(args) -> int:
    from weatherpeft.adapters import load_adapter, save_merged
    from weatherpeft.backbones import load_backbone

    adaptation = load_adapter(args.path, load_backbone(args.backbone), force=args.force)
    out = save_merged(adaptation, args.out)
    print(f"merged model written to {out}")
    return 0


def cmd_tasks(args) -> int:
    from weatherpeft.tasks import ENTRY_POINT_GROUP, describe_tasks

    print(f"tasks (finetune/evaluate --task NAME --data PATH --task-options JSON; benchmark --tasks "
          f"NAME); outside tasks: weatherpeft.tasks.register_task or the entry-point group "
          f"'{ENTRY_POINT_GROUP}'\n")
    for row in describe_tasks():
        print(f"{row['name']:<22} {row['summary']}")
        for key, (kind, default) in row["options"].items():
            print(f"{'':<22}   {key}: {kind} (default {json.dumps(default)})")
    return 0


def cmd_methods(args) -> int:
    from weatherpeft.methods.base import describe_methods

    rows = describe_methods(args.backbone, args.budget, args.encoder_decoder)
    print(f"encoder_decoder={args.encoder_decoder} (--encoder-decoder frozen|train; finetune and "
          "benchmark take it too): 'frozen' keeps the encoder/decoder as pretrained weights inside "
          "the budget; 'train' (the paper's protocol) trains them whole under every method, outside "
          "the budget, counted apart\n")
    for row in rows:
        size = (f"trains {row['trainable']:,} entries per step ({row['trainable_fraction']:.3%}), "
                f"stores {row['stored']:,} ({row['stored_fraction']:.3%}) of {row['pretrained']:,}; "
                f"head {row['head']:,}; encoder/decoder trained whole {row['encoder_decoder']:,}"
                if "trainable" in row else f"cannot: {row['error']}")
        print(f"{row['name']:<14} {row['summary']}\n{'':<14} at budget {args.budget}: {size}")
        if row.get("resolved"):
            print(f"{'':<14} sized as: {json.dumps(row['resolved'])}")
        print(f"{'':<14} options: {row['options']}")
    return 0


def _evaluate_on_task(cfg: EvaluateConfig) -> int:
    """Test-split scores of a (fine-tuned) model on its task; JSON, Markdown and maps in cfg.out."""
    import torch

    from weatherpeft.adapters import load_adapter, read_adapter_config
    from weatherpeft.backbones import backbone_statistics
    from weatherpeft.finetune import build_task, task_backbone
    from weatherpeft.results import results_markdown, write_results
    from weatherpeft.tasks.grid import backbone_grid

    adapters = _named_adapters(cfg.adapter)
    saved = [read_adapter_config(path) for _, path in adapters]
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
    options = cfg.task_options or (json.loads(saved_options.pop()) if saved_options else None)
    task = build_task(task_name, backbone_statistics(cfg.checkpoint), cfg.data, options,
                      grid=backbone_grid(cfg.checkpoint))
    model = task_backbone(cfg.checkpoint, task)
    if len(adapters) == 1:
        model = load_adapter(adapters[0][1], model)
    elif adapters:
        from weatherpeft.serving import MultiAdapterModel

        model = MultiAdapterModel(model)
        for name, path in adapters:
            model.add_adapter(name, path)
    model.eval()
    runs = adapters if len(adapters) > 1 else [("", adapters[0][1] if adapters else "")]
    for name, path in runs:
        if name:
            model.set_adapter(name)
            print(f"## adapter {name} ({path})")
        start = time.perf_counter()
        with torch.no_grad():
            scores = task.evaluate(model, task.dataloader("test", cfg.batch_size))
        seconds = time.perf_counter() - start
        print(results_markdown(scores))
        if cfg.out:
            out = str(Path(cfg.out) / name) if name else cfg.out
            about = {"task": task_name, "checkpoint": cfg.checkpoint, "adapter": str(path),
                     "data": cfg.data or "built-in", "evaluate_seconds": seconds}
            json_path, _ = write_results(scores, out, about)
            print(f"scores written to {json_path} and metrics.md")
            if cfg.map_variable:
                print(f"map written to {_write_map(model, task, replace(cfg, out=out))}")
    return 0


def _named_adapters(text: str) -> list[tuple[str, Path]]:
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
    from weatherpeft.plots import save_task_map

    path = Path(cfg.out) / f"map_{cfg.map_variable}_sample{cfg.map_sample}.png"
    return save_task_map(model, task, cfg.map_variable, path, sample=cfg.map_sample)


def build_parser() -> argparse.ArgumentParser:
    from weatherpeft.data.simulate import SimulationConfig

    parser = argparse.ArgumentParser(prog="weatherpeft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="the built-in world and WeatherBench2-layout stores")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    generate = data_commands.add_parser(
        "generate", help="regenerate the built-in world with the jcm SPEEDY GCM (needs weatherpeft[simulate])",
        description="Spin up a T42L8 SPEEDY-physics run from rest, then sample it 6-hourly into a pretraining "
                    "archive (first years, not committed), a downstream archive (the next year, global 5.625°), "
                    "a regional 2.8125° archive and a T21 10-member ensemble, all in WeatherBench2's layout. "
                    "A reduced run for testing: --spinup-days 1 --pretraining-days 2 --downstream-days 3 "
                    "--truncation 21 --ensemble-members 2 --out /tmp/world --pretraining-out /tmp/world-pre")
    add_dataclass_arguments(generate, SimulationConfig)
    generate.set_defaults(func=cmd_data_generate)
    check = data_commands.add_parser("check", help="validate a store, or a folder with a manifest (checksums too)")
    check.add_argument("path", type=Path)
    check.set_defaults(func=cmd_data_check)
    info = data_commands.add_parser("info", help="describe a store: variables, levels, grid, times")
    info.add_argument("path", type=Path)
    info.set_defaults(func=cmd_data_info)
    card = data_commands.add_parser("card", help="measure the realism numbers of a world folder (data_card.json)")
    card.add_argument("path", type=Path, nargs="?", help="folder with downstream.zarr (default: built-in)")
    card.set_defaults(func=cmd_data_card)

    from weatherpeft.train import TrainConfig

    pretrain = commands.add_parser("pretrain", help="pretrain a backbone on forecasting (6 h ahead)")
    add_dataclass_arguments(pretrain, PretrainConfig)
    add_dataclass_arguments(pretrain, TrainConfig, with_config_flag=False)
    pretrain.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    pretrain.set_defaults(func=cmd_pretrain)
    evaluate = commands.add_parser("evaluate", help="forecast skill of a checkpoint vs persistence and climatology")
    add_dataclass_arguments(evaluate, EvaluateConfig)
    evaluate.set_defaults(func=cmd_evaluate)

    from weatherpeft.finetune import FinetuneConfig

    finetune = commands.add_parser("finetune", help="fine-tune a backbone on a task with a method at a budget")
    add_dataclass_arguments(finetune, FinetuneConfig)
    add_dataclass_arguments(finetune, TrainConfig, with_config_flag=False)
    finetune.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    finetune.set_defaults(func=cmd_finetune)

    from weatherpeft.benchmark import BenchmarkConfig

    benchmark = commands.add_parser(
        "benchmark", help="every method × task × budget, trained and scored alike: JSON, Markdown, plots",
        description="Profiles: quick (minutes: full, frozen, LoRA, WeatherPEFT at 0.3%% under the "
                    "paper's protocol, both accountings), standard (under an hour on 2 CPU cores: the "
                    "methods the paper's claims and ablation name, 0.3%% and 4%%, both accountings, "
                    "learning rates chosen on validation), paper (about 2 hours in the background: "
                    "every method of the paper's tables, 2 seeds, both protocols). --dry-run prints "
                    "the runs and the estimated wall time. Other flags narrow or override the "
                    "profile. Under torchrun every rank runs the grid with --strategy ddp|fsdp.")
    add_dataclass_arguments(benchmark, BenchmarkConfig)
    benchmark.set_defaults(func=cmd_benchmark)

    adapter = commands.add_parser("adapter", help="inspect or merge an adapter folder")
    adapter_commands = adapter.add_subparsers(dest="adapter_command", required=True)
    info = adapter_commands.add_parser("info", help="method, budget, parameter report, sizes, backbone")
    info.add_argument("path", type=Path)
    info.set_defaults(func=cmd_adapter_info)
    merge = adapter_commands.add_parser("merge", help="fold an adapter into its backbone for deployment")
    merge.add_argument("path", type=Path, help="adapter folder")
    merge.add_argument("--backbone", default="models/aurora-tiny", help="the backbone checkpoint it was trained on")
    merge.add_argument("--out", type=Path, required=True, help="folder for the merged model")
    merge.add_argument("--force", action="store_true", help="load even if the backbone fingerprint differs")
    merge.set_defaults(func=cmd_adapter_merge)

    tasks = commands.add_parser("tasks", help="list tasks (built-in, registered, plugins) and their options")
    tasks.set_defaults(func=cmd_tasks)

    methods = commands.add_parser("methods", help="list methods, their options and size at a budget")
    methods.add_argument("--backbone", default="models/aurora-tiny")
    methods.add_argument("--budget", type=float, default=0.003)
    methods.add_argument("--encoder-decoder", choices=("frozen", "train"), default="frozen",
                         help="protocol: 'frozen' (default) keeps the backbone's encoder/decoder as "
                              "pretrained weights inside the budget; 'train' (the paper's) trains "
                              "them whole under every method, outside the budget, counted apart")
    methods.set_defaults(func=cmd_methods)

    from weatherpeft.demo import DemoConfig

    demo = commands.add_parser("demo", help="the main job: WeatherPEFT vs LoRA on built-in downscaling, minutes",
                               description="Checks the built-in world, forecasts 24 h with the shipped "
                                           "backbone, then fine-tunes it for downscaling with WeatherPEFT and "
                                           "with LoRA at one budget: an RMSE table, adapters and a map.")
    add_dataclass_arguments(demo, DemoConfig)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError, pickle.UnpicklingError) as error:
        # UnpicklingError: a published checkpoint holding more than tensors (weights_only=True)
        print(f"weatherpeft: error: {error}", file=sys.stderr)
        return 2
    except BaseException as error:
        from weatherpeft.train import DivergenceError, TrainingInterrupted

        if not isinstance(error, (DivergenceError, TrainingInterrupted)):
            raise
        print(f"weatherpeft: {error}", file=sys.stderr)
        return error.exit_code  # 128 + signal for a stop signal, 1 for divergence


if __name__ == "__main__":
    sys.exit(main())
