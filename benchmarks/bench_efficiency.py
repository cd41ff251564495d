"""Efficiency of fine-tuning methods, side by side in one run, on one CPU thread.

For each backbone (the shipped pretrained ``aurora-tiny``; an AuroraSmall-sized model,
112.8 M parameters, random weights with the zero-initialised AdaLN modulation perturbed so
that gradients reach every block) and each method of the paper's comparison at budget 0.003
(plus WeatherPEFT's R = 10 and strict variants), a fresh Python process builds the model,
runs ``--warmup`` then ``--steps`` real Trainer steps (hooks, clipping, AdamW, masked
updates) on one fixed batch at 32 × 64, and reports:

- median step time; the SFAS refresh time inside it (Fisher scores, noise, global top-k);
  the one-off set-up before the first step (``on_fit_start``: Child-Tuning's Fisher over
  its ``fisher_batches`` batches, the random mask's draw);
- peak RSS (VmHWM) of the process and its growth over the RSS after the model was built;
- optimizer-state bytes after training: torch AdamW's state tensors plus every
  MaskedUpdate's per-entry state (selected indices, exp_avg, exp_avg_sq, step counts);
  apart, the masked updates' selection bookkeeping (the one-byte-per-entry "moved" masks,
  SFAS's Fisher accumulators when R > 1);
- adapter file bytes after training, against the backbone checkpoint's bytes;
- eval forward time of the adapted model (prompts cached, adapters live) and of the deployed
  model — :func:`~weatherpeft.adapters.save_merged` then
  :func:`~weatherpeft.adapters.load_merged`: every trained weight folded into the backbone,
  fixed prompt tokens where the method prompts (AdaptFormer cannot be merged: its row says
  so) — each timed in alternation with a fresh frozen copy of the backbone, as paired ratios.

A method that cannot be built at the budget gets a row saying why. Cases run in alternation,
``--rounds`` times, and each number is the median over rounds — this machine is shared and
noisy, so only ratios within one run mean anything. Writes ``--out`` (JSON) and the same
path with ``.md`` (Markdown: machine, date, command, rounds, one table per backbone).

    .venv/bin/python benchmarks/bench_efficiency.py [--backbones tiny small] [--rounds 2]
    .venv/bin/python benchmarks/bench_efficiency.py --quick   # smoke test: tiny, 1 round, 2 steps
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The budget of the comparison (fraction of the backbone's pretrained parameters).
BUDGET = 0.003

#: (label, method, budget, options): the paper's comparison in its table order ("frozen" is
#: the reference every eval time is divided by), then WeatherPEFT's variants.
CASES = [
    ("full", "full", 1.0, {}),
    ("lora", "lora", BUDGET, {}),
    ("dora", "dora", BUDGET, {}),
    ("ssf", "ssf", BUDGET, {}),
    ("vpt", "vpt", BUDGET, {}),
    ("adaptformer", "adaptformer", BUDGET, {}),
    ("child_tuning", "child_tuning", BUDGET, {}),
    ("random_mask", "random_mask", BUDGET, {}),
    ("tadp", "tadp", BUDGET, {}),
    ("sfas R=1", "sfas", BUDGET, {}),
    ("weatherpeft R=1", "weatherpeft", BUDGET, {}),
    ("weatherpeft R=10", "weatherpeft", BUDGET, {"refresh_every": 10}),
    ("weatherpeft strict", "weatherpeft", BUDGET, {"budget_mode": "strict"}),
]
#: Short names accepted by --cases (the paper's method names).
ALIASES = {"sfas": "sfas R=1", "weatherpeft": "weatherpeft R=1"}
#: MaskedUpdate attributes that are per-tensor views of its buckets' fused state (counted
#: once, through the buckets); every other tensor an update holds, except the parameters
#: themselves, is selection bookkeeping.
MASKED_OPTIMIZER_STATE = ("selection", "_exp_avg", "_exp_avg_sq", "_steps")


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


def _batch(backbone, height: int = 32, width: int = 64):
    """(input, target) at ``height`` × ``width`` (default 32 × 64), batch 1, history 2, fields
    at their normalisation scale."""
    import torch
    from aurora import Batch, Metadata

    from weatherpeft.data.grids import equiangular_grid

    generator = torch.Generator().manual_seed(1)
    stats = backbone.stats
    grid = equiangular_grid(width, height)
    lat = torch.as_tensor(grid.lat, dtype=torch.float32).flip(0)
    lon = torch.as_tensor(grid.lon, dtype=torch.float32)
    levels = tuple(backbone.levels)
    config = backbone.config

    def field(key, *shape):
        return stats.locations[key] + stats.scales[key] * torch.randn(*shape, generator=generator)

    def batch(time_index):
        surf = {v: field(v, 1, 2, height, width) for v in config["surf_vars"]}
        static = {v: field(v, height, width) for v in config["static_vars"]}
        atmos = {v: torch.stack([field(f"{v}_{level}", 1, 2, height, width) for level in levels], dim=2)
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


def _tensor_bytes(value) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or dicts / lists / tuples of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer, masked_updates) -> dict[str, int]:
    """Bytes of training state beyond the weights: ``adamw`` (torch AdamW's state tensors:
    exp_avg, exp_avg_sq, step), ``masked`` (every MaskedUpdate's per-selected-entry state:
    indices, positions, exp_avg, exp_avg_sq, step counts, changed flags) and ``selection``
    (the updates' other tensors: the one-byte-per-entry "moved" masks, SFAS's Fisher
    accumulators; their parameters excluded)."""
    adamw = sum(_tensor_bytes(state) for state in optimizer.state.values())
    masked = selection = 0
    for update in masked_updates:
        update.stored_entries()  # brings the moved masks up to date
        for bucket in update.buckets():
            masked += _tensor_bytes([bucket.indices, bucket.positions, bucket.exp_avg,
                                     bucket.exp_avg_sq, bucket.steps, bucket.pending])
            selection += _tensor_bytes(bucket.moved_mask)
        for name, value in vars(update).items():
            if name not in ("parameters", *MASKED_OPTIMIZER_STATE):  # views of the buckets'
                selection += _tensor_bytes(value)
    return {"adamw": adamw, "masked": masked, "selection": selection}


def _time_forwards(model, inputs, count: int) -> list[float]:
    import torch

    times = []
    with torch.no_grad():
        for _ in range(count):
            start = time.perf_counter()
            model(inputs)
            times.append(time.perf_counter() - start)
    return times


def _time_paired(model, reference, inputs, count: int) -> tuple[list[float], list[float]]:
    """Eval forwards of ``model`` and ``reference`` in alternation (drift on a shared machine
    hits both alike): the two lists of times."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(count):
        for index, times_of in ((0, model), (1, reference)):
            times[index].extend(_time_forwards(times_of, inputs, 1))
    return times


