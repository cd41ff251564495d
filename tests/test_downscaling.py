"""The downscaling task: coarse inputs, bilinear interpolation, lead 0, loss weights, metrics.

Most tests use the ×2 form (``coarse_factor=2``, the first form, kept as an option); the
default ×4 (the paper's factor) has its own tests.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime

import numpy as np
import pytest
import torch
import xarray as xr
from aurora import Batch
from conftest import load_pretrained_tiny, make_world

from weatherpeft.data.builtin import store_path
from weatherpeft.data.grids import coarsen, equiangular_grid
from weatherpeft.data.wb2 import collate_batches, open_store
from weatherpeft.metrics import bias, rmse
from weatherpeft.tasks.downscaling import (
    PAPER_CHANNELS,
    BilinearInterpolator,
    DownscalingTask,
    coarse_coordinates,
    default_periods,
    interpolation_matrix,
)
from weatherpeft.train import TrainConfig, Trainer

#: Three short splits of the built-in downstream year.
PERIODS = {"train": ("2003-03-01", "2003-03-02T18"), "val": ("2003-03-03", "2003-03-03T18"),
           "test": ("2003-03-04", "2003-03-05T18")}


@pytest.fixture(scope="module")
def backbone():
    return load_pretrained_tiny()


@pytest.fixture(scope="module")
def task(backbone):
    return DownscalingTask(store_path("downstream"), PERIODS, backbone.stats, coarse_factor=2)


@pytest.fixture(scope="module")
def task_x4(backbone):
    return DownscalingTask(store_path("downstream"), PERIODS, backbone.stats)


class Oracle(torch.nn.Module):
    """Returns the truth for the input's time(s): a perfect downscaling model."""

    def __init__(self, pairs):
        super().__init__()
        self.truth = {pairs.sample_times(i)[1]: pairs[i][1] for i in range(len(pairs))}

    def forward(self, batch: Batch) -> Batch:
        return collate_batches([(self.truth[t], self.truth[t]) for t in batch.metadata.time])[0]


# -- interpolation ---------------------------------------------------------------------------


def _grids():
    fine = equiangular_grid(64, 32)
    fine_lat, fine_lon = fine.lat[::-1].copy(), fine.lon  # latitude decreasing, as in batches
    coarse_lat, coarse_lon = coarse_coordinates(fine_lat, fine_lon, 2)
    return fine_lat, fine_lon, coarse_lat, coarse_lon


def test_coarse_grid_is_the_11_25_degree_grid():
    _, _, coarse_lat, coarse_lon = _grids()
    reference = equiangular_grid(32, 16)
    np.testing.assert_allclose(coarse_lat, reference.lat[::-1])
    np.testing.assert_allclose(coarse_lon, reference.lon + 11.25 / 2 - 5.625 / 2)  # 2.8125, 14.0625, …


def test_bilinear_interpolation_is_exact_on_a_linear_field_inside_the_coarse_grid():
    fine_lat, fine_lon, coarse_lat, coarse_lon = _grids()
    linear = lambda lat, lon: 3.0 + 0.5 * lat[:, None] - 0.02 * lon[None, :]  # noqa: E731
    interpolate = BilinearInterpolator(coarse_lat, coarse_lon, fine_lat, fine_lon)
    result = interpolate(torch.from_numpy(linear(coarse_lat, coarse_lon))).numpy()
    rows = (fine_lat >= coarse_lat.min()) & (fine_lat <= coarse_lat.max())
    columns = (fine_lon >= coarse_lon.min()) & (fine_lon <= coarse_lon.max())
    assert rows.sum() == 30 and columns.sum() == 62
    np.testing.assert_allclose(result[np.ix_(rows, columns)],
                               linear(fine_lat, fine_lon)[np.ix_(rows, columns)], atol=1e-9)
    # Each row of the matrices sums to 1 (a constant field stays constant).
    assert torch.allclose(interpolate.lat_matrix.sum(1), torch.ones(32, dtype=torch.float64))
    assert torch.allclose(interpolate.lon_matrix.sum(1), torch.ones(64, dtype=torch.float64))


