"""Several adapters on one backbone (weatherpeft.serving): each adapter's outputs equal its own
model's and its merged model's, switching restores the backbone exactly, bad input is refused
with nothing loaded disturbed, and `weatherpeft evaluate` scores several adapters in one process."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_pretrained_tiny
from helpers import outputs

from weatherpeft import MultiAdapterModel
from weatherpeft.adapters import AdapterError, load_adapter, load_merged, save_adapter, save_merged
from weatherpeft.cli import main
from weatherpeft.data.stats import NormalisationStats
from weatherpeft.methods.registry import apply_method
from weatherpeft.train import TrainConfig, Trainer

#: name → (method, budget, options, protocol): a LoRA, a selection method (sparse entries plus
#: TADP prompts), a prompt method, and SFAS under the paper's protocol (dense encoder/decoder).
METHODS = {
    "lora": ("lora", 0.01, {}, "frozen"),
    "weatherpeft": ("weatherpeft", 0.04, {"gamma": 0.5}, "frozen"),
    "vpt": ("vpt", 0.002, {}, "frozen"),
    "sfas-train": ("sfas", 0.01, {}, "train"),
}


@pytest.fixture(scope="module")
def adapters(march_task, tmp_path_factory):
    """name → adapter folder, each trained 2 steps on its own fresh backbone."""
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for name, (method, budget, options, protocol) in METHODS.items():
        adaptation = apply_method(method, load_pretrained_tiny(), budget, options,
                                  encoder_decoder=protocol)
        config = TrainConfig(steps=2, batch_size=2, lr=1e-3, log_every=0, progress=False,
                             out_dir=str(folder / name / "run"))
        Trainer(adaptation, march_task, config, hooks=adaptation.hooks,
                param_groups=adaptation.param_groups(config.weight_decay)).fit()
        paths[name] = save_adapter(adaptation, folder / name / "adapter")
    return paths


@pytest.fixture(scope="module")
def served(adapters):
    model = MultiAdapterModel(load_pretrained_tiny())
    for name, path in adapters.items():
        model.add_adapter(name, path)
    return model


def assert_equal(a, b, exact=True):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_each_adapter_equals_its_own_model_in_any_switching_order(served, adapters,
                                                                   builtin_batches):
    batch = builtin_batches[0]
    expected = {name: outputs(load_adapter(path, load_pretrained_tiny()), batch)
                for name, path in adapters.items()}
    bare = outputs(load_pretrained_tiny(), batch)
    for name in ["vpt", "lora", "sfas-train", "weatherpeft", "lora", "vpt", "sfas-train"]:
        served.set_adapter(name)
        assert served.active == name
        assert_equal(outputs(served, batch), expected[name])
    served.set_adapter(None)
    assert_equal(outputs(served, batch), bare)  # every swapped entry restored exactly
    assert len({float(out["2t"].sum()) for out in expected.values()}) == len(expected)


def test_each_adapter_equals_its_merged_model(served, adapters, builtin_batches, tmp_path):
    batch = builtin_batches[0]
    for name, path in adapters.items():
        merged = load_merged(save_merged(load_adapter(path, load_pretrained_tiny()),
                                         tmp_path / name))
        served.set_adapter(name)
        # Float rounding only: LoRA's merge adds B·A into W, and a merged model's parameters all
        # require grad, which changes the kernel of Aurora's output heads.
        assert_equal(outputs(served, batch), outputs(merged, batch), exact=False)


def test_an_adapter_costs_its_stored_tensors_not_a_backbone(served, adapters):
    backbone_bytes = sum(p.numel() * p.element_size() for p in served.backbone.parameters())
    for name in adapters:
        adaptation = served.adaptation(name)
        shared = {id(p) for p in served.backbone.parameters()}
        own = sum(p.numel() * p.element_size() for p in adaptation.parameters()
                  if id(p) not in shared)
        patches = sum(patch.values.numel() * patch.values.element_size()
                      for patch in served._patches[name])
        file_bytes = (adapters[name] / "adapter.safetensors").stat().st_size
        assert own + patches <= file_bytes  # the values the file stores, nothing more
        assert own + patches < backbone_bytes / 2


def test_bad_input_is_refused_and_nothing_loaded_changes(served, adapters, builtin_batches,
                                                         tmp_path):
    batch = builtin_batches[0]
    served.set_adapter("weatherpeft")
    before, names = outputs(served, batch), served.adapters

    with pytest.raises(AdapterError, match="already loaded"):
        served.add_adapter("lora", adapters["vpt"])
    with pytest.raises(AdapterError, match="no adapter named 'nope'.*loaded: \\['lora'"):
        served.set_adapter("nope")

    other = load_pretrained_tiny()  # another backbone: one weight changed
    with torch.no_grad():
        other.pretrained_parameters()["backbone.encoder_layers.0.blocks.0.mlp.fc1.weight"][0, 0] += 1
    other.fingerprint(refresh=True)
    with pytest.raises(AdapterError, match="trained on backbone"):
        served.add_adapter("other", save_adapter(apply_method("lora", other, 0.01),
                                                 tmp_path / "other"))

    wider = load_pretrained_tiny(extra_surf_vars=("tp",),  # another variable set
                                 stats=NormalisationStats(locations={"tp": 0.0}, scales={"tp": 1e-3}))
    with pytest.raises(AdapterError, match="made for the variables .*missing \\[\\], extra"):
        MultiAdapterModel(wider).add_adapter("lora", adapters["lora"])
    with pytest.raises(AdapterError, match="made for the variables .*missing \\['tp'\\]"):
        served.add_adapter("tp", save_adapter(apply_method("sfas", wider, 0.01), tmp_path / "tp"))

    assert served.adapters == names and served.active == "weatherpeft"
    assert_equal(outputs(served, batch), before)


def test_evaluate_scores_several_adapters_in_one_process(adapters, tmp_path, capsys):
    out = tmp_path / "scores"
    given = f"lora={adapters['lora']},{adapters['weatherpeft']}"
    assert main(["evaluate", "--adapter", given, "--task", "forecasting", "--batch-size", "8",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## adapter lora" in printed and "## adapter weatherpeft" in printed
    lora = json.loads((out / "lora" / "metrics.json").read_text())
    sparse = json.loads((out / "weatherpeft" / "metrics.json").read_text())
    assert lora["scores"] != sparse["scores"]
    assert main(["evaluate", "--adapter", f"{adapters['lora']},{adapters['lora']}",
                 "--task", "forecasting"]) == 2
    assert "more than one adapter" in capsys.readouterr().err