def _paired_ratio(times: list[float], reference: list[float], warmup: int) -> float:
    """Median over the measured iterations of time / reference time."""
    return statistics.median(a / b for a, b in zip(times[warmup:], reference[warmup:]))


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def worker(backbone_name: str, label: str, steps: int, warmup: int) -> dict:
    """One case in this process; returns its measurements (or why the method cannot run)."""
    import torch

    from weatherpeft.adapters import load_merged, save_adapter, save_merged
    from weatherpeft.methods.registry import apply_method
    from weatherpeft.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    _, method, budget, options = next(case for case in CASES if case[0] == label)
    backbone = _backbone(backbone_name)
    inputs, target = _batch(backbone)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_bytes = (backbone.save_checkpoint(Path(folder) / "ckpt") / "model.safetensors").stat().st_size
    backbone.eval()
    frozen_times = _time_forwards(backbone, inputs, warmup + steps)
    backbone.train()
    pretrained = backbone.pretrained_count()
    try:
        adaptation = apply_method(method, backbone, budget, options)
    except ValueError as error:  # BudgetError and other refusals: the row says why
        return {"backbone": backbone_name, "case": label, "method": method, "budget": budget,
                "parameters": pretrained, "checkpoint_bytes": checkpoint_bytes,
                "error": f"{type(error).__name__}: {error}"}
    task = _FixedBatchTask(inputs, target)
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(steps=warmup + steps, batch_size=1, lr=1e-4, grad_clip=1.0,
                             log_every=0, progress=False, out_dir=folder)
        trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                          param_groups=adaptation.param_groups(config.weight_decay))
        refresh_times = _time_refreshes(adaptation)
        start = time.perf_counter()
        for hook in trainer.hooks:
            if hasattr(hook, "on_fit_start"):
                hook.on_fit_start(trainer)
        setup_s = time.perf_counter() - start
        rss_built = _status("VmRSS")
        batches = iter(lambda: (inputs, target), None)
        step_times = []
        adaptation.train()
        for _ in range(warmup + steps):
            start = time.perf_counter()
            trainer._train_step(batches)
            step_times.append(time.perf_counter() - start)
        peak = _status("VmHWM")
        state = optimizer_state_bytes(trainer.optimizer, adaptation.masked_updates)
        adapter_bytes = (save_adapter(adaptation, Path(folder) / "adapter")
                         / "adapter.safetensors").stat().st_size
    report = adaptation.report()
    # Eval: against a fresh frozen copy of the backbone, forwards in alternation.
    reference = _backbone(backbone_name).eval()
    adaptation.eval()
    adapted_times, reference_times = _time_paired(adaptation, reference, inputs, warmup + steps)
    adapted_ratio = _paired_ratio(adapted_times, reference_times, warmup)
    # The extra tokens alone: a frozen copy with as many zero prompt tokens at every site.
    zero_ratio = None
    tokens = adaptation.prompt_tokens()
    if tokens:
        from weatherpeft.methods.prompts import PromptInjector

        zeros = {site: torch.zeros(sum(t.shape[0] for t in parts), parts[0].shape[1])
                 for site, parts in tokens.items()}
        padded = _backbone(backbone_name).eval()
        PromptInjector(padded, lambda: zeros).attach()
        zero_times, zero_reference = _time_paired(padded, reference, inputs, warmup + steps)
        zero_ratio = _paired_ratio(zero_times, zero_reference, warmup)
        del padded
    # Deployment: the merged model as adapters.save_merged writes it and load_merged reads it.
    merged_times, merged_ratio, merged_bytes, merge_error = None, None, None, None
    with tempfile.TemporaryDirectory() as folder:
        try:
            merged_path = save_merged(adaptation, Path(folder) / "merged")
        except ValueError as error:  # AdaptFormer: not mergeable
            merge_error = f"not mergeable: {error}"
        else:
            merged_bytes = _folder_bytes(merged_path)
            deployed = load_merged(merged_path).eval()
            merged_times, merged_reference = _time_paired(deployed, reference, inputs, warmup + steps)
            merged_ratio = _paired_ratio(merged_times, merged_reference, warmup)
            reference_times += merged_reference[warmup:]
    return {
        "backbone": backbone_name, "case": label, "method": method, "budget": budget,
        "parameters": report.pretrained,
        "step_s": statistics.median(step_times[warmup:]),
        "refresh_s": statistics.median(refresh_times) if refresh_times else None,
        "refreshes": len(refresh_times), "setup_s": setup_s,
        "peak_rss_bytes": peak, "rss_growth_bytes": peak - rss_built,
        "optimizer_state_bytes": state["adamw"] + state["masked"],
        "adamw_state_bytes": state["adamw"], "masked_state_bytes": state["masked"],
        "selection_state_bytes": state["selection"],
        "adapter_bytes": adapter_bytes, "checkpoint_bytes": checkpoint_bytes,
        "merged_bytes": merged_bytes,
        "trainable": report.trainable, "stored": report.stored,
        "trainable_fraction": report.trainable_fraction,
        "resolved": adaptation.resolved,
        "frozen_eval_s": statistics.median(frozen_times[warmup:]),
        "reference_eval_s": statistics.median(reference_times[warmup:]),
        "adapted_eval_s": statistics.median(adapted_times[warmup:]),
        "merged_eval_s": statistics.median(merged_times[warmup:]) if merged_times else None,
        "adapted_over_frozen": adapted_ratio, "merged_over_frozen": merged_ratio,
        "zero_prompts_over_frozen": zero_ratio,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "merge_error": merge_error,
        "error": None,
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
    """The Task members the Trainer's step uses: the loss of one fixed batch; as the training
    split (Child-Tuning's Fisher before training), that batch ``train_batches`` times."""

    train_batches = 64

    def __init__(self, inputs, target):
        self.inputs, self.target = inputs, target

    def dataloader(self, split, batch_size):
        return [(self.inputs, self.target)] * self.train_batches

    def training_loss(self, model, batch):
        import torch

        prediction = model(batch[0])
        errors = [torch.mean((prediction.surf_vars[k] - v) ** 2) / v.var()
                  for k, v in batch[1].surf_vars.items()]
        errors += [torch.mean((prediction.atmos_vars[k] - v) ** 2) / v.var()
                   for k, v in batch[1].atmos_vars.items()]
        return torch.stack(errors).mean()


def _fixed(value) -> str:
    """A ratio: two decimals, or three significant digits below 0.1."""
    if value is None:
        return ""
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.3g}"


