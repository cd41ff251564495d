"""The ``weatherpeft`` command line: ``data generate|check|info|card``, ``pretrain``, ``evaluate``,
``finetune``, ``benchmark``, ``adapter info|merge``, ``methods``, ``demo``."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
from dataclasses import fields
from pathlib import Path

import torch

from weatherpeft import model_card
from weatherpeft.adapters import adapter_info, load_adapter, save_merged
from weatherpeft.backbones import load_backbone
from weatherpeft.benchmark import BenchmarkConfig, run_benchmark
from weatherpeft.config import add_dataclass_arguments, build_config
from weatherpeft.data import manifest
from weatherpeft.data.builtin import builtin_dir
from weatherpeft.data.inspect import check_store, describe_store
from weatherpeft.data.layout import DataError
from weatherpeft.data.simulate import SimulationConfig, generate, write_data_card
from weatherpeft.demo import DemoConfig, run_demo
from weatherpeft.distributed import is_main
from weatherpeft.evaluation import EvaluateConfig, checkpoint_card, evaluate_adapters, score_checkpoint
from weatherpeft.finetune import FinetuneConfig, run_finetune
from weatherpeft.methods.registry import describe_methods
from weatherpeft.pretraining import PretrainConfig, run_pretraining
from weatherpeft.results import results_markdown
from weatherpeft.tasks import ENTRY_POINT_GROUP, describe_tasks
from weatherpeft.train import DivergenceError, TrainConfig, TrainingInterrupted


def cmd_data_check(args) -> int:
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


def cmd_data_info(args) -> int:
    print(describe_store(Path(args.path)))
    return 0


def cmd_data_generate(args) -> int:
    cfg = build_config(SimulationConfig, args)
    timings = generate(cfg)
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return 0


def cmd_data_card(args) -> int:
    card = write_data_card(Path(args.path) if args.path else builtin_dir())
    print(json.dumps(card, indent=1))
    return 0


def cmd_demo(args) -> int:
    return run_demo(build_config(DemoConfig, args))


def _set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def cmd_pretrain(args) -> int:
    pretrain_keys = tuple(f.name for f in fields(PretrainConfig))
    train_keys = tuple(f.name for f in fields(TrainConfig))
    cfg = build_config(PretrainConfig, args, shared_keys=train_keys)
    train_cfg = build_config(TrainConfig, args, shared_keys=pretrain_keys)
    _set_threads(cfg.threads)
    if run_pretraining(cfg, train_cfg, resume=args.resume) is None:  # under torchrun, rank 0 reports
        return 0
    print(f"pretrained {cfg.preset} saved to {cfg.export}")
    return 0


def cmd_evaluate(args) -> int:
    cfg = build_config(EvaluateConfig, args)
    _set_threads(cfg.threads)
    if cfg.adapter or cfg.task:
        for result in evaluate_adapters(cfg):
            if result.name:
                print(f"## adapter {result.name} ({result.path})")
            print(results_markdown(result.scores))
            if result.json_path is not None:
                print(f"scores written to {result.json_path} and metrics.md")
            if result.map_path is not None:
                print(f"map written to {result.map_path}")
        return 0
    if cfg.refresh_card or cfg.write_card:
        print(model_card.markdown(checkpoint_card(cfg)))
        return 0
    print(json.dumps(score_checkpoint(cfg), indent=1, sort_keys=True))
    return 0


def cmd_finetune(args) -> int:
    finetune_keys = tuple(f.name for f in fields(FinetuneConfig))
    train_keys = tuple(f.name for f in fields(TrainConfig))
    cfg = build_config(FinetuneConfig, args, shared_keys=train_keys)
    train_cfg = build_config(TrainConfig, args, shared_keys=finetune_keys)
    result = run_finetune(cfg, train_cfg, resume=args.resume)
    if not is_main():  # under torchrun, rank 0 reports
        return 0
    print(json.dumps({k: result[k] for k in ("report", "adapter_bytes", "fit_seconds", "val_loss", "test")
                      if k in result}, indent=1))
    print(f"adapter saved to {Path(train_cfg.out_dir) / 'adapter'}")
    return 0


def cmd_benchmark(args) -> int:
    config = build_config(BenchmarkConfig, args)
    _set_threads(1)
    records = run_benchmark(config)
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
    print(json.dumps(adapter_info(args.path), indent=1))
    return 0


def cmd_adapter_merge(args) -> int:
    adaptation = load_adapter(args.path, load_backbone(args.backbone), force=args.force)
    out = save_merged(adaptation, args.out)
    print(f"merged model written to {out}")
    return 0


def cmd_tasks(args) -> int:
    print(f"tasks (finetune/evaluate --task NAME --data PATH --task-options JSON; benchmark --tasks "
          f"NAME); outside tasks: weatherpeft.tasks.register_task or the entry-point group "
          f"'{ENTRY_POINT_GROUP}'\n")
    for row in describe_tasks():
        print(f"{row['name']:<22} {row['summary']}")
        for key, (kind, default) in row["options"].items():
            print(f"{'':<22}   {key}: {kind} (default {json.dumps(default)})")
    return 0


def cmd_methods(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
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

    pretrain = commands.add_parser("pretrain", help="pretrain a backbone on forecasting (6 h ahead)")
    add_dataclass_arguments(pretrain, PretrainConfig)
    add_dataclass_arguments(pretrain, TrainConfig, with_config_flag=False)
    pretrain.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    pretrain.set_defaults(func=cmd_pretrain)
    evaluate = commands.add_parser("evaluate", help="forecast skill of a checkpoint vs persistence and climatology")
    add_dataclass_arguments(evaluate, EvaluateConfig)
    evaluate.set_defaults(func=cmd_evaluate)

    finetune = commands.add_parser("finetune", help="fine-tune a backbone on a task with a method at a budget")
    add_dataclass_arguments(finetune, FinetuneConfig)
    add_dataclass_arguments(finetune, TrainConfig, with_config_flag=False)
    finetune.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    finetune.set_defaults(func=cmd_finetune)

    benchmark = commands.add_parser(
        "benchmark", help="every method × task × budget, trained and scored alike: JSON, Markdown, plots",
        description="Profiles: quick (minutes: full, frozen, LoRA, WeatherPEFT at 0.3%% under the "
                    "paper's protocol, both accountings), standard (under an hour on 2 CPU cores: the "
                    "methods the paper's claims and ablation name, 0.3%% and 4%%, both accountings, "
                    "learning rates chosen on validation), paper (hours in the background: every "
                    "method of the paper's tables, 2 seeds, both protocols; --dry-run gives the "
                    "estimate). --dry-run prints "
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
        if not isinstance(error, (DivergenceError, TrainingInterrupted)):
            raise
        print(f"weatherpeft: {error}", file=sys.stderr)
        return error.exit_code  # 128 + signal for a stop signal, 1 for divergence


if __name__ == "__main__":
    sys.exit(main())
