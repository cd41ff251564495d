"""The benchmark's tables and plots: records of :mod:`weatherpeft.benchmark` → Markdown, PNG.

Tables follow the paper's layout: downscaling RMSE of T2m, U10, V10, T850, Z500;
post-processing CRPS per channel; precipitation SEEPS and ACC at each lead; each with its
references (bilinear interpolation, the raw ensemble, persistence, climatology), one row
per method and budget, mean ± standard deviation over seeds. The best parameter-efficient
method per column and budget is in bold. A cost table and a check of the paper's claims
on this data follow, then ``quality_vs_stored.png``: each task's score against the
parameters an adapter stores.

Records are grouped by protocol (``encoder_decoder``; records without one are "frozen"): one
set of tables, claims and plot per protocol benchmarked. Every table also shows the
"encoder/decoder only" reference: the frozen method under "train".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from weatherpeft.atomic import atomic_write, write_text

__all__ = ["aggregate", "benchmark_markdown", "claims", "protocols", "save_quality_plot",
           "write_report"]

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
#: The reference row of the encoder/decoder alone: the frozen method under "train".
ENCODER_DECODER_ONLY = "encoder/decoder only"


def _protocol(record: Mapping[str, Any]) -> str:
    return record.get("encoder_decoder") or "frozen"


def protocols(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Protocols with runs of their own, in record order (the encoder/decoder-only reference
    alone does not make "train" one)."""
    found = [_protocol(r) for r in records if _protocol(r) == "frozen" or r["method"] != "frozen"]
    return list(dict.fromkeys(found or [_protocol(r) for r in records]))
TITLES = {"downscaling": "Global downscaling: RMSE (lower is better)",
          "postprocessing": "Ensemble post-processing: CRPS (lower is better)",
          "precipitation": "Regional precipitation: SEEPS (lower is better) and ACC (higher is better)"}


