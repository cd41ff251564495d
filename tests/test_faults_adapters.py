"""Bad adapters and bad method requests: every fault is an AdapterError (or, for a method
request, a ValueError) that names what is wrong; saving refuses NaN/inf and never replaces a
good adapter with a broken one."""

from __future__ import annotations

import copy
import json
import logging
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_pretrained_tiny
from safetensors.torch import load_file, save_file

from weatherpeft import adapters
from weatherpeft.adapters import (
    CONFIG_FILE,
    TENSOR_FILE,
    AdapterError,
    _record_digest,
    _sha256,
    adapter_tensors,
    load_adapter,
    save_adapter,
)
from weatherpeft.methods.registry import apply_method

METHOD, BUDGET = "ssf", 0.001  # the cheapest method to build: 32 scale/shift vectors


@pytest.fixture(scope="module")
def pristine():
    """The shipped tiny backbone, copied for every load (applying a method changes it)."""
    return load_pretrained_tiny()


@pytest.fixture(scope="module")
def saved(pristine, tmp_path_factory):
    """(tensors, folder) of an SSF adapter with random, non-trivial values."""
    adaptation = apply_method(METHOD, copy.deepcopy(pristine), BUDGET)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in adaptation.added_parameters().values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    folder = save_adapter(adaptation, tmp_path_factory.mktemp("adapter") / "adapter")
    return adapter_tensors(adaptation), folder


def copy_of(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def edit_record(folder: Path, change, resign: bool = False) -> None:
    """Apply ``change`` to adapter.json's content; ``resign`` recomputes record_sha256, as a
    deliberate editor would, so that the later checks are reached."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    change(config)
    if resign:
        config["record_sha256"] = _record_digest(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def rechecksum(folder: Path) -> None:
    """Record the (changed) tensor file's sha256 and re-sign the record."""
    edit_record(folder, lambda c: c.update(sha256=_sha256(folder / TENSOR_FILE)), resign=True)


def load(folder: Path, pristine, **kwargs):
    return load_adapter(folder, copy.deepcopy(pristine), **kwargs)


def test_round_trip_is_exact(saved, pristine):
    tensors, folder = saved
    loaded = adapter_tensors(load(folder, pristine))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)


# -- the tensor file ----------------------------------------------------------------------------


def test_random_bytes_as_tensor_file(saved, pristine, tmp_path):
    folder = copy_of(saved[1], tmp_path / "a")
    (folder / TENSOR_FILE).write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(AdapterError, match=rf"{TENSOR_FILE} does not match the checksum in {CONFIG_FILE}"):
        load(folder, pristine)
    rechecksum(folder)
    with pytest.raises(AdapterError, match=rf"cannot read .*{TENSOR_FILE}"):
        load(folder, pristine)


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_truncated_tensor_file(saved, pristine, tmp_path, keep):
    folder = copy_of(saved[1], tmp_path / "a")
    data = (folder / TENSOR_FILE).read_bytes()
    (folder / TENSOR_FILE).write_bytes(data[:keep])
    with pytest.raises(AdapterError, match="truncated, corrupt, or from another adapter"):
        load(folder, pristine)
    rechecksum(folder)
    with pytest.raises(AdapterError, match=rf"cannot read .*{TENSOR_FILE}"):
        load(folder, pristine)


def test_missing_tensor_file(saved, pristine, tmp_path):
    folder = copy_of(saved[1], tmp_path / "a")
    (folder / TENSOR_FILE).unlink()
    with pytest.raises(AdapterError, match=rf"{TENSOR_FILE} is missing"):
        load(folder, pristine)


def test_tensor_unlike_its_inventory(saved, pristine, tmp_path):
    folder = copy_of(saved[1], tmp_path / "a")
    tensors = load_file(str(folder / TENSOR_FILE))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].double()
    save_file(tensors, str(folder / TENSOR_FILE))
    rechecksum(folder)
    with pytest.raises(AdapterError, match=rf"tensor '{key}' .* is {{'dtype': 'float64', 'shape': \[\d+\]}}, "
                                           rf"its inventory in {CONFIG_FILE} says {{'dtype': 'float32'"):
        load(folder, pristine)


