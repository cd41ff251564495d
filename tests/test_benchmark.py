"""The benchmark: a tiny grid end to end (JSON schema, Markdown, plot, resume), and its report."""

from __future__ import annotations

import json
import math

import pytest

from weatherpeft.benchmark import RECORD_KEYS, BenchmarkConfig, plan, run_benchmark
from weatherpeft.benchmark_report import benchmark_markdown, claims, aggregate


def test_tiny_grid_writes_valid_json_markdown_and_plot(tmp_path):
    config = BenchmarkConfig(profile="quick", tasks=("downscaling",), methods=("frozen", "lora"),
                             steps=2, batch_size=1, workers=1, out=str(tmp_path / "bench"))
    records = run_benchmark(config)
    content = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert content["records"] == records and content["about"]["profile"] == "quick"
    assert [(r["method"], r["budget"], r["encoder_decoder"]) for r in records] == \
        [("frozen", None, "frozen"), ("lora", 0.003, "frozen"), ("frozen", None, "train")]
    for record in records:
        assert set(RECORD_KEYS) <= set(record), set(RECORD_KEYS) - set(record)
        assert record["error"] is None and record["task"] == "downscaling" and record["seed"] == 0
        assert isinstance(record["metrics"], dict) and record["metrics"]
        assert all(isinstance(v, float) and math.isfinite(v) for v in record["metrics"].values())
        assert {"model/rmse/2t", "bilinear/rmse/2t"} <= set(record["metrics"])
        assert record["peak_memory_bytes"] > 0 and record["pretrained"] > 0
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
    markdown = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "| *bilinear interpolation* |" in markdown and "| lora | 0.3% |" in markdown
    assert "| *encoder/decoder only* | — | " in markdown
    assert (tmp_path / "bench" / "quality_vs_stored.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(FileExistsError, match="--resume"):
        run_benchmark(config)
    adapter = tmp_path / "bench" / "runs" / "downscaling" / "lora-b0.003-s0" / "adapter"
    stamp = adapter.stat().st_mtime_ns
    config.resume = True
    assert run_benchmark(config) == records  # nothing re-run
    assert adapter.stat().st_mtime_ns == stamp


def test_plan_expands_the_profile_and_rejects_bad_input():
    runs = plan(BenchmarkConfig(profile="standard"))
    keys = {(r.task, r.method, r.budget) for r in runs}
    assert len(runs) == 3 * (2 + 10 * 2 + 1) and ("precipitation", "full", None) in keys
    assert [(r.task, r.method) for r in runs if r.encoder_decoder == "train"] == \
        [(task, "frozen") for task in ("downscaling", "postprocessing", "precipitation")]
    assert ("downscaling", "weatherpeft", 0.04) in keys and ("postprocessing", "sfas", 0.003) in keys
    assert len({r.name for r in runs}) == len(runs)
    both = plan(BenchmarkConfig(profile="standard", encoder_decoder=("frozen", "train")))
    assert len(both) == 2 * 3 * (2 + 10 * 2) and len({r.name for r in both}) == len(both)
    assert {r.encoder_decoder for r in both if r.method == "sfas"} == {"frozen", "train"}
    assert "encoder_decoder" not in runs[0].settings()  # old records still --resume
    assert both[-1].settings()["encoder_decoder"] == "train" and both[-1].name.endswith("-edtrain")
    for bad, message in (({"profile": "huge"}, "profile"), ({"tasks": ("nowcasting",)}, "task"),
                         ({"encoder_decoder": ("thawed",)}, "encoder_decoder"),
                         ({"budgets": (1.5,)}, "budget"), ({"steps": -1}, "steps")):
        with pytest.raises(ValueError, match=message):
            BenchmarkConfig(**bad)
    with pytest.raises(ValueError, match="unknown method"):
        plan(BenchmarkConfig(methods=("lora", "magic")))
    with pytest.raises(ValueError, match="options"):
        plan(BenchmarkConfig(methods=("lora",), options='{"sfas": {"gamma": 0.1}}'))
    seeded = plan(BenchmarkConfig(methods=("weatherpeft",), seeds=(0, 1), tasks=("downscaling",),
                                  options='{"weatherpeft": {"budget_mode": "strict"}}'))
    assert [(r.seed, r.options) for r in seeded] == [(0, {"budget_mode": "strict"}), (1, {"budget_mode": "strict"})]


def _record(method, budget, seed, encoder_decoder="frozen", **metrics):
    return {"task": "downscaling", "method": method, "budget": budget, "seed": seed,
            "encoder_decoder": encoder_decoder, "encoder_decoder_parameters": 0, "steps": 10,
            "batch_size": 2, "lr": 3e-4, "new_lr": 2e-3, "trainable": 10, "stored": 10, "head": 0,
            "pretrained": 1000, "adapter_bytes": 100, "train_seconds": 1.0, "step_seconds": 0.1,
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
    assert "| weatherpeft | 0.3% | 10 (1.00%) | **1.6 ± 0.14** |" in markdown
    assert "| lora | 0.3% | 10 (1.00%) | 2.1 ± 0.14 |" in markdown
    verdicts = {claim: verdict for claim, _, verdict in claims(groups)}
    lowest = next(v for c, v in verdicts.items() if "lowest RMSE" in c)
    gap = next((c, v) for c, v in verdicts.items() if "gap" in c)
    assert lowest == "met (1/1)"
    assert gap[1] == "met (1/1)"  # (2.1 − 1.6) / (2.1 − 1.0) = 45 % of the gap


def test_report_has_a_section_per_protocol_and_the_encoder_decoder_only_reference():
    records = [_record("frozen", None, 0, **{"2t": 3.5}), _record("lora", 0.003, 0, **{"2t": 2.0}),
               _record("frozen", None, 0, "train", **{"2t": 1.25}),
               _record("lora", 0.003, 0, "train", **{"2t": 1.125})]
    records[3]["encoder_decoder_parameters"] = records[2]["encoder_decoder_parameters"] = 5000
    old = {k: v for k, v in _record("sfas", 0.003, 0, **{"2t": 2.5}).items() if "encoder" not in k}
    markdown = benchmark_markdown(records + [old], {"profile": "test", "command": "x"})
    frozen_part, train_part = markdown.split("# Protocol `encoder_decoder=train`")
    assert "# Protocol `encoder_decoder=frozen`" in frozen_part
    for part in (frozen_part, train_part):
        assert "| *encoder/decoder only* | — | 5,000 enc/dec | 1.25 |" in part
    assert "| lora | 0.3% | 10 (1.00%) | **2** |" in frozen_part
    assert "| sfas | 0.3% | 10 (1.00%) | 2.5 |" in frozen_part  # a record from before protocols
    assert "| lora | 0.3% | 10 (1.00%) + 5,000 enc/dec | **1.125** |" in train_part
    assert "| frozen |" not in train_part.split("## Cost")[0]  # it is the reference row there
    assert set(aggregate(records, "train")) == {("downscaling", "frozen", None),
                                                ("downscaling", "lora", 0.003)}


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
               "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.count("[1/1] downscaling lora") == 1  # rank 0 alone reports
    (record,) = json.loads((out / "benchmark.json").read_text())["records"]
    assert record["error"] is None and record["steps"] == 1 and record["metrics"]
    assert (out / "runs" / "downscaling" / "lora-b0.003-s0" / "adapter" / "adapter.json").is_file()