def test_interpolation_wraps_longitude_and_clamps_latitude_at_the_edges():
    fine_lat, fine_lon, coarse_lat, coarse_lon = _grids()
    rng = np.random.default_rng(0)
    field = rng.standard_normal((16, 32))
    result = BilinearInterpolator(coarse_lat, coarse_lon, fine_lat, fine_lon)(torch.from_numpy(field)).numpy()
    # Fine longitude 0° lies between the last coarse column (351.5625°) and the first (2.8125°),
    # 8.4375° past the last of an 11.25° span: weights 0.25 and 0.75.
    interior = slice(1, 31)
    row_interp = interpolation_matrix(coarse_lat, fine_lat, periodic=False) @ field
    np.testing.assert_allclose(result[interior, 0],
                               0.25 * row_interp[interior, -1] + 0.75 * row_interp[interior, 0])
    # The polar fine rows (±87.1875°) lie beyond the outermost coarse rows (±84.375°): copies.
    lon_interp = field @ interpolation_matrix(coarse_lon, fine_lon, periodic=True).T
    np.testing.assert_allclose(result[0], lon_interp[0])
    np.testing.assert_allclose(result[-1], lon_interp[-1])
    # A regional (non-global) source does not wrap: it clamps in longitude too.
    matrix = interpolation_matrix(np.array([10.0, 20.0]), np.array([0.0, 15.0, 30.0]), periodic=False)
    np.testing.assert_allclose(matrix, [[1, 0], [0.5, 0.5], [0, 1]])


def test_interpolator_refuses_a_field_on_another_grid():
    fine_lat, fine_lon, coarse_lat, coarse_lon = _grids()
    with pytest.raises(ValueError, match="source grid"):
        BilinearInterpolator(coarse_lat, coarse_lon, fine_lat, fine_lon)(torch.zeros(32, 64))


# -- samples ---------------------------------------------------------------------------------


def test_samples_pair_coarse_history_with_the_fine_state_at_the_same_time(task):
    variables = task.variables
    assert variables.surf_vars == ("2t", "10u", "10v", "msl")
    assert variables.atmos_vars == ("z", "t", "u", "v", "q") and variables.levels == (500, 850)
    assert variables.new_surf_vars == () and variables.new_atmos_vars == ()
    pairs = task.datasets()["train"]
    inputs, target = pairs[0]
    assert inputs.surf_vars["2t"].shape == (1, 2, 32, 64)
    assert inputs.atmos_vars["z"].shape == (1, 2, 2, 32, 64)
    assert target.surf_vars["2t"].shape == (1, 1, 32, 64)
    assert target.atmos_vars["t"].shape == (1, 1, 2, 32, 64)
    times, target_time = pairs.sample_times(0)
    assert times == (datetime(2003, 3, 1, 0), datetime(2003, 3, 1, 6))
    assert target_time == times[-1]  # lead 0
    assert inputs.metadata.time == target.metadata.time == (target_time,)
    assert len(pairs) == 7  # 8 times in the period, history 2
    assert set(task.datasets()) == {"train", "val", "test"} and task.datasets() is task.datasets()


def test_the_input_is_really_coarse_block_means_interpolated_to_the_fine_grid(task):
    pairs = task.datasets()["train"]
    inputs, _ = pairs[2]
    fine_window, _ = pairs.fine[2]  # the fine fields at the same two input times
    coarse = pairs.coarse_sample(2)
    assert coarse.surf_vars["2t"].shape == (1, 2, 16, 32)
    assert coarse.atmos_vars["u"].shape == (1, 2, 2, 16, 32)
    for name in ("2t", "msl"):
        fine = fine_window.surf_vars[name].double().numpy()
        # Area-weighted mean of each 2 × 2 block of fine cells, computed here by hand.
        weights = np.cos(np.radians(fine_window.metadata.lat.double().numpy()))[:, None] * np.ones(64)
        blocks = lambda a: a.reshape(*a.shape[:-2], 16, 2, 32, 2).sum(axis=(-3, -1))  # noqa: E731
        expected = blocks(fine * weights) / blocks(weights)
        np.testing.assert_allclose(coarse.surf_vars[name].double().numpy(), expected, rtol=1e-5)
        # The coarse field on the fine grid, before interpolation, is constant in every block.
        upsampled = np.repeat(np.repeat(expected, 2, axis=-2), 2, axis=-1)
        assert not np.allclose(upsampled, fine, rtol=1e-4)  # really lost detail
        # What the model sees is the bilinear interpolation of exactly that coarse field.
        assert torch.allclose(inputs.surf_vars[name], pairs.interpolator(coarse.surf_vars[name]))
    # Same as data/grids.coarsen on the store's (lon, lat) layout.
    via_grids = coarsen(fine_window.atmos_vars["t"].numpy().swapaxes(-1, -2).astype(np.float64), 2,
                        fine_window.metadata.lat.numpy()).swapaxes(-1, -2)
    np.testing.assert_allclose(coarse.atmos_vars["t"].numpy(), via_grids, rtol=1e-6)