def aggregate(records: Sequence[Mapping[str, Any]],
              encoder_decoder: str = "frozen") -> dict[tuple, dict[str, Any]]:
    """(task, method, budget) → {"metrics": {key: (mean, std, n)}, "runs": [records]} over seeds,
    of the records under protocol ``encoder_decoder``."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        if not record.get("error") and _protocol(record) == encoder_decoder:
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
    from weatherpeft.benchmark import PAPER_METHODS

    def rank(key: tuple) -> tuple:
        _, method, budget = key
        position = PAPER_METHODS.index(method) if method in PAPER_METHODS else len(PAPER_METHODS)
        return (budget is not None, budget or 0.0, position, method)

    return sorted((k for k in groups if k[0] == task), key=rank)


def _higher_is_better(suffix: str) -> bool:
    return suffix.startswith("acc/")


def _task_table(task: str, groups: Mapping[tuple, Mapping[str, Any]],
                coder_only: Mapping[str, Any] | None = None, protocol: str = "frozen") -> list[str]:
    """One task's table; ``coder_only``: the encoder/decoder-only group (frozen under "train"),
    shown as a reference row (and not again as the frozen method's row under "train")."""
    keys = [k for k in _order(groups, task) if not (protocol == "train" and k[1] == "frozen")]
    if not keys:
        return []
    columns = _columns(task, groups[keys[0]]["metrics"])
    suffix_title = "" if protocol == "frozen" else f" — encoder/decoder {protocol}"
    lines = [f"## {TITLES.get(task, task)}{suffix_title}", "",
             "| method | budget | stored (% of backbone) | " + " | ".join(h for h, _ in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    reference_metrics = groups[keys[0]]["metrics"]
    for source, label in REFERENCES.get(task, {}).items():
        cells = [_cell(reference_metrics.get(f"{source}/{suffix}")) for _, suffix in columns]
        if any(c != "—" for c in cells):
            lines.append(f"| *{label}* | — | — | " + " | ".join(cells) + " |")
    if coder_only is not None:
        cells = [_cell(coder_only["metrics"].get(f"model/{suffix}")) for _, suffix in columns]
        size = coder_only["runs"][0].get("encoder_decoder_parameters")
        stored = "—" if size is None else f"{size:,} enc/dec"
        lines.append(f"| *{ENCODER_DECODER_ONLY}* | — | {stored} | " + " | ".join(cells) + " |")
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
        run = group["runs"][0]
        stored = f"{run['stored']:,} ({run['stored'] / max(run['pretrained'], 1):.2%})" \
            if run.get("stored") is not None else "—"
        if run.get("encoder_decoder_parameters"):
            stored += f" + {run['encoder_decoder_parameters']:,} enc/dec"
        cells = []
        for _, suffix in columns:
            entry = group["metrics"].get(f"model/{suffix}")
            sign = -1 if _higher_is_better(suffix) else 1
            bold = method not in NOT_PEFT and entry is not None and \
                sign * entry[0] == best.get((budget, suffix))
            cells.append(_cell(entry, bold))
        lines.append(f"| {method} | {_budget_label(budget)} | {stored} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cost_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Cost per run", "",
             "Train time and step time come from runs sharing the machine (see `workers`); the "
             "efficiency benchmark measures speed side by side. Peak memory is the run's process peak "
             "(resident set on CPU, allocated on CUDA).", "",
             "| task | method | budget | encoder/decoder | seed | steps | trainable / step | stored | head | "
             "enc/dec trained | adapter KiB | train s | s / step | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("error"):
            lines.append(f"| {r['task']} | {r['method']} | {_budget_label(r['budget'])} | {_protocol(r)} | "
                         f"{r['seed']} | — | — | — | — | — | — | — | — | {r['error'][:120]} |")
            continue

        def count(value: Any) -> str:
            return "—" if value is None else f"{value:,}"

        step = "—" if r["step_seconds"] is None else f"{r['step_seconds']:.2f}"
        lines.append(f"| {r['task']} | {r['method']} | {_budget_label(r['budget'])} | {_protocol(r)} | "
                     f"{r['seed']} | {r['steps']} | {count(r['trainable'])} | {count(r['stored'])} | "
                     f"{count(r['head'])} | {count(r.get('encoder_decoder_parameters'))} | "
                     f"{(r['adapter_bytes'] or 0) / 1024:,.0f} | {r['train_seconds']:.0f} | {step} | "
                     f"{(r['peak_memory_bytes'] or 0) / 2**20:,.0f} |")
    return lines + [""]


def _mean_of(groups: Mapping[tuple, Any], key: tuple, suffixes: Sequence[str]) -> dict[str, float]:
    if key not in groups:
        return {}
    metrics = groups[key]["metrics"]
    return {s: metrics[f"model/{s}"][0] for s in suffixes if f"model/{s}" in metrics}


def claims(groups: Mapping[tuple, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """The paper's claims checked on these records: (claim, what was measured, verdict)."""
    rows: list[tuple[str, str, str]] = []
    budgets = sorted({k[2] for k in groups if k[2] is not None})
    rmse = [f"rmse/{c}" for c in DOWNSCALING_CHANNELS]
    full_ds = _mean_of(groups, ("downscaling", "full", None), rmse)
    for budget in budgets:
        wp = _mean_of(groups, ("downscaling", "weatherpeft", budget), rmse)
        others = {k[1]: _mean_of(groups, k, rmse) for k in groups
                  if k[0] == "downscaling" and k[2] == budget and k[1] not in ("weatherpeft", *NOT_PEFT)}
        if not wp or not others:
            continue
        wins, notes, closed = [], [], []
        for s in rmse:
            rivals = {m: v[s] for m, v in others.items() if s in v}
            if s not in wp or not rivals:
                continue
            rival, value = min(rivals.items(), key=lambda item: item[1])
            channel = s.split("/")[1]
            wins.append(wp[s] <= value)
            notes.append(f"{channel} {_number(wp[s])} vs {rival} {_number(value)}")
            if s in full_ds and value != full_ds[s]:
                closed.append((channel, (value - wp[s]) / (value - full_ds[s])))
        rows.append((f"Downscaling {_budget_label(budget)}: WeatherPEFT has the lowest RMSE of all PEFT methods "
                     "on T2m, U10, V10, T850, Z500", "; ".join(notes),
                     f"{'met' if all(wins) else 'not met'} ({sum(wins)}/{len(wins)})"))
        if budget < 0.01 and closed:
            rows.append((f"Downscaling {_budget_label(budget)}: closes ≥ 30 % of the gap from the best other "
                         "PEFT method to full fine-tuning",
                         "; ".join(f"{c} {g:.0%}" for c, g in closed),
                         f"{'met' if all(g >= 0.3 for _, g in closed) else 'not met'} "
                         f"({sum(g >= 0.3 for _, g in closed)}/{len(closed)})"))
        if budget > 0.01 and full_ds:
            ratios = [(s.split("/")[1], wp[s] / full_ds[s] - 1) for s in rmse if s in wp and s in full_ds]
            rows.append((f"Downscaling {_budget_label(budget)}: within 2 % of full fine-tuning on every variable",
                         "; ".join(f"{c} {r:+.1%}" for c, r in ratios),
                         f"{'met' if all(r <= 0.02 for _, r in ratios) else 'not met'} "
                         f"({sum(r <= 0.02 for _, r in ratios)}/{len(ratios)})"))
    seeps = sorted({k.split("/", 1)[1] for g in groups.values() for k in g["metrics"]
                    if k.startswith("model/seeps/")})
    full_pr = _mean_of(groups, ("precipitation", "full", None), seeps)
    for budget in budgets:
        wp = _mean_of(groups, ("precipitation", "weatherpeft", budget), seeps)
        if budget > 0.01 and wp and full_pr:
            ok = [wp[s] <= full_pr[s] for s in seeps if s in wp and s in full_pr]
            rows.append((f"Precipitation {_budget_label(budget)}: WeatherPEFT SEEPS ≤ full fine-tuning at every lead",
                         "; ".join(f"{s.split('/')[-1]} {_number(wp[s])} vs {_number(full_pr[s])}"
                                   for s in seeps if s in wp and s in full_pr),
                         f"{'met' if all(ok) else 'not met'} ({sum(ok)}/{len(ok)})"))
        sfas = _mean_of(groups, ("precipitation", "sfas", budget), seeps)
        tadp = _mean_of(groups, ("precipitation", "tadp", budget), seeps)
        if sfas and tadp:
            ok = [sfas[s] <= tadp[s] for s in seeps if s in sfas and s in tadp]
            rows.append((f"Precipitation {_budget_label(budget)}: SFAS-only beats TADP-only (SEEPS)",
                         "; ".join(f"{s.split('/')[-1]} {_number(sfas[s])} vs {_number(tadp[s])}"
                                   for s in seeps if s in sfas and s in tadp),
                         f"{'met' if all(ok) else 'not met'} ({sum(ok)}/{len(ok)})"))
    crps = sorted({k.split("/", 1)[1] for (task, _, _), g in groups.items() if task == "postprocessing"
                   for k in g["metrics"] if k.startswith("model/crps/")})
    full_pp = _mean_of(groups, ("postprocessing", "full", None), crps)
    for budget in budgets:
        wp = _mean_of(groups, ("postprocessing", "weatherpeft", budget), crps)
        if budget < 0.01 and wp and full_pp:
            ratios = [(s.split("/")[1], wp[s] / full_pp[s] - 1) for s in crps if s in wp and s in full_pp]
            rows.append((f"Post-processing {_budget_label(budget)}: WeatherPEFT CRPS within 3 % of full fine-tuning",
                         "; ".join(f"{c} {r:+.1%}" for c, r in ratios),
                         f"{'met' if all(r <= 0.03 for _, r in ratios) else 'not met'} "
                         f"({sum(r <= 0.03 for _, r in ratios)}/{len(ratios)})"))
    return rows


def benchmark_markdown(records: Sequence[Mapping[str, Any]], about: Mapping[str, Any]) -> str:
    """The whole report: set-up, then per protocol one table per task and the paper's claims,
    then the cost table."""
    seeds = sorted({r["seed"] for r in records})
    lines = ["# Benchmark", "",
             f"Command: `{about.get('command', '')}`  ",
             f"Profile `{about.get('profile')}` · backbone `{about.get('config', {}).get('backbone')}` · "
             f"device {about.get('device')} · {about.get('workers')} worker(s) · torch {about.get('torch')} · "
             f"seeds {seeds} (mean ± std where more than one) · started {about.get('started')}"
             + (f", finished {about['finished']}" if about.get("finished") else ""), ""]
    protocol = sorted({(r["task"], r["steps"], r["batch_size"], r["lr"], r["new_lr"]) for r in records
                       if not r.get("error") and r["steps"]})
    if protocol:
        lines += ["Every method: the same Trainer (AdamW, warm-up 10 % then cosine to 0.1×, clip 1.0), "
                  "data order and seed; `lr` for entries of pretrained weights, `new_lr` for what a method "
                  "adds and task heads. " + "; ".join(f"{t}: {s} steps × batch {b}, lr {lr:g}, new_lr {nl:g}"
                                                     for t, s, b, lr, nl in protocol) + ".", ""]
    coder_only = aggregate(records, "train")
    several = len(protocols(records)) > 1 or protocols(records) != ["frozen"]
    for protocol in protocols(records):
        groups = aggregate(records, protocol)
        if several:
            lines += [f"# {PROTOCOL_TITLES[protocol]}", ""]
        for task in dict.fromkeys(r["task"] for r in records):
            lines += _task_table(task, groups, coder_only.get((task, "frozen", None)), protocol)
        checked = claims(groups)
        if checked:
            which = "" if protocol == "frozen" else f" (encoder/decoder {protocol})"
            lines += [f"## The paper's claims on this data{which}", "",
                      "| claim | measured | verdict |", "|---|---|---|"]
            lines += [f"| {c} | {m} | {v} |" for c, m, v in checked] + [""]
    lines += _cost_table(records)
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


def save_quality_plot(records: Sequence[Mapping[str, Any]], path: str | Path,
                      encoder_decoder: str = "frozen") -> Path | None:
    """One panel per task: score against stored parameters (log), a line per method over budgets,
    for the records under protocol ``encoder_decoder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = aggregate(records, encoder_decoder)
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


def write_report(records: Sequence[Mapping[str, Any]], about: Mapping[str, Any], out: str | Path) -> None:
    """``benchmark.md`` and ``quality_vs_stored.png`` (``quality_vs_stored_encoder_decoder_train.png``
    for the "train" protocol) into ``out``."""
    out = Path(out)
    write_text(out / "benchmark.md", benchmark_markdown(records, about))
    for protocol in protocols(records):
        name = "quality_vs_stored" + ("" if protocol == "frozen" else f"_encoder_decoder_{protocol}")
        save_quality_plot(records, out / f"{name}.png", protocol)
