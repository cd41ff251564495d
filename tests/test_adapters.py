"""Adapter files: exact round trip, sparse storage, refusal of the wrong backbone or a bad file,
merged model equal to the adapter model, and the CLI around them."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import load_pretrained_tiny
from helpers import outputs
from safetensors.torch import load_file, save_file

from weatherpeft.adapters import (
    CONFIG_FILE,
    TENSOR_FILE,
    AdapterError,
    _record_digest,
    _sha256,
    adapter_info,
    load_adapter,
    load_merged,
    save_adapter,
    save_merged,
)
from weatherpeft.cli import main
from weatherpeft.methods.registry import apply_method
from weatherpeft.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained(march_task, tmp_path_factory):
    """A WeatherPEFT adaptation after 3 steps, and its adapter folder."""
    backbone = load_pretrained_tiny()
    adaptation = apply_method("weatherpeft", backbone, 0.04, {"gamma": 0.5})
    folder = tmp_path_factory.mktemp("adapter")
    config = TrainConfig(steps=3, batch_size=2, lr=1e-3, log_every=0, progress=False,
                         out_dir=str(folder / "run"))
    Trainer(adaptation, march_task, config, hooks=adaptation.hooks,
            param_groups=adaptation.param_groups(config.weight_decay)).fit()
    adaptation.eval()
    return adaptation, save_adapter(adaptation, folder / "adapter")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_round_trip_reproduces_outputs_exactly(trained, builtin_batches):
    adaptation, folder = trained
    loaded = load_adapter(folder, load_pretrained_tiny())
    assert_same(outputs(adaptation, builtin_batches[0]), outputs(loaded, builtin_batches[0]))
    assert loaded.report().stored == adaptation.report().stored


def test_the_file_holds_sparse_entries_and_the_trained_parts_only(trained):
    adaptation, folder = trained
    tensors = load_file(str(folder / TENSOR_FILE))
    roles = {key.split(".", 1)[0] for key in tensors}
    assert roles == {"added", "sparse"}
    sparse_values = sum(t.numel() for k, t in tensors.items() if k.endswith(".values"))
    added = sum(t.numel() for k, t in tensors.items() if k.startswith("added."))
    assert added + sparse_values == adaptation.report().stored
    # 4-byte index + 4-byte value per changed entry, 4 bytes per added parameter, the JSON header
    assert (folder / TENSOR_FILE).stat().st_size <= 8 * sparse_values + 4 * added + 2**17
    info = adapter_info(folder)
    assert info["method"] == "weatherpeft" and info["report"]["stored"] == adaptation.report().stored


def test_a_different_backbone_is_refused_unless_forced(trained, caplog, builtin_batches):
    _, folder = trained
    other = load_pretrained_tiny()
    with torch.no_grad():
        next(iter(other.pretrained_parameters().values())).add_(0.01)
    other.fingerprint(refresh=True)
    with pytest.raises(AdapterError, match="refusing to load"):
        load_adapter(folder, other)
    with caplog.at_level(logging.WARNING):
        forced = load_adapter(folder, other, force=True)
    assert "forced" in caplog.text
    assert forced.report().stored > 0


def copy_adapter(folder, target):
    target.mkdir()
    for name in (CONFIG_FILE, TENSOR_FILE):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


def test_truncated_file_is_named(trained, tmp_path):
    _, folder = trained
    broken = copy_adapter(folder, tmp_path / "broken")
    data = (broken / TENSOR_FILE).read_bytes()
    (broken / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated, corrupt"):
        load_adapter(broken, load_pretrained_tiny())


def test_unknown_keys_are_named(trained, tmp_path):
    _, folder = trained
    odd = copy_adapter(folder, tmp_path / "odd")
    tensors = load_file(str(odd / TENSOR_FILE))
    tensors["added.parts.tadp.extra"] = torch.zeros(3)
    save_file(tensors, str(odd / TENSOR_FILE))
    config = json.loads((odd / CONFIG_FILE).read_text())
    config["tensors"]["added.parts.tadp.extra"] = {"dtype": "float32", "shape": [3]}
    config["sha256"] = _sha256(odd / TENSOR_FILE)
    config["record_sha256"] = _record_digest(config)
    (odd / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="parts.tadp.extra"):
        load_adapter(odd, load_pretrained_tiny())


def test_not_an_adapter_is_named(tmp_path):
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(tmp_path, load_pretrained_tiny())
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tmp_path, load_pretrained_tiny())


def test_merged_model_equals_the_adapter_model(trained, tmp_path, builtin_batches):
    adaptation, folder = trained
    loaded = load_adapter(folder, load_pretrained_tiny())
    expected = outputs(loaded, builtin_batches[0])
    merged = load_merged(save_merged(loaded, tmp_path / "merged"))
    assert_same(outputs(merged, builtin_batches[0]), expected)


def test_cli_finetune_info_and_merge(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["finetune", "--method", "weatherpeft", "--budget", "0.04", "--steps", "2",
                 "--batch-size", "1", "--out-dir", str(run), "--no-evaluate",
                 "--options", '{"refresh_every": 2}'])
    assert code == 0
    result = json.loads((run / "result.json").read_text())
    assert result["report"]["trainable"] > 0 and (run / "adapter" / TENSOR_FILE).is_file()
    assert main(["adapter", "info", str(run / "adapter")]) == 0
    assert '"method": "weatherpeft"' in capsys.readouterr().out
    assert main(["adapter", "merge", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "backbone" / "model.safetensors").is_file()
    assert main(["finetune", "--options", "[1, 2]", "--out-dir", str(tmp_path / "bad")]) == 2
