"""SFAS-style global top-k: ``torch.cat`` + ``torch.topk`` against ``select_top_k``, on one thread.

Scores are ``g² / max(g²) + 0.2·U(0,1)`` per block, the noise regenerated inside the callable
from a per-block seeded generator, as SFAS does; the "gradients" g are fixed random blocks
(held in memory throughout, not counted). Three methods, side by side:

- ``naive``: generate every block, ``torch.cat``, ``torch.topk(k)``;
- ``select_top_k``;
- ``scores only``: one call of ``scores(i)`` per block, results dropped — the lower bound of
  any method that needs every score at least once.

Time: best of ``--repeats`` runs, glibc's default allocator settings. Peak extra memory is
measured, not computed, in a child process (same data) that first makes glibc serve every
allocation above 128 KiB by mmap (``mallopt``), so that freed tensors leave the RSS at
once; that costs page faults, hence the separate process. Before each run there it returns
freed memory (``malloc_trim``), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``,
Linux ≥ 4.0) and notes the RSS; ``VmHWM`` minus that RSS is the peak growth. The two
selections are compared: identical positions, or else the same multiset of values
(``torch.topk`` breaks ties arbitrarily).

    .venv/bin/python benchmarks/bench_selection.py [--entries 113000000] [--blocks 300] [--fraction 0.001]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from weatherpeft.methods.selection import select_top_k

_M_MMAP_THRESHOLD = -3
_LIBC = ctypes.CDLL("libc.so.6")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def timed(work: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` runs of ``work()`` and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return best, result


def peak_growth_mib(work: Callable[[], object]) -> float:
    """Peak RSS growth of one run of ``work()`` (after ``mallopt``, see the module doc)."""
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_kib("VmRSS")
    work()
    return (_status_kib("VmHWM") - before) / 1024


def block_sizes(entries: int, blocks: int, rng: np.random.Generator) -> list[int]:
    """``blocks`` sizes summing to ``entries``, log-uniformly varied like a model's tensors."""
    weights = np.exp(rng.uniform(0.0, np.log(1000.0), blocks))
    sizes = np.floor(weights / weights.sum() * entries).astype(np.int64)
    sizes[np.argmax(sizes)] += entries - sizes.sum()
    return sizes.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=113_000_000)
    parser.add_argument("--blocks", type=int, default=300)
    parser.add_argument("--fraction", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (best is shown)")
    parser.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(1)
    if args.measure_memory:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    rng = np.random.default_rng(args.seed)
    sizes = block_sizes(args.entries, args.blocks, rng)
    k = round(args.fraction * args.entries)
    scales = np.exp(rng.uniform(np.log(1e-4), np.log(1.0), args.blocks))
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(args.seed * 7919 + i)) * float(s)
             for i, (n, s) in enumerate(zip(sizes, scales))]
    g2_max = max(float(g.abs().max()) for g in grads if g.numel()) ** 2
    calls = [0]

    def scores(i: int) -> torch.Tensor:
        calls[0] += 1
        noise = torch.rand(sizes[i], generator=torch.Generator().manual_seed(args.seed * 104729 + i))
        return grads[i].square().div_(g2_max).add_(noise.mul_(0.2))

    def naive() -> tuple[torch.Tensor, torch.Tensor]:
        top = torch.cat([scores(i) for i in range(len(sizes))]).topk(k)
        return top.indices.sort().values, top.values

    def streaming() -> list[torch.Tensor]:
        return select_top_k(scores, sizes, k)

    def lower_bound() -> None:
        for i in range(len(sizes)):
            scores(i)

    methods = {"naive: cat + topk": naive, "select_top_k": streaming,
               "scores only (lower bound)": lower_bound}
    if args.measure_memory:
        print(json.dumps({name: peak_growth_mib(work) for name, work in methods.items()}))
        return

    seconds, results, calls_per_run = {}, {}, {}
    for name, work in methods.items():
        calls[0] = 0
        seconds[name], results[name] = timed(work, args.repeats)
        calls_per_run[name] = calls[0] // args.repeats
    naive_positions, naive_values = results["naive: cat + topk"]
    per_block = results["select_top_k"]
    offsets = np.cumsum([0] + sizes[:-1])
    positions = torch.cat([idx + int(off) for idx, off in zip(per_block, offsets)])
    values = torch.cat([scores(i)[idx] for i, idx in enumerate(per_block)])
    counts = positions.numel(), naive_positions.numel()
    same_positions = torch.equal(positions, naive_positions)
    same_values = torch.equal(values.sort().values, naive_values.sort().values)
    grads.clear()  # free the parent's copy while the child measures memory
    del results, naive_positions, naive_values, per_block, positions, values
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure-memory"],
                           capture_output=True, text=True, check=True)
    peaks = json.loads(child.stdout)

    print(f"{args.entries:,} entries in {args.blocks} blocks (largest {max(sizes):,}), k = {k:,}, "
          f"1 thread; one copy of the scores = {4 * args.entries / 2**20:,.0f} MiB")
    print("\n| method | time (s) | peak extra RSS (MiB) | scores(i) calls |\n|---|---:|---:|---:|")
    for name in methods:
        print(f"| {name} | {seconds[name]:.2f} | {peaks[name]:,.1f} | {calls_per_run[name]} |")
    print(f"\nselections: {counts[0]:,} vs {counts[1]:,} entries; "
          f"same positions: {same_positions}; same values: {same_values}")
    if not same_values:
        raise SystemExit("select_top_k and torch.topk disagree")


if __name__ == "__main__":
    main()
