"""Downscaling on the briefly pretrained Prithvi-WxC (prithvi-tiny): full, LoRA and WeatherPEFT.

For each method: load ``--checkpoint`` (``models/prithvi-tiny``), apply the method at
``--budget`` (``full``: every weight), fine-tune ``--steps`` Trainer steps on the built-in
world's downscaling (11.25° → 5.625°, lead 0, train Jan–Sep 2003), then score the test split
(December 2003) beside bilinear interpolation. The backbone keeps its 6-h lead-time input
(as Aurora does in this task), so its temporal residual starts from the interpolated input at t.
Prints a Markdown table and writes everything to ``--out`` (JSON).

    .venv/bin/python benchmarks/prithvi_downscaling.py [--methods full lora weatherpeft]
        [--steps 250] [--budget 0.04] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAPER_CHANNELS = ("2t", "10u", "10v", "t850", "z500")
#: Learning rates: full fine-tuning moves every weight, the PEFT methods few.
LR = {"full": 2e-4}
DEFAULT_LR = 1e-3


def run(method: str, args: argparse.Namespace) -> dict:
    from weatherpeft.backbones import load_backbone
    from weatherpeft.methods.registry import apply_method
    from weatherpeft.tasks.downscaling import DownscalingTask
    from weatherpeft.train import TrainConfig, Trainer, seed_everything

    seed_everything(args.seed)
    start = time.perf_counter()
    backbone = load_backbone(args.checkpoint)
    task = DownscalingTask(stats=backbone.stats)
    budget = 1.0 if method == "full" else args.budget
    adaptation = apply_method(method, backbone, budget)
    report = adaptation.report()
    lr = LR.get(method, DEFAULT_LR)
    setup = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr,
                             warmup_steps=min(20, args.steps // 10), grad_clip=1.0,
                             weight_decay=0.05, log_every=max(1, args.steps // 5),
                             seed=args.seed, progress=False, out_dir=folder)
        trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                          param_groups=adaptation.param_groups(config.weight_decay))
        with torch.no_grad():
            before = task.evaluate(adaptation.eval(), task.dataloader("test", 8))
        start = time.perf_counter()
        summary = trainer.fit()
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            scores = task.evaluate(adaptation.eval(), task.dataloader("test", 8))
        eval_seconds = time.perf_counter() - start
    return {"method": method, "budget": budget, "steps": int(summary["step"]),
            "batch_size": args.batch_size, "lr": lr, "trainable": report.trainable,
            "stored": adaptation.report().stored, "head": report.head, "setup_s": setup,
            "fit_s": fit_seconds, "eval_s": eval_seconds, "final_loss": summary.get("loss"),
            "scores_before": before, "scores": scores}


def table(results: list[dict]) -> str:
    lines = ["| method | budget | steps | lr | trainable (stored) | fit s |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['budget']:g} | {r['steps']} | {r['lr']:g} | "
                     f"{r['trainable']:,} ({r['stored']:,}) | {r['fit_s']:.0f} |")
    lines.append("\n| channel | pretrained, untuned | " + " | ".join(r["method"] for r in results)
                 + " | bilinear |")
    lines.append("|---" * (len(results) + 3) + "|")
    first = results[0]
    channels = [k.split("/")[-1] for k in first["scores"] if k.startswith("model/rmse/")]
    for channel in channels:
        mark = "**" if channel in PAPER_CHANNELS else ""
        cells = [f"{first['scores_before'][f'model/rmse/{channel}']:.4g}"]
        cells += [f"{r['scores'][f'model/rmse/{channel}']:.4g}" for r in results]
        cells.append(f"{first['scores'][f'bilinear/rmse/{channel}']:.4g}")
        lines.append(f"| {mark}{channel}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "prithvi-tiny")
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "weatherpeft"])
    parser.add_argument("--budget", type=float, default=0.04)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "prithvi_downscaling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for method in args.methods:
        result = run(method, args)
        print(f"{method}: {result['steps']} steps, fit {result['fit_s']:.0f} s, "
              f"eval {result['eval_s']:.0f} s", flush=True)
        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
