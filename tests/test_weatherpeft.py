"""WeatherPEFT = TADP + SFAS: sizing to a budget, what moves in training, honest reports."""

from __future__ import annotations

import pytest
import torch
from conftest import load_pretrained_tiny

from weatherpeft.methods.base import BudgetError, budget_entries
from weatherpeft.methods.registry import apply_method
from weatherpeft.methods.tadp import TADP
from weatherpeft.train import TrainConfig, Trainer


@pytest.mark.parametrize("method", ["weatherpeft", "tadp", "sfas"])
@pytest.mark.parametrize("budget", [0.003, 0.04])
def test_methods_land_within_ten_percent_of_the_budget(method, budget):
    backbone = load_pretrained_tiny()
    adaptation = apply_method(method, backbone, budget)
    report = adaptation.report()
    assert report.trainable == pytest.approx(budget_entries(backbone, budget), rel=0.10)
    assert report.head == 0


def test_weatherpeft_split_is_recorded_and_adds_up():
    backbone = load_pretrained_tiny()
    adaptation = apply_method("weatherpeft", backbone, 0.04)
    resolved = adaptation.resolved
    tadp = adaptation.parts["tadp"]
    assert isinstance(tadp, TADP)
    assert resolved["tadp_parameters"] == sum(p.numel() for p in tadp.parameters())
    assert resolved["tadp_parameters"] + resolved["sfas_entries"] == budget_entries(backbone, 0.04)
    assert resolved["tadp_parameters"] <= 0.5 * budget_entries(backbone, 0.04)


def test_an_infeasible_budget_names_the_nearest_feasible_one():
    with pytest.raises(BudgetError, match="nearest feasible budget"):
        apply_method("weatherpeft", load_pretrained_tiny(), 0.001)
    with pytest.raises(BudgetError, match="nearest feasible budget"):
        apply_method("tadp", load_pretrained_tiny(), 0.0005, {"sharing": "block"})


def test_the_variable_set_option_shapes_the_prompts():
    backbone = load_pretrained_tiny()
    everything = apply_method("tadp", backbone, 0.003)
    fewer = apply_method("tadp", load_pretrained_tiny(), 0.003,
                         {"variables": ("2t", "msl", "z", "t")})
    assert everything.parts["tadp"].variables == backbone.embedding_variables
    assert fewer.parts["tadp"].variables == ("2t", "msl", "z", "t")


def test_training_moves_prompts_and_selected_entries_only(march_task, tmp_path):
    backbone = load_pretrained_tiny()
    before = {n: p.detach().clone() for n, p in backbone.pretrained_parameters().items()}
    adaptation = apply_method("weatherpeft", backbone, 0.04)
    tadp_before = {n: p.detach().clone() for n, p in adaptation.parts.named_parameters()}
    config = TrainConfig(steps=3, batch_size=2, lr=1e-3, log_every=0, progress=False,
                         out_dir=str(tmp_path / "run"))
    Trainer(adaptation, march_task, config, hooks=adaptation.hooks,
            param_groups=adaptation.param_groups(config.weight_decay)).fit()
    changed = sum(int((p.detach() != before[n]).sum())
                  for n, p in backbone.pretrained_parameters().items())
    report = adaptation.report()
    tadp_count = adaptation.resolved["tadp_parameters"]
    assert changed > 0
    assert report.stored == tadp_count + changed
    assert report.trainable == budget_entries(backbone, 0.04)
    moved = [n for n, p in adaptation.parts.named_parameters() if not torch.equal(p, tadp_before[n])]
    assert moved, "TADP parameters did not train"
