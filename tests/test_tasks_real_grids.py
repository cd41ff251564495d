"""Every task on real grids: both poles and an odd row count, latitude either way, a 0.25° crop.

The stores are written here, tiny: a global 11.25° grid with both poles (17 × 32, so Aurora
drops the last row: 16 rows of 4-cell patches), stored north → south as ERA5 and GRIB files
are, or south → north as WeatherBench2 is; and 33 × 64 cells of the 0.25° (721 × 1440)
layout. Each task is built through ``build_task`` with task options, and scored with the
shipped aurora-tiny: the loss runs on a training batch and ``evaluate`` on the test split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import PRETRAINED_TINY, load_pretrained_tiny

from weatherpeft.backbones import backbone_statistics
from weatherpeft.tasks import build_task
from weatherpeft.tasks.grid import backbone_grid

LEVELS = (500, 850)
TIMES = pd.date_range("2003-01-01", periods=36, freq="6h")  # 9 days
PERIODS = {"train": ["2003-01-01", "2003-01-03T18:00"], "val": ["2003-01-04", "2003-01-06T18:00"],
           "test": ["2003-01-07", "2003-01-09T18:00"]}


def pole_grid(n_lat: int = 17, n_lon: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Latitude 90 … −90 (both poles) and longitude 0 … 360 − step."""
    return np.linspace(90.0, -90.0, n_lat), np.arange(n_lon) * 360.0 / n_lon


def analysis(lat: np.ndarray, lon: np.ndarray, times=TIMES, seed: int = 0) -> xr.Dataset:
    """Plausible random fields on (time, level, latitude, longitude), latitude as given."""
    rng = np.random.default_rng(seed)
    shape_surf = (len(times), len(lat), len(lon))
    shape_atmos = (len(times), len(LEVELS), len(lat), len(lon))
    coslat = np.cos(np.radians(lat))[None, :, None]
    level = np.asarray(LEVELS, dtype=float)[None, :, None, None]
    surface = ("time", "latitude", "longitude")
    atmos = ("time", "level", "latitude", "longitude")
    fields = {
        "2m_temperature": (surface, 250 + 40 * coslat + 3 * rng.standard_normal(shape_surf)),
        "10m_u_component_of_wind": (surface, 5 * rng.standard_normal(shape_surf)),
        "10m_v_component_of_wind": (surface, 4 * rng.standard_normal(shape_surf)),
        "mean_sea_level_pressure": (surface, 101000 + 800 * rng.standard_normal(shape_surf)),
        "total_precipitation_6hr": (surface, 1e-3 * rng.gamma(0.3, 1.0, shape_surf)),
        "geopotential": (atmos, 9.81 * 7000 * np.log(1000 / level) + 200 * rng.standard_normal(shape_atmos)),
        "temperature": (atmos, 210 + 70 * level / 1000 + 15 * coslat[:, None] + 2 * rng.standard_normal(shape_atmos)),
        "u_component_of_wind": (atmos, 10 * rng.standard_normal(shape_atmos)),
        "v_component_of_wind": (atmos, 5 * rng.standard_normal(shape_atmos)),
        "specific_humidity": (atmos, 1e-3 * (level / 1000) ** 3 * np.abs(rng.standard_normal(shape_atmos))),
        "land_sea_mask": (("latitude", "longitude"), (rng.random((len(lat), len(lon))) > 0.7) * 1.0),
        "geopotential_at_surface": (("latitude", "longitude"),
                                    2000 * np.abs(rng.standard_normal((len(lat), len(lon))))),
    }
    ds = xr.Dataset({k: (dims, v.astype(np.float32)) for k, (dims, v) in fields.items()},
                    coords={"time": times, "level": np.asarray(LEVELS), "latitude": lat, "longitude": lon})
    ds["total_precipitation_6hr"].attrs["units"] = "m"
    return ds


def write(ds: xr.Dataset, path: Path) -> str:
    ds.to_zarr(path, mode="w", consolidated=True, zarr_format=2)
    return str(path)


