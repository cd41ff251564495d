"""The forecasting task: loss weighting, roll-out, references, climatology, metric names."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import torch
from aurora import Aurora, Batch
from conftest import make_world, write_wb2_zarr

from weatherpeft.data.wb2 import collate_batches
from weatherpeft.metrics import rmse
from weatherpeft.tasks.forecasting import (
    Climatology,
    ForecastingTask,
    RolloutWindows,
    channel_name,
    metric_key,
    rollout,
)
from weatherpeft.train import TrainConfig, Trainer

# 8 days, 6-hourly from 2001-03-01: 3 days of training, 1 of validation, 4 of test.
N_TIMES = 32
PERIODS = {"train": ("2001-03-01T00", "2001-03-03T18"),
           "val": ("2001-03-04T00", "2001-03-04T18"),
           "test": ("2001-03-05T00", "2001-03-08T18")}
LEVELS = (300, 500, 850)
SURF = ("2t", "10u", "10v", "msl")
ATMOS = ("z", "t", "u", "v", "q")


class LastInput(torch.nn.Module):
    """Predicts that nothing changes: returns the newest input time (persistence)."""

    def forward(self, batch: Batch) -> Batch:
        return dataclasses.replace(
            batch,
            surf_vars={k: v[:, -1:] for k, v in batch.surf_vars.items()},
            atmos_vars={k: v[:, -1:] for k, v in batch.atmos_vars.items()})


class AddOne(torch.nn.Module):
    """Predicts the newest input plus one, to see predictions fed back."""

    def forward(self, batch: Batch) -> Batch:
        return dataclasses.replace(
            batch,
            surf_vars={k: v[:, -1:] + 1 for k, v in batch.surf_vars.items()},
            atmos_vars={k: v[:, -1:] + 1 for k, v in batch.atmos_vars.items()})


def tiny_aurora(task: ForecastingTask) -> Aurora:
    """An untrained Aurora of ~70k parameters for the task's variables."""
    variables = task.variables
    torch.manual_seed(0)
    return Aurora(surf_vars=variables.surf_vars, static_vars=variables.static_vars,
                  atmos_vars=variables.atmos_vars, encoder_depths=(1, 1),
                  encoder_num_heads=(2, 4), decoder_depths=(1, 1), decoder_num_heads=(4, 2),
                  embed_dim=16, num_heads=2, window_size=(1, 4, 8), latent_levels=2,
                  use_lora=False)


@pytest.fixture(scope="module")
def forecast_world():
    return make_world(n_times=N_TIMES, seed=3)


@pytest.fixture(scope="module")
def forecast_store(forecast_world, tmp_path_factory):
    return write_wb2_zarr(forecast_world, tmp_path_factory.mktemp("forecast") / "world.zarr",
                          packed=False)


@pytest.fixture(scope="module")
def task(forecast_store):
    return ForecastingTask(forecast_store, PERIODS)


def test_variables_and_splits_respect_periods(task):
    variables = task.variables
    assert variables.surf_vars == SURF and variables.atmos_vars == ATMOS
    assert variables.levels == LEVELS and variables.static_vars == ("lsm", "z")
    assert variables.new_surf_vars == () and variables.new_atmos_vars == ()
    splits = task.datasets()
    assert set(splits) == {"train", "val", "test"}
    assert task.datasets() is splits  # cached
    # Test windows: history 2 + 12 steps = 14 consecutive times inside the 16 test times.
    test = splits["test"]
    assert isinstance(test, RolloutWindows) and len(test) == 3 and test.steps == 12
    inputs, truth = test[0]
    assert inputs.surf_vars["2t"].shape == (1, 2, 32, 64)
    assert truth.atmos_vars["z"].shape == (1, 12, 3, 32, 64)
    assert inputs.metadata.time == (datetime(2001, 3, 5, 6),)
    for index in range(len(splits["train"])):
        times, target = splits["train"].sample_times(index)
        start, end = (pd.Timestamp(t) for t in PERIODS["train"])
        assert start <= times[0] and target <= end


def test_periods_must_name_every_split(forecast_store):
    with pytest.raises(ValueError, match="missing \\['test'\\]"):
        ForecastingTask(forecast_store, {k: PERIODS[k] for k in ("train", "val")})


