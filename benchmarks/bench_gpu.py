"""Fine-tuning Aurora 1.3 B on one GPU: step time and peak CUDA memory per method, one command.

Answers the question Aurora's users ask (out-of-memory reports in its tracker): on one GPU at
0.25° (721 × 1440), does full fine-tuning fit, does WeatherPEFT, and with what peak memory?

The model is ``aurora.Aurora`` with its 1.3 B defaults (weatherpeft preset
``aurora-0.25-finetuned``, ``use_lora=False``), random weights, activation checkpointing on,
bf16 autocast, batch 1, history 2, 13 pressure levels. Cases: full fine-tuning, LoRA and
WeatherPEFT R = 1 / R = 10 / strict at budget 0.003. Each case runs in a fresh process
(a clean CUDA allocator, so that its peak is its own) on the largest grid that fits: 0.25°
first, then coarser grids (``--grids``) after an out-of-memory error, which is recorded as
such. Per case: median step time (``--warmup`` then ``--steps`` real Trainer steps, CUDA
synchronised), the SFAS refresh time inside it, peak CUDA memory (allocated and reserved),
and the training state beyond the weights (optimizer, masked-update and selection bytes).
Writes ``--out`` (JSON) and the same path with ``.md``.

    .venv/bin/python benchmarks/bench_gpu.py                 # one CUDA GPU, ~15-25 min
    .venv/bin/python benchmarks/bench_gpu.py --dry-run       # CPU, aurora-tiny at 32 × 64, seconds

``--dry-run`` checks the script itself on CPU (a test runs it): the tiny model, one grid of
32 × 64, one step per case, in this process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_efficiency  # noqa: E402  (the batch, the fixed-batch task, state accounting)

#: The budget of the comparison (fraction of the backbone's pretrained parameters).
BUDGET = 0.003
#: (label, method, budget, options).
CASES = [
    ("full", "full", 1.0, {}),
    ("lora", "lora", BUDGET, {}),
    ("weatherpeft R=1", "weatherpeft", BUDGET, {}),
    ("weatherpeft R=10", "weatherpeft", BUDGET, {"refresh_every": 10}),
    ("weatherpeft strict", "weatherpeft", BUDGET, {"budget_mode": "strict"}),
]
#: Grids tried in turn (lat × lon): 0.25°, 0.5°, 1°.
GRIDS = [(721, 1440), (361, 720), (181, 360)]
#: The 1.3 B model (aurora.Aurora's defaults); the dry run uses the shipped aurora-tiny.
PRESET, DRY_PRESET = "aurora-0.25-finetuned", "aurora-tiny"


def _backbone(preset: str):
    """The model with activation checkpointing: random weights, or aurora-tiny's own."""
    from weatherpeft.backbones.aurora import AuroraBackbone

    if preset == DRY_PRESET:
        return AuroraBackbone.from_checkpoint(ROOT / "models" / "aurora-tiny",
                                              activation_checkpointing=True)
    return AuroraBackbone(preset, random_init=True, activation_checkpointing=True)