def test_nan_in_a_stored_tensor(saved, pristine, tmp_path):
    folder = copy_of(saved[1], tmp_path / "a")
    tensors = load_file(str(folder / TENSOR_FILE))
    key = sorted(tensors)[3]
    tensors[key][5] = math.nan
    save_file(tensors, str(folder / TENSOR_FILE))
    rechecksum(folder)
    with pytest.raises(AdapterError, match=rf"tensor '{key}' in .* holds NaN/inf"):
        load(folder, pristine)


# -- adapter.json -------------------------------------------------------------------------------


def test_random_bytes_as_record(saved, pristine, tmp_path):
    folder = copy_of(saved[1], tmp_path / "a")
    (folder / CONFIG_FILE).write_bytes(b"\xff\xfe\x00{\x80garbage")
    with pytest.raises(AdapterError, match=rf"{CONFIG_FILE} is not valid JSON"):
        load(folder, pristine)
    (folder / CONFIG_FILE).write_text('{"format": "weatherpeft.adapter/1", "method": ')
    with pytest.raises(AdapterError, match=rf"{CONFIG_FILE} is not valid JSON"):
        load(folder, pristine)
    (folder / CONFIG_FILE).write_text('["weatherpeft.adapter/1"]')
    with pytest.raises(AdapterError, match="is not a weatherpeft adapter .* found list"):
        load(folder, pristine)


@pytest.mark.parametrize("key", ["method", "options", "budget", "backbone", "tensors", "sha256",
                                 "report", "variables", "weatherpeft_version"])
def test_missing_key(saved, pristine, tmp_path, key):
    folder = copy_of(saved[1], tmp_path / "a")
    edit_record(folder, lambda c: c.pop(key), resign=True)
    with pytest.raises(AdapterError, match=rf"{CONFIG_FILE}: '{key}' is missing"):
        load(folder, pristine)


@pytest.mark.parametrize("key, value, message", [
    ("method", 5, "'method' must be a JSON str, got int 5"),
    ("options", [1], "'options' must be a JSON dict, got list"),
    ("budget", "0.001", "'budget' must be a JSON number, got str"),
    ("budget", True, "'budget' must be a JSON number, got bool"),
    ("backbone", "aurora", "'backbone' must be a JSON dict"),
    ("backbone", {"fingerprint": 1, "config": {}}, "'backbone' must hold 'fingerprint'"),
    ("tensors", {"added.x": {"dtype": "float32", "shape": [-1]}}, "inventory entry 'added.x' must be"),
    ("tensors", {"added.x": "float32"}, "inventory entry 'added.x' must be"),
    ("sha256", None, "'sha256' must be a JSON str, got NoneType"),
])
def test_wrong_type(saved, pristine, tmp_path, key, value, message):
    folder = copy_of(saved[1], tmp_path / "a")
    edit_record(folder, lambda c: c.update({key: value}), resign=True)
    with pytest.raises(AdapterError, match=message):
        load(folder, pristine)


@pytest.mark.parametrize("budget", [math.nan, math.inf, -math.inf, -0.01, 0, 1.5])
def test_budget_outside_the_unit_interval(saved, pristine, tmp_path, budget):
    folder = copy_of(saved[1], tmp_path / "a")
    edit_record(folder, lambda c: c.update(budget=budget), resign=True)
    with pytest.raises(AdapterError, match=r"budget is a fraction of the pretrained parameters in \(0, 1\]"):
        load(folder, pristine)


@pytest.mark.parametrize("key, value", [("sha256", "0" * 64), ("options", {"sites": ["mlp"]}),
                                        ("budget", 0.002), ("method", "vpt"),
                                        ("tensors", {})])
def test_edited_record_is_refused(saved, pristine, tmp_path, key, value):
    folder = copy_of(saved[1], tmp_path / "a")
    edit_record(folder, lambda c: c.update({key: value}))
    with pytest.raises(AdapterError, match=r"method, options, budget, backbone or tensor inventory were "
                                           r"edited after saving \(they no longer match record_sha256\)"):
        load(folder, pristine)


@pytest.mark.parametrize("change, message", [
    ({"method": "nope"}, r"does not rebuild its method: unknown method 'nope'"),
    ({"options": {"rank": 4}}, r"does not rebuild its method: method 'ssf' has no option\(s\) 'rank'"),
    ({"options": {"sites": [1]}}, r"option 'sites' of method 'ssf' must be a list of string values"),
    ({"options": {"sites": ["no such module"]}}, r"does not rebuild its method: SSF sites"),
    ({"options": {"sites": ["attn"]}}, r"does not rebuild its method: SSF on the 16 chosen sites needs "
                                       r"12,288 parameters, more than budget 0.001 allows"),
    ({"method": "vpt", "options": {}}, r"added tensors do not match the rebuilt method"),
])
def test_resigned_record_that_does_not_rebuild(saved, pristine, tmp_path, change, message):
    folder = copy_of(saved[1], tmp_path / "a")
    edit_record(folder, lambda c: c.update(change), resign=True)
    with pytest.raises(AdapterError, match=message):
        load(folder, pristine)