def test_loss_is_zero_for_a_perfect_forecast_and_weights_variables_equally(task):
    _, target = collate_batches([task.datasets()["train"][i] for i in range(2)])
    assert task.loss(target, target).item() == 0.0
    # Off by exactly one scale everywhere in one surface variable: that variable's term
    # is 1, the other 8 are 0 → loss 1/9 (each of the 9 variables counts once).
    scale = task.stats.scales["2t"]
    shifted = dataclasses.replace(target, surf_vars={**target.surf_vars,
                                                     "2t": target.surf_vars["2t"] + scale})
    assert task.loss(shifted, target).item() == pytest.approx(1 / 9, rel=1e-4)
    # The same in one level of one atmospheric variable: 1/3 of that variable's term.
    z = target.atmos_vars["z"].clone()
    z[:, :, 1] += task.stats.scales["z_500"]
    shifted = dataclasses.replace(target, atmos_vars={**target.atmos_vars, "z": z})
    assert task.loss(shifted, target).item() == pytest.approx(1 / 27, rel=1e-4)
    noisy = dataclasses.replace(target, surf_vars={k: v + torch.randn_like(v)
                                                   for k, v in target.surf_vars.items()})
    assert task.loss(noisy, target).item() > 0


def test_loss_names_a_missing_variable(task):
    inputs, target = task.datasets()["train"][0]
    partial = dataclasses.replace(target, surf_vars={k: v for k, v in target.surf_vars.items()
                                                     if k != "msl"})
    with pytest.raises(KeyError, match="msl"):
        task.loss(partial, target)


def test_rollout_feeds_predictions_back_and_advances_time(task):
    inputs, truth = task.datasets()["test"][0]
    steps = list(rollout(AddOne(), inputs, 4, timedelta(hours=6)))
    assert len(steps) == 4
    last = inputs.surf_vars["2t"][:, -1:]
    for k, prediction in enumerate(steps, start=1):
        torch.testing.assert_close(prediction.surf_vars["2t"], last + k)
    # The fourth prediction was made from an input advanced three times.
    persistence = list(rollout(LastInput(), inputs, 4, timedelta(hours=6)))
    assert persistence[-1].metadata.time == (inputs.metadata.time[0] + timedelta(hours=18),)
    assert persistence[-1].metadata.rollout_step == 3
    for prediction in persistence:
        torch.testing.assert_close(prediction.atmos_vars["t"], inputs.atmos_vars["t"][:, -1:])


def test_last_input_model_scores_exactly_as_persistence(forecast_store):
    task = ForecastingTask(forecast_store, PERIODS, lead_steps=(1, 4))
    results = task.evaluate(LastInput(), task.dataloader("test", batch_size=4))
    model = {k: v for k, v in results.items() if k.startswith("model/")}
    assert len(model) == 2 * (4 + 5 * 3)
    for key, value in model.items():
        assert value == results[key.replace("model/", "persistence/", 1)]
        assert np.isfinite(value) and value > 0


def test_streamed_rmse_matches_the_definition(task):
    """Persistence RMSE at 24 h = sqrt(mean over initialisations of the spatial MSE)."""
    results = task.evaluate(LastInput(), task.dataloader("test", batch_size=2))
    test = task.datasets()["test"]
    pairs = [test[i] for i in range(len(test))]
    forecast = torch.cat([p[0].atmos_vars["t"][:, -1, 2] for p in pairs])  # t850, last input
    truth = torch.cat([p[1].atmos_vars["t"][:, 3, 2] for p in pairs])  # +4 steps
    expected = rmse(forecast.double(), truth.double(), pairs[0][0].metadata.lat).item()
    assert results["persistence/rmse/t850/24h"] == pytest.approx(expected, rel=1e-5)


def test_metric_names_cover_every_channel_lead_and_reference(task):
    results = task.evaluate(LastInput(), task.dataloader("test", batch_size=3))
    channels = list(SURF) + [f"{v}{level}" for v in ATMOS for level in LEVELS]
    sources = ("model", "persistence", "climatology")
    expected = {f"{source}/rmse/{channel}/{hours}h" for source in sources
                for channel in channels for hours in (6, 24, 72)}
    assert set(results) == expected
    assert {"model/rmse/z500/72h", "model/rmse/t850/6h", "climatology/rmse/2t/24h"} <= set(results)
    assert channel_name("z", 500) == "z500" and channel_name("2t") == "2t"
    assert metric_key("model", "rmse", "z500", timedelta(hours=72)) == "model/rmse/z500/72h"


