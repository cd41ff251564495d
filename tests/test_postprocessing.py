"""Ensemble post-processing task: samples, σ head, Gaussian-CRPS loss, metrics, errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from aurora import Batch
from conftest import load_pretrained_tiny

from weatherpeft.data.builtin import store_path
from weatherpeft.metrics import latitude_weights
from weatherpeft.tasks.postprocessing import PostprocessingTask, default_periods, spread_name

#: Five, three and three inits of the built-in ensemble (every 54 h from 1 Jan 2003).
PERIODS = {"train": ("2003-01-01", "2003-01-12T23:59"), "val": ("2003-01-13", "2003-01-20T18:00"),
           "test": ("2003-01-21", "2003-01-28T18:00")}
SURFACE = {"2t": "2m_temperature", "10u": "10m_u_component_of_wind", "10v": "10m_v_component_of_wind"}
ATMOS = {"z": "geopotential", "t": "temperature"}
LEAD = np.timedelta64(48, "h")


@pytest.fixture(scope="module")
def pretrained_stats():
    return load_pretrained_tiny().stats


@pytest.fixture(scope="module")
def task(pretrained_stats):
    return PostprocessingTask(periods=PERIODS, stats=pretrained_stats)


@pytest.fixture(scope="module")
def raw():
    """The built-in stores as xarray, latitude flipped to decreasing (Aurora's order)."""
    ensemble = xr.open_zarr(store_path("ensemble")).isel(prediction_timedelta=0)
    truth = xr.open_zarr(store_path("downstream"))
    return ensemble.isel(latitude=slice(None, None, -1)), truth.isel(latitude=slice(None, None, -1))


def _field(array: xr.DataArray, *leading: str) -> np.ndarray:
    return array.transpose(*leading, "latitude", "longitude").values


class Echo(torch.nn.Module):
    """A 'model' that predicts μ = the ensemble mean and the σ head raw output = the spread."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))  # gives the task a device to read

    def forward(self, batch: Batch) -> Batch:
        return dataclasses.replace(batch, surf_vars={k: v[:, -1:] for k, v in batch.surf_vars.items()},
                                   atmos_vars={k: v[:, -1:] for k, v in batch.atmos_vars.items()})


# -- samples --------------------------------------------------------------------------------


def test_samples_hold_ensemble_mean_spread_truth_and_static(task, raw):
    ensemble, truth = raw
    dataset = task.datasets()["train"]
    assert len(dataset) == 5
    for index in (0, 4):
        inputs, target = dataset[index]
        init, valid = dataset.sample_times(index)
        assert pd.Timestamp(valid) - pd.Timestamp(init) == pd.Timedelta(hours=48)
        assert inputs.metadata.time == (valid,) and target.metadata.time == (valid,)
        members = ensemble.sel(time=np.datetime64(init))
        at_valid = truth.sel(time=np.datetime64(valid))
        for name, canonical in SURFACE.items():
            values = _field(members[canonical], "number").astype(np.float64)
            assert inputs.surf_vars[name].shape == (1, 2, 32, 64)
            for step in range(2):  # the mean fills both history steps
                np.testing.assert_allclose(inputs.surf_vars[name][0, step], values.mean(0), rtol=1e-5, atol=1e-4)
                np.testing.assert_allclose(inputs.surf_vars[spread_name(name)][0, step],
                                           values.std(0, ddof=1), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(target.surf_vars[name][0, 0], _field(at_valid[canonical]), rtol=1e-6)
        for name, canonical in ATMOS.items():
            values = _field(members[canonical], "number", "level").astype(np.float64)
            assert inputs.atmos_vars[name].shape == (1, 2, 2, 32, 64)
            np.testing.assert_allclose(inputs.atmos_vars[name][0, 1], values.mean(0), rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(inputs.atmos_vars[spread_name(name)][0, 0], values.std(0, ddof=1),
                                       rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(target.atmos_vars[name][0, 0],
                                       _field(at_valid[canonical], "level"), rtol=1e-6)
        np.testing.assert_allclose(inputs.static_vars["lsm"], _field(truth["land_sea_mask"]))
        np.testing.assert_allclose(inputs.static_vars["z"], _field(truth["geopotential_at_surface"]))
        assert inputs.metadata.atmos_levels == (500, 850)
        assert torch.all(inputs.metadata.lat[:-1] > inputs.metadata.lat[1:])


def test_splits_by_init_and_valid_time(task, raw):
    for split, (start, end) in PERIODS.items():
        inits = task.inits(split)
        assert len(inits) > 0
        assert (inits >= pd.Timestamp(start)).all() and (inits + pd.Timedelta("48h") <= pd.Timestamp(end)).all()
    # The default split of the built-in year: Jan–Sep / Oct–Nov / Dec, no sample across a boundary.
    periods = default_periods(raw[0].time.values)
    assert periods["test"] == ("2003-12-01", "2003-12-31T23:59:59")
    inits = pd.DatetimeIndex(raw[0].time.values)
    train = (inits + pd.Timedelta("48h") <= pd.Timestamp(periods["train"][1])).sum()
    assert (train, (inits.month == 12).sum()) == (121, 13)


def test_spread_statistics_come_from_the_training_inits_only(task, raw, pretrained_stats):
    ensemble, _ = raw
    spread = ensemble["2m_temperature"].sel(time=task.inits("train").values).std("number", ddof=1)
    values = _field(spread, "time").astype(np.float64)
    weights = latitude_weights(ensemble.latitude.values.copy()).numpy()[:, None]
    w = np.broadcast_to(weights, values.shape)
    mean = (values * w).sum() / w.sum()
    std = np.sqrt(((values - mean) ** 2 * w).sum() / w.sum())
    assert task.stats.locations["2t_spread"] == pytest.approx(mean, rel=1e-5)
    assert task.stats.scales["2t_spread"] == pytest.approx(std, rel=1e-5)
    assert {"z_spread_500", "z_spread_850", "t_spread_500", "t_spread_850"} <= set(task.stats.scales)
    # The pretrained variables keep the statistics they were passed.
    assert task.stats.locations["2t"] == pretrained_stats.locations["2t"]
    assert task.stats.scales["z_500"] == pretrained_stats.scales["z_500"]


def test_without_stats_the_truth_training_period_is_used(raw):
    task = PostprocessingTask(periods=PERIODS)
    truth = raw[1]["2m_temperature"].sel(time=slice(*PERIODS["train"]))
    values = _field(truth, "time").astype(np.float64)
    w = np.broadcast_to(latitude_weights(raw[1].latitude.values.copy()).numpy()[:, None], values.shape)
    assert task.stats.locations["2t"] == pytest.approx((values * w).sum() / w.sum(), rel=1e-6)
    assert {"lsm", "z", "z_850", "t_500", "10v_spread"} <= set(task.stats.locations)


# -- the σ head and the loss ------------------------------------------------------------------


def test_new_variables_are_spread_companions(task):
    variables = task.variables
    assert variables.new_surf_vars == ("2t_spread", "10u_spread", "10v_spread")
    assert variables.new_atmos_vars == ("z_spread", "t_spread")
    assert set(variables.surf_vars) == {"2t", "10u", "10v", *variables.new_surf_vars}
    assert variables.static_vars == ("lsm", "z") and variables.levels == (500, 850)


def test_sigma_is_positive_floored_and_follows_large_raw_outputs(task):
    raw_output = torch.tensor([-1e6, -50.0, -1.0, 0.0, 1.0, 5.0, 50.0])
    sigma = task.sigma(raw_output, "2t")
    floor = task.sigma_floor * task.stats.scales["2t"]
    assert torch.all(sigma > 0) and torch.all(sigma >= floor)
    assert sigma[0] == pytest.approx(floor, rel=1e-4)
    assert torch.all(sigma[2:] > sigma[1:-1]) and sigma[1] >= sigma[0]  # monotone
    assert sigma[-1] == pytest.approx(50.0 + floor, rel=1e-4)  # σ ≈ r where r ≫ the spread scale
    levels = task.sigma(torch.full((2, 1, 1), -1e6), "z", (500, 850))
    assert levels.flatten().tolist() == pytest.approx(
        [task.sigma_floor * task.stats.scales["z_500"], task.sigma_floor * task.stats.scales["z_850"]], rel=1e-4)


def _prediction(target: Batch, mean_shift, raw_sigma: float) -> Batch:
    """A prediction with μ = truth + shift (a number, or {variable: shift}) and the raw σ output constant."""
    def fields(group: dict) -> dict:
        out = {}
        for name, value in group.items():
            out[name] = value + (mean_shift[name] if isinstance(mean_shift, dict) else mean_shift)
            out[spread_name(name)] = torch.full_like(value, raw_sigma)
        return out

    return dataclasses.replace(target, surf_vars=fields(target.surf_vars), atmos_vars=fields(target.atmos_vars))


def _crps_by_integration(mean: float, std: float, truth: float) -> float:
    """∫ (F(x) − 1{x ≥ y})² dx on a fine grid: the CRPS definition, independent of the closed form."""
    x = torch.linspace(min(mean, truth) - 12 * std, max(mean, truth) + 12 * std, 400_001, dtype=torch.float64)
    cdf = torch.special.ndtr((x - mean) / std)
    return float(torch.trapezoid((cdf - (x >= truth).double()) ** 2, x))


def test_loss_scales_are_the_training_rmse_of_the_ensemble_mean(task, raw):
    ensemble, truth = raw
    inits = task.inits("train").values
    weights = latitude_weights(ensemble.latitude.values.copy()).numpy()[:, None]
    mean = _field(ensemble["temperature"].sel(time=inits, level=850).mean("number"), "time")
    error = mean.astype(np.float64) - _field(truth["temperature"].sel(time=inits + LEAD, level=850), "time")
    assert task.loss_scales["t_850"] == pytest.approx(np.sqrt((error**2 * weights).mean()), rel=1e-5)
    assert set(task.loss_scales) == {"2t", "10u", "10v", "z_500", "z_850", "t_500", "t_850"}
    by_stats = PostprocessingTask(periods=PERIODS, stats=task.stats, loss_scales="stats")
    assert by_stats.loss_scales["z_500"] == task.stats.scales["z_500"]
    with pytest.raises(ValueError, match="loss_scales lack"):
        PostprocessingTask(periods=PERIODS, stats=task.stats, loss_scales={"2t": 1.0})


def test_loss_is_the_normalised_gaussian_crps(task):
    _, target = task.collate([task.datasets()["train"][0], task.datasets()["train"][1]])
    scales = {key.replace("_", ""): value for key, value in task.loss_scales.items()}  # "z500"

    # Zero-spread limit: σ → floor, CRPS → |μ − y|, so the loss is the mean normalised |shift|
    # over the 7 channels: shifts of 3, 2, 4 scales (2t, 10u, 10v), 2.5 (z) and 3.5 (t) → 21 / 7.
    shifts = {"2t": 3.0 * scales["2t"], "10u": 2.0 * scales["10u"], "10v": 4.0 * scales["10v"]}
    shifts |= {v: k * torch.tensor([scales[f"{v}500"], scales[f"{v}850"]])[:, None, None]
               for v, k in (("z", 2.5), ("t", 3.5))}
    loss = task.loss(_prediction(target, shifts, -1e9), target)
    assert float(loss) == pytest.approx(3.0, rel=4e-3)

    # Perfect mean: CRPS = σ (√2 − 1)/√π for every point; each channel counts once.
    raw_sigma = 30.0
    loss = task.loss(_prediction(target, 0.0, raw_sigma), target)
    factor = (math.sqrt(2) - 1) / math.sqrt(math.pi)
    terms = []
    for v in ("2t", "10u", "10v", "z", "t"):
        levels = (500, 850) if v in ("z", "t") else ()
        sigma = task.sigma(torch.full((len(levels) or 1, 1, 1), raw_sigma), v, levels).flatten()
        keys = [f"{v}{lv}" for lv in levels] or [v]
        terms += [factor * float(s) / scales[k] for s, k in zip(sigma, keys)]
    assert len(terms) == 7 and float(loss) == pytest.approx(np.mean(terms), rel=1e-4)

    # A generic case against the CRPS definition (one value, everywhere).
    mean, std, truth = 1.3, 0.7, 0.2
    expected = _crps_by_integration(mean, std, truth)
    single = dataclasses.replace(target, surf_vars={"2t": torch.full((1, 1, 32, 64), truth)}, atmos_vars={})
    raw_output = torch.tensor(std - task.sigma_floor * task.stats.scales["2t"], dtype=torch.float64)
    sharpness = task.stats.scales["2t_spread"]
    raw_output = float(sharpness * torch.log(torch.expm1(raw_output / sharpness)))  # inverse softplus
    prediction = dataclasses.replace(single, surf_vars={"2t": torch.full((1, 1, 32, 64), mean),
                                                        "2t_spread": torch.full((1, 1, 32, 64), raw_output)})
    assert float(task.loss(prediction, single)) * scales["2t"] == pytest.approx(expected, rel=1e-4)


def test_loss_is_differentiable_and_names_a_missing_spread_head(task):
    _, target = task.datasets()["train"][0]
    prediction = _prediction(target, 1.0, 2.0)
    prediction.surf_vars["2t"].requires_grad_(True)
    task.loss(prediction, target).backward()
    assert prediction.surf_vars["2t"].grad is not None
    del prediction.surf_vars["2t_spread"]
    with pytest.raises(KeyError, match="2t_spread"):
        task.loss(prediction, target)


def test_spread_heads_are_task_heads_trainable_under_frozen(task):
    from weatherpeft.methods.registry import apply_method

    backbone = load_pretrained_tiny(extra_surf_vars=task.variables.new_surf_vars,
                                    extra_atmos_vars=task.variables.new_atmos_vars, stats=task.stats)
    heads = backbone.task_head_parameters()
    for variable in (*task.variables.new_surf_vars, *task.variables.new_atmos_vars):
        assert any(name.endswith(f"token_embeds.weights.{variable}") for name in heads)
        assert any(f"heads.{variable}.weight" in name for name in heads)
    assert all("_spread" in name for name in heads)
    adaptation = apply_method("frozen", backbone, 1.0)
    trainable = {id(p) for p in adaptation.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in heads.values()}
    inputs, target = task.collate([task.datasets()["train"][0]])
    loss = task.training_loss(adaptation, (inputs, target))
    loss.backward()
    grads = {name: p.grad for name, p in adaptation.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for name, g in grads.items() if "heads.2t_spread" in name)


# -- evaluation -----------------------------------------------------------------------------


def test_evaluate_scores_model_and_raw_ensemble(task, raw):
    """With μ = ensemble mean and raw σ = ensemble spread, every number has a direct computation."""
    ensemble, truth = raw
    scores = task.evaluate(Echo(), task.dataloader("test", batch_size=2))
    channels = ["2t", "10u", "10v", "z500", "z850", "t500", "t850"]
    assert set(scores) == {f"{s}/{m}/{c}" for s in ("model", "ensemble")
                           for m in ("crps", "rmse", "spread_skill") for c in channels} | \
        {f"ensemble/crps_ecdf/{c}" for c in channels}
    assert all(math.isfinite(v) for v in scores.values())

    inits = task.inits("test").values
    weights = latitude_weights(ensemble.latitude.values.copy()).numpy()[:, None]

    def spatial(values: np.ndarray) -> np.ndarray:  # (..., H, W) → (...)
        return (values * weights).mean(axis=(-2, -1))

    for channel, variable, level in (("2t", "2t", None), ("z500", "z", 500), ("t850", "t", 850)):
        canonical = {**SURFACE, **ATMOS}[variable]
        members = ensemble[canonical].sel(time=inits)
        verifying = truth[canonical].sel(time=inits + LEAD)
        if level is not None:
            members, verifying = members.sel(level=level), verifying.sel(level=level)
        x = _field(members, "time", "number").astype(np.float64)  # (T, M, H, W)
        y = _field(verifying, "time").astype(np.float64)
        m = x.shape[1]
        pairs = np.abs(x[:, :, None] - x[:, None, :]).sum(axis=(1, 2))
        skill = np.abs(x - y[:, None]).mean(1)
        fair_crps = spatial(skill - pairs / (2 * m * (m - 1))).mean()  # WeatherBench2's CRPS
        ecdf_crps = spatial(skill - pairs / (2 * m * m)).mean()  # the members' empirical CDF
        mean, spread = x.mean(1), x.std(1, ddof=1)
        rmse = np.sqrt(spatial((mean - y) ** 2).mean())
        assert scores[f"ensemble/crps/{channel}"] == pytest.approx(fair_crps, rel=1e-4)
        assert scores[f"ensemble/crps_ecdf/{channel}"] == pytest.approx(ecdf_crps, rel=1e-4)
        assert scores[f"ensemble/rmse/{channel}"] == pytest.approx(rmse, rel=1e-4)
        assert scores[f"ensemble/spread_skill/{channel}"] == pytest.approx(
            np.sqrt(spatial(spread**2).mean()) / rmse, rel=1e-4)
        # The echo model's μ is the ensemble mean: same RMSE; σ = the task's softplus of the spread.
        assert scores[f"model/rmse/{channel}"] == pytest.approx(rmse, rel=1e-4)
        suffix = "" if level is None else f"_{level}"
        sharpness = task.stats.scales[f"{variable}_spread{suffix}"]
        floor = task.sigma_floor * task.stats.scales[f"{variable}{suffix}"]
        sigma = sharpness * np.logaddexp(0, spread / sharpness) + floor
        z = (y - mean) / sigma
        cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
        pdf = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        gaussian_crps = spatial(sigma * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))).mean()
        assert scores[f"model/crps/{channel}"] == pytest.approx(gaussian_crps, rel=1e-4)
        assert scores[f"model/spread_skill/{channel}"] == pytest.approx(
            np.sqrt(spatial(sigma**2).mean()) / rmse, rel=1e-4)
    assert scores["ensemble/spread_skill/2t"] < 1  # the raw ensemble is under-dispersive


class Climatology(torch.nn.Module):
    """Every head outputs its variable's normalisation location: normalised output 0."""

    def __init__(self, stats, levels):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.stats, self.levels = stats, levels

    def forward(self, batch: Batch) -> Batch:
        def location(name: str, values: torch.Tensor) -> torch.Tensor:
            if values.dim() == 4:
                return torch.full_like(values[:, -1:], self.stats.locations[name])
            per_level = [self.stats.locations[f"{name}_{level}"] for level in self.levels]
            return torch.tensor(per_level).reshape(1, 1, -1, 1, 1).expand_as(values[:, -1:]).clone()

        return dataclasses.replace(batch, surf_vars={k: location(k, v) for k, v in batch.surf_vars.items()},
                                   atmos_vars={k: location(k, v) for k, v in batch.atmos_vars.items()})


def test_residual_head_form_starts_from_the_ensemble(pretrained_stats):
    """μ = μ_ens + o_v·σ_ens, σ = exp(o_s)·σ_ens + floor: heads at o = 0 give the raw ensemble."""
    task = PostprocessingTask(periods=PERIODS, stats=pretrained_stats, head_form="residual")
    inputs, target = task.dataloader("test", batch_size=2).__iter__().__next__()
    model = Climatology(task.stats, task.levels)
    gaussians = task.gaussian(model(inputs), inputs=inputs)
    for v, group in (("2t", "surf_vars"), ("t", "atmos_vars")):
        mean, std = gaussians[v]
        given = getattr(inputs, group)
        torch.testing.assert_close(mean, given[v][:, -1:], rtol=1e-5, atol=1e-3)
        floor = task._constants(v, task.levels if v == "t" else (), mean.device)[1]
        torch.testing.assert_close(std, given[f"{v}_spread"][:, -1:] + floor, rtol=1e-5, atol=1e-5)
    # The loss needs the inputs and gets them through training_loss.
    with pytest.raises(ValueError, match="residual.*needs the inputs"):
        task.loss(model(inputs), target)
    assert torch.isfinite(task.training_loss(model, (inputs, target)))
    prediction, _ = task.sample_prediction(model, "test", 0)
    one, _ = task.collated_sample("test", 0)
    torch.testing.assert_close(prediction.surf_vars["2t"], one.surf_vars["2t"][:, -1:], rtol=1e-5, atol=1e-3)


def test_truth_offset_verifies_later_than_the_ensemble(pretrained_stats, raw):
    _, truth = raw
    task = PostprocessingTask(periods=PERIODS, stats=pretrained_stats, truth_offset="24h")
    dataset = task.datasets()["test"]
    inputs, target = dataset[0]
    init, valid = dataset.sample_times(0)
    assert pd.Timestamp(valid) - pd.Timestamp(init) == pd.Timedelta(hours=72)
    assert inputs.metadata.time == (valid - pd.Timedelta("24h"),) and target.metadata.time == (valid,)
    expected = _field(truth["2m_temperature"].sel(time=np.datetime64(valid)))
    np.testing.assert_allclose(target.surf_vars["2t"][0, 0], expected, rtol=1e-6)
    assert (task.inits("test") + pd.Timedelta("72h") <= pd.Timestamp(PERIODS["test"][1])).all()
    scores = task.evaluate(Echo(), task.dataloader("test", batch_size=2))
    assert math.isfinite(scores["ensemble/crps/2t"])


def test_bad_head_form_or_offset_is_refused(pretrained_stats):
    with pytest.raises(ValueError, match="head_form must be one of"):
        PostprocessingTask(periods=PERIODS, stats=pretrained_stats, head_form="exp")
    with pytest.raises(ValueError, match="truth_offset must not be negative"):
        PostprocessingTask(periods=PERIODS, stats=pretrained_stats, truth_offset="-6h")


def test_tiny_fine_tuning_run_evaluates_to_finite_scores(task, tmp_path):
    from weatherpeft.methods.registry import apply_method
    from weatherpeft.train import TrainConfig, Trainer

    backbone = load_pretrained_tiny(extra_surf_vars=task.variables.new_surf_vars,
                                    extra_atmos_vars=task.variables.new_atmos_vars, stats=task.stats)
    adaptation = apply_method("full", backbone, 1.0)
    trainer = Trainer(adaptation, task, TrainConfig(steps=2, batch_size=2, lr=1e-4, log_every=0,
                                                    progress=False, out_dir=str(tmp_path)),
                      hooks=adaptation.hooks, param_groups=adaptation.param_groups(0.05))
    trainer.fit()
    scores = trainer.evaluate(split="test")
    assert len(scores) == 7 * 7 and all(math.isfinite(v) for v in scores.values())
    assert all(scores[f"model/spread_skill/{c}"] > 0 for c in ("2t", "z500", "t850"))


# -- errors ---------------------------------------------------------------------------------


def test_a_store_without_the_forecast_layout_is_refused():
    downstream = store_path("downstream")
    with pytest.raises(ValueError, match="forecast layout.*member dimension"):
        PostprocessingTask(downstream, PERIODS, truth_store=downstream)


def test_missing_variable_level_lead_or_truth_store_are_named(pretrained_stats):
    ensemble, downstream = store_path("ensemble"), store_path("downstream")
    with pytest.raises(ValueError, match="mean_sea_level_pressure.*not in forecast store"):
        PostprocessingTask(ensemble, PERIODS, pretrained_stats, truth_store=downstream,
                           surf_vars=("2t", "msl"))
    with pytest.raises(ValueError, match="level 300 hPa not in forecast store"):
        PostprocessingTask(ensemble, PERIODS, pretrained_stats, truth_store=downstream, levels=(300, 500))
    with pytest.raises(ValueError, match="lead 1 day.*not in"):
        PostprocessingTask(ensemble, PERIODS, pretrained_stats, truth_store=downstream,
                           lead=pd.Timedelta("24h"))
    with pytest.raises(ValueError, match="truth_store"):
        PostprocessingTask(ensemble, PERIODS, pretrained_stats)
    truth = xr.open_zarr(downstream).drop_vars("10m_u_component_of_wind")
    with pytest.raises(ValueError, match="10m_u_component_of_wind.*not in truth store"):
        PostprocessingTask(ensemble, PERIODS, pretrained_stats, truth_store=truth)


def test_a_one_member_store_is_refused():
    one = xr.open_zarr(store_path("ensemble")).isel(number=slice(0, 1))
    with pytest.raises(ValueError, match="at least 2"):
        PostprocessingTask(one, PERIODS, truth_store=store_path("downstream"))
