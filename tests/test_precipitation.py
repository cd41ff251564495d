"""The regional precipitation task: region, leads, the tp task head, the loss, SEEPS/ACC/RMSE.

Most tests use the roll-out design (the first form, kept as an option); the direct design
(the default: a head per lead, one pass, L1) has its own tests at the end.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import torch
from aurora import Batch
from conftest import load_pretrained_tiny, make_world

from weatherpeft.data.builtin import store_path
from weatherpeft.data.wb2 import collate_batches, open_store
from weatherpeft.methods.registry import apply_method
from weatherpeft.metrics import acc, rmse, seeps
from weatherpeft.tasks.precipitation import (
    DEFAULT_REGION,
    PrecipitationTask,
    lead_head,
    signed_log,
)
from weatherpeft.train import TrainConfig, Trainer

PERIODS = {"train": ("2003-03-01", "2003-03-06T18"), "val": ("2003-03-07", "2003-03-08T18"),
           "test": ("2003-03-09", "2003-03-12T18")}
LEADS = ("12h", "24h", "36h")
#: The direct design's windows span 48 h (t − 12 h … t + 36 h): every split needs 2 days.
DIRECT_PERIODS = {"train": ("2003-03-01", "2003-03-06T18"), "val": ("2003-03-07", "2003-03-09T18"),
                  "test": ("2003-03-10", "2003-03-13T18")}


@pytest.fixture(scope="module")
def pretrained_stats():
    return load_pretrained_tiny().stats


@pytest.fixture(scope="module")
def task(pretrained_stats):
    return PrecipitationTask(store_path("regional"), PERIODS, pretrained_stats, design="rollout")


@pytest.fixture(scope="module")
def direct(pretrained_stats):
    """The direct design with absolute heads (the authors' form; the oracles predict totals)."""
    return PrecipitationTask(store_path("regional"), DIRECT_PERIODS, pretrained_stats,
                             head_form="absolute")


@pytest.fixture(scope="module")
def region_tp():
    """The store's tp over the default region, (time, lat decreasing, lon), in metres."""
    ds = open_store(store_path("regional"))
    south, north, west, east = DEFAULT_REGION
    tp = ds["total_precipitation_6hr"].sel(latitude=slice(south, north), longitude=slice(west, east))
    return tp.transpose("time", "latitude", "longitude").isel(latitude=slice(None, None, -1)).load()


class Oracle(torch.nn.Module):
    """Predicts the true state 6 h after the input's last time (a perfect 6-h model)."""

    def __init__(self, windows):
        super().__init__()
        self.states: dict[datetime, Batch] = {}
        for index in range(len(windows)):
            inputs, truth = windows[index]
            start = inputs.metadata.time[0]
            for step in range(truth.surf_vars["tp"].shape[1]):
                self.states[start + (step + 1) * timedelta(hours=6)] = dataclasses.replace(
                    truth, surf_vars={k: v[:, step:step + 1] for k, v in truth.surf_vars.items()},
                    atmos_vars={k: v[:, step:step + 1] for k, v in truth.atmos_vars.items()})

    def forward(self, batch: Batch) -> Batch:
        wanted = [t + timedelta(hours=6) for t in batch.metadata.time]
        return collate_batches([(self.states[t], self.states[t]) for t in wanted])[0]


# -- construction --------------------------------------------------------------------------------


def test_default_region_is_a_16_by_20_crop_of_the_regional_store(task, region_tp):
    lat, lon = task.grid
    assert (len(lat), len(lon)) == (16, 20)
    assert np.all(np.diff(lat) < 0) and lat.min() >= 5 and lat.max() <= 50
    np.testing.assert_allclose(lat, region_tp.latitude.values)
    assert lon.min() == pytest.approx(70.3125) and lon.max() == pytest.approx(123.75)
    variables = task.variables
    assert variables.surf_vars == ("2t", "10u", "10v", "msl", "tp")
    assert variables.new_surf_vars == ("tp",) and variables.new_atmos_vars == ()
    assert task.lead_hours == (12, 24, 36) and task.lead_steps == (2, 4, 6)


def test_samples_hold_the_current_state_and_the_truth_at_each_step(task, region_tp):
    splits = task.datasets()
    inputs, truth = splits["train"][0]
    assert inputs.surf_vars["tp"].shape == (1, 2, 16, 20)
    assert truth.surf_vars["tp"].shape == (1, 2, 16, 20)  # train_steps = 2: +6 h and +12 h
    assert inputs.atmos_vars["q"].shape == (1, 2, 2, 16, 20) and inputs.static_vars["lsm"].shape == (16, 20)
    start = datetime(2003, 3, 1, 6)
    assert inputs.metadata.time == (start,)
    expected = region_tp.sel(time=[start, start + timedelta(hours=6), start + timedelta(hours=12)]).values
    np.testing.assert_allclose(inputs.surf_vars["tp"][0, -1].numpy(), expected[0])
    np.testing.assert_allclose(truth.surf_vars["tp"][0].numpy(), expected[1:])
    test_inputs, test_truth = splits["test"][0]
    assert test_truth.surf_vars["tp"].shape[1] == 6  # up to 36 h
    assert len(splits["test"]) == 16 - 2 - 6 + 1


def test_statistics_keep_the_backbones_and_measure_tp_on_the_training_period(task, pretrained_stats,
                                                                              region_tp):
    assert task.stats.locations["2t"] == pretrained_stats.locations["2t"]
    assert "tp" not in pretrained_stats.locations
    train = region_tp.sel(time=slice(*PERIODS["train"])).values.astype(np.float64)
    weights = np.cos(np.radians(region_tp.latitude.values))[:, None]
    weights = weights / weights.mean()
    mean = (train * weights).mean()
    assert task.stats.locations["tp"] == pytest.approx(mean, rel=1e-3)
    assert task.stats.scales["tp"] > 0


def test_climatology_comes_from_the_training_period(task, region_tp):
    climatology = task.climatology()
    train = region_tp.sel(time=slice(*PERIODS["train"]))
    at_six = train.sel(time=train.time.dt.hour == 6).mean("time").values * 1000
    np.testing.assert_allclose(climatology.by_hour[6].numpy(), at_six, rtol=1e-5)
    assert sorted(climatology.by_hour) == [0, 6, 12, 18]
    forecast = climatology.forecast([datetime(2003, 12, 24, 6), datetime(2003, 12, 24, 3)])
    assert torch.equal(forecast[0], climatology.by_hour[6])
    assert torch.equal(forecast[1], climatology.mean)  # an hour the period lacks
    dry = (train.values < 1e-4).mean(axis=0)
    np.testing.assert_allclose(climatology.dry_fraction.numpy(), dry, rtol=1e-6)


def test_clear_errors_for_bad_regions_and_a_store_without_precipitation(pretrained_stats):
    regional = store_path("regional")
    with pytest.raises(ValueError, match="lies outside store .*regional"):
        PrecipitationTask(regional, PERIODS, pretrained_stats, region=(-40, -10, 0, 50))
    with pytest.raises(ValueError, match="patch size 4"):
        PrecipitationTask(regional, PERIODS, pretrained_stats, region=(5, 55, 70, 125))  # 17 rows
    with pytest.raises(ValueError, match="not a positive multiple"):
        PrecipitationTask(regional, PERIODS, pretrained_stats, lead_hours=(12, 15))
    dry_world = make_world(n_times=12).drop_vars("total_precipitation_6hr")
    with pytest.raises(ValueError, match="needs 'total_precipitation_6hr'"):
        PrecipitationTask(dry_world, PERIODS, pretrained_stats)
    with pytest.raises(ValueError, match="unknown variables \\['rain'\\]"):
        PrecipitationTask(regional, PERIODS, pretrained_stats, design="rollout",
                          variable_weights={"rain": 2})
    with pytest.raises(ValueError, match="unknown precipitation design 'nowcast'"):
        PrecipitationTask(regional, PERIODS, pretrained_stats, design="nowcast")
    with pytest.raises(ValueError, match="belong to the roll-out design"):
        PrecipitationTask(regional, PERIODS, pretrained_stats, train_steps=3)
    with pytest.raises(ValueError, match="tp_loss must be one of"):
        PrecipitationTask(regional, PERIODS, pretrained_stats, tp_loss="huber")


# -- loss --------------------------------------------------------------------------------------


def test_loss_is_zero_when_perfect_and_weights_precipitation_up(task):
    _, truth = collate_batches([task.datasets()["train"][i] for i in range(2)])
    target = dataclasses.replace(truth, surf_vars={k: v[:, :1] for k, v in truth.surf_vars.items()},
                                 atmos_vars={k: v[:, :1] for k, v in truth.atmos_vars.items()})
    assert task.loss(target, target).item() == 0.0
    # One σ off in 2t only: weights 4 surface + 5 atmospheric variables at 1, tp at 5 → 1/14.
    off = dataclasses.replace(target, surf_vars={**target.surf_vars,
                                                 "2t": target.surf_vars["2t"] + task.stats.scales["2t"]})
    assert task.loss(off, target).item() == pytest.approx(1 / 14, rel=1e-4)
    # Precipitation alone with the linear loss: one σ off everywhere → exactly 1.
    linear = PrecipitationTask(store_path("regional"), PERIODS, task.stats, tp_loss="mse", design="rollout",
                               variable_weights=dict.fromkeys(
                                   task.variables.surf_vars[:4] + task.variables.atmos_vars, 0.0))
    wet = dataclasses.replace(target, surf_vars={**target.surf_vars,
                                                 "tp": target.surf_vars["tp"] + task.stats.scales["tp"]})
    assert linear.loss(wet, target).item() == pytest.approx(1.0, rel=1e-4)


def test_the_log_loss_counts_a_dry_error_more_than_the_same_error_in_heavy_rain(task):
    base = torch.zeros(1, 1, 16, 20)
    surf = {name: torch.zeros(1, 1, 16, 20) for name in task.variables.surf_vars}
    metadata = task.datasets()["train"][0][1].metadata
    def batch(tp):
        return Batch(surf_vars={**surf, "tp": tp}, static_vars={}, atmos_vars={}, metadata=metadata)
    only_tp = PrecipitationTask(store_path("regional"), PERIODS, task.stats, atmos_vars=(), design="rollout",
                                variable_weights=dict.fromkeys(("2t", "10u", "10v", "msl"), 0.0))
    millimetre = 1e-3
    dry_error = only_tp.loss(batch(base + millimetre), batch(base)).item()
    heavy_error = only_tp.loss(batch(base + 21 * millimetre), batch(base + 20 * millimetre)).item()
    assert dry_error > 50 * heavy_error > 0
    # A negative prediction is penalised symmetrically, not cut off.
    assert only_tp.loss(batch(base - millimetre), batch(base)).item() == pytest.approx(dry_error)
    assert signed_log(torch.tensor([-1.0, 0.0, 1.0]), 1.0).tolist() == pytest.approx(
        [-math.log(2), 0.0, math.log(2)])


def test_training_loss_rolls_out_and_is_zero_for_a_perfect_model(task):
    windows = task.datasets()["train"]
    batch = collate_batches([windows[i] for i in range(3)])
    assert task.training_loss(Oracle(windows), batch).item() == 0.0


# -- evaluation --------------------------------------------------------------------------------


def test_a_perfect_model_scores_perfectly_and_references_are_scored_right(task):
    windows = task.datasets()["test"]
    scores = task.evaluate(Oracle(windows), task.dataloader("test", batch_size=4))
    for lead in LEADS:
        assert scores[f"model/seeps/tp/{lead}"] == 0.0
        assert scores[f"model/rmse/tp/{lead}"] == 0.0
        assert scores[f"model/acc/tp/{lead}"] == pytest.approx(1.0)
    inputs, truth = collate_batches([windows[i] for i in range(len(windows))])
    lat = inputs.metadata.lat
    persistence = inputs.surf_vars["tp"][:, -1] * 1000
    observed = truth.surf_vars["tp"][:, 1] * 1000  # 12 h = 2 steps
    assert scores["persistence/rmse/tp/12h"] == pytest.approx(float(rmse(persistence, observed, lat)), rel=1e-5)
    climatology = task.climatology()
    valid = [t + timedelta(hours=12) for t in inputs.metadata.time]
    normal = climatology.forecast(valid)
    assert scores["persistence/acc/tp/12h"] == pytest.approx(
        float(acc(persistence, observed, normal, lat)), rel=1e-5)
    expected = seeps(persistence / 1000, observed / 1000, climatology.dry_fraction,
                     climatology.wet_threshold, lat, dry_threshold=0.1)
    assert scores["persistence/seeps/tp/12h"] == pytest.approx(float(expected), rel=1e-5)
    assert scores["climatology/rmse/tp/12h"] == pytest.approx(float(rmse(normal, observed, lat)), rel=1e-5)
    assert "climatology/acc/tp/12h" not in scores


def test_aurora_tiny_runs_on_the_region_and_frozen_trains_only_the_tp_head(task, tmp_path):
    backbone = load_pretrained_tiny(extra_surf_vars=task.variables.new_surf_vars, stats=task.stats)
    head = backbone.task_head_parameters()
    assert head and all(".tp" in name for name in head)
    adaptation = apply_method("frozen", backbone, 1.0)
    trainable = {name for name, p in adaptation.named_parameters() if p.requires_grad}
    assert trainable and all(".tp" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in adaptation.named_parameters()}
    trainer = Trainer(adaptation, task, TrainConfig(steps=2, batch_size=2, lr=1e-3, log_every=0,
                                                    progress=False, out_dir=str(tmp_path)),
                      hooks=adaptation.hooks, param_groups=adaptation.param_groups(0.05))
    trainer.fit()
    moved = {name for name, p in adaptation.named_parameters() if not torch.equal(p, before[name])}
    assert moved and moved <= trainable
    scores = trainer.evaluate(split="test", batch_size=8)
    expected = {f"{source}/{metric}/tp/{lead}" for lead in LEADS
                for source, metrics in (("model", ("seeps", "acc", "rmse")),
                                        ("persistence", ("seeps", "acc", "rmse")),
                                        ("climatology", ("seeps", "rmse")))
                for metric in metrics}
    assert set(scores) == expected
    assert all(math.isfinite(v) for v in scores.values())
    assert list(scores)[:3] == ["model/seeps/tp/12h", "model/acc/tp/12h", "model/rmse/tp/12h"]
    # The val pairs (12 h of truth) are scored at the leads they reach.
    assert set(task.evaluate(adaptation, task.dataloader("val", 4))) == {
        k for k in expected if k.endswith("/12h")}


def test_default_periods_and_store_are_the_built_in_year():
    task = PrecipitationTask(region=None, stats=None, in_memory=False, grid=None)
    assert task.periods["test"] == ("2003-12-01T00:00:00", "2003-12-31T18:00:00")
    assert pd.Timestamp(task.periods["train"][1]).month == 9
    assert task.grid[0].shape == (20,)  # the whole store; aurora-tiny needs the default crop
    with pytest.raises(ValueError, match=r"20 × 20 cells .* Nearest sizes that fit: 16 × 20"):
        PrecipitationTask(region=None, stats=None, in_memory=False)


# -- the direct design (the default) -------------------------------------------------------------


class DirectOracle(torch.nn.Module):
    """Predicts every head's true total: the direct design's perfect model."""

    def __init__(self, windows, heads):
        super().__init__()
        self.heads = heads
        self.totals: dict[datetime, torch.Tensor] = {}
        for index in range(len(windows)):
            inputs, truth = windows[index]
            for step in heads:
                self.totals[inputs.metadata.time[0] + step * timedelta(hours=12)] = \
                    truth.surf_vars["tp"][:, step - 1:step]

    def forward(self, batch: Batch) -> Batch:
        surf = {head: torch.cat([self.totals[t + step * timedelta(hours=12)]
                                 for t in batch.metadata.time])
                for step, head in self.heads.items()}
        return dataclasses.replace(batch, surf_vars=surf, atmos_vars={})


def test_direct_design_is_the_default_with_a_head_per_lead_and_twelve_hour_inputs(direct, region_tp):
    assert direct.design == "direct" and direct.tp_loss == "l1"
    assert direct.timestep == timedelta(hours=12) and direct.lead_steps == (1, 2, 3)
    heads = ("tp_12h", "tp_24h", "tp_36h")
    assert tuple(direct.heads.values()) == heads and lead_head(24) == "tp_24h"
    assert direct.variables.new_surf_vars == heads
    assert direct.variables.surf_vars == ("2t", "10u", "10v", "msl", *heads)
    for head in heads:  # normalised as tp is
        assert direct.stats.scales[head] == direct.stats.scales["tp"]
        assert direct.stats.locations[head] == direct.stats.locations["tp"]
    inputs, truth = direct.datasets()["train"][0]
    start = inputs.metadata.time[0]
    assert start == datetime(2003, 3, 1, 12)  # inputs at t − 12 h and t
    assert "tp" not in inputs.surf_vars
    expected = region_tp.sel(time=[start - timedelta(hours=12), start]).values
    for head in heads:  # each head reads the observed tp history
        assert inputs.surf_vars[head].shape == (1, 2, 16, 20)
        np.testing.assert_allclose(inputs.surf_vars[head][0].numpy(), expected)
    later = [start + timedelta(hours=h) for h in (12, 24, 36)]
    assert truth.surf_vars["tp"].shape == (1, 3, 16, 20)
    np.testing.assert_allclose(truth.surf_vars["tp"][0].numpy(), region_tp.sel(time=later).values)
    assert len(direct.datasets()["test"]) == 16 - 9 + 1  # 6-hourly inits, windows of 9 times


def test_direct_loss_is_the_mean_l1_of_the_heads_on_normalised_tp(direct):
    windows = direct.datasets()["train"]
    inputs, truth = collate_batches([windows[i] for i in range(2)])
    oracle = DirectOracle(windows, direct.heads)
    assert direct.training_loss(oracle, (inputs, truth)).item() == 0.0
    perfect = oracle(inputs)
    sigma = direct.stats.scales["tp"]
    # One head off by 3 σ everywhere, the others perfect: the mean over 3 heads is 1.
    off = dataclasses.replace(perfect, surf_vars={**perfect.surf_vars,
                                                  "tp_24h": perfect.surf_vars["tp_24h"] - 3 * sigma})
    assert direct.loss(off, truth).item() == pytest.approx(1.0, rel=1e-4)
    # L1, not squared: half the error, half the loss.
    half = dataclasses.replace(perfect, surf_vars={**perfect.surf_vars,
                                                   "tp_24h": perfect.surf_vars["tp_24h"] + 1.5 * sigma})
    assert direct.loss(half, truth).item() == pytest.approx(0.5, rel=1e-4)


def test_direct_design_scores_each_head_against_its_lead(direct):
    windows = direct.datasets()["test"]
    scores = direct.evaluate(DirectOracle(windows, direct.heads), direct.dataloader("test", 4))
    for lead in LEADS:
        assert scores[f"model/seeps/tp/{lead}"] == 0.0 and scores[f"model/rmse/tp/{lead}"] == 0.0
    inputs, truth = collate_batches([windows[i] for i in range(len(windows))])
    persistence = inputs.surf_vars["tp_12h"][:, -1] * 1000
    observed = truth.surf_vars["tp"][:, 2] * 1000  # 36 h = 3 steps of 12 h
    assert scores["persistence/rmse/tp/36h"] == pytest.approx(
        float(rmse(persistence, observed, inputs.metadata.lat)), rel=1e-5)
    assert "climatology/seeps/tp/24h" in scores


def test_aurora_tiny_trains_the_direct_heads_in_one_pass(direct, tmp_path):
    backbone = load_pretrained_tiny(extra_surf_vars=direct.variables.new_surf_vars, stats=direct.stats)
    adaptation = apply_method("frozen", backbone, 1.0)
    trainable = {name for name, p in adaptation.named_parameters() if p.requires_grad}
    assert trainable and all(".tp_" in name for name in trainable)
    trainer = Trainer(adaptation, direct, TrainConfig(steps=2, batch_size=2, lr=1e-3, log_every=0,
                                                      progress=False, out_dir=str(tmp_path)),
                      hooks=adaptation.hooks, param_groups=adaptation.param_groups(0.05))
    trainer.fit()
    scores = trainer.evaluate(split="test", batch_size=8)
    assert {f"model/seeps/tp/{lead}" for lead in LEADS} <= set(scores)
    assert all(math.isfinite(v) for v in scores.values())
    prediction, truth = direct.sample_prediction(adaptation, "test", 0)
    assert prediction.surf_vars["tp"].shape == truth.surf_vars["tp"].shape == (1, 1, 16, 20)


def test_residual_heads_add_their_change_to_persistence(pretrained_stats):
    residual = PrecipitationTask(store_path("regional"), DIRECT_PERIODS, pretrained_stats)
    assert (residual.design, residual.head_form, residual.tp_loss) == ("direct", "residual", "l1")
    location = residual.stats.locations["tp"]

    class NoChange(torch.nn.Module):
        """Every head outputs tp's location: a change of zero."""

        def forward(self, batch: Batch) -> Batch:
            surf = {head: torch.full_like(batch.surf_vars[head][:, -1:], location)
                    for head in residual.heads.values()}
            return dataclasses.replace(batch, surf_vars=surf, atmos_vars={})

    scores = residual.evaluate(NoChange(), residual.dataloader("test", 4))
    for lead in LEADS:
        assert scores[f"model/seeps/tp/{lead}"] == pytest.approx(scores[f"persistence/seeps/tp/{lead}"])
        assert scores[f"model/rmse/tp/{lead}"] == pytest.approx(scores[f"persistence/rmse/tp/{lead}"])
    with pytest.raises(ValueError, match="head_form must be one of"):
        PrecipitationTask(store_path("regional"), DIRECT_PERIODS, pretrained_stats, head_form="delta")