def test_evaluate_on_pairs_scores_only_the_first_lead(task):
    results = task.evaluate(LastInput(), task.dataloader("val", batch_size=2))
    assert results and all(key.endswith("/6h") for key in results)


def test_climatology_uses_only_the_training_period(task, forecast_world):
    climatology = task.climatology()
    assert task.climatology() is climatology  # cached
    train = forecast_world.sel(time=slice(*PERIODS["train"]))
    assert climatology.period == tuple(str(pd.Timestamp(t)) for t in PERIODS["train"])
    for hour in (0, 6, 12, 18):
        valid = [datetime(2001, 3, 9, hour)]  # a test-era date: March, that hour of day
        expected = train["temperature"].sel(time=train.time.dt.hour == hour).mean("time")
        expected = expected.transpose("level", "latitude", "longitude").values[:, ::-1]
        np.testing.assert_allclose(climatology.forecast("t", valid)[0].numpy(), expected, rtol=1e-6)
        everything = forecast_world["temperature"].sel(
            time=forecast_world.time.dt.hour == hour).mean("time")
        assert not np.allclose(everything.transpose("level", "latitude", "longitude").values[:, ::-1],
                               expected)
    # A month the training period lacks falls back to the mean of that hour of day.
    np.testing.assert_allclose(climatology.forecast("2t", [datetime(2001, 7, 1, 6)]).numpy(),
                               climatology.forecast("2t", [datetime(2001, 3, 2, 6)]).numpy())
    assert int(climatology.counts[climatology.rows([datetime(2001, 3, 1, 6)])[0]]) == 3


def test_climatology_cache_round_trips(forecast_store, task, tmp_path):
    path = tmp_path / "clim.pt"
    first = ForecastingTask(forecast_store, PERIODS, stats=task.stats, climatology_path=path)
    computed = first.climatology()
    assert path.exists()
    loaded = Climatology.load(path)
    for name, field in computed.fields.items():
        torch.testing.assert_close(loaded.fields[name], field, rtol=0, atol=0)
    second = ForecastingTask(forecast_store, PERIODS, stats=task.stats, climatology_path=path)
    assert second.climatology().matches(second._selection, second.source)
    other = dict(PERIODS, train=("2001-03-01T00", "2001-03-02T18"))
    third = ForecastingTask(forecast_store, other, stats=task.stats, climatology_path=path)
    assert third.climatology().period[1] == str(pd.Timestamp("2001-03-02T18"))  # recomputed


def test_a_small_aurora_trains_and_evaluates(forecast_store, task):
    """The task's loss and roll-out work with a real (tiny, untrained) Aurora."""
    small = ForecastingTask(forecast_store, PERIODS, stats=task.stats, lead_steps=(1,))
    model = tiny_aurora(small)
    with small.stats.installed():
        inputs, target = collate_batches([small.datasets()["train"][i] for i in range(2)])
        loss = small.loss(model(inputs), target)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        first_batch = [next(iter(small.dataloader("test", batch_size=2)))]
        results = small.evaluate(model, first_batch)
    assert len(results) == 3 * 19 and all(np.isfinite(v) for v in results.values())
    assert model.training  # evaluate restores the mode


def test_trainer_pretrains_and_evaluates_a_small_aurora(forecast_store, task, tmp_path):
    periods = dict(PERIODS, test=("2001-03-05T00", "2001-03-05T18"))  # 2 initialisations
    small = ForecastingTask(forecast_store, periods, stats=task.stats, lead_steps=(1,))
    model = tiny_aurora(small)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, val_every=2, val_batches=1, log_every=1,
                      out_dir=str(tmp_path), progress=False, device="cpu")
    with small.stats.installed():
        trainer = Trainer(model, small, cfg)
        summary = trainer.fit()
        results = trainer.evaluate(split="test", batch_size=3)
    assert summary["step"] == 2 and np.isfinite(summary["val_loss"])
    assert np.isfinite(results["model/rmse/z500/6h"])
    reference = small.evaluate(LastInput(), small.dataloader("test", 1))
    assert results["persistence/rmse/z500/6h"] == pytest.approx(reference["persistence/rmse/z500/6h"])