def test_record_without_its_checksum_loads_with_a_warning(saved, pristine, tmp_path, caplog):
    folder = copy_of(saved[1], tmp_path / "a")
    edit_record(folder, lambda c: c.pop("record_sha256"))
    with caplog.at_level(logging.WARNING):
        loaded = adapter_tensors(load(folder, pristine))
    assert "no record_sha256" in caplog.text
    assert all(torch.equal(loaded[key], value) for key, value in saved[0].items())


def test_wrong_backbone_is_refused_unless_forced(saved, pristine, caplog):
    other = copy.deepcopy(pristine)
    with torch.no_grad():
        next(iter(other.pretrained_parameters().values())).add_(0.01)
    other.fingerprint(refresh=True)
    with pytest.raises(AdapterError, match=r"was trained on backbone \w+… \(aurora-tiny\), this backbone is "
                                           r"\w+…: refusing to load \(force=True / --force overrides\)"):
        load_adapter(saved[1], other)
    with caplog.at_level(logging.WARNING):
        assert load_adapter(saved[1], other, force=True).report().stored > 0
    assert "loading anyway (forced)" in caplog.text


# -- method requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [math.nan, math.inf, -math.inf, -0.5, 0, 0.0, 1.5, True, "0.1", None])
def test_budget_outside_the_unit_interval_is_refused(pristine, budget):
    with pytest.raises(ValueError, match=r"budget is a fraction of the pretrained parameters in \(0, 1\], "
                                         rf"got {__import__('re').escape(repr(budget))}"):
        apply_method(METHOD, copy.deepcopy(pristine), budget)


@pytest.mark.parametrize("method, options, message", [
    ("nope", {}, r"unknown method 'nope'; known: \["),
    (["ssf"], {}, r"unknown method \['ssf'\]"),
    ("ssf", {"rank": 4}, r"method 'ssf' has no option\(s\) 'rank'; its options: \['sites'\]"),
    ("ssf", [("sites", ())], r"options of method 'ssf' must be a mapping of name → value, got list"),
    ("lora", {"rank": "4"}, r"option 'rank' of method 'lora' must be an integer or null, got '4'"),
    ("lora", {"dropout": math.nan}, r"option 'dropout' of method 'lora' must be a finite number, got nan"),
    ("lora", {"targets": [1]}, r"option 'targets' of method 'lora' must be a list of string values, got \[1\]"),
    ("lora", {"targets": 1}, r"option 'targets' of method 'lora' must be a list of string values, got 1"),
    ("sfas", {"noise": True}, r"option 'noise' of method 'sfas' must be a string, got True"),
    ("peft", {"peft_type": "lora", "config": []}, r"option 'config' of method 'peft' must be an object"),
])
def test_bad_method_request_is_named(pristine, method, options, message):
    with pytest.raises(ValueError, match=message):
        apply_method(method, copy.deepcopy(pristine), BUDGET, options)


# -- saving -------------------------------------------------------------------------------------


def _listing(folder: Path) -> dict[str, bytes]:
    return {item.name: item.read_bytes() for item in sorted(folder.iterdir())}


