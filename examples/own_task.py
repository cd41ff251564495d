"""Your own task: 2 m temperature ``lead_hours`` ahead on your own store, fine-tuned by the CLI.

The task lives outside the package. It reads any store the readers understand (WeatherBench2
zarr, ERA5 netCDF, GRIB) with :class:`~weatherpeft.data.wb2.WB2Dataset`, trains on a
latitude-weighted MSE of normalised 2 m temperature, and scores the RMSE of the model and of
persistence with the public helpers of :mod:`weatherpeft.tasks.scoring`. Registering it with
:func:`weatherpeft.tasks.register_task` makes ``finetune`` and ``evaluate`` take
``--task t2m-ahead`` in this process; an entry point in the group ``weatherpeft.tasks`` of
your package's pyproject.toml makes it known everywhere (the benchmark's worker processes too)::

    [project.entry-points."weatherpeft.tasks"]
    t2m-ahead = "own_task:build"

Run it (any weatherpeft command line after the script's name; the default data: the built-in
downstream year)::

    python examples/own_task.py finetune --task t2m-ahead --method lora --steps 50 \\
        --task-options '{"lead_hours": 12}' --out-dir runs/own
    python examples/own_task.py evaluate --adapter runs/own/adapter
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from datetime import timedelta

import torch
from aurora import Batch
from torch.utils.data import Dataset

from weatherpeft.data.stats import NormalisationStats, compute_stats
from weatherpeft.data.wb2 import SampleSpec, WB2Dataset
from weatherpeft.metrics import latitude_weights, spatial_mse
from weatherpeft.tasks import SPLITS, Task, TaskVariables, register_task
from weatherpeft.tasks.grid import PatchGrid
from weatherpeft.tasks.scoring import accumulate, channel_values, match_rows, module_device

TARGET = "2t"


class TemperatureAhead(Task):
    """Predict the whole state ``lead`` ahead from two times; trained and scored on 2t alone."""

    name = "t2m-ahead"

    def __init__(self, store, periods: dict[str, tuple[str, str]], stats: NormalisationStats | None,
                 lead: timedelta, grid: PatchGrid | None):
        self.store, self.periods = store, periods
        self.spec = SampleSpec(history=2, lead=lead)  # Aurora's default variables and levels
        train = WB2Dataset(store, dataclasses.replace(self.spec, start=periods["train"][0],
                                                      end=periods["train"][1]))
        selection = train.selection
        if grid is not None:
            grid.check(len(selection.lat), len(selection.lon), f"store {train.source}")
        self._variables = TaskVariables.from_selection(selection)
        # The backbone's statistics (every variable here is pretrained); else measured.
        self.stats = stats if stats is not None else compute_stats(store, train.spec)
        self._datasets = {"train": train}

    @property
    def variables(self) -> TaskVariables:
        return self._variables

    def datasets(self) -> dict[str, Dataset]:
        for split in SPLITS:
            if split not in self._datasets:
                start, end = self.periods[split]
                self._datasets[split] = WB2Dataset(
                    self.store, dataclasses.replace(self.spec, start=start, end=end))
        return self._datasets

    def loss(self, prediction: Batch, target: Batch) -> torch.Tensor:
        prediction, target = match_rows(prediction, target)  # Aurora may drop a pole row
        predicted = prediction.surf_vars[TARGET].float()
        error = (predicted - target.surf_vars[TARGET].to(predicted.device).float()) \
            / self.stats.scales[TARGET]
        weights = latitude_weights(target.metadata.lat).to(predicted)[:, None]
        return (error.square() * weights).mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Iterable) -> dict[str, float]:
        """Latitude-weighted RMSE of 2t for the model and persistence (kelvin)."""
        device = module_device(model)
        sums: dict = {}
        count = 0
        for inputs, target in loader:
            inputs = inputs.to(device)
            persistence = dataclasses.replace(
                inputs, surf_vars={k: v[:, -1:] for k, v in inputs.surf_vars.items()})
            for source, forecast in (("model", model(inputs)), ("persistence", persistence)):
                forecast, truth = match_rows(forecast, target.to(device))
                accumulate(sums, source, spatial_mse(forecast.surf_vars[TARGET][:, -1].float(),
                                                     truth.surf_vars[TARGET][:, -1].float(),
                                                     truth.metadata.lat))
            count += inputs.surf_vars[TARGET].shape[0]
        return {f"{source}/rmse/{channel}": value for source, total in sums.items()
                for channel, value in channel_values(TARGET, torch.sqrt(total / count), ())}


def build(data: str, stats: NormalisationStats | None, *, grid: PatchGrid | None,
          periods: dict[str, tuple[str, str]] | None = None, lead_hours: int = 6) -> Task:
    """2 m temperature lead_hours ahead (data: any store; default the built-in downstream year)."""
    from weatherpeft.data.builtin import store_path

    periods = periods or {"train": ("2003-01-01", "2003-09-30T18:00"),
                          "val": ("2003-10-01", "2003-11-30T18:00"),
                          "test": ("2003-12-01", "2003-12-31T18:00")}
    if lead_hours <= 0 or lead_hours % 6:
        raise ValueError(f"lead_hours must be a positive multiple of 6, got {lead_hours}")
    return TemperatureAhead(data or store_path("downstream"), periods, stats,
                            timedelta(hours=lead_hours), grid)


if __name__ == "__main__":
    from weatherpeft.cli import main

    register_task("t2m-ahead", build, replace=True)
    sys.exit(main(sys.argv[1:]))
