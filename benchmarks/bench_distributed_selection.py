"""Distributed SFAS: the sharded refresh against the single-process one, and FSDP step cost.

Part 1 (CPU, Gloo; runs anywhere): one SFAS refresh (``FisherSelection.update_selection`` at
step 0, γ = 0.2: Fisher g², the annealed noise, the global top-k, the masked-update
bookkeeping) on N selectable entries in ``--blocks`` tensors, k = ``--fraction``·N:

- ``single``: one process, full tensors (``select_top_k``, as under DDP on every rank);
- ``sharded``: ``--world`` Gloo ranks, each holding its dim-0 shard of every tensor as a
  DTensor (FSDP2's layout), scoring it and merging the ranks' top-k candidates
  (:func:`weatherpeft.distributed.sharded_top_k`); the time is the slowest rank's. The merged
  selection is checked against the single-process one (count and position sum).

Each rank runs one torch thread. Reported: wall time and CPU time (the process's own, so
waiting for a slower rank or for a core shared with other work is excluded), best of
``--repeats``, the slowest rank's. On a machine with fewer free cores than ranks the wall
times measure contention; the CPU times show the per-rank work.

Part 2 (CUDA only, under torchrun): step time and peak memory of WeatherPEFT against full
fine-tuning under FSDP2 (bf16 parameters, float32 reductions, activation checkpointing) on
a full-size Aurora (``--preset aurora-0.25-pretrained``, random weights: timing only) with
synthetic batches on the 0.25° grid (720 × 1440, the south-pole row dropped):

    .venv/bin/python benchmarks/bench_distributed_selection.py [--sizes 1e6 4e6 16e6 32e6]
    torchrun --nproc_per_node 8 benchmarks/bench_distributed_selection.py --fsdp-step \\
        [--preset aurora-0.25-pretrained --grid 720x1440 --batch 1 --steps 5]

``--fsdp-step --device cpu --preset aurora-tiny --grid 32x64`` runs part 2's code on CPU/Gloo
(a smoke test of the path, not a measurement of anything the paper cares about).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from weatherpeft import distributed
from weatherpeft.methods.sfas import FisherSelection, SFASConfig

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------
# Part 1: the refresh
# --------------------------------------------------------------------------------------


def block_shapes(entries: int, blocks: int, columns: int = 256) -> list[tuple[int, int]]:
    rows = max(8, round(entries / blocks / columns))
    return [(rows, columns)] * blocks


def gradients(shapes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def refresh_seconds(parameters: dict, k: int, repeats: int) -> tuple[float, float, FisherSelection]:
    """Best wall time and best CPU time (this process's, waits excluded) of one refresh; the
    slowest rank's when distributed."""
    best_wall = best_cpu = math.inf
    for _ in range(repeats):
        selection = FisherSelection(parameters, k, SFASConfig(gamma=0.2))
        selection.total_steps = 100
        distributed.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        selection.update_selection(None, 0)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        seconds, cpu = (float(v) for v in distributed.all_reduce([seconds, cpu], "max"))
        best_wall, best_cpu = min(best_wall, seconds), min(best_cpu, cpu)
    return best_wall, best_cpu, selection


def positions_checksum(selection: FisherSelection, shapes: list[tuple[int, int]]) -> list[int]:
    """[count, Σ global position] of the selection (this rank's part)."""
    offset, count, total = 0, 0, 0
    for (name, parameter), shape in zip(selection.parameters.items(), shapes):
        indices = selection.selection[name] + distributed.shard_offset(parameter) + offset
        count += int(indices.numel())
        total += int(indices.sum())
        offset += shape[0] * shape[1]
    return [count, total]


def _sharded_worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu")
    mesh = init_device_mesh("cpu", (args.world,))
    rows = []
    for entries in args.sizes:
        shapes = block_shapes(int(entries), args.blocks)
        parameters = {}
        for i, grad in enumerate(gradients(shapes)):
            per_rank = math.ceil(grad.shape[0] / args.world)
            local = slice(min(rank * per_rank, grad.shape[0]), min((rank + 1) * per_rank, grad.shape[0]))

            def shard(full: torch.Tensor, local: slice = local) -> DTensor:
                return DTensor.from_local(full[local].clone(), mesh, [Shard(0)], shape=full.shape,
                                          stride=full.stride(), run_check=False)

            parameter = torch.nn.Parameter(shard(torch.zeros_like(grad)))
            parameter.grad = shard(grad)
            parameters[f"block{i}"] = parameter
        n = sum(a * b for a, b in shapes)
        k = max(1, round(args.fraction * n))
        seconds, cpu, selection = refresh_seconds(parameters, k, args.repeats)
        checksum = distributed.all_reduce(torch.tensor(positions_checksum(selection, shapes)), "sum")
        rows.append({"entries": n, "k": k, "sharded_s": seconds, "sharded_cpu_s": cpu,
                     "checksum": checksum.tolist()})
        del parameters, selection
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def refresh_benchmark(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    out = RESULTS / ".sharded_rows.json"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_sharded_worker, args=(port, args, str(out)), nprocs=args.world)
    sharded = json.loads(out.read_text())
    out.unlink()
    rows = []
    for entries, row in zip(args.sizes, sharded):
        shapes = block_shapes(int(entries), args.blocks)
        parameters = {}
        for i, grad in enumerate(gradients(shapes)):
            parameter = torch.nn.Parameter(torch.zeros_like(grad))
            parameter.grad = grad
            parameters[f"block{i}"] = parameter
        seconds, cpu, selection = refresh_seconds(parameters, row["k"], args.repeats)
        same = positions_checksum(selection, shapes) == row.pop("checksum")
        rows.append({**row, "single_s": seconds, "single_cpu_s": cpu, "same_selection": same})
        print(f"{row['entries']:>12,} entries  k {row['k']:>9,}  wall: single {seconds:6.3f} s, "
              f"{args.world} ranks {row['sharded_s']:6.3f} s   CPU per rank: single {cpu:6.3f} s, "
              f"{args.world} ranks {row['sharded_cpu_s']:6.3f} s   same selection: {same}", flush=True)
    return rows


# --------------------------------------------------------------------------------------
# Part 2: FSDP step time and memory (CUDA)
# --------------------------------------------------------------------------------------


class SyntheticForecasting:
    """Random (input, target) batches for a backbone's own variables on a lat × lon grid; the
    loss is the mean squared error over every predicted field (a Task for the Trainer)."""

    name = "synthetic"

    def __init__(self, backbone, height: int, width: int, batch: int, samples: int = 64) -> None:
        from aurora import Batch, Metadata

        self.Batch, self.Metadata = Batch, Metadata
        model = backbone.aurora
        self.surf, self.static, self.atmos = model.surf_vars, model.static_vars, model.atmos_vars
        self.levels = tuple(backbone.levels)
        self.height, self.width, self.batch, self.samples = height, width, batch, samples

    def _batch(self, seed: int, history: int):
        generator = torch.Generator().manual_seed(seed)
        b, h, w, c = self.batch, self.height, self.width, len(self.levels)
        lat = torch.linspace(90, -90, h + 1)[:h]
        lon = torch.arange(w) * (360 / w)
        return self.Batch(
            surf_vars={v: torch.randn(b, history, h, w, generator=generator) for v in self.surf},
            static_vars={v: torch.randn(h, w, generator=generator) for v in self.static},
            atmos_vars={v: torch.randn(b, history, c, h, w, generator=generator) for v in self.atmos},
            metadata=self.Metadata(lat=lat, lon=lon, time=(datetime(2020, 1, 1),) * b,
                                   atmos_levels=self.levels))

    def datasets(self) -> dict:
        return {"train": [(self._batch(2 * i, 2), self._batch(2 * i + 1, 1)) for i in range(self.samples)]}

    @staticmethod
    def collate(items):
        return items[0]

    def training_loss(self, model, batch):
        inputs, target = batch
        prediction = model(inputs)
        device = next(iter(prediction.surf_vars.values())).device
        errors = [(prediction.surf_vars[v].float() - target.surf_vars[v].to(device)).square().mean()
                  for v in self.surf]
        errors += [(prediction.atmos_vars[v].float() - target.atmos_vars[v].to(device)).square().mean()
                   for v in self.atmos]
        return torch.stack(errors).mean()


def fsdp_step_benchmark(args: argparse.Namespace) -> list[dict]:
    from weatherpeft.backbones import build_backbone, load_backbone
    from weatherpeft.methods.registry import apply_method
    from weatherpeft.train import TrainConfig, Trainer, seed_everything

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device available: the FSDP step benchmark needs a GPU (skipped)")
        return []
    if not cuda:
        torch.set_num_threads(1)
    distributed.init(args.device)
    height, width = (int(v) for v in args.grid.split("x"))
    rows = []
    for method, budget in (("weatherpeft", args.budget), ("full", 1.0)):
        seed_everything(0)
        if args.preset == "aurora-tiny":
            backbone = load_backbone("models/aurora-tiny", activation_checkpointing=cuda)
        else:
            backbone = build_backbone(args.preset, random_init=True, activation_checkpointing=True)
        adaptation = apply_method(method, backbone, budget)
        task = SyntheticForecasting(backbone, height, width, args.batch, samples=args.steps + 2)
        config = TrainConfig(steps=args.steps + 1, batch_size=1, lr=1e-4, amp="bf16" if cuda else "none",
                             device=args.device, strategy="fsdp", progress=False, log_every=0,
                             out_dir=f"/tmp/bench_fsdp_{method}", activation_checkpointing=cuda)
        trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                          param_groups=adaptation.param_groups(config.weight_decay))
        for hook in trainer.hooks:
            if hasattr(hook, "on_fit_start"):
                hook.on_fit_start(trainer)
        batches = trainer._train_batches(task.datasets()["train"])
        trainer.model.train()
        trainer._train_step(batches)  # warm-up (allocations, first all-gathers)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer._train_step(batches)
        if cuda:
            torch.cuda.synchronize()
        seconds = float(distributed.all_reduce([(time.perf_counter() - start) / args.steps], "max")[0])
        peak = float(distributed.all_reduce([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], "max")[0])
        row = {"method": method, "budget": budget, "preset": args.preset, "grid": args.grid,
               "batch_per_rank": args.batch, "world": distributed.world_size(),
               "step_s": seconds, "peak_gib": peak,
               "device": torch.cuda.get_device_name() if cuda else "cpu",
               "parameters": sum(p.numel() for p in adaptation.parameters())}
        rows.append(row)
        if distributed.is_main():
            print(json.dumps(row), flush=True)
        del trainer, adaptation, backbone
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 4e6, 16e6, 32e6])
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.001)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fsdp-step", action="store_true", help="part 2 (launch with torchrun)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="aurora-0.25-pretrained")
    parser.add_argument("--grid", default="720x1440")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.003)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.fsdp_step:
        rows, name = fsdp_step_benchmark(args), "distributed_fsdp_step.json"
    else:
        rows, name = refresh_benchmark(args), "distributed_selection.json"
    if rows and distributed.is_main():
        path = args.out or RESULTS / name
        path.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1) + "\n")
        print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