def worker(preset: str, label: str, height: int, width: int, steps: int, warmup: int,
           device: str) -> dict:
    """One case on one grid in this process: its measurements, or the out-of-memory error."""
    import torch

    from weatherpeft.methods.registry import apply_method
    from weatherpeft.train import TrainConfig, Trainer

    _, method, budget, options = next(case for case in CASES if case[0] == label)
    cuda = device.startswith("cuda")
    row = {"case": label, "method": method, "budget": budget, "grid": [height, width],
           "preset": preset, "device": device}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stage = "build"
    try:
        backbone = _backbone(preset)
        inputs, target = bench_efficiency._batch(backbone, height, width)
        adaptation = apply_method(method, backbone, budget, options)
        task = bench_efficiency._FixedBatchTask(inputs, target)
        with tempfile.TemporaryDirectory() as folder:
            config = TrainConfig(steps=warmup + steps, batch_size=1, lr=1e-4, grad_clip=1.0,
                                 log_every=0, progress=False, out_dir=folder, amp="bf16",
                                 device=device)
            trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                              param_groups=adaptation.param_groups(config.weight_decay))
            refresh_times = _time_refreshes(adaptation, cuda)
            for hook in trainer.hooks:
                if hasattr(hook, "on_fit_start"):
                    hook.on_fit_start(trainer)
            weights = sum(p.numel() * p.element_size() for p in adaptation.parameters())
            row["weights_bytes"] = weights
            if cuda:
                row["memory_after_build_bytes"] = torch.cuda.memory_allocated()
            batches = iter(lambda: (inputs, target), None)
            adaptation.train()
            stage = "train"
            step_times = []
            for _ in range(warmup + steps):
                _synchronize(cuda)
                start = time.perf_counter()
                trainer._train_step(batches)
                _synchronize(cuda)
                step_times.append(time.perf_counter() - start)
            state = bench_efficiency.optimizer_state_bytes(trainer.optimizer, adaptation.masked_updates)
        report = adaptation.report()
        row.update(
            status="ok", step_s=statistics.median(step_times[warmup:]),
            refresh_s=statistics.median(refresh_times) if refresh_times else None,
            refreshes=len(refresh_times), steps_run=warmup + steps,
            parameters=report.pretrained, trainable=report.trainable,
            trainable_fraction=report.trainable_fraction,
            adamw_state_bytes=state["adamw"], masked_state_bytes=state["masked"],
            selection_state_bytes=state["selection"])
    except torch.OutOfMemoryError as error:
        row.update(status="out of memory", stage=stage, error=str(error).splitlines()[0])
    if cuda:
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        row["gpu"] = torch.cuda.get_device_name()
        row["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return row


def _synchronize(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _time_refreshes(adaptation, cuda: bool) -> list[float]:
    """Wrap every SFAS refresh with a (CUDA-synchronised) timer; returns the list it fills."""
    times: list[float] = []
    for update in adaptation.masked_updates:
        if hasattr(update, "refresh"):
            original = update.refresh

            def timed(*args, original=original, **kwargs):
                _synchronize(cuda)
                start = time.perf_counter()
                original(*args, **kwargs)
                _synchronize(cuda)
                times.append(time.perf_counter() - start)

            update.refresh = timed
    return times


def _gib(value) -> str:
    return "" if value is None else f"{value / 2**30:.1f}"


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Aurora 1.3 B fine-tuning on one GPU: step time and peak memory", "",
             f"- date: {meta['started']} (UTC), {meta['wall_s'] / 60:.1f} min; device: "
             f"{meta.get('gpu') or meta['device']}; torch {meta['torch']}",
             f"- command: `{meta['command']}`",
             f"- model: preset `{meta['preset']}` ({meta['weights']}), activation checkpointing, "
             f"bf16 autocast, batch 1, budget {BUDGET}; {meta['warmup']} warm-up + "
             f"{meta['steps']} measured steps per case, {meta['isolation']}", "",
             "*peak alloc / reserved GiB*: `torch.cuda.max_memory_allocated` / `_reserved` over "
             "the whole case (build and training). *state bytes*: AdamW's state + the masked "
             "updates' per-entry state; *selection bytes*: the one-byte \"moved\" masks (and "
             "SFAS's Fisher accumulators when R > 1).", "",
             "| case | grid | status | step s | refresh s | peak alloc GiB | peak reserved GiB | "
             "trainable | state bytes | selection bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grid = f"{r['grid'][0]} × {r['grid'][1]}"
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {grid} | {r['status']} ({r.get('stage', '')}) | | | "
                         f"{_gib(r.get('peak_allocated_bytes'))} | "
                         f"{_gib(r.get('peak_reserved_bytes'))} | | | |")
            continue
        refresh = "" if r.get("refresh_s") is None else f"{r['refresh_s']:.3f}"
        state = r["adamw_state_bytes"] + r["masked_state_bytes"]
        lines.append(f"| {r['case']} | {grid} | ok | {r['step_s']:.3f} | {refresh} | "
                     f"{_gib(r.get('peak_allocated_bytes'))} | {_gib(r.get('peak_reserved_bytes'))} | "
                     f"{r['trainable_fraction']:.3%} | {state:,} | {r['selection_state_bytes']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, aurora-tiny at 32 × 64, 1 step per case, in this process")
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES])
    parser.add_argument("--grids", nargs="+", default=[f"{h}x{w}" for h, w in GRIDS],
                        help="lat×lon grids, largest first (default 721x1440 361x720 181x360)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--worker", nargs=4, metavar=("PRESET", "CASE", "HEIGHT", "WIDTH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in [case[0] for case in CASES]]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {[case[0] for case in CASES]}")
    grids = [tuple(int(n) for n in grid.lower().split("x")) for grid in args.grids]
    dry = args.dry_run
    steps = args.steps if args.steps is not None else (1 if dry else 3)
    warmup = args.warmup if args.warmup is not None else (0 if dry else 1)
    device = "cpu" if dry else "cuda"
    if args.worker:
        preset, label, height, width = args.worker
        print(json.dumps(worker(preset, label, int(height), int(width), steps, warmup, device)))
        return 0
    import torch

    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --dry-run to check the script")
    preset = DRY_PRESET if dry else PRESET
    grids = [(32, 64)] if dry else grids
    meta = {"started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "preset": preset,
            "device": device, "torch": torch.__version__, "platform": platform.platform(),
            "steps": steps, "warmup": warmup, "budget": BUDGET,
            "weights": "shipped weights" if dry else "random weights",
            "isolation": "all cases in one process (dry run)" if dry else "each case in a fresh process",
            "gpu": torch.cuda.get_device_name() if not dry else None}
    began = time.perf_counter()
    rows = []
    for label in args.cases:
        for height, width in grids:
            if dry:
                torch.set_num_threads(1)
                row = worker(preset, label, height, width, steps, warmup, device)
            else:
                done = subprocess.run([sys.executable, __file__, "--worker", preset, label,
                                       str(height), str(width), "--steps", str(steps),
                                       "--warmup", str(warmup)],
                                      capture_output=True, text=True, check=False)
                if done.returncode:
                    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    row = {"case": label, "grid": [height, width], "status": "failed",
                           "stage": f"exit {done.returncode}", "error": last}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{label:<20} {height}×{width}: {row['status']}"
                  + (f", step {row['step_s']:.3f} s" if row["status"] == "ok" else "")
                  + (f", peak {_gib(row.get('peak_allocated_bytes'))} GiB"
                     if row.get("peak_allocated_bytes") else ""), flush=True)
            if row["status"] == "ok" or row["status"] == "failed":
                break  # the largest grid that fits is found (or the case is broken)
    meta["wall_s"] = time.perf_counter() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(rows, meta))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0 if all(r["status"] != "failed" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
