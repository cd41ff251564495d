"""The GPU benchmark's CPU dry run: the script runs end to end and writes its tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_the_gpu_benchmark_dry_run_measures_every_case_it_is_given(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    assert bench.main(["--dry-run", "--cases", "full", "weatherpeft strict", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["full", "weatherpeft strict"]
    assert all(r["status"] == "ok" and r["step_s"] > 0 and r["grid"] == [32, 64] for r in rows)
    full, peft = rows
    assert full["adamw_state_bytes"] >= 2 * 4 * full["parameters"]  # fp32 moments of every weight
    assert peft["refreshes"] == 1 and peft["refresh_s"] > 0
    assert 0 < peft["masked_state_bytes"] < full["adamw_state_bytes"] / 100
    assert peft["selection_state_bytes"] > 0  # the one-byte "moved" mask
    markdown = out.with_suffix(".md").read_text()
    assert "| weatherpeft strict | 32 × 64 | ok |" in markdown and "aurora-tiny" in markdown