def _ratio(value, reference) -> str:
    return "" if value is None or not reference else _fixed(value / reference)


def _load(r: dict) -> str:
    """The 1-minute load average(s) when the case's rounds finished."""
    loads = r.get("load_averages") or []
    return " / ".join(f"{x[0]:.1f}" for x in loads)


def _note(r: dict) -> str:
    notes = []
    if r.get("error"):
        notes.append(r["error"])
    exception = (r.get("resolved") or {}).get("budget_exception")
    if exception:
        notes.append(exception)
    if r.get("merge_error"):
        notes.append(r["merge_error"].split(":")[0] + " (adapter deployment only)")
    if r.get("refreshes") and r.get("steps_run") and r["refreshes"] < r["steps_run"]:
        notes.append(f"{r['refreshes']} refresh(es) in {r['steps_run']} steps")
    return "; ".join(n.replace("|", "/").replace("\n", " ") for n in notes)


def _markdown_tables(rows: list[dict]) -> str:
    """One table per backbone; ratios against full fine-tuning of the same backbone."""
    lines = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone]
        full = next((r for r in mine if r["case"] == "full" and not r.get("error")), None)
        frozen = [r["reference_eval_s"] for r in mine if r.get("reference_eval_s") is not None]
        frozen_text = f"; frozen eval forward {statistics.median(frozen):.3f} s" if frozen else ""
        info = next((r for r in mine if r.get("parameters")), {"parameters": 0, "checkpoint_bytes": 0})
        lines += [f"\n### {backbone} ({info['parameters'] / 1e6:.2f} M parameters, checkpoint "
                  f"{info['checkpoint_bytes']:,} bytes{frozen_text})\n",
                  "| case | trainable | step s | × full | refresh s | refresh / step | set-up s | "
                  "peak RSS MiB | growth MiB | × full | optimizer state bytes | × full | "
                  "selection state bytes | adapter bytes | / checkpoint | eval cached × frozen | "
                  "eval zero prompts × frozen | eval merged × frozen | load | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            if r.get("error"):
                lines.append(f"| {r['case']} |" + " — |" * 18 + f" {_note(r)} |")
                continue
            refresh = "" if r["refresh_s"] is None else f"{r['refresh_s']:.3f}"
            per_step = "" if r["refresh_s"] is None else f"{r['refresh_s'] / r['step_s']:.2f}"
            setup = f"{r['setup_s']:.3f}" if r["setup_s"] >= 0.0005 else ""
            selection = f"{r['selection_state_bytes']:,}" if r["selection_state_bytes"] else ""
            lines.append(
                f"| {r['case']} | {r['trainable_fraction']:.3%} | {r['step_s']:.3f} | "
                f"{_ratio(r['step_s'], full and full['step_s'])} | {refresh} | {per_step} | {setup} | "
                f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['rss_growth_bytes'] / 2**20:.0f} | "
                f"{_ratio(r['rss_growth_bytes'], full and full['rss_growth_bytes'])} | "
                f"{r['optimizer_state_bytes']:,} | "
                f"{_ratio(r['optimizer_state_bytes'], full and full['optimizer_state_bytes'])} | "
                f"{selection} | {r['adapter_bytes']:,} | "
                f"{r['adapter_bytes'] / r['checkpoint_bytes']:.2%} | "
                f"{_fixed(r['adapted_over_frozen'])} | {_fixed(r.get('zero_prompts_over_frozen'))} | "
                f"{_fixed(r['merged_over_frozen']) or '—'} | {_load(r)} | {_note(r)} |")
    return "\n".join(lines)


