"""Are downscaling and regional precipitation learnable? ``full`` and ``frozen`` on aurora-tiny.

For each task × method: load the pretrained ``models/aurora-tiny`` (with the task's new
heads), fine-tune ``--steps`` Trainer steps on the built-in world, then score the test split
(December 2003) with the task's own metrics beside its references. Downscaling with
``frozen`` has nothing to train (no new variable, so no task head): it is scored as loaded.
Prints one Markdown table per task and writes everything to ``--out`` (JSON).

The issue's acceptance: downscaling RMSE of ``full`` below bilinear interpolation for
2t, 10u, 10v, t850 and z500; precipitation SEEPS < 1 and ACC > 0 at 12 h.

    .venv/bin/python benchmarks/learnability_tasks.py [--tasks downscaling precipitation]
        [--methods full frozen] [--steps 300] [--batch-size 4] [--lr 2e-4] [--tp-loss log]
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


def build_task(name: str, stats, tp_loss: str = "log"):
    if name == "downscaling":
        from weatherpeft.tasks.downscaling import DownscalingTask
        return DownscalingTask(stats=stats)
    if name == "precipitation":
        from weatherpeft.tasks.precipitation import PrecipitationTask
        return PrecipitationTask(stats=stats, tp_loss=tp_loss)
    raise ValueError(f"unknown task {name!r}")


def run(task_name: str, method: str, args: argparse.Namespace) -> dict:
    from weatherpeft.backbones import load_backbone
    from weatherpeft.methods.registry import apply_method
    from weatherpeft.train import TrainConfig, Trainer, seed_everything

    seed_everything(args.seed)
    start = time.perf_counter()
    pretrained = load_backbone(ROOT / "models" / "aurora-tiny")
    task = build_task(task_name, pretrained.stats, args.tp_loss)
    variables = task.variables
    backbone = load_backbone(ROOT / "models" / "aurora-tiny", extra_surf_vars=variables.new_surf_vars,
                             extra_atmos_vars=variables.new_atmos_vars, stats=task.stats)
    adaptation = apply_method(method, backbone, 1.0)
    report = adaptation.report()
    setup = time.perf_counter() - start
    trained = report.trainable + report.head > 0
    summary: dict = {"step": 0.0}
    fit_seconds = 0.0
    with tempfile.TemporaryDirectory() as folder:
        if trained:
            config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 warmup_steps=min(20, args.steps // 10), grad_clip=1.0,
                                 weight_decay=0.05, log_every=max(1, args.steps // 5),
                                 seed=args.seed, progress=False, out_dir=folder)
            trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                              param_groups=adaptation.param_groups(config.weight_decay))
            start = time.perf_counter()
            summary = trainer.fit()
            fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            scores = task.evaluate(adaptation, task.dataloader("test", 8))
        eval_seconds = time.perf_counter() - start
    return {"task": task_name, "method": method, "steps": int(summary["step"]),
            "batch_size": args.batch_size, "lr": args.lr, "trainable": report.trainable,
            "head": report.head, "setup_s": setup, "fit_s": fit_seconds, "eval_s": eval_seconds,
            "final_loss": summary.get("loss"), "scores": scores}


def table(results: list[dict]) -> str:
    """One Markdown table per task: rows = metric keys, columns = method (and references)."""
    lines = []
    for task_name in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task_name]
        lines.append(f"\n### {task_name}\n")
        lines.append("| run | steps | batch | lr | trainable + head | fit s | eval s |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rows:
            lr = f"{r['lr']:g}" if r["steps"] else "–"
            lines.append(f"| {r['method']} | {r['steps']} | {r['batch_size']} | {lr} | "
                         f"{r['trainable']:,} + {r['head']:,} | {r['fit_s']:.0f} | {r['eval_s']:.0f} |")
        if task_name == "downscaling":
            lines.append("\n| channel | " + " | ".join(f"{r['method']} RMSE" for r in rows)
                         + " | bilinear RMSE | " + " | ".join(f"{r['method']} bias" for r in rows)
                         + " | bilinear bias |")
            lines.append("|---" * (2 * len(rows) + 3) + "|")
            channels = [k.split("/")[-1] for k in rows[0]["scores"] if k.startswith("model/rmse/")]
            for channel in channels:
                mark = "**" if channel in PAPER_CHANNELS else ""
                cells = [f"{r['scores'][f'model/rmse/{channel}']:.4g}" for r in rows]
                cells.append(f"{rows[0]['scores'][f'bilinear/rmse/{channel}']:.4g}")
                cells += [f"{r['scores'][f'model/bias/{channel}']:.3g}" for r in rows]
                cells.append(f"{rows[0]['scores'][f'bilinear/bias/{channel}']:.3g}")
                lines.append(f"| {mark}{channel}{mark} | " + " | ".join(cells) + " |")
        else:
            leads = sorted({k.split("/")[-1] for k in rows[0]["scores"]}, key=lambda s: float(s[:-1]))
            header = ["lead"]
            for metric in ("seeps", "acc", "rmse"):
                header += [f"{r['method']} {metric}" for r in rows] + [f"persistence {metric}"]
                if metric != "acc":
                    header.append(f"climatology {metric}")
            lines.append("\n| " + " | ".join(header) + " |")
            lines.append("|---" * len(header) + "|")
            for lead in leads:
                cells = [lead]
                for metric in ("seeps", "acc", "rmse"):
                    cells += [f"{r['scores'][f'model/{metric}/tp/{lead}']:.3f}" for r in rows]
                    cells.append(f"{rows[0]['scores'][f'persistence/{metric}/tp/{lead}']:.3f}")
                    if metric != "acc":
                        cells.append(f"{rows[0]['scores'][f'climatology/{metric}/tp/{lead}']:.3f}")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["downscaling", "precipitation"],
                        choices=["downscaling", "precipitation"])
    parser.add_argument("--methods", nargs="+", default=["full", "frozen"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4, help="for full; frozen uses 10×")
    parser.add_argument("--tp-loss", choices=["log", "mse"], default="log",
                        help="precipitation loss on tp (PrecipitationTask's tp_loss)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learnability_tasks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for task_name in args.tasks:
        for method in args.methods:
            run_args = argparse.Namespace(**vars(args))
            if method == "frozen":  # only a freshly initialised head moves: a larger step
                run_args.lr = args.lr * 10
            result = run(task_name, method, run_args)
            print(f"{task_name} {method}: {result['steps']} steps, fit {result['fit_s']:.0f} s, "
                  f"eval {result['eval_s']:.0f} s", flush=True)
            results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
