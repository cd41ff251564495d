"""Where the sparse methods' moves land and how much Fisher information they hold (issue 20, item 6).

Reads the adapters of a benchmark folder (SFAS-only, WeatherPEFT, Child-Tuning_D, random mask
under the "train" protocol), estimates the empirical Fisher (Σ g² per entry) of the pretrained
backbone on the task's first training batches, and writes, per adapter:

- the Fisher mass of the entries it moved (Σ F over moved / Σ F over the selection pool), beside
  the most any set of that size could hold (top-k of F) and what a random set holds (k / N);
- where the moved entries sit: per Swin stage (encoder_layers.i / decoder_layers.i) and per
  module kind (attention qkv / proj, MLP fc1 / fc2, the AdaLN modulations, patch merging and
  splitting between stages, the time embedding), with each group's
  share of the pool and of the Fisher.

    python docs/results/investigation/where_it_moves.py runs/paper --task downscaling \\
        --batches 16 --out docs/results/investigation/paper
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from weatherpeft.backbones import backbone_statistics
from weatherpeft.finetune import task_backbone
from weatherpeft.methods.registry import apply_method
from weatherpeft.tasks.grid import backbone_grid
from weatherpeft.tasks.registry import build_task

SPARSE_METHODS = ("sfas", "weatherpeft", "child_tuning", "random_mask")


def stage_of(name: str) -> str:
    match = re.match(r"backbone\.(encoder|decoder)_layers\.(\d+)\.", name)
    return f"{match.group(1)} stage {match.group(2)}" if match else "other"


def kind_of(name: str) -> str:
    for key, kind in (("attn.qkv", "attention qkv"), ("attn.proj", "attention proj"), ("mlp.fc1", "MLP fc1"),
                      ("mlp.fc2", "MLP fc2"), ("ln_modulation", "AdaLN modulation"),
                      ("downsample", "patch merging"), ("upsample", "patch splitting"),
                      ("time_mlp", "time-embedding MLP")):
        if key in name:
            return kind + (" (bias)" if name.endswith(".bias") else "")
    return "other" + (" (bias)" if name.endswith(".bias") else "")


def fisher(backbone_path: str, task_name: str, batches: int) -> dict[str, torch.Tensor]:
    """Σ g² of the task loss per entry of the selection pool (pretrained backbone weights outside
    the encoder/decoder), at the pretrained weights, over the first ``batches`` training batches."""
    torch.manual_seed(0)
    task = build_task(task_name, backbone_statistics(backbone_path), grid=backbone_grid(backbone_path))
    adaptation = apply_method("frozen", task_backbone(backbone_path, task), 1.0, {}, encoder_decoder="train")
    pool = adaptation.backbone.pretrained_parameters()
    for parameter in pool.values():
        parameter.requires_grad_(True)
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in pool.items()}
    adaptation.train()
    for used, batch in enumerate(task.dataloader("train", 2)):
        if used == batches:
            break
        adaptation.zero_grad(set_to_none=True)
        task.training_loss(adaptation, batch).backward()
        for name, parameter in pool.items():
            if parameter.grad is not None:
                total[name].addcmul_(parameter.grad.float(), parameter.grad.float())
    return {name: value.reshape(-1) for name, value in total.items()}


def moved_entries(adapter: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(adapter / "adapter.safetensors"), "pt") as tensors:
        return {key[len("sparse."):-len(".indices")]: tensors.get_tensor(key).long()
                for key in tensors.keys()  # noqa: SIM118 (safe_open is not iterable)
                if key.startswith("sparse.") and key.endswith(".indices")}


def describe(moved: dict[str, torch.Tensor], fisher_of: dict[str, torch.Tensor]) -> dict:
    pool = sum(v.numel() for v in fisher_of.values())
    mass = sum(float(v.sum()) for v in fisher_of.values())
    k = sum(v.numel() for name, v in moved.items() if name in fisher_of)
    captured = sum(float(fisher_of[name][idx].sum()) for name, idx in moved.items() if name in fisher_of)
    everything = torch.cat(list(fisher_of.values()))
    best = float(torch.topk(everything, k).values.sum()) if k else 0.0
    groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, values in fisher_of.items():
        count = moved[name].numel() if name in moved else 0
        for group in (stage_of(name), kind_of(name)):
            groups[group]["pool"] += values.numel() / pool
            groups[group]["fisher"] += float(values.sum()) / mass
            groups[group]["moved"] += count / max(k, 1)
            groups[group]["moved_of_group"] += count
            groups[group]["group_size"] += values.numel()
    return {"moved": k, "pool": pool, "fisher_captured": captured / mass, "fisher_best": best / mass,
            "fisher_random": k / pool,
            "groups": {g: {**v, "moved_of_group": v["moved_of_group"] / v["group_size"]} for g, v in groups.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench", type=Path)
    parser.add_argument("--task", default="downscaling")
    parser.add_argument("--backbone", default="models/aurora-tiny")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--runs", default="*-s0-edtrain*", help="run folders to read (a glob)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fisher_of = fisher(args.backbone, args.task, args.batches)
    results = {}
    for adapter in sorted((args.bench / "runs" / args.task).glob(f"{args.runs}/adapter")):
        method = adapter.parent.name.split("-")[0]
        if method in SPARSE_METHODS:
            results[adapter.parent.name] = describe(moved_entries(adapter), fisher_of)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "where_it_moves.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Where the moves land: {args.task}, `{args.bench}`", "",
             f"Fisher: Σ g² per entry at the pretrained weights, {args.batches} training batches of 2.", "",
             "| run | moved | Fisher held | best possible | random |", "|---|---|---|---|---|"]
    for run, r in results.items():
        lines.append(f"| {run} | {r['moved']:,} ({r['moved'] / r['pool']:.2%}) | {r['fisher_captured']:.1%} | "
                     f"{r['fisher_best']:.1%} | {r['fisher_random']:.1%} |")
    if results:
        groups = sorted(next(iter(results.values()))["groups"])
        lines += ["", "Share of the moved entries per group (pool share and Fisher share for reference):", "",
                  "| group | pool | Fisher | " + " | ".join(results) + " |",
                  "|---|---|---|" + "---|" * len(results)]
        first = next(iter(results.values()))["groups"]
        for group in groups:
            lines.append(f"| {group} | {first[group]['pool']:.1%} | {first[group]['fisher']:.1%} | "
                         + " | ".join(f"{r['groups'][group].get('moved', 0.0):.1%}" for r in results.values()) + " |")
    (args.out / "where_it_moves.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
