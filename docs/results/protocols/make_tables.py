"""Issue 15's protocol table: every task, both protocols, frozen / encoder-decoder only / full and
LoRA, SFAS-only, WeatherPEFT at 0.3 %, 2 seeds, from benchmark folders (their benchmark.json).

    python docs/results/protocols/make_tables.py docs/results/benchmark.json \\
        docs/results/protocols/benchmark.json > docs/results/protocols/tables.md
"""

from __future__ import annotations

import json
import statistics
import sys

from weatherpeft.benchmark_report import DOWNSCALING_CHANNELS, HEADLINE_METRICS, protocol_table

METHODS = ("full", "frozen", "lora", "sfas", "weatherpeft")


def wanted(record: dict) -> bool:
    return (not record["error"] and record["method"] in METHODS and record["budget"] in (None, 0.003)
            and record.get("accounting", "trainable") == "trainable")


def channel_gaps(records: list[dict]) -> list[str]:
    """Per task and headline channel: full fine-tuning's gain over the encoder/decoder alone
    under "train", mean over seeds."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in records):
        prefix = "model/" + HEADLINE_METRICS[task]

        def mean(method: str, key: str, task: str = task) -> float:
            return statistics.fmean(r["metrics"][key] for r in records if r["task"] == task
                                    and r["method"] == method and r.get("encoder_decoder") == "train")

        keys = sorted(k for k in next(r for r in records if r["task"] == task)["metrics"] if k.startswith(prefix)
                      and (task != "downscaling" or k[len(prefix):] in DOWNSCALING_CHANNELS))
        gaps = [f"{k[len(prefix):]} {1 - mean('full', k) / mean('frozen', k):.1%}" for k in keys]
        lines.append(f"- {task}: " + ", ".join(gaps))
    return lines


def main() -> None:
    records = [r for path in sys.argv[1:] for r in json.load(open(path))["records"] if wanted(r)]
    print("\n".join(protocol_table(records)))
    print("Full fine-tuning's gain over the encoder/decoder alone under \"train\", per headline column:\n")
    print("\n".join(channel_gaps(records)))


if __name__ == "__main__":
    main()
