"""examples/own_task.py, the README's "Your own data, your own task", run at tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"lead_hours": 12, "periods": {"train": ["2003-03-01", "2003-03-03"],
                                          "val": ["2003-03-04", "2003-03-05"],
                                          "test": ["2003-03-06", "2003-03-07"]}}


def run_example(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / "own_task.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_own_task_fine_tunes_and_evaluates_from_another_folder(tmp_path):
    """From a folder outside the checkout: the default backbone and data resolve in the checkout."""
    out = tmp_path / "run"
    tuned = run_example("finetune", "--task", "t2m-ahead", "--method", "lora", "--steps", "2",
                        "--batch-size", "2", "--task-options", json.dumps(OPTIONS),
                        "--out-dir", str(out), cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert set(result["test"]) == {"model/rmse/2t", "persistence/rmse/2t"}
    assert 0 < result["test"]["model/rmse/2t"] < 20
    scored = run_example("evaluate", "--adapter", str(out / "adapter"), "--out",
                         str(tmp_path / "scores"), cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    scores = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert "persistence/rmse/2t" in json.dumps(scores)


def test_own_task_options_are_checked_before_any_data_are_read(tmp_path):
    bad = run_example("finetune", "--task", "t2m-ahead", "--task-options", '{"lead": 12}',
                      "--data", str(tmp_path / "absent.zarr"), cwd=tmp_path)
    assert bad.returncode == 2
    assert "task 't2m-ahead' has no option(s) ['lead']; its options: ['lead_hours', 'periods']" \
        in bad.stderr
