"""Is ensemble post-processing learnable? ``full`` and ``frozen`` aurora-tiny on the built-in ensemble.

For each method: load the shipped pretrained ``aurora-tiny`` with the task's new ``*_spread``
variables (their embeddings and σ heads are the task head), train ``--steps`` Trainer steps
on the 2003 training inits (Jan–Sep, 121 inits of the 10-member 48-h ensemble) with the
Gaussian-CRPS loss, then score the December test inits: the model's Gaussian CRPS, RMSE of μ
and spread–skill of σ beside the raw ensemble's CRPS (ensemble form over its members), RMSE
of its mean and spread–skill, all in physical units. Writes JSON and a Markdown table.

    .venv/bin/python benchmarks/learnability_postprocessing.py [--steps 600] [--methods full frozen]

Two ensemble CRPS references: WeatherBench2's (the fair estimator, what an ensemble of this
spread would score with infinitely many members: the stricter bar for a Gaussian) and the
CRPS of the 10 members as issued (their empirical CDF).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: The channels the paper's table lists.
LISTED = ("2t", "10u", "10v", "t850", "z500")


def run(method: str, args: argparse.Namespace, base_stats) -> dict:
    from weatherpeft.backbones import load_backbone
    from weatherpeft.methods.registry import apply_method
    from weatherpeft.tasks.postprocessing import PostprocessingTask
    from weatherpeft.train import TrainConfig, Trainer, seed_everything

    began = time.perf_counter()
    seed_everything(args.seed)
    task = PostprocessingTask(stats=base_stats, history=args.history)
    backbone = load_backbone(ROOT / "models" / "aurora-tiny",
                             extra_surf_vars=task.variables.new_surf_vars,
                             extra_atmos_vars=task.variables.new_atmos_vars, stats=task.stats)
    adaptation = apply_method(method, backbone, 1.0)
    lr = args.lr if args.lr is not None else (5e-4 if method == "full" else 3e-3)
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr,
                             warmup_steps=max(1, args.steps // 20), min_lr_ratio=0.05,
                             grad_clip=1.0, log_every=0, progress=False, out_dir=folder,
                             seed=args.seed)
        trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                          param_groups=adaptation.param_groups(config.weight_decay))
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.fit()
        fit_seconds = time.perf_counter() - start
        fit_cpu_seconds = time.process_time() - cpu_start
        val_loss = trainer.validate()
        scores = trainer.evaluate(split="test", batch_size=4)
    report = adaptation.report()
    return {"method": method, "steps": args.steps, "batch_size": args.batch_size, "lr": lr,
            "epochs": args.steps * args.batch_size / len(task.datasets()["train"]),
            "fit_seconds": fit_seconds, "fit_cpu_seconds": fit_cpu_seconds, "val_loss": val_loss,
            "trainable": report.trainable,
            "head": report.head, "total_seconds": time.perf_counter() - began,
            "scores": scores}


def table(result: dict) -> str:
    scores = result["scores"]
    lines = [f"### {result['method']}: {result['steps']} steps × batch {result['batch_size']} "
             f"({result['epochs']:.1f} epochs), lr {result['lr']:g}, {result['fit_seconds']:.0f} s "
             f"training wall ({result['fit_cpu_seconds']:.0f} s CPU; {result['total_seconds']:.0f} s "
             f"wall in all, evaluation included), {result['trainable']:,} trainable "
             f"backbone parameters + {result['head']:,} task head",
             "",
             "| channel | CRPS model | CRPS ensemble (WB2, fair) | CRPS ensemble (10 members as "
             "issued) | RMSE model | RMSE ensemble mean | spread–skill model | spread–skill ensemble |",
             "|---|---|---|---|---|---|---|---|"]
    channels = [key.split("/")[2] for key in scores if key.startswith("model/crps/")]
    for channel in channels:
        model = scores[f"model/crps/{channel}"]
        fair, ecdf = scores[f"ensemble/crps/{channel}"], scores[f"ensemble/crps_ecdf/{channel}"]
        lines.append(f"| {channel}{' *' if channel in LISTED else ''} | {model:.4g} | "
                     f"{fair:.4g}{' ✓' if model < fair else ''} | {ecdf:.4g}{' ✓' if model < ecdf else ''} | "
                     f"{scores[f'model/rmse/{channel}']:.4g} | {scores[f'ensemble/rmse/{channel}']:.4g} | "
                     f"{scores[f'model/spread_skill/{channel}']:.3f} | "
                     f"{scores[f'ensemble/spread_skill/{channel}']:.3f} |")
    for form, label in (("crps", "WB2 (fair) ensemble CRPS"), ("crps_ecdf", "as-issued ensemble CRPS")):
        beaten = [c for c in LISTED if scores[f"model/crps/{c}"] < scores[f"ensemble/{form}/{c}"]]
        lines.append(f"\nModel CRPS below the {label} on {len(beaten)}/{len(LISTED)} listed channels (*)"
                     + ("" if len(beaten) == len(LISTED) else
                        f"; not on {[c for c in LISTED if c not in beaten]}"))
    return "\n".join(lines) + "\n"


def main() -> None:
    from weatherpeft.backbones import load_backbone

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["full", "frozen"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None,
                        help="default: 5e-4 for full, 3e-3 for frozen (task head only)")
    parser.add_argument("--history", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "learnability_postprocessing.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_stats = load_backbone(ROOT / "models" / "aurora-tiny").stats
    results = []
    for method in args.methods:
        result = run(method, args, base_stats)
        results.append(result)
        print(table(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(table(r) for r in results))


if __name__ == "__main__":
    main()