def test_nan_tensor_is_refused_and_the_previous_adapter_kept(saved, pristine, tmp_path):
    folder = copy_of(saved[1], tmp_path / "adapter")
    before = _listing(folder)
    adaptation = apply_method(METHOD, copy.deepcopy(pristine), BUDGET)
    name, parameter = sorted(adaptation.added_parameters().items())[2]
    with torch.no_grad():
        parameter[7] = math.inf
    with pytest.raises(AdapterError, match=rf"refusing to save adapter .*: tensor 'added.{name}' holds 1 "
                                           rf"NaN/inf value\(s\) of {parameter.numel()}"):
        save_adapter(adaptation, folder)
    assert _listing(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_failed_write_keeps_the_previous_adapter(saved, pristine, tmp_path, monkeypatch):
    folder = copy_of(saved[1], tmp_path / "adapter")
    before = _listing(folder)

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(adapters, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(apply_method(METHOD, copy.deepcopy(pristine), BUDGET), folder)
    assert _listing(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert adapter_tensors(load(folder, pristine)).keys() == saved[0].keys()


# -- nothing is unpickled -----------------------------------------------------------------------


class _Payload:
    """Unpickling this writes ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.fixture
def pickled(tmp_path) -> tuple[Path, Path]:
    """(a checkpoint-like file holding a pickled object, the marker its unpickling writes)."""
    from weatherpeft.train import CHECKPOINT_FORMAT

    marker = tmp_path / "marker"
    path = tmp_path / "step_00000001.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": _Payload(marker), "step": 1}, path)
    return path, marker


def test_trainer_checkpoint_with_a_pickled_object_is_refused(pickled):
    from weatherpeft.train import load_model_state

    path, marker = pickled
    with pytest.raises(ValueError, match=rf"cannot read checkpoint {path}: Weights only load failed"):
        load_model_state(torch.nn.Linear(2, 2), path)
    assert not marker.exists()


def test_climatology_with_a_pickled_object_is_refused(pickled):
    from weatherpeft.tasks.forecasting import Climatology

    path, marker = pickled
    with pytest.raises(ValueError, match=rf"{path} is not a readable weatherpeft climatology: Weights only"):
        Climatology.load(path)
    assert not marker.exists()


def test_published_checkpoints_with_a_pickled_object_are_refused(pickled, pristine):
    """Microsoft's and NASA's published pickles load with weights_only=True: no object runs."""
    from weatherpeft.backbones.aurora import AuroraBackbone
    from weatherpeft.backbones.prithvi import PrithviBackbone

    path, marker = pickled
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AuroraBackbone("aurora-tiny", checkpoint=path, stats=pristine.stats)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        PrithviBackbone("prithvi-tiny", checkpoint=path)
    assert not marker.exists()


@pytest.mark.parametrize("budget, options, message", [
    (1.5, "{}", "budget"), (0.01, '{"nonsense": 1}', "nonsense"), (0.01, '{"rank": "big"}', "rank")])
def test_finetune_refuses_a_bad_request_before_reading_any_data(monkeypatch, tmp_path, budget, options, message):
    from weatherpeft import finetune
    from weatherpeft.train import TrainConfig

    def no_data(*args, **kwargs):
        raise AssertionError("the task was built before the request was checked")

    monkeypatch.setattr(finetune, "build_task", no_data)
    config = finetune.FinetuneConfig(task="downscaling", method="lora", budget=budget, options=options)
    with pytest.raises(ValueError, match=message):
        finetune.run_finetune(config, TrainConfig(steps=1, out_dir=str(tmp_path)))


_KILLED_SAVE = """
import sys, time
import torch
from weatherpeft import adapters
from weatherpeft.backbones import load_backbone
from weatherpeft.methods.registry import apply_method

torch.set_num_threads(1)
adaptation = apply_method("ssf", load_backbone(sys.argv[1]), 0.003)
adapters.save_adapter(adaptation, sys.argv[2])
print("saved", flush=True)
with torch.no_grad():
    for parameter in adaptation.added_parameters().values():
        parameter.add_(1.0)
real_save = adapters.save_file

def slow_save(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    print("writing", flush=True)
    time.sleep(60)

adapters.save_file = slow_save
adapters.save_adapter(adaptation, sys.argv[2])
"""


@pytest.mark.slow
def test_sigkill_while_saving_keeps_the_previous_adapter(tmp_path):
    import signal
    import subprocess
    import sys

    from weatherpeft.adapters import load_adapter
    from weatherpeft.backbones import load_backbone

    checkpoint = Path(__file__).resolve().parents[1] / "models" / "aurora-tiny"
    path = tmp_path / "adapter"
    process = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(checkpoint), str(path)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "saved"
        before = {p.name: p.read_bytes() for p in path.iterdir()}
        assert process.stdout.readline().strip() == "writing"  # the new tensors are on disk
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    from weatherpeft.methods.registry import apply_method

    loaded = load_adapter(path, load_backbone(checkpoint)).added_parameters()
    first = apply_method("ssf", load_backbone(checkpoint), 0.003).added_parameters()  # as first saved
    assert loaded.keys() == first.keys()
    assert all(torch.equal(loaded[name], first[name]) for name in first)
