"""Every registered method at equal budgets on the shipped ``aurora-tiny``: size and step time.

For each method × budget: apply it to a fresh pretrained backbone, run ``--warmup`` +
``--steps`` Trainer steps on one fixed batch of 2 (6-h forecasting on the built-in downstream
year, the task's own loss; Child-Tuning's Fisher uses its March training data), then
save its adapter. Reports trainable and stored entries (``ParameterReport``), adapter file
bytes and the median step time, all in one process and one run, so the step times compare.
Methods that cannot reach a budget say why instead of a row.

    .venv/bin/python benchmarks/bench_methods.py [--budgets 0.003 0.04] [--methods lora sfas ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: Options for methods that need some to run at all.
METHOD_OPTIONS = {"peft": {"peft_type": "ia3"}}


def measure(method: str, budget: float, task, batch, steps: int, warmup: int) -> dict:
    from weatherpeft.adapters import save_adapter
    from weatherpeft.backbones import load_backbone
    from weatherpeft.methods.base import apply_method
    from weatherpeft.train import TrainConfig, Trainer

    backbone = load_backbone(ROOT / "models" / "aurora-tiny")
    adaptation = apply_method(method, backbone, budget, METHOD_OPTIONS.get(method, {}))
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(steps=warmup + steps, batch_size=2, lr=1e-3, grad_clip=1.0,
                             log_every=0, progress=False, out_dir=folder)
        trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                          param_groups=adaptation.param_groups(config.weight_decay))
        for hook in trainer.hooks:
            if hasattr(hook, "on_fit_start"):
                hook.on_fit_start(trainer)
        batches = iter(lambda: batch, None)
        times = []
        adaptation.train()
        for _ in range(warmup + steps):
            start = time.perf_counter()
            trainer._train_step(batches)
            times.append(time.perf_counter() - start)
        adapter = save_adapter(adaptation, Path(folder) / "adapter")
        adapter_bytes = (adapter / "adapter.safetensors").stat().st_size
    report = adaptation.report()
    return {"method": method, "budget": budget, "trainable": report.trainable,
            "stored": report.stored, "trainable_fraction": report.trainable_fraction,
            "adapter_bytes": adapter_bytes, "step_s": statistics.median(times[warmup:])}


def main() -> None:
    from weatherpeft.backbones import load_backbone
    from weatherpeft.data.builtin import store_path
    from weatherpeft.methods.base import method_names
    from weatherpeft.tasks.forecasting import ForecastingTask

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.003, 0.04])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stats = load_backbone(ROOT / "models" / "aurora-tiny").stats
    periods = {"train": ("2003-03-01", "2003-03-31T18:00"), "val": ("2003-04-01", "2003-04-07"),
               "test": ("2003-04-01", "2003-04-07")}
    task = ForecastingTask(store_path("downstream"), periods, stats, lead_steps=(1,))
    batch = next(iter(task.dataloader("train", 2)))
    rows = []
    for method in args.methods or method_names():
        for budget in args.budgets:
            try:
                row = measure(method, budget, task, batch, args.steps, args.warmup)
            except ValueError as error:
                row = {"method": method, "budget": budget, "error": str(error)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| method | budget | trainable | fraction | stored | adapter bytes | step s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | {row['budget']} | — | — | — | — | {row['error'][:90]} |")
        else:
            print(f"| {row['method']} | {row['budget']} | {row['trainable']:,} | "
                  f"{row['trainable_fraction']:.3%} | {row['stored']:,} | {row['adapter_bytes']:,} | "
                  f"{row['step_s']:.3f} |")


if __name__ == "__main__":
    main()