#: What the columns mean (written above the tables).
LEGEND = """\
Columns: *trainable* — entries an optimizer step may change, % of the pretrained parameters
(SFAS: the per-step k). *step s* — median Trainer step (forward, backward, hooks, clipping,
AdamW, masked update); *× full* — against full fine-tuning on the same backbone. *refresh s*
— median SFAS refresh (scores, noise, global top-k), inside the step time. *set-up s* —
one-off work before the first step (Child-Tuning's Fisher over 16 batches, the random mask).
*peak RSS* — the process's VmHWM; *growth* — peak RSS minus the RSS after the model and
method were built (what training itself adds; the interpreter and libraries are in every
case's peak). *optimizer state bytes* — torch AdamW's state tensors plus the masked updates'
per-entry state (selected indices, exp_avg, exp_avg_sq, step counts) after training.
*selection state bytes* — the masked updates' other tensors (one byte per selectable entry
for the "moved" set the adapter file needs; SFAS's Fisher accumulators when R > 1).
*adapter bytes* — `adapter.safetensors` after training; */ checkpoint* — against the
backbone's `model.safetensors`. *eval cached × frozen* — eval forward of the adapted model
(adapters live, prompts cached) over that of a fresh frozen copy of the backbone, the two
timed in alternation in the same process after training (median of the paired ratios);
*eval zero prompts × frozen* — a frozen copy with as many zero prompt tokens injected at
every site as the method prepends, over the frozen model: what the extra tokens cost by
themselves (the part of *eval cached* no implementation of prompting can avoid).
*eval merged × frozen* — the same for the deployed model (`adapters.save_merged` →
`load_merged`: trained weights folded in, fixed prompt tokens). *load* — the 1-minute load
average of the machine when each round of the case finished."""


