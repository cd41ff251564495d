"""The benchmark's tables and plots: records of :mod:`weatherpeft.benchmark` → Markdown, PNG.

Tables follow the paper's layout: downscaling RMSE of T2m, U10, V10, T850, Z500;
post-processing CRPS per channel; precipitation SEEPS and ACC at each lead; each with its
references (bilinear interpolation, the raw ensemble, persistence, climatology), one row
per method and budget with what it trains per step, stores, and its head and encoder/decoder
counts, mean ± standard deviation over seeds. The best parameter-efficient method per column
and budget is in bold. Then the paper's claims and ablation order (:data:`CLAIMS`, evaluated
by :func:`check_claim`), the learning rates chosen on validation, a cost table, and the plots
``quality_vs_stored*.png`` (each task's score against the parameters an adapter stores) and
``learning_curves.png`` (validation loss against step).

Records are grouped by view: protocol (``encoder_decoder``; records without one are "frozen")
× accounting ("trainable"; "stored" runs SFAS and WeatherPEFT strictly capped, every other
method's records serve both). One set of tables and claims per view. Every table also shows
the "encoder/decoder only" reference: the frozen method under "train".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weatherpeft.atomic import atomic_write, write_text

__all__ = ["CLAIMS", "PAPER_METHODS", "Claim", "aggregate", "benchmark_markdown", "check_claim", "claims",
           "protocol_table", "protocols",
           "save_learning_curves", "save_quality_plot", "views", "write_report"]

#: The paper's comparison, in its table order (the benchmark's ``paper`` profile runs these).
PAPER_METHODS = ("full", "frozen", "lora", "dora", "ssf", "vpt", "adaptformer", "child_tuning",
                 "random_mask", "tadp", "sfas", "weatherpeft")
#: The paper's downscaling variables, in its column order (our channel names).
DOWNSCALING_CHANNELS = ("2t", "10u", "10v", "t850", "z500")
#: Reference sources each task reports beside the model, and how the table names them.
REFERENCES = {"downscaling": {"bilinear": "bilinear interpolation"},
              "postprocessing": {"ensemble": "raw ensemble"},
              "precipitation": {"persistence": "persistence", "climatology": "climatology"}}
NOT_PEFT = ("full", "frozen")
#: How the report introduces each protocol's tables.
PROTOCOL_TITLES = {
    "frozen": "Protocol `encoder_decoder=frozen`: the encoder/decoder are pretrained weights "
              "inside the budget (frozen unless a method trains them)",
    "train": "Protocol `encoder_decoder=train` (the paper's): every method, frozen and full "
             "included, also trains the encoder/decoder whole, outside the budget and the "
             "stored counts (their size is given apart)"}
ACCOUNTING_TITLES = {
    "trainable": "accounting: equal entries trained per step (the paper's; SFAS and WeatherPEFT "
                 "store the union of what they moved)",
    "stored": "accounting: equal entries stored (SFAS and WeatherPEFT capped, budget_mode strict)"}
#: The reference row of the encoder/decoder alone: the frozen method under "train".
ENCODER_DECODER_ONLY = "encoder/decoder only"
#: Methods whose "stored" accounting differs (they run once per accounting).
UNION_METHODS = ("sfas", "weatherpeft")


def _protocol(record: Mapping[str, Any]) -> str:
    return record.get("encoder_decoder") or "frozen"


def _accounting(record: Mapping[str, Any]) -> str:
    return record.get("accounting") or "trainable"


def _in_view(record: Mapping[str, Any], encoder_decoder: str, accounting: str) -> bool:
    return _protocol(record) == encoder_decoder and \
        (record["method"] not in UNION_METHODS or _accounting(record) == accounting)


def protocols(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Protocols with runs of their own, in record order (the encoder/decoder-only reference
    alone does not make "train" one)."""
    found = [_protocol(r) for r in records if _protocol(r) == "frozen" or r["method"] != "frozen"]
    return list(dict.fromkeys(found or [_protocol(r) for r in records]))


