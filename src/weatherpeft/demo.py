"""The main job, ``weatherpeft demo``: the point of the project in a few minutes on a CPU.

It checks the built-in world, shows the shipped pretrained backbone forecasting 24 h ahead,
then adapts that backbone to global downscaling ×4 (22.5° → 5.625°, the paper's factor) twice at one parameter
budget — with WeatherPEFT and with LoRA, the benchmark's training protocol for both — and
prints their test-month RMSE beside bilinear interpolation and the frozen backbone, with
what each stores. By default both store at most the budget (WeatherPEFT's SFAS capped,
``budget_mode="strict"``): an equal-size comparison. ``--no-strict`` runs the paper's
per-step accounting, where WeatherPEFT stores the union of what it moved, and the demo says
that the comparison is then not at equal stored size. It writes both adapters and a map
(prediction, truth, error) and says what to run next.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weatherpeft.adapters import load_adapter
from weatherpeft.backbones import backbone_statistics, load_backbone
from weatherpeft.benchmark import training_protocol
from weatherpeft.data import builtin, manifest, wb2
from weatherpeft.data.inspect import describe_store
from weatherpeft.finetune import FinetuneConfig, build_task, run_finetune, task_backbone
from weatherpeft.metrics import rmse
from weatherpeft.plots import save_task_map
from weatherpeft.tasks.forecasting import rollout

__all__ = ["DemoConfig", "run_demo"]

#: The paper's downscaling columns and their units.
CHANNELS = {"2t": "K", "10u": "m/s", "10v": "m/s", "t850": "K", "z500": "m²/s²"}


@dataclass
class DemoConfig:
    """How long the demo trains and where it writes (defaults: 216 s in all measured on 2 CPU
    cores; the benchmark's training protocol at 200 steps, where the benchmark now runs 500)."""

    out: str = "runs/demo"
    budget: float = 0.04
    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-3
    new_lr: float = 6e-3
    map_variable: str = "2t"
    strict: bool = field(default=True, metadata={
        "help": "cap what WeatherPEFT stores at the budget (budget_mode strict), so both adapters "
                "are compared at equal stored size; --no-strict: the paper's per-step accounting "
                "(WeatherPEFT stores its union, more than LoRA)"})

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"--budget is a fraction of the backbone in (0, 1], got {self.budget}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"--steps and --batch-size must be at least 1, got {self.steps}, {self.batch_size}")


def _check_world() -> bool:
    root = builtin.builtin_dir()
    problems = manifest.verify_manifest(root)
    if problems:
        print("built-in world does not match its manifest:\n  " + "\n  ".join(problems))
        return False
    content = json.loads((root / manifest.MANIFEST_NAME).read_text())
    print(f"Built-in world at {root}: {len(content['files'])} files, "
          f"{content['total_bytes'] / 2**20:.1f} MiB, checksums verified")
    for name in builtin.STORES:
        print("  " + describe_store(builtin.store_path(name)).replace("\n", "\n  "))
    return True


def _forecast(checkpoint: Path) -> None:
    """A 24-hour roll-out of the pretrained backbone against persistence."""
    dataset = wb2.WB2Dataset(builtin.store_path("downstream"), wb2.SampleSpec())
    backbone = load_backbone(checkpoint)
    inputs, _ = dataset[0]
    with torch.no_grad():
        forecast = list(rollout(backbone, inputs, 4))[-1]
    truth, _ = dataset[4]  # its last input time is 24 h after the first sample's
    lat = inputs.metadata.lat
    scores = []
    for name in ("2t", "msl"):
        model = float(rmse(forecast.surf_vars[name][:, -1], truth.surf_vars[name][:, -1], lat))
        persistence = float(rmse(inputs.surf_vars[name][:, -1], truth.surf_vars[name][:, -1], lat))
        scores.append(f"{name} {model:.3g} vs {persistence:.3g}")
    print(f"\n24 h forecast by {checkpoint.name} ({sum(p.numel() for p in backbone.parameters()):,} "
          f"parameters) from {inputs.metadata.time[0]:%Y-%m-%d %H:%M}, RMSE model vs persistence: "
          + "; ".join(scores))


def _finetune(method: str, config: DemoConfig, checkpoint: Path) -> dict[str, Any]:
    folder = Path(config.out) / method
    if folder.exists():  # a previous demo's run: replace it
        shutil.rmtree(folder)
    options = {"budget_mode": "strict"} if method == "weatherpeft" and config.strict else {}
    finetune = FinetuneConfig(task="downscaling", backbone=str(checkpoint), method=method,
                              budget=1.0 if method == "frozen" else config.budget, new_lr=config.new_lr,
                              options=json.dumps(options))
    train = training_protocol(config.steps, config.batch_size, config.lr, 0, folder, progress=True)
    start = time.perf_counter()
    result = run_finetune(finetune, train)
    result["seconds"] = time.perf_counter() - start
    return result


def _table(results: dict[str, dict[str, Any]], checkpoint_bytes: int) -> str:
    names = {"frozen": "frozen backbone", "lora": "LoRA", "weatherpeft": "WeatherPEFT"}
    header = ["RMSE on the test month", "bilinear"] + [names.get(m, m) for m in results]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    first = next(iter(results.values()))["test"]
    for channel, units in CHANNELS.items():
        values = [results[m]["test"][f"model/rmse/{channel}"] for m in results]
        best = min(values)
        cells = [f"{channel} ({units})", f"{first[f'bilinear/rmse/{channel}']:.4g}"]
        cells += [f"**{v:.4g}**" if v == best else f"{v:.4g}" for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    stored = ["parameters stored", "—"]
    sizes = ["adapter file", "—"]
    for result in results.values():
        report = result["report"]
        stored.append(f"{report['stored']:,} ({report['stored_fraction']:.2%})")
        size = result.get("adapter_bytes") or 0
        sizes.append(f"{size / 1024:,.0f} KiB ({size / checkpoint_bytes:.1%} of the backbone)" if size else "—")
    seconds = ["training time", "—"] + [f"{r['seconds']:.0f} s" if r["fit"]["step"] else "—"
                                        for r in results.values()]
    for row in (stored, sizes, seconds):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _size_verdict(results: dict[str, dict[str, Any]], config: DemoConfig) -> str:
    """Whether the two adapters were compared at equal stored size, in plain words."""
    lora, weatherpeft = (results[m]["report"]["stored"] for m in ("lora", "weatherpeft"))
    pretrained = results["lora"]["report"]["pretrained"]
    cap = config.budget * pretrained
    if weatherpeft <= 1.01 * cap and lora <= 1.01 * cap:
        return (f"Equal stored size: both adapters store at most the budget ({cap:,.0f} entries; LoRA "
                f"{lora:,}, WeatherPEFT {weatherpeft:,}, its SFAS capped with budget_mode strict).")
    return (f"Not an equal-size comparison: WeatherPEFT trains {config.budget:.1%} of the weights per "
            f"step but stores all it moved ({weatherpeft:,} entries, {weatherpeft / lora:.1f}× LoRA's "
            f"{lora:,}); drop --no-strict to cap it at the budget.")


def run_demo(config: DemoConfig) -> int:
    """World check, forecast, then WeatherPEFT vs LoRA on downscaling; returns an exit code."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    if not _check_world():
        return 1
    checkpoint = builtin.builtin_dir().parents[1] / "models" / "aurora-tiny"
    if not (checkpoint / "model.safetensors").is_file():
        print(f"no pretrained backbone at {checkpoint}: nothing to fine-tune")
        return 1
    _forecast(checkpoint)
    print(f"\nDownscaling ×4 (22.5° → 5.625°) with {checkpoint.name}, budget {config.budget:.1%} of its weights, "
          f"{config.steps} steps × batch {config.batch_size} each (training on Jan–Sep 2003, "
          "testing on December):")
    results = {method: _finetune(method, config, checkpoint) for method in ("frozen", "lora", "weatherpeft")}
    checkpoint_bytes = (checkpoint / "model.safetensors").stat().st_size
    print("\n" + _table(results, checkpoint_bytes))
    print(_size_verdict(results, config))

    out = Path(config.out)
    adapter = out / "weatherpeft" / "adapter"
    task = build_task("downscaling", backbone_statistics(str(checkpoint)))
    model = load_adapter(adapter, task_backbone(str(checkpoint), task)).eval()
    map_path = save_task_map(model, task, config.map_variable,
                             out / f"weatherpeft_{config.map_variable}_map.png")
    print(f"\nWritten to {out}/: adapters weatherpeft/adapter and lora/adapter, scores in each "
          f"result.json, the map {map_path.name} (WeatherPEFT's {config.map_variable}: prediction, "
          f"truth, error). {time.perf_counter() - start:.0f} s in all.")
    print("Next:\n"
          f"  weatherpeft adapter info {adapter}\n"
          f"  weatherpeft evaluate --adapter {adapter} --out {out}/eval --map-variable z_500\n"
          "  weatherpeft benchmark --profile quick --out runs/benchmark   # every method, three tasks\n"
          "  weatherpeft methods --budget 0.003                           # what each method trains")
    return 0

