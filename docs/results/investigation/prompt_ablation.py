"""What the prompts add to a trained adapter (issue 20, item 6): test scores with and without them.

For every prompting run of a benchmark folder (WeatherPEFT, TADP-only, VPT-deep; by default seed
0 under the "train" protocol) the adapter is loaded and scored on the test split twice: as trained,
and with its prompts removed (``Adaptation.prompts_hidden``: the same model, every other trained
entry kept). The encoder/decoder-only run of the same folder is the reference row.

    python docs/results/investigation/prompt_ablation.py runs/paper --task downscaling \\
        --out docs/results/investigation/paper
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from weatherpeft.adapters import load_adapter, read_adapter_config
from weatherpeft.backbones import backbone_statistics
from weatherpeft.finetune import task_backbone
from weatherpeft.tasks.grid import backbone_grid
from weatherpeft.tasks.registry import build_task

PROMPTING = ("weatherpeft", "tadp", "vpt")


def scores(run: Path, backbone_path: str, task_name: str) -> dict[str, dict[str, float]]:
    """The run's test metrics with its prompts and without them."""
    config = read_adapter_config(run / "adapter")
    task = build_task(task_name, backbone_statistics(backbone_path), options=config.get("task_options"),
                      grid=backbone_grid(backbone_path))
    adaptation = load_adapter(run / "adapter", task_backbone(backbone_path, task)).eval()
    loader = task.dataloader("test", 2)
    with torch.no_grad():
        trained = task.evaluate(adaptation, loader)
        with adaptation.prompts_hidden() as bare:
            hidden = task.evaluate(bare, loader)
    return {"with prompts": trained, "prompts removed": hidden}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench", type=Path)
    parser.add_argument("--task", default="downscaling")
    parser.add_argument("--backbone", default="models/aurora-tiny")
    parser.add_argument("--runs", default="*-s0-edtrain*", help="run folders to read (a glob)")
    parser.add_argument("--metrics", nargs="+", help="the metrics shown",
                        default=[f"model/rmse/{c}" for c in ("2t", "10u", "10v", "t850", "z500")])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = sorted(p.parent for p in (args.bench / "runs" / args.task).glob(f"{args.runs}/adapter"))
    reference = [r for r in runs if r.name.startswith("frozen-")]
    results = {r.name: scores(r, args.backbone, args.task) for r in runs
               if r.name.split("-")[0] in PROMPTING}
    for run in reference:
        result = json.loads((run / "result.json").read_text())
        if "test" in result:
            results[run.name] = {"encoder/decoder only": result["test"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompt_ablation.json").write_text(json.dumps(results, indent=1))
    names = args.metrics
    lines = [f"# What the prompts add: {args.task}, `{args.bench}`", "",
             "| run | scored | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for run, variants in results.items():
        for variant, metrics in variants.items():
            lines.append(f"| {run} | {variant} | " + " | ".join(f"{metrics.get(n, float('nan')):.4g}" for n in names)
                         + " |")
    (args.out / "prompt_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
