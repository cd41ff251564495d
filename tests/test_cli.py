"""The command line: configs from YAML plus flags, data commands, clear errors."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from weatherpeft.cli import build_parser, main
from weatherpeft.config import add_dataclass_arguments, build_config


@dataclass
class _Example:
    steps: int = 10
    lr: float = 1e-3
    levels: tuple[int, ...] = (500, 850)
    out: Path = Path("runs")
    verbose: bool = False


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Example)
    return build_config(_Example, parser.parse_args(argv))


def test_defaults_then_yaml_then_flags(tmp_path):
    assert _parse([]) == _Example()
    config = tmp_path / "c.yaml"
    config.write_text("steps: 20\nlevels: [300, 500]\nverbose: true\n")
    assert _parse(["--config", str(config)]) == _Example(steps=20, levels=(300, 500), verbose=True)
    assert _parse(["--config", str(config), "--steps", "5", "--no-verbose"]) == _Example(
        steps=5, levels=(300, 500), verbose=False)


@pytest.mark.parametrize("text, message", [
    ("stpes: 3\n", "unknown option"),
    ("steps: lots\n", "bad value for 'steps'"),
    ("levels: 500\n", "bad value for 'levels'"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_bad_yaml_is_rejected_naming_the_key(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        _parse(["--config", str(config)])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        _parse(["--config", str(tmp_path / "nope.yaml")])


def test_generate_help_documents_the_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "generate", "--help"])
    text = capsys.readouterr().out
    for option in ("--truncation", "--spinup-days", "--downstream-days", "--ensemble-members", "--config"):
        assert option in text


def test_data_check_and_info_on_a_store(wb2_store, capsys):
    assert main(["data", "check", str(wb2_store)]) == 0
    assert "all finite" in capsys.readouterr().out
    assert main(["data", "info", str(wb2_store)]) == 0
    assert "2m_temperature" in capsys.readouterr().out


def test_data_check_reports_a_missing_path_as_an_error(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "missing.zarr")]) == 2
    assert "store not found" in capsys.readouterr().err


def test_demo_compares_weatherpeft_and_lora_and_writes_adapters_and_a_map(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--batch-size", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checksums verified" in printed and "24 h forecast by aurora-tiny" in printed
    assert "| RMSE on the test month | bilinear | frozen backbone | LoRA | WeatherPEFT |" in printed
    rows = {line.split(" | ")[0].strip("| "): line for line in printed.splitlines() if line.startswith("| ")}
    assert {"2t (K)", "10u (m/s)", "10v (m/s)", "t850 (K)", "z500 (m²/s²)", "parameters stored",
            "adapter file"} <= set(rows)
    for method in ("lora", "weatherpeft"):
        result = json.loads((out / method / "result.json").read_text())
        assert f"{result['test']['model/rmse/2t']:.4g}" in rows["2t (K)"]
        assert (out / method / "adapter" / "adapter.safetensors").is_file()
    assert (out / "weatherpeft_2t_map.png").read_bytes()[:4] == b"\x89PNG"
    assert f"weatherpeft adapter info {out / 'weatherpeft' / 'adapter'}" in printed
    assert "Equal stored size: both adapters store at most the budget" in printed  # strict by default


def test_finetune_and_evaluate_a_downstream_task_with_maps(tmp_path, capsys):
    run = tmp_path / "ds"
    assert main(["finetune", "--task", "downscaling", "--method", "lora", "--budget", "0.01",
                 "--steps", "1", "--batch-size", "1", "--out-dir", str(run), "--no-evaluate"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--adapter", str(run / "adapter"), "--out", str(out),
                 "--map-variable", "t_850", "--batch-size", "16"]) == 0
    scores = json.loads((out / "metrics.json").read_text())
    assert scores["task"] == "downscaling"
    assert {"model/rmse/2t", "bilinear/rmse/2t", "model/bias/z500"} <= set(scores["scores"])
    assert "| rmse | 2t |" in (out / "metrics.md").read_text()
    assert (out / "map_t_850_sample0.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", "--adapter", str(run / "adapter"), "--out", str(out),
                 "--map-variable", "nonsense"]) == 2
    assert "not predicted" in capsys.readouterr().err


def test_methods_lists_the_sizes_that_applying_each_method_gives():
    """``weatherpeft methods`` builds one backbone and sizes every method on copies of it: the
    numbers are those of applying each method to a freshly loaded backbone."""
    from conftest import PRETRAINED_TINY

    from weatherpeft.backbones import load_backbone
    from weatherpeft.methods.registry import apply_method, describe_methods

    rows = describe_methods(str(PRETRAINED_TINY), 0.003)
    assert len(rows) >= 10
    for row in rows:
        try:
            adaptation = apply_method(row["name"], load_backbone(PRETRAINED_TINY), 0.003)
        except ValueError as error:
            assert row["error"] == str(error), row["name"]
            continue
        assert "error" not in row, row["name"]
        assert {k: row[k] for k in adaptation.report().as_dict()} == adaptation.report().as_dict(), \
            row["name"]
        assert row["resolved"] == adaptation.resolved, row["name"]