def views(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(protocol, accounting) pairs the records hold, protocols in record order."""
    accountings = list(dict.fromkeys(_accounting(r) for r in records if r["method"] in UNION_METHODS))
    return [(p, a) for p in protocols(records) for a in accountings or ["trainable"]]


TITLES = {"downscaling": "Global downscaling: RMSE (lower is better)",
          "postprocessing": "Ensemble post-processing: CRPS (lower is better)",
          "precipitation": "Regional precipitation: SEEPS (lower is better) and ACC (higher is better)"}


def aggregate(records: Sequence[Mapping[str, Any]], encoder_decoder: str = "frozen",
              accounting: str = "trainable") -> dict[tuple, dict[str, Any]]:
    """(task, method, budget) → {"metrics": {key: (mean, std, n)}, "runs": [records]} over seeds,
    of the records in the view (protocol ``encoder_decoder``, ``accounting``)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        if not record.get("error") and _in_view(record, encoder_decoder, accounting):
            groups.setdefault((record["task"], record["method"], record["budget"]), []).append(record)
    result = {}
    for key, runs in groups.items():
        names = sorted(set().union(*(r["metrics"] for r in runs)))
        metrics = {}
        for name in names:
            values = [float(r["metrics"][name]) for r in runs if name in r["metrics"]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            metrics[name] = (statistics.fmean(values), spread, len(values))
        result[key] = {"metrics": metrics, "runs": runs}
    return result


def _columns(task: str, metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(header, metric suffix after the source) of a task's table."""
    if task == "downscaling":
        return [(c, f"rmse/{c}") for c in DOWNSCALING_CHANNELS if f"model/rmse/{c}" in metrics]
    if task == "postprocessing":
        return [(k.split("/")[-1], "crps/" + k.split("/")[-1]) for k in metrics if k.startswith("model/crps/")]
    leads = sorted({k.split("/")[-1] for k in metrics if k.startswith("model/seeps/")},
                   key=lambda lead: float(lead.rstrip("h")))
    return [(f"SEEPS {lead}", f"seeps/tp/{lead}") for lead in leads] + \
        [(f"ACC {lead}", f"acc/tp/{lead}") for lead in leads]


def _number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.4g}"
    return f"{value:.3f}" if magnitude >= 0.01 else f"{value:.2e}"


def _cell(entry: tuple[float, float, int] | None, bold: bool = False) -> str:
    if entry is None:
        return "—"
    mean, spread, n = entry
    text = _number(mean) + (f" ± {spread:.2g}" if n > 1 else "")
    return f"**{text}**" if bold else text


def _budget_label(budget: float | None) -> str:
    return "—" if budget is None else f"{budget:.1%}".replace(".0%", "%")


def _order(groups: Mapping[tuple, Any], task: str) -> list[tuple]:
    def rank(key: tuple) -> tuple:
        _, method, budget = key
        position = PAPER_METHODS.index(method) if method in PAPER_METHODS else len(PAPER_METHODS)
        return (budget is not None, budget or 0.0, position, method)

    return sorted((k for k in groups if k[0] == task), key=rank)


def _higher_is_better(suffix: str) -> bool:
    return suffix.startswith("acc/")


def _count(value: Any, pretrained: Any = None) -> str:
    if value is None:
        return "—"
    return f"{value:,}" + (f" ({value / pretrained:.2%})" if pretrained else "")


def _size_cells(run: Mapping[str, Any]) -> str:
    """trainable / step, stored (with % of the backbone), head, encoder/decoder trained."""
    pretrained = run.get("pretrained")
    return " | ".join((_count(run.get("trainable"), pretrained), _count(run.get("stored"), pretrained),
                       _count(run.get("head")), _count(run.get("encoder_decoder_parameters") or None)))


# Above radon C on purpose: reference rows, the encoder/decoder-only row and per-column best marking of one table.
def _task_table(task: str, groups: Mapping[tuple, Mapping[str, Any]],
                coder_only: Mapping[str, Any] | None = None, protocol: str = "frozen",
                title_suffix: str = "") -> list[str]:
    """One task's table; ``coder_only``: the encoder/decoder-only group (frozen under "train"),
    shown as a reference row (and not again as the frozen method's row under "train")."""
    keys = [k for k in _order(groups, task) if not (protocol == "train" and k[1] == "frozen")]
    if not keys:
        return []
    columns = _columns(task, groups[keys[0]]["metrics"])
    lines = [f"## {TITLES.get(task, task)}{title_suffix}", "",
             "| method | budget | trainable / step (% of backbone) | stored | head | enc/dec trained | "
             + " | ".join(h for h, _ in columns) + " |", "|---|---|---|---|---|---|" + "---|" * len(columns)]
    reference_metrics = groups[keys[0]]["metrics"]
    blank = " | ".join(["—"] * 4)
    for source, label in REFERENCES.get(task, {}).items():
        cells = [_cell(reference_metrics.get(f"{source}/{suffix}")) for _, suffix in columns]
        if any(c != "—" for c in cells):
            lines.append(f"| *{label}* | — | {blank} | " + " | ".join(cells) + " |")
    if coder_only is not None:
        cells = [_cell(coder_only["metrics"].get(f"model/{suffix}")) for _, suffix in columns]
        lines.append(f"| *{ENCODER_DECODER_ONLY}* | — | {_size_cells(coder_only['runs'][0])} | "
                     + " | ".join(cells) + " |")
    best: dict[tuple, float] = {}
    for key in keys:
        if key[1] in NOT_PEFT:
            continue
        for _, suffix in columns:
            entry = groups[key]["metrics"].get(f"model/{suffix}")
            if entry is None:
                continue
            sign = -1 if _higher_is_better(suffix) else 1
            slot = (key[2], suffix)
            best[slot] = min(best.get(slot, math.inf), sign * entry[0])
    for key in keys:
        _, method, budget = key
        group = groups[key]
        cells = []
        for _, suffix in columns:
            entry = group["metrics"].get(f"model/{suffix}")
            sign = -1 if _higher_is_better(suffix) else 1
            bold = method not in NOT_PEFT and entry is not None and \
                sign * entry[0] == best.get((budget, suffix))
            cells.append(_cell(entry, bold))
        lines.append(f"| {method} | {_budget_label(budget)} | {_size_cells(group['runs'][0])} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _cost_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Cost per run", "",
             "Wall time and step time come from runs sharing the machine (see `workers`); the "
             "efficiency benchmark measures speed side by side. *Estimated* is the cost model's "
             "(`weatherpeft benchmark --dry-run`). Peak memory is the run's process peak "
             "(resident set on CPU, allocated on CUDA).", "",
             "| stage | task | method | budget | encoder/decoder | accounting | seed | steps | lr / new_lr | "
             "trainable / step | stored | head | enc/dec trained | adapter KiB | wall s | estimated s | "
             "s / step | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lead = (f"| {r.get('stage', 'test')} | {r['task']} | {r['method']} | {_budget_label(r['budget'])} | "
                f"{_protocol(r)} | {_accounting(r)} | {r['seed']} |")
        if r.get("error"):
            lines.append(lead + " — |" * 10 + f" {r['error'][:120]} |")
            continue
        step = "—" if r["step_seconds"] is None else f"{r['step_seconds']:.2f}"
        wall = r.get("wall_seconds") or r["train_seconds"]
        estimated = r.get("estimated_seconds")
        lines.append(lead + f" {r['steps']} | {r['lr']:g} / {r['new_lr']:g} | {_count(r['trainable'])} | "
                     f"{_count(r['stored'])} | {_count(r['head'])} | "
                     f"{_count(r.get('encoder_decoder_parameters'))} | "
                     f"{(r['adapter_bytes'] or 0) / 1024:,.0f} | {wall:.0f} | "
                     f"{'—' if estimated is None else f'{estimated:.0f}'} | {step} | "
                     f"{(r['peak_memory_bytes'] or 0) / 2**20:,.0f} |")
    return lines + [""]


#: The metrics a task's claims and ablation compare (the paper's headline per task).
HEADLINE_METRICS = {"downscaling": "rmse/", "postprocessing": "crps/", "precipitation": "seeps/"}
#: How the claims name the methods.
NAMES = {"weatherpeft": "WeatherPEFT", "tadp": "TADP-only", "sfas": "SFAS-only",
         "child_tuning": "Child-Tuning_D", "random_mask": "the random mask", "vpt": "VPT-deep",
         "full": "full fine-tuning", "lora": "LoRA"}


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims as data, checked on one task's headline metric columns.

    ``kind``: "lowest" — ``subject`` is at least as good as every other PEFT method at its budget
    on every column; "gap" — it closes at least ``threshold`` of the gap from the best other PEFT
    method to ``other``; "within" — it is at most ``threshold`` (a fraction) worse than ``other``
    on every column (0: at least as good). ``budgets``: "small" (< 1 %), "large" (> 1 %) or "all".
    ``text`` names the claim; ``{budget}`` is filled in. ``ablation``: a step of the paper's
    ablation order.
    """

    text: str
    task: str
    kind: str
    subject: str = "weatherpeft"
    other: str = "full"
    budgets: str = "all"
    threshold: float = 0.0
    ablation: bool = False


_ABLATION_ORDER = (("weatherpeft", "tadp"), ("weatherpeft", "sfas"), ("sfas", "child_tuning"),
                   ("sfas", "random_mask"), ("tadp", "vpt"))
_TASK_LABELS = {"downscaling": "Downscaling", "postprocessing": "Post-processing",
                "precipitation": "Precipitation"}
#: The paper's claims, then its ablation order on every task.
CLAIMS = (
    Claim("Downscaling {budget}: WeatherPEFT has the lowest RMSE of all PEFT methods on T2m, U10, "
          "V10, T850, Z500", "downscaling", "lowest"),
    Claim("Downscaling {budget}: closes ≥ 30 % of the gap from the best other PEFT method to full "
          "fine-tuning", "downscaling", "gap", budgets="small", threshold=0.3),
    Claim("Downscaling {budget}: within 2 % of full fine-tuning on every variable", "downscaling",
          "within", budgets="large", threshold=0.02),
    Claim("Precipitation {budget}: WeatherPEFT SEEPS ≤ full fine-tuning at every lead", "precipitation",
          "within", budgets="large"),
    Claim("Precipitation {budget}: SFAS-only beats TADP-only (SEEPS)", "precipitation", "within",
          subject="sfas", other="tadp"),
    Claim("Post-processing {budget}: WeatherPEFT CRPS within 3 % of full fine-tuning", "postprocessing",
          "within", budgets="small", threshold=0.03),
) + tuple(Claim(f"Ablation order, {_TASK_LABELS[task]} {{budget}}: {NAMES[subject]} better than "
                f"{NAMES[other]} ({HEADLINE_METRICS[task].rstrip('/').upper()})", task, "within",
                subject=subject, other=other, ablation=True)
          for task in _TASK_LABELS for subject, other in _ABLATION_ORDER)


def _columns_of(groups: Mapping[tuple, Mapping[str, Any]], task: str) -> list[str]:
    """The headline metric columns (suffixes after ``model/``) the task's records have."""
    prefix = "model/" + HEADLINE_METRICS[task]
    names = {k[len("model/"):] for (t, _, _), g in groups.items() if t == task for k in g["metrics"]
             if k.startswith(prefix)}
    if task == "downscaling":
        return [f"rmse/{c}" for c in DOWNSCALING_CHANNELS if f"rmse/{c}" in names]
    return sorted(names, key=lambda n: (len(n), n))


def _entry_text(entry: tuple[float, float, int]) -> str:
    mean, spread, n = entry
    return _number(mean) + (f" ± {spread:.2g}" if n > 1 else "")


# Above radon C on purpose: the three claim kinds and the budget filter in one evaluator (claims are data).
def check_claim(claim: Claim, groups: Mapping[tuple, Mapping[str, Any]],
                budget: float) -> tuple[str, str, str, int] | None:
    """(claim, measured, verdict, seeds) of ``claim`` at ``budget`` on the aggregated records;
    None where the records lack what it compares."""
    if claim.budgets == "small" and budget >= 0.01 or claim.budgets == "large" and budget <= 0.01:
        return None
    columns = _columns_of(groups, claim.task)
    subject = groups.get((claim.task, claim.subject, budget))
    if subject is None or not columns:
        return None
    notes, passes, seeds = [], [], subject["metrics"][f"model/{columns[0]}"][2] \
        if f"model/{columns[0]}" in subject["metrics"] else 0
    other_budget = None if claim.other in NOT_PEFT else budget
    for column in columns:
        mine = subject["metrics"].get(f"model/{column}")
        if mine is None:
            continue
        label = column.split("/")[-1]
        sign = -1 if _higher_is_better(column) else 1
        if claim.kind in ("lowest", "gap"):
            rivals = {k[1]: g["metrics"][f"model/{column}"] for k, g in groups.items()
                      if k[0] == claim.task and k[2] == budget and k[1] not in (claim.subject, *NOT_PEFT)
                      and f"model/{column}" in g["metrics"]}
            if not rivals:
                continue
            rival, best = min(rivals.items(), key=lambda item: sign * item[1][0])
            if claim.kind == "lowest":
                passes.append(sign * mine[0] <= sign * best[0])
                notes.append(f"{label} {_entry_text(mine)} vs {rival} {_entry_text(best)}")
                continue
            reference = groups.get((claim.task, claim.other, None), {}).get("metrics", {}).get(f"model/{column}")
            if reference is None or reference[0] == best[0]:
                continue
            closed = (best[0] - mine[0]) / (best[0] - reference[0])
            passes.append(closed >= claim.threshold)
            notes.append(f"{label} {closed:.0%}")
            continue
        other = groups.get((claim.task, claim.other, other_budget), {}).get("metrics", {}).get(f"model/{column}")
        if other is None:
            continue
        excess = sign * (mine[0] - other[0]) / abs(other[0])
        passes.append(excess <= claim.threshold)
        notes.append(f"{label} {excess:+.1%}" if claim.threshold else
                     f"{label} {_entry_text(mine)} vs {_entry_text(other)}")
    if not passes:
        return None
    verdict = f"{'met' if all(passes) else 'not met'} ({sum(passes)}/{len(passes)})"
    return claim.text.format(budget=_budget_label(budget)), "; ".join(notes), verdict, seeds


def claims(groups: Mapping[tuple, Mapping[str, Any]]) -> list[tuple[str, str, str, int]]:
    """Every claim of :data:`CLAIMS` at every budget the records hold: (claim, measured, verdict,
    seeds), the paper's claims first, then its ablation order."""
    budgets = sorted({k[2] for k in groups if k[2] is not None})
    rows = [check_claim(claim, groups, budget) for claim in CLAIMS for budget in budgets]
    return [row for row in rows if row is not None]


def _selection_table(selection: Sequence[Mapping[str, Any]],
                     choices: Sequence[Mapping[str, Any]]) -> list[str]:
    if not choices:
        return []
    steps = sorted({(r["task"], r["steps"]) for r in selection if not r.get("error")})
    lines = ["## Learning rates chosen on the validation split", "",
             "Every method trains each (lr, new_lr) pair of the grid once (first seed, first budget) "
             "and keeps the pair with the lowest task loss over the whole validation split at the "
             "last step; the test runs use it at every budget, seed and accounting. No choice reads "
             "a test score. Schedule: " + ", ".join(f"{t} {s} steps" for t, s in steps) + ".", "",
             "| task | method | encoder/decoder | chosen lr / new_lr | validation loss per candidate | why |",
             "|---|---|---|---|---|---|"]
    for choice in choices:
        candidates = "; ".join(
            f"{c['lr']:g}/{c['new_lr']:g}: " + ("failed" if c.get("error") else
                                                "—" if c["val_loss"] is None else f"{c['val_loss']:.5g}")
            for c in choice["candidates"])
        lines.append(f"| {choice['task']} | {choice['method']} | {choice['encoder_decoder']} | "
                     f"{choice['lr']:g} / {choice['new_lr']:g} | {candidates} | {choice['reason']} |")
    return lines + [""]


def benchmark_markdown(records: Sequence[Mapping[str, Any]], about: Mapping[str, Any],
                       selection: Sequence[Mapping[str, Any]] = (),
                       choices: Sequence[Mapping[str, Any]] = ()) -> str:
    """The whole report: set-up, then per view (protocol × accounting) one table per task and
    the claims, then the learning rates chosen and the cost table."""
    seeds = sorted({r["seed"] for r in records})
    lines = ["# Benchmark", "",
             f"Command: `{about.get('command', '')}`  ",
             *(f"Earlier into the same folder (its records kept where this command's grid does not "
               f"cover them): `{chunk.get('command', '')}` (started {chunk.get('started')})  "
               for chunk in about.get("earlier", [])),
             f"Profile `{about.get('profile')}` · backbone `{about.get('config', {}).get('backbone')}` · "
             f"device {about.get('device')} · {about.get('workers')} worker(s) · torch {about.get('torch')} · "
             f"seeds {seeds} (mean ± std where more than one) · started {about.get('started')}"
             + (f", finished {about['finished']}" if about.get("finished") else "")
             + (f" · load average at start {about['load_average']:.1f}" if "load_average" in about else ""),
             ""]
    protocol = sorted({(r["task"], r["steps"], r["batch_size"]) for r in records
                       if not r.get("error") and r["steps"]})
    if protocol:
        lines += ["Every method: the same Trainer (AdamW, warm-up 10 % then cosine to 0.1×, clip 1.0), "
                  "data order and seed; `lr` for entries of pretrained weights, `new_lr` for what a method "
                  "adds and task heads (each method's pair: the cost table and, where chosen, the "
                  "selection table). " + "; ".join(f"{t}: {s} steps × batch {b}" for t, s, b in protocol)
                  + ". Learning curves: `learning_curves.png`.", ""]
    coder_only = aggregate(records, "train")
    found = views(records)
    several = len(found) > 1 or found != [("frozen", "trainable")]
    for protocol, accounting in found:
        groups = aggregate(records, protocol, accounting)
        if several:
            lines += [f"# {PROTOCOL_TITLES[protocol]}; {ACCOUNTING_TITLES[accounting]}", ""]
        suffix = "" if not several else f" — encoder/decoder {protocol}, {accounting}"
        for task in dict.fromkeys(r["task"] for r in records):
            lines += _task_table(task, groups, coder_only.get((task, "frozen", None)), protocol, suffix)
        checked = claims(groups)
        if checked:
            lines += [f"## The paper's claims and ablation order on this data{suffix}", "",
                      "| claim | measured (mean ± std over seeds) | verdict | seeds |", "|---|---|---|---|"]
            lines += [f"| {c} | {m} | {v} | {n} |" for c, m, v, n in checked] + [""]
    lines += protocol_table(records)
    lines += _selection_table(selection, choices)
    lines += _cost_table(list(selection) + list(records))
    return "\n".join(lines)


def _summary_score(task: str, metrics: Mapping[str, tuple]) -> float | None:
    """One number per run for the plot: the model's score relative to the task's reference
    (downscaling: RMSE / bilinear; post-processing: CRPS / raw ensemble), or mean SEEPS."""
    if task == "precipitation":
        values = [v[0] for k, v in metrics.items() if k.startswith("model/seeps/")]
        return statistics.fmean(values) if values else None
    source = "bilinear/rmse/" if task == "downscaling" else "ensemble/crps/"
    prefix = "model/" + source.split("/", 1)[1]
    ratios = [v[0] / metrics[source + k[len(prefix):]][0] for k, v in metrics.items()
              if k.startswith(prefix) and source + k[len(prefix):] in metrics]
    return statistics.fmean(ratios) if ratios else None


def _seed_summary(task: str, runs: Sequence[Mapping[str, Any]]) -> tuple[float, float, int] | None:
    """The task's summary score (:func:`_summary_score`) per run, as (mean, std, n) over seeds."""
    values = [_summary_score(task, {k: (float(v), 0.0, 1) for k, v in r["metrics"].items()}) for r in runs]
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


SUMMARY_NAMES = {"downscaling": "RMSE / bilinear, mean of the variables",
                 "postprocessing": "CRPS / raw ensemble, mean of the channels",
                 "precipitation": "SEEPS, mean of the leads"}


def protocol_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Both protocols side by side (per-step accounting, smallest budget of each method), one
    summary score per task, and the gap between full fine-tuning and the encoder/decoder alone:
    what the protocol decides. Empty unless both protocols ran a method besides "frozen"."""
    if set(protocols(records)) != {"frozen", "train"}:
        return []
    frozen, train = aggregate(records, "frozen"), aggregate(records, "train")
    lines = ["# The two protocols side by side", "",
             "Summary score per task (lower is better), mean ± std over seeds; each method at its "
             "smallest budget, per-step accounting. Under \"frozen\" the frozen method is the "
             "pretrained backbone untouched; under \"train\" it is the encoder/decoder-only reference.", "",
             "| task (score) | method | budget | encoder/decoder frozen | encoder/decoder trained |",
             "|---|---|---|---|---|"]
    gaps = []
    for task in dict.fromkeys(r["task"] for r in records):
        budgets: dict[str, float | None] = {}
        for _, method, budget in _order({**frozen, **train}, task):
            budgets.setdefault(method, budget)
        for method, budget in budgets.items():
            cells = [_cell(_seed_summary(task, groups[(task, method, budget)]["runs"]))
                     if (task, method, budget) in groups else "—" for groups in (frozen, train)]
            label = f"frozen / {ENCODER_DECODER_ONLY}" if method == "frozen" else method
            lines.append(f"| {task} ({SUMMARY_NAMES.get(task, 'score')}) | {label} | "
                         f"{_budget_label(budget)} | {cells[0]} | {cells[1]} |")
        full, only = (train.get((task, m, None)) for m in ("full", "frozen"))
        if full and only:
            a, b = _seed_summary(task, full["runs"]), _seed_summary(task, only["runs"])
            if a and b:
                gaps.append(f"{task} {1 - a[0] / b[0]:.1%}")
    if gaps:
        lines += ["", "Full fine-tuning's gain over the encoder/decoder alone under \"train\" (the room "
                  "the backbone leaves a method): " + ", ".join(gaps) + "."]
    return lines + [""]


def save_quality_plot(records: Sequence[Mapping[str, Any]], path: str | Path,
                      encoder_decoder: str = "frozen", accounting: str = "trainable") -> Path | None:
    """One panel per task: score against stored parameters (log), a line per method over budgets,
    for the records in the view (protocol ``encoder_decoder``, ``accounting``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = aggregate(records, encoder_decoder, accounting)
    tasks = list(dict.fromkeys(k[0] for k in groups))
    if not tasks:
        return None
    labels = {"downscaling": "RMSE / bilinear RMSE, mean over channels",
              "postprocessing": "CRPS / raw-ensemble CRPS, mean over channels",
              "precipitation": "SEEPS, mean over leads"}
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False,
                                constrained_layout=True)
    colours = plt.get_cmap("tab20").colors
    for axis, task in zip(axes[0], tasks):
        keys = _order(groups, task)
        for index, method in enumerate(dict.fromkeys(k[1] for k in keys)):
            points = []
            for key in (k for k in keys if k[1] == method):
                score = _summary_score(task, groups[key]["metrics"])
                stored = groups[key]["runs"][0].get("stored")
                if score is None:
                    continue
                if method == "frozen" or not stored:
                    axis.axhline(score, color="grey", linestyle=":", label=f"{method}")
                    continue
                points.append((stored, score))
            if points:
                xs, ys = zip(*sorted(points))
                style = dict(marker="*", markersize=12, linewidth=2, color="black") \
                    if method == "weatherpeft" else \
                    dict(marker="o", markersize=5, linewidth=1, color=colours[index % len(colours)])
                axis.plot(xs, ys, label=method, **style)
        axis.set_xscale("log")
        axis.set_xlabel("parameters stored in the adapter")
        axis.set_ylabel(labels.get(task, "score"))
        axis.set_title(task)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(figure, Path(path))


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    finally:
        plt.close(figure)


#: The learning curves drawn: (label, method, protocol or None for the panel's own).
CURVES = (("full", "full", None), (ENCODER_DECODER_ONLY, "frozen", "train"), ("LoRA", "lora", None),
          ("WeatherPEFT", "weatherpeft", None))


def _mean_curve(runs: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float]]:
    """Validation loss per step, mean over the runs (seeds) logging that step."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, loss in run.get("curve") or []:
            by_step.setdefault(int(step), []).append(float(loss))
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def save_learning_curves(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Validation loss against step: a row per protocol, a panel per task; full,
    encoder/decoder only, LoRA and WeatherPEFT (smallest budget, "trainable" accounting), mean
    over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = protocols(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    if not any(r.get("curve") for r in records):
        return None
    figure, axes = plt.subplots(len(rows), len(tasks), figsize=(5 * len(tasks), 3.6 * len(rows)),
                                squeeze=False, constrained_layout=True)
    for row, protocol in zip(axes, rows):
        for axis, task in zip(row, tasks):
            for label, method, fixed in CURVES:
                groups = aggregate(records, fixed or protocol)
                keys = sorted((k for k in groups if k[0] == task and k[1] == method),
                              key=lambda k: k[2] or 0.0)
                if method == "frozen" and fixed is None or not keys:
                    continue
                steps, losses = _mean_curve(groups[keys[0]]["runs"])
                if steps:
                    budget = "" if keys[0][2] is None else f" {_budget_label(keys[0][2])}"
                    axis.plot(steps, losses, marker=".", label=label + budget,
                              **({"color": "black", "linewidth": 2} if method == "weatherpeft" else {}))
            axis.set_title(f"{task} — encoder/decoder {protocol}", fontsize=9)
            axis.set_xlabel("step")
            axis.set_ylabel("validation loss")
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=7)
    return _save(figure, Path(path))


def write_report(records: Sequence[Mapping[str, Any]], about: Mapping[str, Any], out: str | Path,
                 selection: Sequence[Mapping[str, Any]] = (),
                 choices: Sequence[Mapping[str, Any]] = ()) -> None:
    """``benchmark.md``, ``learning_curves.png`` and one ``quality_vs_stored*.png`` per view
    (``quality_vs_stored.png`` for "frozen"/"trainable", else suffixed
    ``_encoder_decoder_<protocol>`` and ``_stored``) into ``out``."""
    out = Path(out)
    write_text(out / "benchmark.md", benchmark_markdown(records, about, selection, choices))
    for protocol, accounting in views(records):
        name = "quality_vs_stored" + ("" if protocol == "frozen" else f"_encoder_decoder_{protocol}") \
            + ("" if accounting == "trainable" else f"_{accounting}")
        save_quality_plot(records, out / f"{name}.png", protocol, accounting)
    save_learning_curves(records, out / "learning_curves.png")
