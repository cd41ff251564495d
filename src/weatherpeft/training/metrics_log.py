"""The run's metric log: one JSON record per line in ``out_dir/metrics.jsonl``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from weatherpeft.atomic import write_text

__all__ = ["METRICS_FILE", "MetricsLog"]

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """``out_dir/metrics.jsonl``: appended to by the main process, cut back on resume."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / METRICS_FILE

    def clear(self) -> None:
        """Remove the log of an earlier run (a fresh start)."""
        self.path.unlink(missing_ok=True)

    def append(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as stream:
            stream.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Drop log lines past ``step`` (written by a run that died after its checkpoint)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
        write_text(self.path, "".join(line + "\n" for line in kept))