def _machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return {"cpu": model, "logical_cpus": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)), "threads_per_case": 1,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def _command() -> str:
    python = Path(sys.executable)
    shown = (os.path.relpath(python, ROOT) if python.is_relative_to(ROOT)
             else str(python))
    script = os.path.relpath(Path(__file__).resolve(), ROOT)
    return shlex.join([shown, script, *sys.argv[1:]])


def _markdown(rows: list[dict], meta: dict) -> str:
    machine = meta["machine"]
    header = [
        "# Efficiency of fine-tuning methods, side by side",
        "",
        f"- date: {meta['started']} → {meta['finished']} (UTC), {meta['wall_s'] / 60:.1f} min",
        f"- machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
        f"({machine['cpus_available']} available), every case on {machine['threads_per_case']} "
        f"torch thread in a fresh process; load average at start "
        f"{' / '.join(map(str, machine['load_average']))}, at end "
        f"{' / '.join(map(str, meta['load_average_end']))}; Python {machine['python']}, "
        f"torch {machine['torch']}, {machine['platform']}",
        f"- command (from the repository root): `{meta['command']}`",
        f"- {meta['rounds']} round(s), cases alternated, median over rounds; each case: "
        f"{meta['warmup']} warm-up + {meta['steps']} measured steps (and as many eval "
        f"forwards), batch 1 at 32 × 64, lr 1e-4, budget {BUDGET} (full: every weight)",
        "",
        LEGEND,
    ]
    return "\n".join(header) + "\n" + _markdown_tables(rows) + "\n"


