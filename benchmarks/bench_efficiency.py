"""Training-step time and peak memory of fine-tuning methods, side by side, on one CPU thread.

For each backbone (the shipped pretrained ``aurora-tiny``; an AuroraSmall-sized model,
112.8 M parameters, random weights with the zero-initialised AdaLN modulation perturbed so
that gradients reach every block) and each method, a fresh Python process builds the model,
runs ``--warmup`` then ``--steps`` real Trainer steps (hooks, clipping, AdamW, masked
updates) on one fixed batch at 32 × 64, and reports:

- median step time; the SFAS refresh time inside it (Fisher scores, noise, global top-k);
- peak RSS (VmHWM) of the process and its growth over the RSS after the model was built;
- adapter file bytes after training, against the backbone checkpoint's bytes;
- eval forward time: frozen backbone vs the adapted model (cached prompts).

Cases run in alternation, ``--rounds`` times, and each number is the median over rounds —
this machine is shared and noisy, so only ratios within one run mean anything.

    .venv/bin/python benchmarks/bench_efficiency.py [--backbones tiny small] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (label, method, budget, options)
CASES = [
    ("full", "full", 1.0, {}),
    ("lora", "lora", 0.003, {}),
    ("weatherpeft R=1", "weatherpeft", 0.003, {}),
    ("weatherpeft R=10", "weatherpeft", 0.003, {"refresh_every": 10}),
    ("weatherpeft strict", "weatherpeft", 0.003, {"budget_mode": "strict"}),
    ("sfas R=1", "sfas", 0.003, {}),
    ("tadp", "tadp", 0.003, {}),
]


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _backbone(name: str):
    import torch

    from weatherpeft.backbones.aurora import AuroraBackbone

    if name == "tiny":
        from weatherpeft.backbones import load_backbone

        return load_backbone(ROOT / "models" / "aurora-tiny")
    backbone = AuroraBackbone("aurora-0.25-small-pretrained", random_init=True, levels=(500, 850))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in backbone.named_parameters():
            if "ln_modulation" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    backbone.fingerprint(refresh=True)
    return backbone


def _batch(backbone):
    """(input, target) at 32 × 64, batch 1, history 2, fields at their normalisation scale."""
    import torch
    from aurora import Batch, Metadata

    from weatherpeft.data.grids import equiangular_grid

    generator = torch.Generator().manual_seed(1)
    stats = backbone.stats
    grid = equiangular_grid(64, 32)
    lat = torch.as_tensor(grid.lat, dtype=torch.float32).flip(0)
    lon = torch.as_tensor(grid.lon, dtype=torch.float32)
    levels = tuple(backbone.levels)
    config = backbone.config

    def field(key, *shape):
        return stats.locations[key] + stats.scales[key] * torch.randn(*shape, generator=generator)

    def batch(time_index):
        surf = {v: field(v, 1, 2, 32, 64) for v in config["surf_vars"]}
        static = {v: field(v, 32, 64) for v in config["static_vars"]}
        atmos = {v: torch.stack([field(f"{v}_{level}", 1, 2, 32, 64) for level in levels], dim=2)
                 for v in config["atmos_vars"]}
        from datetime import datetime, timedelta
        metadata = Metadata(lat=lat, lon=lon, time=(datetime(2003, 1, 1) + timedelta(hours=6 * time_index),),
                            atmos_levels=levels)
        return Batch(surf_vars=surf, static_vars=static, atmos_vars=atmos, metadata=metadata)

    inputs, target = batch(0), batch(1)
    target = Batch(surf_vars={k: v[:, -1:] for k, v in target.surf_vars.items()},
                   static_vars=target.static_vars,
                   atmos_vars={k: v[:, -1:] for k, v in target.atmos_vars.items()},
                   metadata=target.metadata)
    return inputs, target


def worker(backbone_name: str, label: str, steps: int, warmup: int) -> dict:
    """One case in this process; returns its measurements."""
    import torch

    from weatherpeft.adapters import save_adapter
    from weatherpeft.methods.base import apply_method
    from weatherpeft.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    _, method, budget, options = next(case for case in CASES if case[0] == label)
    backbone = _backbone(backbone_name)
    inputs, target = _batch(backbone)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_bytes = (backbone.save_checkpoint(Path(folder) / "ckpt") / "model.safetensors").stat().st_size
    backbone.eval()
    with torch.no_grad():
        frozen_times = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            backbone(inputs)
            frozen_times.append(time.perf_counter() - start)
    backbone.train()
    adaptation = apply_method(method, backbone, budget, options)
    task = _FixedBatchTask(inputs, target)
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(steps=warmup + steps, batch_size=1, lr=1e-4, grad_clip=1.0,
                             log_every=0, progress=False, out_dir=folder)
        trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                          param_groups=adaptation.param_groups(config.weight_decay))
        refresh_times = _time_refreshes(adaptation)
        for hook in trainer.hooks:
            if hasattr(hook, "on_fit_start"):
                hook.on_fit_start(trainer)
        rss_built = _status("VmRSS")
        batches = iter(lambda: (inputs, target), None)
        step_times = []
        adaptation.train()
        for _ in range(warmup + steps):
            start = time.perf_counter()
            trainer._train_step(batches)
            step_times.append(time.perf_counter() - start)
        peak = _status("VmHWM")
        adapter_bytes = (save_adapter(adaptation, Path(folder) / "adapter")
                         / "adapter.safetensors").stat().st_size
    adaptation.eval()
    with torch.no_grad():
        adapted_times = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            adaptation(inputs)
            adapted_times.append(time.perf_counter() - start)
    report = adaptation.report()
    return {
        "backbone": backbone_name, "case": label, "parameters": report.pretrained,
        "step_s": statistics.median(step_times[warmup:]),
        "refresh_s": statistics.median(refresh_times) if refresh_times else None,
        "peak_rss_bytes": peak, "rss_growth_bytes": peak - rss_built,
        "adapter_bytes": adapter_bytes, "checkpoint_bytes": checkpoint_bytes,
        "trainable": report.trainable, "stored": report.stored,
        "frozen_eval_s": statistics.median(frozen_times[warmup:]),
        "adapted_eval_s": statistics.median(adapted_times[warmup:]),
    }


def _time_refreshes(adaptation) -> list[float]:
    """Wrap every SFAS refresh with a timer; returns the list it appends to."""
    times: list[float] = []
    for update in adaptation.masked_updates:
        if hasattr(update, "refresh"):
            original = update.refresh

            def timed(*args, original=original, **kwargs):
                start = time.perf_counter()
                original(*args, **kwargs)
                times.append(time.perf_counter() - start)

            update.refresh = timed
    return times


class _FixedBatchTask:
    """The Task members the Trainer's step uses: the loss of one fixed batch."""

    def __init__(self, inputs, target):
        self.inputs, self.target = inputs, target

    def training_loss(self, model, batch):
        import torch

        prediction = model(batch[0])
        errors = [torch.mean((prediction.surf_vars[k] - v) ** 2) / v.var()
                  for k, v in batch[1].surf_vars.items()]
        errors += [torch.mean((prediction.atmos_vars[k] - v) ** 2) / v.var()
                   for k, v in batch[1].atmos_vars.items()]
        return torch.stack(errors).mean()


