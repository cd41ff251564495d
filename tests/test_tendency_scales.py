"""Loss scales from the one-step change of each field (persistence-relative weighting)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import make_world, write_wb2_zarr

from weatherpeft.data.wb2 import SampleSpec
from weatherpeft.tasks.forecasting import ForecastingTask, tendency_scales


@pytest.fixture(scope="module")
def trending_store(tmp_path_factory):
    world = make_world()
    steps = xr.DataArray(np.arange(world.sizes["time"], dtype=np.float32), dims="time")
    first = world["2m_temperature"].isel(time=0, drop=True)
    world["2m_temperature"] = (first + 0.5 * steps).transpose("time", "longitude", "latitude")  # +0.5 K / 6 h
    world["2m_temperature"].encoding = {}
    return write_wb2_zarr(world, tmp_path_factory.mktemp("trend") / "world.zarr", packed=False)


def test_tendency_scale_is_the_rms_one_step_change(trending_store):
    scales = tendency_scales(trending_store, SampleSpec(start="2001-03-01", end="2001-03-03T18:00"))
    assert scales["2t"] == pytest.approx(0.5, rel=1e-5)
    assert {"z_300", "z_500", "z_850", "t_850", "10u"} <= set(scales)
    assert scales["z_500"] > scales["t_500"] > 0


def test_forecasting_loss_uses_tendency_scales(trending_store):
    periods = dict.fromkeys(("train", "val", "test"), ("2001-03-01", "2001-03-03T18:00"))
    task = ForecastingTask(trending_store, periods, loss_scales="tendency", lead_steps=(1,))
    inputs, target = task.datasets()["train"][0]
    wrong = target.surf_vars["2t"] + 0.5  # one tendency scale of error in 2t only
    prediction = type(target)(surf_vars={**target.surf_vars, "2t": wrong}, static_vars=target.static_vars,
                              atmos_vars=target.atmos_vars, metadata=target.metadata)
    n_variables = len(task.variables.surf_vars) + len(task.variables.atmos_vars)
    assert float(task.loss(prediction, target)) == pytest.approx(1 / n_variables, rel=1e-4)
    with pytest.raises(ValueError, match="loss_scales"):
        ForecastingTask(trending_store, periods, loss_scales="nonsense", lead_steps=(1,))
