"""Score dictionaries as files people read: JSON for machines, a Markdown table for people.

Tasks return flat scores keyed ``source/metric/channel`` or ``source/metric/channel/lead``
(``model/rmse/2t``, ``bilinear/rmse/2t``, ``model/seeps/tp/12h``). The table has one row per
(metric, channel, lead) and one column per source, so a model and its references (bilinear
interpolation, the raw ensemble, persistence, climatology) read side by side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from weatherpeft.atomic import write_json, write_text

__all__ = ["results_markdown", "write_results"]


def _split_key(key: str) -> tuple[str, tuple[str, ...]]:
    source, _, rest = key.partition("/")
    if not rest:
        raise ValueError(f"score key '{key}' is not 'source/metric/channel[/lead]'")
    return source, tuple(rest.split("/"))


def _format(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e5 or magnitude < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def results_markdown(scores: Mapping[str, float]) -> str:
    """A Markdown table: rows (metric, channel[, lead]), columns sources, model first."""
    rows: dict[tuple[str, ...], dict[str, float]] = {}
    sources: list[str] = []
    for key, value in scores.items():
        source, row = _split_key(key)
        rows.setdefault(row, {})[source] = value
        if source not in sources:
            sources.append(source)
    sources.sort(key=lambda s: (s != "model", s))
    width = max((len(row) for row in rows), default=2)
    header = ["metric", "channel", "lead"][:width] + [f"**{s}**" if s == "model" else s for s in sources]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows):
        cells = list(row) + [""] * (width - len(row))
        cells += [_format(rows[row].get(source, float("nan"))) for source in sources]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(scores: Mapping[str, float], folder: str | os.PathLike,
                  about: Mapping[str, object] | None = None) -> tuple[Path, Path]:
    """Write ``metrics.json`` (scores and ``about``) and ``metrics.md`` into ``folder``, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = write_json(folder / "metrics.json", {"scores": dict(scores), **dict(about or {})})
    markdown_path = write_text(folder / "metrics.md", results_markdown(scores))
    return json_path, markdown_path