def _markdown(rows: list[dict]) -> str:
    lines = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone]
        full = next((r for r in mine if r["case"] == "full"), None)
        lines += [f"\n### {backbone} ({mine[0]['parameters'] / 1e6:.2f} M parameters)\n",
                  "| case | step s | × full | refresh s | refresh / step | peak RSS MiB | × full | "
                  "growth MiB | adapter bytes | / checkpoint | eval × frozen |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            step_ratio = r["step_s"] / full["step_s"] if full else float("nan")
            peak_ratio = r["peak_rss_bytes"] / full["peak_rss_bytes"] if full else float("nan")
            refresh = "" if r["refresh_s"] is None else f"{r['refresh_s']:.3f}"
            per_step = "" if r["refresh_s"] is None else f"{r['refresh_s'] / r['step_s']:.2f}"
            lines.append(
                f"| {r['case']} | {r['step_s']:.3f} | {step_ratio:.2f} | {refresh} | {per_step} | "
                f"{r['peak_rss_bytes'] / 2**20:.0f} | {peak_ratio:.2f} | "
                f"{r['rss_growth_bytes'] / 2**20:.0f} | {r['adapter_bytes']:,} | "
                f"{r['adapter_bytes'] / r['checkpoint_bytes']:.2%} | "
                f"{r['adapted_eval_s'] / r['frozen_eval_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["tiny", "small"])
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "efficiency.json")
    parser.add_argument("--worker", nargs=2, metavar=("BACKBONE", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup)))
        return
    results: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for backbone in args.backbones:
            for case in args.cases:
                command = [sys.executable, __file__, "--worker", backbone, case,
                           "--steps", str(args.steps), "--warmup", str(args.warmup)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    print(f"{backbone} / {case} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((backbone, case), []).append(row)
                print(f"round {round_index + 1}: {backbone:>5} {case:<20} step {row['step_s']:.3f} s, "
                      f"peak {row['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    rows = []
    for runs in results.values():
        merged = dict(runs[0])
        for key, value in runs[0].items():
            if isinstance(value, float):
                merged[key] = statistics.median(r[key] for r in runs)
        merged["rounds"] = len(runs)
        rows.append(merged)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(_markdown(rows))


if __name__ == "__main__":
    main()