def ensemble(truth: xr.Dataset, lead_hours: int = 24, members: int = 3) -> xr.Dataset:
    """A forecast-layout store: members = the truth at the valid time plus noise, leads 0 and
    ``lead_hours``, for every init whose valid time the truth holds."""
    rng = np.random.default_rng(1)
    leads = pd.to_timedelta([0, lead_hours], unit="h")
    inits = truth.time.values[: len(truth.time) - lead_hours // 6]
    variables = ["2m_temperature", "10m_u_component_of_wind", "geopotential", "temperature"]
    data = {}
    for name in variables:
        per_lead = [truth[name].sel(time=inits + lead).values for lead in leads]
        base = np.stack(per_lead, axis=1)  # (init, lead, …)
        noise = rng.standard_normal((base.shape[0], len(leads), members, *base.shape[2:]))
        spread = float(truth[name].std()) * 0.1
        values = base[:, :, None] + spread * noise
        dims = ("time", "prediction_timedelta", "number", *truth[name].dims[1:])
        data[name] = (dims, values.astype(np.float32))
    return xr.Dataset(data, coords={"time": inits, "prediction_timedelta": leads,
                                    "number": np.arange(members), "level": truth.level,
                                    "latitude": truth.latitude, "longitude": truth.longitude})


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("real_grids")
    lat, lon = pole_grid()
    north_south = analysis(lat, lon)
    fine_lat = 90.0 - 0.25 * np.arange(33)  # rows 0–32 and columns 0–63 of the 721 × 1440 layout
    fine_lon = 0.25 * np.arange(64)
    return {
        "north_south": write(north_south, folder / "ns.zarr"),
        "south_north": write(north_south.isel(latitude=slice(None, None, -1)), folder / "sn.zarr"),
        "ensemble": write(ensemble(north_south), folder / "ens.zarr"),
        "quarter": write(analysis(fine_lat, fine_lon, seed=2), folder / "quarter.zarr"),
    }


@pytest.fixture(scope="module")
def stats():
    return backbone_statistics(PRETRAINED_TINY)


def scored(task, new_heads: bool = False) -> tuple[float, dict[str, float]]:
    """(loss of aurora-tiny on the first training batch, its test scores)."""
    import torch

    variables = task.variables
    model = load_pretrained_tiny(extra_surf_vars=variables.new_surf_vars,
                                 extra_atmos_vars=variables.new_atmos_vars, stats=task.stats).eval()
    with torch.no_grad():
        loss = float(task.training_loss(model, task.collate([task.datasets()["train"][0],
                                                             task.datasets()["train"][1]])))
        scores = task.evaluate(model, task.dataloader("test", 2))
    return loss, scores


@pytest.mark.parametrize("orientation", ["north_south", "south_north"])
def test_forecasting_on_a_pole_grid_either_way(stores, stats, orientation):
    task = build_task("forecasting", stats, stores[orientation],
                      {"periods": PERIODS, "lead_steps": [1, 2]}, grid=backbone_grid(PRETRAINED_TINY))
    inputs, _ = task.datasets()["train"][0]
    assert inputs.spatial_shape == (17, 32)
    assert float(inputs.metadata.lat[0]) == 90.0 and float(inputs.metadata.lat[-1]) == -90.0
    loss, scores = scored(task)
    assert math.isfinite(loss) and scores and all(math.isfinite(v) for v in scores.values())
    assert "model/rmse/z500/12h" in scores


def test_both_orientations_score_the_same(stores, stats):
    results = [scored(build_task("forecasting", stats, stores[o], {"periods": PERIODS}))
               for o in ("north_south", "south_north")]
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)


def test_downscaling_on_a_pole_grid(stores, stats):
    task = build_task("downscaling", stats, stores["north_south"],
                      {"periods": PERIODS, "coarse_factor": 4})
    inputs, target = task.datasets()["test"][0]
    assert target.spatial_shape == (17, 32) and inputs.spatial_shape == (17, 32)
    coarse = task.datasets()["test"].coarse_sample(0)
    assert coarse.spatial_shape == (4, 8)  # the 16 rows Aurora keeps, coarsened ×4
    loss, scores = scored(task)
    assert math.isfinite(loss) and all(math.isfinite(v) for v in scores.values())
    assert {"model/rmse/2t", "bilinear/rmse/z500"} <= set(scores)


def test_postprocessing_on_a_pole_grid(stores, stats):
    """Before: "'2t': prediction shape (1, 1, 16, 32) differs from target shape (1, 1, 17, 32)"."""
    data = f"{stores['ensemble']},{stores['north_south']}"
    task = build_task("postprocessing", stats, data,
                      {"periods": PERIODS, "lead_hours": 24, "surf_vars": ["2t", "10u"],
                       "atmos_vars": ["z", "t"], "static_vars": ["lsm"]})
    assert task.lead.total_seconds() == 24 * 3600 and task.variables.static_vars == ("lsm",)
    loss, scores = scored(task)
    assert math.isfinite(loss)
    assert scores["model/crps/2t"] > 0 and scores["ensemble/crps/z500"] > 0
    assert all(math.isfinite(v) for v in scores.values())


def test_precipitation_on_a_pole_grid(stores, stats):
    task = build_task("precipitation", stats, stores["south_north"],
                      {"periods": PERIODS, "region": None, "lead_hours": [12, 24]})
    lat, _ = task.grid
    assert len(lat) == 16 and lat[0] == 90.0  # the south pole row dropped, as Aurora does
    loss, scores = scored(task)
    assert math.isfinite(loss) and all(math.isfinite(v) for v in scores.values())
    assert {"model/rmse/tp/12h", "model/seeps/tp/24h"} <= set(scores)


def test_forecasting_on_a_crop_of_the_quarter_degree_layout(stores, stats):
    task = build_task("forecasting", stats, stores["quarter"], {"periods": PERIODS})
    inputs, _ = task.datasets()["train"][0]
    assert inputs.spatial_shape == (33, 64) and float(inputs.metadata.lat[0]) == 90.0
    loss, scores = scored(task)
    assert math.isfinite(loss) and all(math.isfinite(v) for v in scores.values())


def test_finetune_and_evaluate_postprocessing_on_a_pole_grid(stores, tmp_path):
    """The command line end to end: task options given as JSON, kept in the adapter."""
    from weatherpeft.cli import main

    data = f"{stores['ensemble']},{stores['north_south']}"
    options = json.dumps({"periods": PERIODS, "lead_hours": 24, "surf_vars": ["2t"],
                          "atmos_vars": ["z"], "static_vars": ["lsm", "z"]})
    assert main(["finetune", "--task", "postprocessing", "--data", data, "--task-options", options,
                 "--method", "lora", "--steps", "1", "--batch-size", "2", "--out-dir",
                 str(tmp_path / "run"), "--no-evaluate"]) == 0
    from weatherpeft.adapters import read_adapter_config

    assert read_adapter_config(tmp_path / "run" / "adapter")["task_options"]["lead_hours"] == 24
    # evaluate rebuilds the task with the adapter's options (lead 24 h: the store has no 48 h)
    assert main(["evaluate", "--adapter", str(tmp_path / "run" / "adapter"), "--data", data,
                 "--out", str(tmp_path / "scores")]) == 0
    scores = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert "model/crps/2t" in json.dumps(scores)
