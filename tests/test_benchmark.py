"""The benchmark: tiny grids end to end (JSON schema, Markdown, plots, resume, the selection
stage), the plan and its cost model, and the report (views, claims, learning rates)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from weatherpeft.benchmark import (
    RECORD_KEYS,
    BenchmarkConfig,
    Run,
    _carried,
    _chunks,
    _with_choices,
    choose_learning_rates,
    estimate_seconds,
    estimate_wall,
    plan,
    run_benchmark,
    selection_plan,
)
from weatherpeft.benchmark_report import (
    CLAIMS,
    aggregate,
    benchmark_markdown,
    check_claim,
    claims,
    protocol_table,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_tiny_grid_writes_valid_json_markdown_and_plots(tmp_path):
    config = BenchmarkConfig(profile="quick", tasks=("downscaling",), methods=("frozen", "lora"),
                             steps=2, batch_size=1, workers=1, out=str(tmp_path / "bench"),
                             encoder_decoder=("frozen",), accounting=("trainable",))
    records = run_benchmark(config)
    content = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert content["records"] == records and content["about"]["profile"] == "quick"
    assert content["selection"] == [] and content["choices"] == []  # the quick profile selects nothing
    assert [(r["method"], r["budget"], r["encoder_decoder"]) for r in records] == \
        [("frozen", None, "frozen"), ("lora", 0.003, "frozen"), ("frozen", None, "train")]
    for record in records:
        assert set(RECORD_KEYS) <= set(record), set(RECORD_KEYS) - set(record)
        assert record["error"] is None and record["task"] == "downscaling" and record["seed"] == 0
        assert record["stage"] == "test" and record["accounting"] == "trainable"
        assert isinstance(record["metrics"], dict) and record["metrics"]
        assert all(isinstance(v, float) and math.isfinite(v) for v in record["metrics"].values())
        assert {"model/rmse/2t", "bilinear/rmse/2t"} <= set(record["metrics"])
        assert record["peak_memory_bytes"] > 0 and record["pretrained"] > 0
        assert record["wall_seconds"] > 0 and record["estimated_seconds"] > 0
    frozen, lora, coder_only = records
    assert frozen["steps"] == 0 and frozen["trainable"] == 0 and frozen["adapter_bytes"] == 0
    assert frozen["encoder_decoder_parameters"] == 0 == lora["encoder_decoder_parameters"]
    # the encoder/decoder-only reference: the frozen method trained under "train"
    assert coder_only["steps"] == 2 and coder_only["trainable"] == 0
    assert coder_only["encoder_decoder_parameters"] > 0 and coder_only["adapter_bytes"] > 0
    assert coder_only["metrics"]["model/rmse/2t"] != frozen["metrics"]["model/rmse/2t"]
    assert lora["steps"] == 2 and 0 < lora["trainable"] <= 1.1 * 0.003 * lora["pretrained"]
    assert lora["adapter_bytes"] > 0 and lora["step_seconds"] > 0 and lora["train_seconds"] > 0
    assert lora["metrics"]["model/rmse/2t"] != frozen["metrics"]["model/rmse/2t"]
    # the learning curve: the validation loss logged along the way (val_every divides steps)
    assert [step for step, _ in lora["curve"]] == [1, 2] and lora["val_loss"] > 0
    assert frozen["curve"] == []
    markdown = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "| *bilinear interpolation* |" in markdown and "| lora | 0.3% | " in markdown
    assert "| *encoder/decoder only* | — | 0 (0.00%) | 0 (0.00%) | 0 | " in markdown
    for name in ("quality_vs_stored.png", "learning_curves.png"):
        assert (tmp_path / "bench" / name).read_bytes()[:8] == PNG

    with pytest.raises(FileExistsError, match="--resume"):
        run_benchmark(config)
    adapter = tmp_path / "bench" / "runs" / "downscaling" / "lora-b0.003-s0" / "adapter"
    stamp = adapter.stat().st_mtime_ns
    config.resume = True
    assert run_benchmark(config) == records  # nothing re-run
    assert adapter.stat().st_mtime_ns == stamp
    # a narrower command into the same folder (one chunk of a grid) keeps what it does not cover
    narrow = dataclasses.replace(config, methods=("frozen",))
    assert run_benchmark(narrow) == [records[0], records[2]]
    content = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert sorted(r["method"] for r in content["records"]) == ["frozen", "frozen", "lora"]
    assert content["about"]["earlier"][-1]["started"]
    assert "| lora | 0.3% | " in (tmp_path / "bench" / "benchmark.md").read_text()


def test_selection_stage_reads_validation_only_and_the_test_run_takes_the_choice(tmp_path):
    out = tmp_path / "select"
    config = BenchmarkConfig(profile="quick", tasks=("precipitation",), methods=("lora",), steps=2,
                             select_steps=2, batch_size=1, workers=1, out=str(out),
                             lr_grid=("1e-4/1e-4", "3e-3/2e-2"))
    (record,) = run_benchmark(config)
    content = json.loads((out / "benchmark.json").read_text())
    selection = content["selection"]
    assert [(r["lr"], r["new_lr"], r["stage"]) for r in selection] == [(1e-4, 1e-4, "select"),
                                                                       (3e-3, 2e-2, "select")]
    for candidate in selection:  # scored on validation; no test score computed or stored
        assert candidate["val_loss"] > 0 and candidate["metrics"] == {}
        result = json.loads((Path(candidate["run_dir"]) / "result.json").read_text())
        assert "test" not in result and candidate["steps"] == 2
    (choice,) = content["choices"]
    best = min(selection, key=lambda r: r["val_loss"])
    assert (choice["lr"], choice["new_lr"]) == (best["lr"], best["new_lr"]) == (record["lr"], record["new_lr"])
    assert [c["val_loss"] for c in choice["candidates"]] == [r["val_loss"] for r in selection]
    markdown = (out / "benchmark.md").read_text()
    assert "## Learning rates chosen on the validation split" in markdown
    assert f"| precipitation | lora | train | {best['lr']:g} / {best['new_lr']:g} |" in markdown
    config.resume = True
    assert run_benchmark(config) == [record]  # selection and test records both kept


def test_resume_keeps_other_chunks_and_a_replanned_cell_gives_way():
    def run(task, method, steps, stage="test", lr=1e-3):
        return Run(task=task, method=method, budget=0.003, seed=0, steps=steps, batch_size=2, lr=lr,
                   new_lr=6e-3, encoder_decoder="train", stage=stage)

    def record(planned):
        return {"settings": planned.settings(), "stage": planned.stage, "error": None, "task": planned.task,
                "method": planned.method}

    old_lora, old_select = run("downscaling", "lora", 100), run("downscaling", "lora", 25, stage="select")
    other_task = run("precipitation", "lora", 300)
    previous = {"selection": [record(old_select)], "records": [record(old_lora), record(other_task)],
                "choices": [{"task": t, "method": "lora", "encoder_decoder": "train", "lr": 1e-3}
                            for t in ("downscaling", "precipitation")],
                "about": {"command": "weatherpeft benchmark --tasks precipitation", "started": "then"}}
    planned = [run("downscaling", "lora", 200), run("downscaling", "lora", 50, stage="select")]
    selection, records, choices = _carried(previous, planned)
    assert selection == [] and records == [record(other_task)]  # the longer schedule supersedes
    assert [c["task"] for c in choices] == ["precipitation"]
    assert _chunks(previous) == [{"command": "weatherpeft benchmark --tasks precipitation", "started": "then"}]
    assert _carried(previous, [run("downscaling", "lora", 50, stage="select", lr=3e-3)])[0] == \
        [record(old_select)]  # another candidate's pair: the old one stays


def test_choice_follows_the_validation_loss_never_the_test_scores():
    def candidate(lr, val_loss, test_rmse, error=None):
        return {"task": "downscaling", "method": "lora", "encoder_decoder": "train", "lr": lr,
                "new_lr": 10 * lr, "val_loss": val_loss, "error": error,
                "metrics": {"model/rmse/2t": test_rmse}}

    choices = choose_learning_rates([candidate(1e-3, 0.30, 1.0), candidate(3e-3, 0.20, 9.0),
                                     candidate(1e-2, None, 0.1, "DivergenceError: nan")], (5e-4, 5e-3))
    choice = choices[("downscaling", "lora", "train")]
    assert (choice["lr"], choice["new_lr"], choice["reason"]) == (3e-3, 3e-2, "lowest validation loss")
    assert [c["val_loss"] for c in choice["candidates"]] == [0.30, 0.20, None]
    untrained = choose_learning_rates([candidate(1e-3, None, 1.0), candidate(3e-3, None, 2.0)], (5e-4, 5e-3))
    assert untrained[("downscaling", "lora", "train")]["lr"] == 5e-4
    assert "nothing to train" in untrained[("downscaling", "lora", "train")]["reason"]
    # the paper profile selects under "train" once; the choice holds under "frozen" too
    runs = plan(BenchmarkConfig(profile="paper", tasks=("precipitation",), methods=("lora",),
                                budgets=(0.003,), seeds=(0,)))
    chosen = _with_choices(runs, {("precipitation", "lora", "train"): {"lr": 3e-3, "new_lr": 2e-2}})
    assert sorted((r.encoder_decoder, r.lr, r.new_lr) for r in chosen) == [("frozen", 3e-3, 2e-2),
                                                                          ("train", 3e-3, 2e-2)]


def test_plan_expands_the_profiles_and_rejects_bad_input():
    quick = plan(BenchmarkConfig(profile="quick"))
    assert {r.encoder_decoder for r in quick} == {"train"}
    assert sorted((r.method, r.accounting) for r in quick if r.task == "downscaling") == \
        [("frozen", "trainable"), ("full", "trainable"), ("lora", "trainable"),
         ("weatherpeft", "stored"), ("weatherpeft", "trainable")]
    strict = next(r for r in quick if r.accounting == "stored")
    assert strict.options == {"min_prompt_length": 1, "budget_mode": "strict"}
    assert all(r.steps % r.val_every == 0 for r in quick)  # the last step logs its validation loss

    standard = plan(BenchmarkConfig(profile="standard"))
    paper = plan(BenchmarkConfig(profile="paper"))
    for runs in (standard, paper):
        assert len({r.name for r in runs}) == len(runs)
    paper_keys = {(r.task, r.method, r.budget, r.encoder_decoder, r.accounting) for r in paper}
    assert ("postprocessing", "dora", 0.04, "train", "trainable") in paper_keys
    assert ("postprocessing", "dora", 0.04, "frozen", "trainable") not in paper_keys  # headline only
    assert ("precipitation", "weatherpeft", 0.003, "frozen", "stored") in paper_keys
    assert {r.seed for r in paper} == {0, 1}
    selection = selection_plan(BenchmarkConfig(profile="paper"), paper)
    assert {r.seed for r in selection} == {0} and {r.stage for r in selection} == {"select"}
    # chosen once per method and task, under "train", for both protocols
    assert len(selection) == 3 * len({(r.task, r.method) for r in paper})
    assert {r.encoder_decoder for r in selection} == {"train"}
    halved = plan(BenchmarkConfig(profile="paper", step_scale=0.5))
    assert [2 * r.steps for r in halved] == [r.steps for r in paper]
    assert all(s.steps < next(r.steps for r in paper if r.task == s.task) for s in selection)
    assert selection_plan(BenchmarkConfig(profile="paper", lr=1e-3), paper) == []  # fixed by hand

    both = plan(BenchmarkConfig(profile="quick", tasks=("downscaling",), methods=("lora", "sfas"),
                                encoder_decoder=("frozen", "train"), accounting=("trainable", "stored")))
    assert sorted((r.method, r.encoder_decoder, r.accounting) for r in both) == \
        [("lora", "frozen", "trainable"), ("lora", "train", "trainable"),
         ("sfas", "frozen", "stored"), ("sfas", "frozen", "trainable"),
         ("sfas", "train", "stored"), ("sfas", "train", "trainable")]
    assert both[0].settings().get("accounting") is None  # defaults left out: old records still --resume
    assert next(r for r in both if r.accounting == "stored").name.endswith("-stored")
    for bad, message in (({"profile": "huge"}, "profile"), ({"tasks": ("nowcasting",)}, "task"),
                         ({"encoder_decoder": ("thawed",)}, "encoder_decoder"),
                         ({"accounting": ("union",)}, "accounting"), ({"lr_grid": ("1e-3",)}, "LR/NEW_LR"),
                         ({"budgets": (1.5,)}, "budget"), ({"steps": -1}, "steps"),
                         ({"step_scale": 0.0}, "step-scale")):
        with pytest.raises(ValueError, match=message):
            BenchmarkConfig(**bad)
    with pytest.raises(ValueError, match="unknown method"):
        plan(BenchmarkConfig(methods=("lora", "magic")))
    with pytest.raises(ValueError, match="options"):
        plan(BenchmarkConfig(methods=("lora",), options='{"sfas": {"gamma": 0.1}}'))
    with pytest.raises(ValueError, match="set by the accounting"):
        plan(BenchmarkConfig(methods=("sfas",), accounting=("stored",),
                             options='{"sfas": {"budget_mode": "union"}}'))


def test_cost_model_and_dry_run(tmp_path, capsys):
    config = BenchmarkConfig(profile="quick", tasks=("downscaling",), out=str(tmp_path / "dry"), dry_run=True)
    runs = plan(config)
    longer = plan(BenchmarkConfig(profile="quick", tasks=("downscaling",), steps=300))
    assert all(estimate_seconds(a) < estimate_seconds(b) for a, b in zip(runs, longer))
    one, two = estimate_wall(runs, 1), estimate_wall(runs, 2)
    assert one == pytest.approx(sum(map(estimate_seconds, runs))) and max(map(estimate_seconds, runs)) <= two < one
    assert run_benchmark(config) == []
    printed = capsys.readouterr().out
    assert "estimated wall time: ~" in printed and "downscaling/full-nobudget-s0-edtrain" in printed
    assert not (tmp_path / "dry").exists()


def _record(method, budget, seed, encoder_decoder="frozen", accounting="trainable", **metrics):
    return {"task": "downscaling", "method": method, "budget": budget, "seed": seed,
            "encoder_decoder": encoder_decoder, "accounting": accounting, "stage": "test",
            "encoder_decoder_parameters": 0, "steps": 10,
            "batch_size": 2, "lr": 3e-4, "new_lr": 2e-3, "trainable": 10, "stored": 10, "head": 0,
            "pretrained": 1000, "adapter_bytes": 100, "train_seconds": 1.0, "step_seconds": 0.1,
            "wall_seconds": 2.0, "estimated_seconds": 3.0, "curve": [[5, 0.5], [10, 0.4]],
            "peak_memory_bytes": 2**20, "error": None,
            "metrics": {f"model/rmse/{k}": v for k, v in metrics.items()} | {"bilinear/rmse/2t": 3.0}}


def test_report_means_over_seeds_bolds_the_best_and_checks_the_claims():
    records = [_record("full", None, 0, **{"2t": 1.0}), _record("lora", 0.003, 0, **{"2t": 2.0}),
               _record("lora", 0.003, 1, **{"2t": 2.2}), _record("weatherpeft", 0.003, 0, **{"2t": 1.5}),
               _record("weatherpeft", 0.003, 1, **{"2t": 1.7})]
    groups = aggregate(records)
    mean, spread, n = groups[("downscaling", "lora", 0.003)]["metrics"]["model/rmse/2t"]
    assert (round(mean, 6), round(spread, 6), n) == (2.1, round(math.sqrt(0.02), 6), 2)
    markdown = benchmark_markdown(records, {"profile": "test", "command": "x"})
    assert "| weatherpeft | 0.3% | 10 (1.00%) | 10 (1.00%) | 0 | — | **1.6 ± 0.14** |" in markdown
    assert "| lora | 0.3% | 10 (1.00%) | 10 (1.00%) | 0 | — | 2.1 ± 0.14 |" in markdown
    rows = {claim: (measured, verdict, seeds) for claim, measured, verdict, seeds in claims(groups)}
    lowest = next(v for c, v in rows.items() if "lowest RMSE" in c)
    gap = next(v for c, v in rows.items() if "gap" in c)
    assert lowest == ("2t 1.6 ± 0.14 vs lora 2.1 ± 0.14", "met (1/1)", 2)
    assert gap[1:] == ("met (1/1)", 2) and gap[0] == "2t 45%"  # (2.1 − 1.6) / (2.1 − 1.0) of the gap


def test_claims_are_data_and_the_ablation_order_is_checked():
    assert len({c.text for c in CLAIMS}) == len(CLAIMS)
    ablation = [c for c in CLAIMS if c.ablation and c.task == "downscaling"]
    assert [(c.subject, c.other) for c in ablation] == [("weatherpeft", "tadp"), ("weatherpeft", "sfas"),
                                                        ("sfas", "child_tuning"), ("sfas", "random_mask"),
                                                        ("tadp", "vpt")]
    records = [_record(m, 0.003, s, **{"2t": v + 0.01 * s, "10u": u})
               for m, v, u in (("weatherpeft", 1.0, 2.0), ("tadp", 1.2, 1.5), ("sfas", 1.1, 2.5),
                               ("child_tuning", 1.3, 2.6), ("random_mask", 1.0, 2.4), ("vpt", 1.3, 1.6))
               for s in (0, 1)]
    groups = aggregate(records)
    verdicts = {(c.subject, c.other): check_claim(c, groups, 0.003) for c in ablation}
    assert verdicts[("weatherpeft", "tadp")][1:3] == ("2t 1.005 ± 0.0071 vs 1.205 ± 0.0071; 10u 2 ± 0 vs 1.5 ± 0",
                                                      "not met (1/2)")
    assert verdicts[("sfas", "child_tuning")][2] == "met (2/2)"
    assert verdicts[("sfas", "random_mask")][2] == "not met (0/2)"
    assert verdicts[("tadp", "vpt")][2] == "met (2/2)" and verdicts[("tadp", "vpt")][3] == 2
    large = next(c for c in CLAIMS if "within 2 %" in c.text)
    assert check_claim(large, groups, 0.003) is None  # a 4 % claim is not checked at 0.3 %


def test_report_has_a_section_per_view_and_the_encoder_decoder_only_reference():
    records = [_record("frozen", None, 0, **{"2t": 3.5}), _record("lora", 0.003, 0, **{"2t": 2.0}),
               _record("frozen", None, 0, "train", **{"2t": 1.25}),
               _record("lora", 0.003, 0, "train", **{"2t": 1.125}),
               _record("sfas", 0.003, 0, "train", **{"2t": 1.0}),
               _record("sfas", 0.003, 0, "train", "stored", **{"2t": 1.5})]
    records[3]["encoder_decoder_parameters"] = records[2]["encoder_decoder_parameters"] = 5000
    old = {k: v for k, v in _record("ssf", 0.003, 0, **{"2t": 2.5}).items()
           if "encoder" not in k and k != "accounting"}
    markdown = benchmark_markdown(records + [old], {"profile": "test", "command": "x"})
    parts = markdown.split("\n# Protocol")
    assert len(parts) == 5  # preamble + frozen × 2 accountings + train × 2 accountings
    frozen_part, _, train_trainable, train_stored = parts[1:]
    assert "accounting: equal entries stored" in train_stored
    for part in parts[1:]:
        assert "| *encoder/decoder only* | — | 10 (1.00%) | 10 (1.00%) | 0 | 5,000 | 1.25 |" in part
    assert "| lora | 0.3% | 10 (1.00%) | 10 (1.00%) | 0 | — | **2** |" in frozen_part
    assert "| ssf | 0.3% | 10 (1.00%) | 10 (1.00%) | 0 | — | 2.5 |" in frozen_part  # a record from before
    assert "| lora | 0.3% | 10 (1.00%) | 10 (1.00%) | 0 | 5,000 | 1.125 |" in train_trainable
    assert "| sfas | 0.3% | 10 (1.00%) | 10 (1.00%) | 0 | — | **1** |" in train_trainable
    assert "| sfas | 0.3% | 10 (1.00%) | 10 (1.00%) | 0 | — | 1.5 |" in train_stored.split("## Cost")[0]
    assert "| lora | 0.3% | 10 (1.00%) | 10 (1.00%) | 0 | 5,000 | **1.125** |" in train_stored
    assert "| frozen |" not in train_trainable  # it is the reference row there
    assert set(aggregate(records, "train")) == {("downscaling", "frozen", None),
                                                ("downscaling", "lora", 0.003), ("downscaling", "sfas", 0.003)}


def test_protocols_side_by_side_with_the_gap_full_fine_tuning_leaves():
    records = [_record("frozen", None, 0, **{"2t": 3.0}), _record("full", None, 0, **{"2t": 1.5}),
               _record("lora", 0.003, 0, **{"2t": 2.4}), _record("lora", 0.003, 1, **{"2t": 2.7}),
               _record("lora", 0.04, 0, **{"2t": 2.1}),
               _record("frozen", None, 0, "train", **{"2t": 2.4}), _record("full", None, 0, "train", **{"2t": 1.8}),
               _record("lora", 0.003, 0, "train", **{"2t": 2.1})]
    table = "\n".join(protocol_table(records))
    score = "downscaling (RMSE / bilinear, mean of the variables)"
    assert f"| {score} | frozen / encoder/decoder only | — | 1 | 0.800 |" in table
    assert f"| {score} | full | — | 0.500 | 0.600 |" in table
    assert f"| {score} | lora | 0.3% | 0.850 ± 0.071 | 0.700 |" in table  # its smallest budget only
    assert "4%" not in table and "downscaling 25.0%" in table  # 1 − 0.6 / 0.8
    assert protocol_table(records[:5]) == []  # one protocol: nothing to set side by side
    assert "# The two protocols side by side" in benchmark_markdown(records, {"command": "x"})


@pytest.mark.slow
def test_under_torchrun_every_rank_runs_the_grid_and_rank_0_reports(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(port), "-m", "weatherpeft", "benchmark", "--strategy", "ddp",
               "--tasks", "downscaling", "--methods", "lora", "--steps", "1", "--batch-size", "1",
               "--encoder-decoder", "frozen", "--accounting", "trainable", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.count("[1/1] test downscaling lora") == 1  # rank 0 alone reports
    (record,) = json.loads((out / "benchmark.json").read_text())["records"]
    assert record["error"] is None and record["steps"] == 1 and record["metrics"]
    assert (out / "runs" / "downscaling" / "lora-b0.003-s0" / "adapter" / "adapter.json").is_file()
