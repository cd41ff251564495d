"""Model cards: forecast skill of a backbone against persistence and climatology.

The card is JSON (``model_card.json``, every number) plus Markdown (``MODEL_CARD.md``, the
table people read). It also records a *reproducibility row*: the scores on the first few
evaluation windows, so a test can recompute them from the checkpoint on a fresh clone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from weatherpeft.atomic import write_json, write_text
from weatherpeft.backbones.base import Backbone
from weatherpeft.tasks.forecasting import SOURCES, ForecastingTask

#: Variables and leads the card's table shows (all channels are in the JSON).
CARD_CHANNELS = ("2t", "10u", "10v", "msl", "z500", "t850")
CARD_LEADS_HOURS = (6, 24, 72)
REPRODUCIBILITY_WINDOWS = 4


def evaluation_windows(task: ForecastingTask, stride: int) -> list[int]:
    """Indices of the test roll-out windows used: every ``stride``-th initialisation."""
    return list(range(0, len(task.datasets()["test"]), stride))


def score(model: torch.nn.Module, task: ForecastingTask, windows: Sequence[int], *,
          batch_size: int = 4, references: bool = True) -> dict[str, float]:
    """Latitude-weighted RMSE per channel and lead on the given test windows."""
    loader = DataLoader(Subset(task.datasets()["test"], list(windows)), batch_size=batch_size,
                        shuffle=False, collate_fn=task.collate)
    return task.evaluate(model, loader, references=references)


def build_card(model: torch.nn.Module, task: ForecastingTask, *, stride: int, about: dict) -> dict:
    """Score the model and the references; returns the card's content."""
    windows = evaluation_windows(task, stride)
    scores = score(model, task, windows)
    check_windows = windows[:REPRODUCIBILITY_WINDOWS]
    check = score(model, task, check_windows, references=False)
    return {**about, "evaluation": {"period": list(map(str, task.periods["test"])),
                                    "initialisations": len(windows), "stride_steps": stride,
                                    "rmse": scores},
            "reproducibility": {"windows": check_windows, "rmse": check}}


def refresh_model_rows(card: dict, model: Backbone, task: ForecastingTask, *,
                       note: str) -> dict:
    """The card with its model rows and reproducibility row re-measured on its own windows.

    For a new dependency set (``constraints.txt``): the reference rows (persistence,
    climatology) depend only on the data and are kept, so the pretraining archive is not
    needed. ``task`` must give the card's test windows (same count at the card's stride);
    ``note`` says why and is recorded under ``facts``.
    """
    if model.fingerprint() != card["fingerprint"]:
        raise ValueError(f"the model's fingerprint {model.fingerprint()} is not the card's "
                         f"{card['fingerprint']}: a card describes one set of weights")
    evaluation = card["evaluation"]
    windows = evaluation_windows(task, evaluation["stride_steps"])
    if len(windows) != evaluation["initialisations"]:
        raise ValueError(f"the store gives {len(windows)} evaluation windows at stride "
                         f"{evaluation['stride_steps']}, the card {evaluation['initialisations']}: "
                         "not the store the card was made on")
    scores = score(model, task, windows, references=False)
    check_windows = card["reproducibility"]["windows"]
    rmse = {k: v for k, v in evaluation["rmse"].items() if not k.startswith("model/")}
    return {**card, "facts": {**card.get("facts", {}), "model rows": note},
            "evaluation": {**evaluation, "rmse": {**rmse, **scores}},
            "reproducibility": {"windows": check_windows,
                                "rmse": score(model, task, check_windows, references=False)}}


def card_facts(backbone: Backbone, about: dict) -> dict:
    """The few lines a reader of the card wants first: the size, and from ``about`` (a
    ``pretraining.json``) the data, the optimisation, the wall time and the final losses."""
    facts = {"parameters": f"{sum(p.numel() for p in backbone.parameters()):,}"}
    run, fit = about.get("pretraining"), about.get("fit")
    if run and fit:
        facts["pretraining data"] = (f"{run['store']} {run['train_start']} … {run['train_end']} "
                                     f"(validation {run['val_start']} … {run['val_end']})")
        facts["optimisation"] = (f"{int(fit['step'])} AdamW steps × batch {run['batch_size']}, lr {run['lr']} "
                                 f"(warm-up {run['warmup_steps']}, cosine to ×{run['min_lr_ratio']}), "
                                 f"weight decay {run['weight_decay']}, clip {run['grad_clip']}")
        if "wall_seconds_this_invocation" in fit:
            facts["wall time"] = (f"{fit['wall_seconds_this_invocation'] / 60:.1f} min on {run['threads']} CPU "
                                  "thread(s)" + (" (last invocation of a resumed run)" if fit.get("resumed") else ""))
        facts["final training loss / validation loss"] = \
            f"{fit.get('loss', float('nan')):.4f} / {fit.get('val_loss', float('nan')):.4f}"
    return facts


def pretrained_about(backbone: Backbone, folder: Path) -> dict:
    """What a card says about a backbone pretrained here (``folder``'s ``pretraining.json``
    if any): name, summary, configuration, fingerprint and :func:`card_facts`."""
    pretraining_path = Path(folder) / "pretraining.json"
    about = json.loads(pretraining_path.read_text()) if pretraining_path.exists() else {}
    about.update(name=f"{backbone.config['preset']} pretrained on the built-in world",
                 summary="An Aurora-architecture model (microsoft-aurora's own Aurora class, use_lora=False) "
                         "pretrained on 6-hour forecasting of every variable; the downstream tasks use "
                         "years it never saw. Scores are roll-outs on the evaluated store.",
                 backbone=backbone.config, fingerprint=backbone.fingerprint(),
                 facts=card_facts(backbone, about))
    return about


def _key(source: str, channel: str, hours: int) -> str:
    return f"{source}/rmse/{channel}/{hours}h"


def markdown(card: dict) -> str:
    """The card's table: RMSE of model, persistence and climatology per variable and lead."""
    scores = card["evaluation"]["rmse"]
    lines = [f"# {card['name']}", "", card.get("summary", ""), ""]
    lines += [f"- {key}: {value}" for key, value in card.get("facts", {}).items()]
    lines += ["", f"Latitude-weighted RMSE on {card['evaluation']['initialisations']} initialisations of "
              f"{card['evaluation']['period'][0][:10]} … {card['evaluation']['period'][1][:10]} "
              "(physical units; lower is better; **bold** = best).", ""]
    header = "| variable | " + " | ".join(f"{h} h {s}" for h in CARD_LEADS_HOURS for s in SOURCES) + " |"
    lines += [header, "|" + "---|" * (1 + len(CARD_LEADS_HOURS) * len(SOURCES))]
    for channel in CARD_CHANNELS:
        cells = []
        for hours in CARD_LEADS_HOURS:
            values = {s: scores.get(_key(s, channel, hours)) for s in SOURCES}
            best = min((v for v in values.values() if v is not None), default=None)
            for source in SOURCES:
                value = values[source]
                text = "–" if value is None else f"{value:.4g}"
                cells.append(f"**{text}**" if value is not None and value == best else text)
        lines.append(f"| {channel} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_card(card: dict, folder: Path) -> None:
    """Write ``model_card.json`` and ``MODEL_CARD.md`` into ``folder`` (atomically)."""
    write_json(Path(folder) / "model_card.json", card)
    write_text(Path(folder) / "MODEL_CARD.md", markdown(card))


def load_card(folder: Path) -> dict:
    """Read a model card written by :func:`write_card`."""
    return json.loads((Path(folder) / "model_card.json").read_text())
