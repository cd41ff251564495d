"""Memory and latency of N adapters served on one backbone (MultiAdapterModel) vs N merged models.

Adapters are made untrained-but-nonzero (every stored value perturbed), for LoRA, WeatherPEFT
(sparse entries + TADP prompts), VPT and SFAS under the "train" protocol, cycled to N. Memory:
the bytes of distinct tensors each setup holds (parameters, buffers, stored values, cached
prompts are counted as they are created) and the process's resident-set growth while building
it. Latency: one forward of batch 1, and the switch alone, median of ``--repeats``.

    python benchmarks/bench_multi_adapter.py --adapters 8 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from weatherpeft.adapters import load_adapter, load_merged, save_adapter, save_merged
from weatherpeft.backbones import load_backbone
from weatherpeft.data.builtin import store_path
from weatherpeft.data.wb2 import SampleSpec, WB2Dataset, collate_batches
from weatherpeft.methods.registry import apply_method
from weatherpeft.serving import MultiAdapterModel

BACKBONE = Path(__file__).resolve().parents[1] / "models" / "aurora-tiny"
METHODS = [("lora", 0.01, {}, "frozen"), ("weatherpeft", 0.01, {}, "frozen"),
           ("vpt", 0.002, {}, "frozen"), ("sfas", 0.01, {}, "train")]


def make_adapters(folder: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        method, budget, options, protocol = METHODS[i % len(METHODS)]
        torch.manual_seed(i)
        adaptation = apply_method(method, load_backbone(BACKBONE), budget, options,
                                  encoder_decoder=protocol)
        with torch.no_grad():
            for parameter in adaptation.added_parameters().values():
                parameter.add_(0.01 * torch.randn_like(parameter))
            for update in adaptation.masked_updates:  # move budget-many entries
                for name, parameter in update.parameters.items():
                    chosen = torch.randperm(parameter.numel())[:max(1, parameter.numel() // 100)]
                    parameter.view(-1)[chosen] += 0.01
                    update.mark_moved(name, chosen)
            for parameter in adaptation.encoder_decoder_parameters().values():
                parameter.add_(0.001)
        paths.append(save_adapter(adaptation, folder / f"{i:02d}-{method}"))
    return paths


def tensor_bytes(modules: list[torch.nn.Module], extra: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages of the modules' parameters and buffers, plus ``extra``."""
    seen, total = set(), 0
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())] + list(extra)
    for tensor in tensors:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def resident() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dataset = WB2Dataset(store_path("downstream"), SampleSpec(start="2003-03-01", end="2003-03-03"))
    batch = collate_batches([dataset[0]])[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(Path(tmp), args.adapters)
        names = [p.name for p in paths]
        file_bytes = {p.name: (p / "adapter.safetensors").stat().st_size for p in paths}

        before = resident()
        served = MultiAdapterModel(load_backbone(BACKBONE))
        for name, path in zip(names, paths):
            served.add_adapter(name, path)
        with torch.no_grad():
            for _ in served.each():  # one forward each: prompts cached
                served(batch)
        served_rss = resident() - before
        patches = [p.values for ps in served._patches.values() for p in ps] + \
                  [p.indices for ps in served._patches.values() for p in ps if p.indices is not None]
        served_bytes = tensor_bytes([served.backbone, *(served.adaptation(n) for n in names)],
                                    patches)

        def served_call(name):
            served.set_adapter(name)
            with torch.no_grad():
                served(batch)

        switch = {n: median_seconds(lambda n=n: (served.set_adapter(n), served.set_adapter(None)),
                                    args.repeats) / 2 for n in names}
        served_forward = {n: median_seconds(lambda n=n: served_call(n), args.repeats)
                          for n in names}
        rotating = median_seconds(lambda: [served_call(n) for n in names], args.repeats) / len(names)
        served = None  # released before the merged models are measured

        before = resident()
        merged = [load_merged(save_merged(load_adapter(p, load_backbone(BACKBONE)),
                                          Path(tmp) / "merged" / p.name)).eval() for p in paths]
        with torch.no_grad():
            for model in merged:
                model(batch)
        merged_rss = resident() - before
        merged_bytes = tensor_bytes(merged)

        def merged_call(model):
            with torch.no_grad():
                model(batch)

        merged_forward = {n: median_seconds(lambda m=m: merged_call(m), args.repeats)
                          for n, m in zip(names, merged)}
        backbone_bytes = tensor_bytes([load_backbone(BACKBONE)])
    result = {
        "adapters": args.adapters, "backbone_bytes": backbone_bytes,
        "adapter_file_bytes": file_bytes,
        "served": {"tensor_bytes": served_bytes, "rss_growth": served_rss,
                   "forward_s": served_forward, "switch_s": switch,
                   "forward_rotating_s": rotating},
        "merged": {"tensor_bytes": merged_bytes, "rss_growth": merged_rss,
                   "forward_s": merged_forward},
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return result


if __name__ == "__main__":
    main()