def test_the_default_is_the_papers_factor_4_from_22_5_degree_block_means(task_x4):
    pairs = task_x4.datasets()["train"]
    assert task_x4.coarse_factor == 4 and pairs.coarse_factor == 4
    reference = equiangular_grid(16, 8)  # 22.5°
    np.testing.assert_allclose(pairs.coarse_lat, reference.lat[::-1])
    np.testing.assert_allclose(pairs.coarse_lon, reference.lon + 22.5 / 2 - 5.625 / 2)
    inputs, target = pairs[1]
    fine_window, _ = pairs.fine[1]
    coarse = pairs.coarse_sample(1)
    assert coarse.surf_vars["2t"].shape == (1, 2, 8, 16)
    assert inputs.surf_vars["2t"].shape == target.surf_vars["2t"].shape[:1] + (2, 32, 64)
    fine = fine_window.surf_vars["2t"].double().numpy()
    weights = np.cos(np.radians(fine_window.metadata.lat.double().numpy()))[:, None] * np.ones(64)
    blocks = lambda a: a.reshape(*a.shape[:-2], 8, 4, 16, 4).sum(axis=(-3, -1))  # noqa: E731
    expected = blocks(fine * weights) / blocks(weights)
    np.testing.assert_allclose(coarse.surf_vars["2t"].double().numpy(), expected, rtol=1e-5)
    assert torch.allclose(inputs.surf_vars["2t"], pairs.interpolator(coarse.surf_vars["2t"]))
    # Coarser input, larger bilinear error than the ×2 form on the same times.
    x2 = DownscalingTask(store_path("downstream"), PERIODS, task_x4.stats, coarse_factor=2)
    loader = [collate_batches([pairs[i] for i in range(len(pairs))])]
    identity = torch.nn.Identity()
    x2_loader = [collate_batches([x2.datasets()["train"][i] for i in range(len(pairs))])]
    scores_x4 = task_x4.evaluate(identity, loader)
    scores_x2 = x2.evaluate(identity, x2_loader)
    assert scores_x4["bilinear/rmse/2t"] > scores_x2["bilinear/rmse/2t"] > 0


def test_the_task_registry_names_both_forms(backbone):
    from weatherpeft.tasks import TASKS, build_task

    assert {"downscaling", "downscaling-x2"} <= set(TASKS)
    assert build_task("downscaling-x2", backbone.stats).coarse_factor == 2
    assert build_task("downscaling", backbone.stats).coarse_factor == 4


def test_static_fields_stay_at_the_fine_resolution(task):
    inputs, target = task.datasets()["val"][0]
    ds = open_store(store_path("downstream"))
    lsm = ds["land_sea_mask"].transpose("latitude", "longitude").values[::-1]
    assert inputs.static_vars["lsm"].shape == (32, 64)
    np.testing.assert_array_equal(inputs.static_vars["lsm"].numpy(), lsm.astype(np.float32))
    assert set(inputs.static_vars) == {"lsm", "z"}


def test_default_periods_split_the_last_year():
    assert default_periods(store_path("downstream")) == {
        "train": ("2003-01-01T00:00:00", "2003-09-30T23:59:59"),
        "val": ("2003-10-01T00:00:00", "2003-11-30T23:59:59"),
        "test": ("2003-12-01T00:00:00", "2003-12-31T18:00:00")}
    march = np.array(["2001-03-01", "2001-03-02"], dtype="datetime64[ns]")
    with pytest.raises(ValueError, match="pass periods explicitly"):
        default_periods(march)


def test_a_coarse_store_gives_the_same_inputs_as_coarsening():
    world = make_world(n_times=12, levels=(500, 850), seed=5)
    periods = {"train": ("2001-03-01T00", "2001-03-01T18"), "val": ("2001-03-02T00", "2001-03-02T18"),
               "test": ("2001-03-03T00", "2001-03-03T18")}
    dynamic = [n for n in world.data_vars if "time" in world[n].dims]
    lon, lat = world.longitude.values, world.latitude.values
    coarse = xr.Dataset(
        {n: (world[n].dims, coarsen(world[n].values.astype(np.float64), 2, lat).astype(np.float32))
         for n in dynamic},
        coords={"time": world.time, "level": world.level,
                "longitude": lon.reshape(-1, 2).mean(1), "latitude": lat.reshape(-1, 2).mean(1)})
    derived = DownscalingTask(world, periods, coarse_factor=2)
    read = DownscalingTask(world, periods, coarse_store=coarse)
    for index in (0, 2):
        a, target_a = derived.datasets()["test"][index]
        b, target_b = read.datasets()["test"][index]
        for name in ("2t", "10v"):
            assert torch.allclose(a.surf_vars[name], b.surf_vars[name], rtol=1e-5)
        assert torch.allclose(a.atmos_vars["z"], b.atmos_vars["z"], rtol=1e-5)
        assert torch.equal(target_a.surf_vars["2t"], target_b.surf_vars["2t"])
    with pytest.raises(ValueError, match="coarsening factor 3"):
        DownscalingTask(world, periods, coarse_factor=3)
    with pytest.raises(ValueError, match="coarsening factor 64"):
        DownscalingTask(world, periods, coarse_factor=64)
    with pytest.raises(ValueError, match="missing \\['test'\\]"):
        DownscalingTask(world, {k: periods[k] for k in ("train", "val")})