def _combine(runs: list[dict]) -> dict:
    """One row from the rounds of a case: medians of times and memory, the rest as measured."""
    failed = next((r for r in runs if r.get("error")), None)
    if failed:
        return {**failed, "rounds": len(runs)}
    merged = dict(runs[0])
    for key, value in runs[0].items():
        values = [r[key] for r in runs if r.get(key) is not None]
        if isinstance(value, float) and values:
            merged[key] = statistics.median(values)
        elif key in ("peak_rss_bytes", "rss_growth_bytes") and values:
            merged[key] = round(statistics.median(values))
    merged["rounds"] = len(runs)
    merged["load_averages"] = [r["load_average"] for r in runs if r.get("load_average")]
    return merged


def _resolve_cases(names: list[str]) -> list[str]:
    known = [c[0] for c in CASES]
    resolved = [ALIASES.get(name, name) for name in names]
    unknown = [name for name in resolved if name not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {known} (aliases: {ALIASES})")
    return list(dict.fromkeys(resolved))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", choices=["tiny", "small"], default=None,
                        help="default: tiny small (--quick: tiny)")
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES],
                        help="labels of CASES (quote those with spaces); 'sfas' and 'weatherpeft' "
                             "mean their R=1 cases")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (--quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps, default 6 (--quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (--quick: 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path; the Markdown goes next to it as .md (default "
                             "benchmarks/results/efficiency.json; --quick: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny backbone, 1 round, 1 + 2 steps, results to a "
                             "temporary folder (explicit flags still win)")
    parser.add_argument("--worker", nargs=2, metavar=("BACKBONE", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.backbones = args.backbones or (["tiny"] if quick else ["tiny", "small"])
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 2)
    args.steps = args.steps if args.steps is not None else (2 if quick else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "weatherpeft-efficiency-quick" / "efficiency.json"
                    if quick else ROOT / "benchmarks" / "results" / "efficiency.json")
    if args.worker:
        row = worker(*args.worker, args.steps, args.warmup)
        row["steps_run"] = args.warmup + args.steps
        print(json.dumps(row, default=str))
        return
    cases = _resolve_cases(args.cases)
    meta = {"started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "machine": _machine(), "command": _command(), "rounds": args.rounds,
            "steps": args.steps, "warmup": args.warmup, "budget": BUDGET,
            "backbones": args.backbones, "cases": cases}
    began = time.perf_counter()
    results: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for backbone in args.backbones:
            for case in cases:
                command = [sys.executable, __file__, "--worker", backbone, case,
                           "--steps", str(args.steps), "--warmup", str(args.warmup)]
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    print(f"{backbone} / {case} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    row = {"backbone": backbone, "case": case,
                           "error": f"worker failed (exit {done.returncode}): {last}"}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                row["case_wall_s"] = time.perf_counter() - started
                results.setdefault((backbone, case), []).append(row)
                if row.get("error"):
                    summary = row["error"][:150]
                else:
                    merged = row["merged_over_frozen"]
                    summary = (f"step {row['step_s']:.3f} s, peak {row['peak_rss_bytes'] / 2**20:.0f} MiB, "
                               f"optimizer state {row['optimizer_state_bytes'] / 2**20:.2f} MiB, eval × "
                               f"frozen {row['adapted_over_frozen']:.2f} cached / "
                               + (f"{merged:.2f} merged" if merged else "not merged"))
                print(f"round {round_index + 1}: {backbone:>5} {case:<20} {summary} "
                      f"[{row['case_wall_s']:.0f} s]", flush=True)
    rows = [_combine(runs) for runs in results.values()]
    meta["finished"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    meta["wall_s"] = time.perf_counter() - began
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    markdown = _markdown(rows, meta)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
