"""LoRA / DoRA / any peft type through HF peft: sizing to the budget, outputs at initialisation,
what moves in training, exact adapter round trip, merged = unmerged, and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import load_pretrained_tiny
from helpers import outputs
from peft.tuners.lora import Linear as LoraLinear
from safetensors.torch import load_file

from weatherpeft.adapters import load_adapter, load_merged, save_adapter, save_merged
from weatherpeft.data.stats import NormalisationStats
from weatherpeft.methods.base import BudgetError, budget_entries
from weatherpeft.methods.hf_peft import SWIN_LINEARS, lora_entries, target_modules
from weatherpeft.methods.registry import apply_method
from weatherpeft.train import TrainConfig, Trainer

#: Relative tolerance (of each variable's largest value) for "same outputs up to float rounding".
ROUNDING = 1e-6


def assert_close(a, b, rel=ROUNDING):
    assert a.keys() == b.keys()
    for key in a:
        worst = float((a[key] - b[key]).abs().max() / b[key].abs().max())
        assert worst <= rel, f"{key}: relative difference {worst:.2e}"


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def lora_layers(adaptation):
    return {name: module for name, module in adaptation.backbone.named_modules()
            if isinstance(module, LoraLinear)}


@pytest.fixture(scope="module")
def reference(builtin_batches):
    return outputs(load_pretrained_tiny(), builtin_batches[0])


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("budget", [0.003, 0.04])
def test_size_lands_within_ten_percent_and_equals_the_built_parameters(method, budget):
    backbone = load_pretrained_tiny()
    pretrained_ids = {id(p) for p in backbone.pretrained_parameters().values()}
    adaptation = apply_method(method, backbone, budget)
    report = adaptation.report()
    assert report.trainable == pytest.approx(budget_entries(backbone, budget), rel=0.10)
    assert report.trainable <= budget_entries(backbone, budget)
    # The analytic count (from the ranks peft actually built) equals the parameters.
    targets = {name: module.base_layer for name, module in lora_layers(adaptation).items()}
    ranks = {name: module.r["default"] for name, module in lora_layers(adaptation).items()}
    assert lora_entries(targets, ranks, method == "dora") == report.trainable
    assert report.trainable == sum(p.numel() for p in adaptation.added_parameters().values())
    assert report.trainable == adaptation.resolved["parameters"] == report.stored
    assert report.head == 0 and not adaptation.dense_parameters()
    # Pretrained parameters are the same objects, found under their wrapped names.
    assert {id(p) for p in backbone.pretrained_parameters().values()} == pretrained_ids
    assert all(name.startswith(("backbone.encoder_layers.", "backbone.decoder_layers."))
               and name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2") for name in targets)
    # alpha / r is the same for every layer (alpha_ratio = 1).
    assert {module.scaling["default"] for module in lora_layers(adaptation).values()} == {1.0}


def test_budget_0_04_adapts_every_swin_linear_with_ranks_one_apart():
    adaptation = apply_method("lora", load_pretrained_tiny(), 0.04)
    layers = lora_layers(adaptation)
    assert len(layers) == 32 == adaptation.resolved["target_layers"]
    assert adaptation.resolved["rank_counts"] == {"9": 1, "10": 31}
    assert not any(name.startswith(("encoder.", "decoder.")) for name in layers)


def test_an_explicit_rank_is_uniform_and_alpha_follows_the_ratio():
    adaptation = apply_method("lora", load_pretrained_tiny(), 0.04, {"rank": 4, "alpha_ratio": 2.0})
    layers = lora_layers(adaptation)
    assert {m.r["default"] for m in layers.values()} == {4}
    assert {m.scaling["default"] for m in layers.values()} == {2.0}
    assert adaptation.report().trainable == 4 * 24576


def test_a_budget_below_one_layer_names_the_nearest_feasible_one():
    with pytest.raises(BudgetError, match="nearest feasible budget"):
        apply_method("lora", load_pretrained_tiny(), 1e-5)


def test_targets_must_be_linear_and_must_match():
    with pytest.raises(ValueError, match="must be nn.Linear"):
        apply_method("lora", load_pretrained_tiny(), 0.04,
                     {"targets": [r"backbone\.encoder_layers\.0\.blocks\.0\.mlp"]})
    with pytest.raises(ValueError, match="no module"):
        apply_method("dora", load_pretrained_tiny(), 0.04, {"targets": "nothing"})


def test_the_task_head_stays_trainable():
    stats = NormalisationStats(locations={"tp": 0.0}, scales={"tp": 1e-3})
    adaptation = apply_method("dora", load_pretrained_tiny(stats=stats, extra_surf_vars=("tp",)), 0.01)
    head = adaptation.head_parameters()
    assert head and all(p.requires_grad for p in head.values())
    trainable = {id(p) for p in adaptation.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in (*head.values(), *adaptation.added_parameters().values())}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_outputs_at_initialisation_equal_the_frozen_backbone(method, builtin_batches, reference):
    adaptation = apply_method(method, load_pretrained_tiny(), 0.04)
    for module in lora_layers(adaptation).values():
        assert not module.lora_B["default"].weight.any()
        if method == "dora":
            norm = module.base_layer.weight.norm(p=2, dim=1)
            assert torch.equal(module.lora_magnitude_vector["default"].weight, norm)
    # Each wrapped layer computes exactly what its base layer does ...
    x = torch.randn(3, 7, 1024)
    with torch.no_grad():
        for module in lora_layers(adaptation).values():
            inputs = x[..., :module.base_layer.in_features]
            assert torch.equal(module(inputs), module.base_layer(inputs))
    # ... and the whole model agrees to float rounding (other allocations, other kernels).
    assert_close(outputs(adaptation, builtin_batches[0]), reference)


@pytest.fixture(scope="module", params=[("lora", 0.04), ("dora", 0.003)], ids=["lora", "dora"])
def trained(request, march_task, tmp_path_factory):
    """((pretrained parameter, its value before) pairs, the adaptation after 3 steps, added
    parameters before, the adapter folder)."""
    method, budget = request.param
    backbone = load_pretrained_tiny()
    before = [(p, p.detach().clone()) for p in backbone.pretrained_parameters().values()]
    adaptation = apply_method(method, backbone, budget)
    added_before = {n: p.detach().clone() for n, p in adaptation.added_parameters().items()}
    folder = tmp_path_factory.mktemp(method)
    config = TrainConfig(steps=3, batch_size=2, lr=1e-3, log_every=0, progress=False,
                         out_dir=str(folder / "run"))
    Trainer(adaptation, march_task, config, hooks=adaptation.hooks,
            param_groups=adaptation.param_groups(config.weight_decay)).fit()
    adaptation.eval()
    return before, adaptation, added_before, save_adapter(adaptation, folder / "adapter")


def test_training_moves_the_adapters_only(trained):
    before, adaptation, added_before, _ = trained
    assert len(before) == len(adaptation.backbone.pretrained_parameters())
    for parameter, value in before:
        assert torch.equal(parameter, value)
    added = adaptation.added_parameters()
    moved = {n for n, p in added.items() if not torch.equal(p, added_before[n])}
    assert {n for n in added if ".lora_B." in n} <= moved  # every B left zero

    def kinds(names):  # A, B (and DoRA's magnitude_vector)
        return {n.split(".lora_")[1].split(".")[0] for n in names}

    assert kinds(moved) == kinds(added)


def test_adapter_round_trip_is_exact(trained, builtin_batches):
    _, adaptation, _, folder = trained
    tensors = load_file(str(folder / "adapter.safetensors"))
    assert set(tensors) == {f"added.{n}" for n in adaptation.added_parameters()}
    loaded = load_adapter(folder, load_pretrained_tiny())
    assert loaded.report() == adaptation.report()
    assert loaded.resolved == adaptation.resolved
    assert_same(outputs(loaded, builtin_batches[0]), outputs(adaptation, builtin_batches[0]))


def test_merged_model_equals_the_adapter_model(trained, builtin_batches, tmp_path):
    _, _, _, folder = trained
    loaded = load_adapter(folder, load_pretrained_tiny())
    expected = outputs(loaded, builtin_batches[0])
    merged_folder = save_merged(loaded, tmp_path / "merged")
    saved = load_file(str(merged_folder / "backbone" / "model.safetensors"))
    pretrained = load_pretrained_tiny().pretrained_parameters()
    assert set(saved) == set(pretrained)  # original names, no base_layer / lora tensors
    qkv = "backbone.encoder_layers.0.blocks.0.attn.qkv.weight"
    assert not torch.equal(saved[qkv], pretrained[qkv])  # the update was folded in
    assert_close(outputs(load_merged(merged_folder), builtin_batches[0]), expected, rel=1e-5)
    # The merged adaptation itself no longer applies the LoRA path twice.
    assert_close(outputs(loaded, builtin_batches[0]), expected, rel=1e-5)


def test_ia3_runs_forward_and_backward_with_an_honest_count(builtin_batches, reference):
    adaptation = apply_method("peft", load_pretrained_tiny(), 0.003, {"peft_type": "ia3"})
    modules = target_modules(adaptation.backbone, (SWIN_LINEARS,))
    # IA3 scales the outputs of qkv, proj, fc1 and the inputs of fc2 (feed-forward).
    expected = sum(m.in_features if name.endswith("fc2") else m.out_features
                   for name, m in ((n, m.base_layer) for n, m in modules.items()))
    assert adaptation.report().trainable == expected == 18432
    assert_close(outputs(adaptation, builtin_batches[0]), reference)
    adaptation.train()
    prediction = adaptation(builtin_batches[0])
    sum(v.float().square().mean() for v in prediction.surf_vars.values()).backward()
    added = adaptation.added_parameters()
    assert added and all(p.grad is not None and p.grad.any() for p in added.values())


def test_vera_round_trips_exactly_with_regenerated_projections(builtin_batches, tmp_path):
    adaptation = apply_method("peft", load_pretrained_tiny(), 0.003,
                              {"peft_type": "vera", "config": {"r": 32}})
    with torch.no_grad():
        for parameter in adaptation.added_parameters().values():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    loaded = load_adapter(save_adapter(adaptation, tmp_path / "vera"), load_pretrained_tiny())
    assert_same(outputs(loaded, builtin_batches[0]), outputs(adaptation, builtin_batches[0]))


def test_peft_errors_name_the_type():
    with pytest.raises(ValueError, match="unknown peft_type 'nope'.*ia3"):
        apply_method("peft", load_pretrained_tiny(), 0.003, {"peft_type": "nope"})
    with pytest.raises(ValueError, match="needs the option peft_type"):
        apply_method("peft", load_pretrained_tiny(), 0.003)
    with pytest.raises(ValueError, match="'prompt_tuning' is prompt learning"):
        apply_method("peft", load_pretrained_tiny(), 0.003, {"peft_type": "prompt_tuning"})
    with pytest.raises(ValueError, match="'poly' cannot run"):
        apply_method("peft", load_pretrained_tiny(), 0.003, {"peft_type": "poly"})
    with pytest.raises(ValueError, match="'c3a' cannot be applied"):
        apply_method("peft", load_pretrained_tiny(), 0.003, {"peft_type": "c3a"})
    with pytest.raises(ValueError, match="'boft'.*BOFTConfig rejects"):
        apply_method("peft", load_pretrained_tiny(), 0.003,
                     {"peft_type": "boft", "config": {"no_such_option": 1}})
    with pytest.raises(ValueError, match="targets come from the 'targets' option"):
        apply_method("peft", load_pretrained_tiny(), 0.003,
                     {"peft_type": "ia3", "config": {"target_modules": ["qkv"]}})