# -- loss --------------------------------------------------------------------------------------


def test_loss_is_zero_when_perfect_and_weights_surface_by_a_quarter(task):
    _, target = collate_batches([task.datasets()["train"][i] for i in range(2)])
    assert task.loss(target, target).item() == 0.0
    # One σ off everywhere in one of the 4 surface variables: 0.25 × 1/4.
    off = dataclasses.replace(target, surf_vars={**target.surf_vars,
                                                 "2t": target.surf_vars["2t"] + task.stats.scales["2t"]})
    assert task.loss(off, target).item() == pytest.approx(0.25 / 4, rel=1e-4)
    # One σ off in one level of one of the 5 atmospheric variables: 1 × 1/10 channels.
    z = target.atmos_vars["z"].clone()
    z[:, :, 1] += task.stats.scales["z_850"]
    off = dataclasses.replace(target, atmos_vars={**target.atmos_vars, "z": z})
    assert task.loss(off, target).item() == pytest.approx(1 / 10, rel=1e-4)
    # The surface weight is an option.
    equal = DownscalingTask(store_path("downstream"), PERIODS, task.stats, surface_weight=1.0)
    off = dataclasses.replace(target, surf_vars={**target.surf_vars,
                                                 "10u": target.surf_vars["10u"] + task.stats.scales["10u"]})
    assert equal.loss(off, target).item() == pytest.approx(1 / 4, rel=1e-4)
    partial = dataclasses.replace(target, surf_vars={k: v for k, v in target.surf_vars.items() if k != "msl"})
    with pytest.raises(KeyError, match="msl"):
        task.loss(partial, target)


# -- evaluation --------------------------------------------------------------------------------


def test_a_perfect_model_scores_zero_and_bilinear_is_scored_against_the_truth(task):
    pairs = task.datasets()["test"]
    loader = task.dataloader("test", batch_size=3)
    scores = task.evaluate(Oracle(pairs), loader)
    model = {k: v for k, v in scores.items() if k.startswith("model/")}
    assert model and all(v == 0.0 for v in model.values())
    inputs, target = collate_batches([pairs[i] for i in range(len(pairs))])
    lat = target.metadata.lat
    bilinear, truth = inputs.surf_vars["2t"][:, -1], target.surf_vars["2t"][:, 0]
    assert scores["bilinear/rmse/2t"] == pytest.approx(float(rmse(bilinear, truth, lat)), rel=1e-5)
    assert scores["bilinear/bias/2t"] == pytest.approx(float(bias(bilinear, truth, lat)), rel=1e-4, abs=1e-6)
    z500 = rmse(inputs.atmos_vars["z"][:, -1, 0], target.atmos_vars["z"][:, 0, 0], lat)
    assert scores["bilinear/rmse/z500"] == pytest.approx(float(z500), rel=1e-5)
    assert scores["bilinear/rmse/2t"] > 0.1


def test_aurora_tiny_trains_and_evaluates_with_every_documented_key(task, backbone, tmp_path):
    channels = ["2t", "10u", "10v", "msl", "z500", "z850", "t500", "t850", "u500", "u850",
                "v500", "v850", "q500", "q850"]
    assert task.channels == channels and set(PAPER_CHANNELS) <= set(channels)
    before = task.evaluate(backbone, task.dataloader("test", batch_size=4))
    expected = {f"{source}/{metric}/{channel}" for source in ("model", "bilinear")
                for metric in ("rmse", "bias") for channel in channels}
    assert set(before) == expected
    assert all(math.isfinite(v) for v in before.values())
    assert before["model/rmse/2t"] != before["bilinear/rmse/2t"]
    # Two Trainer steps through the task's contract (full fine-tuning of a copy).
    model = load_pretrained_tiny()
    trainer = Trainer(model, task, TrainConfig(steps=2, batch_size=2, lr=1e-4, log_every=0,
                                               progress=False, out_dir=str(tmp_path)))
    trainer.fit()
    assert math.isfinite(trainer.validate(batches=1))
    after = trainer.evaluate(split="test", batch_size=4)
    assert set(after) == expected and after["model/rmse/2t"] != before["model/rmse/2t"]
    assert task.evaluate(backbone, []) == {}

