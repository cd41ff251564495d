"""benchmarks/bench_efficiency.py: state-byte accounting, case names and the Markdown table
(no model is built here; the benchmark itself is run by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from weatherpeft.methods.masked_update import MaskedUpdate

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optimizer_state_counts_adamw_and_the_masked_updates_per_entry_state(bench):
    dense = torch.nn.Parameter(torch.zeros(5, 4))
    masked = torch.nn.Parameter(torch.zeros(10))
    optimizer = torch.optim.AdamW([dense], lr=1e-3)
    dense.grad = torch.ones_like(dense)
    optimizer.step()
    update = MaskedUpdate({"w": masked}, 3)
    update.set_selection({"w": torch.tensor([1, 4, 7])})
    update.mark_moved("w", torch.tensor([1, 4]))

    state = bench.optimizer_state_bytes(optimizer, [update])

    expected_adamw = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                         for t in s.values() if isinstance(t, torch.Tensor))
    assert expected_adamw >= 2 * 20 * 4  # exp_avg, exp_avg_sq (and the step tensor)
    assert state["adamw"] == expected_adamw
    # int64 indices and positions, float32 exp_avg, exp_avg_sq and step counts, a one-byte
    # changed flag, for each of the 3 selected entries
    assert state["masked"] == 3 * (8 + 8 + 4 * 3 + 1)
    assert state["selection"] == 10  # the one-byte "moved" mask; the parameter is not counted


def test_cases_cover_the_paper_comparison_and_aliases_resolve(bench):
    methods = {method for _, method, _, _ in bench.CASES}
    assert methods == {"full", "lora", "dora", "ssf", "vpt", "adaptformer", "child_tuning",
                       "random_mask", "tadp", "sfas", "weatherpeft"}
    assert all(budget == bench.BUDGET for label, _, budget, _ in bench.CASES if label != "full")
    assert bench._resolve_cases(["sfas", "weatherpeft", "lora"]) == \
        ["sfas R=1", "weatherpeft R=1", "lora"]
    with pytest.raises(SystemExit):
        bench._resolve_cases(["nope"])


def _row(case, **values):
    row = {"backbone": "tiny", "case": case, "parameters": 6_000_000, "checkpoint_bytes": 24_000_000,
           "step_s": 0.1, "refresh_s": None, "refreshes": 0, "steps_run": 8, "setup_s": 0.0,
           "peak_rss_bytes": 900 * 2**20, "rss_growth_bytes": 100 * 2**20,
           "optimizer_state_bytes": 48_000_000, "selection_state_bytes": 0,
           "adapter_bytes": 24_000_000, "trainable_fraction": 1.0, "resolved": {},
           "reference_eval_s": 0.02, "adapted_over_frozen": 1.0, "merged_over_frozen": 1.0,
           "merge_error": None, "error": None}
    row.update(values)
    return row


def test_markdown_has_ratios_against_full_and_says_why_rows_are_missing(bench):
    rows = [_row("full"),
            _row("sfas R=1", step_s=0.15, refresh_s=0.05, refreshes=8, rss_growth_bytes=50 * 2**20,
                 optimizer_state_bytes=48_000, selection_state_bytes=6_000_000,
                 adapter_bytes=240_000, trainable_fraction=0.003, adapted_over_frozen=1.02,
                 merged_over_frozen=0.99),
            _row("adaptformer", merged_over_frozen=None, merge_error="not mergeable: ReLU"),
            bench._combine([{"backbone": "tiny", "case": "ssf", "error": "BudgetError: too small"}])]
    table = bench._markdown_tables(rows)
    lines = table.splitlines()
    sfas = next(line for line in lines if line.startswith("| sfas R=1 |")).split(" | ")
    assert sfas[2:7] == ["0.150", "1.50", "0.050", "0.33", ""]
    assert sfas[8:12] == ["50", "0.50", "48,000", "0.001"]
    assert sfas[12:18] == ["6,000,000", "240,000", "1.00%", "1.02", "", "0.99"]
    assert "not mergeable" in next(line for line in lines if line.startswith("| adaptformer |"))
    assert "BudgetError: too small" in next(line for line in lines if line.startswith("| ssf |"))
    meta = {"started": "2000-01-01 00:00", "finished": "2000-01-01 00:01", "wall_s": 60.0,
            "machine": {"cpu": "Some CPU", "logical_cpus": 2, "cpus_available": 2,
                        "threads_per_case": 1, "load_average": [1.0, 1.0, 1.0],
                        "python": "3.11", "torch": "2", "platform": "Linux"},
            "load_average_end": [1.0, 1.0, 1.0], "command": "python bench --quick",
            "rounds": 1, "steps": 2, "warmup": 1}
    markdown = bench._markdown(rows, meta)
    for text in ("Some CPU", "2 logical CPUs", "1 torch thread", "2000-01-01", "`python bench --quick`",
                 "1 round(s)"):
        assert text in markdown
