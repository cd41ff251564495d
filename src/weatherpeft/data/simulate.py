"""Regenerate the built-in world: a SPEEDY-physics GCM run (``jcm``) stored like WeatherBench2.

One truth run at T42L8 (30-min step, from rest, seasons from date-aware forcing) is spun
up, then sampled 6-hourly: its first years form the *pretraining* archive, the year after
them the *downstream* archive (global 5.625°) and the *regional* archive (2.8125°, a
China-like box). An imperfect forecast model (T21L8) started from perturbed truth states
gives a 10-member *ensemble* in WeatherBench2's forecast layout.

How each variable is derived from the model (documented in the README data card):
- atmospheric fields: sigma-level state interpolated linearly in log-pressure to the
  target pressure levels (linear extrapolation below the surface / above the model top);
- 2m_temperature, 10m winds: SPEEDY's near-surface diagnostics (``t0``, ``u0``, ``v0``,
  extrapolated from the lowest sigma level), instantaneous;
- mean_sea_level_pressure: surface pressure reduced hypsometrically with a 6.5 K/km lapse
  rate from the near-surface temperature;
- total_precipitation_6hr: large-scale + convective precipitation averaged over the 6 h
  before each time (exact accumulation), in metres of water like ERA5;
- land_sea_mask, geopotential_at_surface: the model's boundary conditions.
Everything is regridded conservatively from the Gaussian grid.

Requires the optional extra ``weatherpeft[simulate]`` (jcm, JAX).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import xarray as xr

from weatherpeft.atomic import write_json
from weatherpeft.data import archive, manifest, realism
from weatherpeft.data.grids import Grid, conservative_regridder, crop_indices, equiangular_grid, gaussian_grid
from weatherpeft.data.stats import compute_stats
from weatherpeft.data.wb2 import SampleSpec

log = logging.getLogger(__name__)

GRAVITY = 9.80665
R_DRY = 287.05
LAPSE_RATE = 0.0065
P0_HPA = 1000.0  # jcm's normalized_surface_pressure is relative to 1000 hPa
SECONDS_6H = 6 * 3600
NORMALISATION_NAME = "normalisation.json"

SURFACE_VARIABLES = (
    "2m_temperature",
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "mean_sea_level_pressure",
    "total_precipitation_6hr",
)
ATMOSPHERIC_VARIABLES = ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind",
                         "specific_humidity")
STATIC_VARIABLES = ("land_sea_mask", "geopotential_at_surface")
_STATE_FIELDS = {
    "geopotential": "geopotential",
    "temperature": "temperature",
    "u_component_of_wind": "u_wind",
    "v_component_of_wind": "v_wind",
    "specific_humidity": "specific_humidity",
}
#: Fields of jcm's PhysicsState that make up an atmospheric state.
_STATE_NAMES = ("u_wind", "v_wind", "temperature", "specific_humidity", "geopotential", "normalized_surface_pressure")
# jcm diagnostics sampled instantaneously at the end of each 6-h interval.
_NEAR_SURFACE = {
    "2m_temperature": "_surface_flux.t0",
    "10m_u_component_of_wind": "surface_exchange.wind_u",
    "10m_v_component_of_wind": "surface_exchange.wind_v",
}


@dataclass
class SimulationConfig:
    """Everything that determines the built-in world; recorded in the manifest."""

    out: Path = Path("data/builtin")
    pretraining_out: Path = Path("data/pretraining")
    seed: int = 0
    truncation: int = 42
    layers: int = 8
    time_step_minutes: int = 30
    spinup_days: int = 122
    archive_start: str = "2000-01-01"
    pretraining_days: int = 1096  # 2000-2002
    downstream_days: int = 365  # 2003
    levels: tuple[int, ...] = (500, 850)
    grid: tuple[int, int] = (64, 32)
    regional_grid: tuple[int, int] = (128, 64)
    region_lat: tuple[float, float] = (0.0, 60.0)
    region_lon: tuple[float, float] = (70.0, 130.0)
    region_multiple: int = 4  # crop the box to a multiple of Aurora's patch size
    regional_levels: tuple[int, ...] = (500, 850)
    ensemble_truncation: int = 21
    ensemble_members: int = 10
    ensemble_init_every_hours: int = 54
    ensemble_leads_hours: tuple[int, ...] = (48,)
    ensemble_surface: tuple[str, ...] = ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind")
    ensemble_atmospheric: tuple[str, ...] = ("geopotential", "temperature")
    ensemble_levels: tuple[int, ...] = (500, 850)
    perturbation_scale: float = 0.3
    perturbation_window: int = 10  # perturbations from init pairs within ± this many inits

    def run_start(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.archive_start) - dt.timedelta(days=self.spinup_days)

    def downstream_start(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.archive_start) + dt.timedelta(days=self.pretraining_days)


def _import_jcm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import jax
        import jax.numpy as jnp
        import jax_datetime as jdt
        from jcm.forcing import ForcingData
        from jcm.model import Model
        from jcm.physics.speedy.speedy_coords import get_speedy_coords
        from jcm.physics.speedy.speedy_terms import speedy_physics
        from jcm.terrain import TerrainData
    except ImportError as error:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "regenerating the built-in world needs the optional extra: pip install 'weatherpeft[simulate]'"
        ) from error
    return dict(jax=jax, jnp=jnp, jdt=jdt, ForcingData=ForcingData, Model=Model, get_speedy_coords=get_speedy_coords,
                speedy_physics=speedy_physics, TerrainData=TerrainData)


def _boundary_data_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("jcm.data.bc") / "t63"))


class _SpeedyModel:
    """A jcm SPEEDY model at one truncation with its forcing, terrain and grid."""

    def __init__(self, cfg: SimulationConfig, truncation: int, start: dt.datetime):
        self.jcm = _import_jcm()
        bc = _boundary_data_dir()
        coords = self.jcm["get_speedy_coords"](layers=cfg.layers, spectral_truncation=truncation)
        self.terrain = self.jcm["TerrainData"].from_file(str(bc / "terrain.nc"), coords=coords)
        self.forcing = self.jcm["ForcingData"].from_file(str(bc / "forcing.nc"), coords=coords, align_mode="wrap_year")
        self.model = self.jcm["Model"](coords=coords, terrain=self.terrain, physics=self.jcm["speedy_physics"](),
                                       time_step=cfg.time_step_minutes, start_time=start.isoformat())
        n_lon, n_lat = coords.horizontal.nodal_shape
        self.grid = gaussian_grid(n_lon, n_lat)
        self.sigma = np.asarray(coords.vertical.centers, dtype=np.float64)
        self.surface_geopotential = np.asarray(self.terrain.phis0, dtype=np.float64)
        self.land_fraction = np.asarray(self.terrain.fmask, dtype=np.float64)

    def datetime(self, when: dt.datetime):
        return self.jcm["jdt"].to_datetime(when.isoformat())


def pressure_level_fields(state: dict[str, np.ndarray], sigma: np.ndarray, surface_pressure_pa: np.ndarray,
                          levels_hpa: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Interpolate (sigma, lon, lat) fields to pressure levels, linearly in log p.

    Outside the model's sigma range (below ground, above the top level) the nearest
    segment is extrapolated linearly, as ERA5 does below the surface.
    """
    log_sigma = np.log(sigma)  # ascending (top to bottom)
    target = np.log(np.asarray(levels_hpa, dtype=np.float64)[:, None, None] * 100.0 / surface_pressure_pa[None])
    upper = np.clip(np.searchsorted(log_sigma, target), 1, len(sigma) - 1)
    lower = upper - 1
    weight = (target - log_sigma[lower]) / (log_sigma[upper] - log_sigma[lower])
    out = {}
    for name, values in state.items():
        lo = np.take_along_axis(values, lower, axis=0)
        hi = np.take_along_axis(values, upper, axis=0)
        out[name] = lo + weight * (hi - lo)
    return out


def mean_sea_level_pressure(surface_pressure_pa: np.ndarray, surface_geopotential: np.ndarray,
                            near_surface_temperature: np.ndarray) -> np.ndarray:
    """Hypsometric reduction to sea level with a standard lapse rate below the surface."""
    height = surface_geopotential / GRAVITY
    mean_temperature = near_surface_temperature + 0.5 * LAPSE_RATE * height
    return surface_pressure_pa * np.exp(surface_geopotential / (R_DRY * mean_temperature))


def _native_fields(physics_state, diagnostics: dict[str, np.ndarray], precip_rate: np.ndarray | None,
                   model: _SpeedyModel, levels: tuple[int, ...]) -> dict[str, np.ndarray]:
    """WB2 variables on the model's Gaussian grid from a jcm state and diagnostics."""
    surface_pressure = np.asarray(physics_state.normalized_surface_pressure, dtype=np.float64) * P0_HPA * 100.0
    state = {wb2: np.asarray(getattr(physics_state, jcm_name), dtype=np.float64)
             for wb2, jcm_name in _STATE_FIELDS.items()}
    fields = pressure_level_fields(state, model.sigma, surface_pressure, levels)
    for wb2 in _NEAR_SURFACE:
        fields[wb2] = np.asarray(diagnostics[wb2], dtype=np.float64)
    fields["specific_humidity"] = np.clip(fields["specific_humidity"], 0.0, None)  # spectral undershoots
    fields["mean_sea_level_pressure"] = mean_sea_level_pressure(
        surface_pressure, model.surface_geopotential, fields["2m_temperature"])
    if precip_rate is not None:
        # g m-2 s-1 averaged over 6 h -> metres of water accumulated over 6 h.
        fields["total_precipitation_6hr"] = np.clip(precip_rate, 0.0, None) * 1e-3 * SECONDS_6H / 1000.0
    return fields


class _ArchiveBuffer:
    """Collects time steps of regridded fields and writes them as a WB2-layout store."""

    def __init__(self, grid: Grid, levels: tuple[int, ...], surface: tuple[str, ...], atmospheric: tuple[str, ...],
                 lon_index: np.ndarray | None = None, lat_index: np.ndarray | None = None):
        self.grid, self.levels, self.surface, self.atmospheric = grid, levels, surface, atmospheric
        self.lon_index, self.lat_index = lon_index, lat_index
        self.times: list[dt.datetime] = []
        self.values: dict[str, list[np.ndarray]] = {name: [] for name in surface + atmospheric}

    def _crop(self, values: np.ndarray) -> np.ndarray:
        if self.lon_index is not None:
            values = values[..., self.lon_index, :][..., self.lat_index]
        return values

    def add(self, when: dt.datetime, regridded: dict[str, np.ndarray], all_levels: tuple[int, ...]):
        self.times.append(when)
        level_index = [all_levels.index(level) for level in self.levels]
        for name in self.surface:
            self.values[name].append(self._crop(regridded[name]).astype(np.float32))
        for name in self.atmospheric:
            self.values[name].append(self._crop(regridded[name][level_index]).astype(np.float32))

    def dataset(self, statics: dict[str, np.ndarray], attrs: dict) -> xr.Dataset:
        lon = self.grid.lon if self.lon_index is None else self.grid.lon[self.lon_index]
        lat = self.grid.lat if self.lat_index is None else self.grid.lat[self.lat_index]
        coords = {"time": np.array(self.times, dtype="datetime64[ns]"), "level": np.array(self.levels, dtype=np.int64),
                  "longitude": lon, "latitude": lat}
        data = {}
        for name in self.surface:
            data[name] = (("time", "longitude", "latitude"), np.stack(self.values[name]))
        for name in self.atmospheric:
            data[name] = (("time", "level", "longitude", "latitude"), np.stack(self.values[name]))
        for name, values in statics.items():
            data[name] = (("longitude", "latitude"), self._crop(values).astype(np.float32))
        ds = xr.Dataset(data, coords=coords, attrs=attrs)
        return archive.annotate(ds)

    def clear(self):
        self.times.clear()
        for values in self.values.values():
            values.clear()


def _run_truth(cfg: SimulationConfig, on_downstream_state) -> dict:
    """Integrate the truth run; write pretraining, downstream and regional archives."""
    truth = _SpeedyModel(cfg, cfg.truncation, cfg.run_start())
    model = truth.model
    to_physics_state = truth.jcm["jax"].jit(model.dycore.to_physics_state)  # eager JAX is slow op by op
    grid = equiangular_grid(*cfg.grid)
    regional_grid = equiangular_grid(*cfg.regional_grid)
    to_global = conservative_regridder(truth.grid, grid)
    to_regional = conservative_regridder(truth.grid, regional_grid)
    lon_index = crop_indices(regional_grid.lon, *cfg.region_lon)
    lat_index = crop_indices(regional_grid.lat, *cfg.region_lat)
    lon_index = lon_index[: len(lon_index) // cfg.region_multiple * cfg.region_multiple]
    lat_index = lat_index[: len(lat_index) // cfg.region_multiple * cfg.region_multiple]

    statics_native = {"land_sea_mask": truth.land_fraction, "geopotential_at_surface": truth.surface_geopotential}
    statics = {k: to_global(v) for k, v in statics_native.items()}
    regional_statics = {k: to_regional(v) for k, v in statics_native.items()}
    attrs = {"source": f"weatherpeft built-in world: jcm SPEEDY physics, T{cfg.truncation}L{cfg.layers}"}

    timings = {}
    start = time.perf_counter()
    model.bootstrap_state(model.initial_state(random_seed=cfg.seed))
    model.resume(forcing=truth.forcing, save_interval=cfg.spinup_days, total_time=cfg.spinup_days)
    timings["spinup_seconds"] = time.perf_counter() - start
    log.info("spin-up of %d days done in %.0f s", cfg.spinup_days, timings["spinup_seconds"])

    all_levels = tuple(sorted(set(cfg.levels) | set(cfg.regional_levels) | set(cfg.ensemble_levels)))
    pretraining = _ArchiveBuffer(grid, cfg.levels, SURFACE_VARIABLES, ATMOSPHERIC_VARIABLES)
    downstream = _ArchiveBuffer(grid, cfg.levels, SURFACE_VARIABLES, ATMOSPHERIC_VARIABLES)
    regional = _ArchiveBuffer(regional_grid, cfg.regional_levels, SURFACE_VARIABLES, ATMOSPHERIC_VARIABLES,
                              lon_index=lon_index, lat_index=lat_index)
    chunk = dict(forcing=truth.forcing, save_interval=0.25, total_time=0.25, output_averages=True,
                 snapshot_interval=0.25, snapshot_variables=tuple(_NEAR_SURFACE.values()))
    archive_start = dt.datetime.fromisoformat(cfg.archive_start)
    downstream_start = cfg.downstream_start()
    n_steps = (cfg.pretraining_days + cfg.downstream_days) * 4 - 1  # downstream ends at 18 UTC of its last day
    pretraining_path = Path(cfg.pretraining_out) / "pretraining.zarr"
    shutil.rmtree(pretraining_path, ignore_errors=True)
    start = time.perf_counter()
    for step in range(1, n_steps + 1):
        predictions = model.resume(**chunk)
        when = archive_start + dt.timedelta(hours=6 * step)
        physics_state = to_physics_state(model.dycore_state)
        snaps = predictions.snapshots
        # one frame with one snapshot at its end; jcm returns it as (1, lon, lat)
        diagnostics = {wb2: np.asarray(snaps[key]).reshape((-1,) + truth.grid.shape)[-1]
                       for wb2, key in _NEAR_SURFACE.items()}
        precip = (np.asarray(predictions.physics["_condensation"].precls)
                  + np.asarray(predictions.physics["_convection"].precnv))[0]
        native = _native_fields(physics_state, diagnostics, precip, truth, all_levels)
        if when < downstream_start:
            if pretraining.times and when.year != pretraining.times[0].year:
                archive.append(pretraining.dataset(statics, attrs), pretraining_path)  # a year at a time
                pretraining.clear()
            pretraining.add(when, {k: to_global(v) for k, v in native.items()}, all_levels)
        else:
            downstream.add(when, {k: to_global(v) for k, v in native.items()}, all_levels)
            regional.add(when, {k: to_regional(v) for k, v in native.items()}, all_levels)
            on_downstream_state(when, physics_state)
        if step % 400 == 0:
            log.info("truth run at %s (%.0f s)", when.isoformat(), time.perf_counter() - start)
    if pretraining.times:
        archive.append(pretraining.dataset(statics, attrs), pretraining_path)
    timings["truth_run_seconds"] = time.perf_counter() - start
    _write_committed(cfg, downstream.dataset(statics, attrs), "downstream.zarr")
    _write_committed(cfg, regional.dataset(regional_statics, attrs), "regional.zarr")
    return timings


def _write_committed(cfg: SimulationConfig, ds: xr.Dataset, name: str) -> None:
    """Write a committed store packed, plus an unpacked float32 copy beside the pretraining archive.

    The float32 copy lets the committed stores be repacked at another precision
    (:func:`weatherpeft.data.archive.repack`) without rerunning the simulation.
    """
    archive.write(ds, Path(cfg.pretraining_out) / "float32" / name, pack=False)
    archive.write(ds, Path(cfg.out) / name)


class _Ensemble:
    """Collects truth states at init times, then runs the imperfect-model ensemble."""

    def __init__(self, cfg: SimulationConfig):
        self.cfg = cfg
        self.model = _SpeedyModel(cfg, cfg.ensemble_truncation, cfg.downstream_start())
        self.inits: list[tuple[dt.datetime, object]] = []
        self._truth_to_ensemble = None

    def maybe_collect(self, when: dt.datetime, truth_state, truth_grid: Grid):
        cfg = self.cfg
        hours = (when - cfg.downstream_start()).total_seconds() / 3600
        # the last downstream (truth) time is 18 UTC of the last day: every forecast must verify
        last_truth = cfg.downstream_start() + dt.timedelta(days=cfg.downstream_days, hours=-6)
        last_lead = dt.timedelta(hours=max(cfg.ensemble_leads_hours))
        if hours % cfg.ensemble_init_every_hours or when + last_lead > last_truth:
            return
        if self._truth_to_ensemble is None:
            self._truth_to_ensemble = conservative_regridder(truth_grid, self.model.grid)
        regrid = self._truth_to_ensemble
        fields = {name: regrid(np.asarray(getattr(truth_state, name), dtype=np.float64)) for name in _STATE_NAMES}
        self.inits.append((when, fields))

    def _perturbations(self, init_number: int) -> list[tuple[int, float]]:
        """(index j, sign) per member: the perturbation is sign·(X[j+1] − X[j]) of the truth inits.

        Differences of consecutive init states (one init interval apart) are balanced,
        synoptic-scale structures of the atmosphere itself (white noise would be damped
        within hours); drawing j within ±``perturbation_window`` inits keeps them in the
        same season, so they carry no seasonal-cycle signal.
        """
        cfg = self.cfg
        if len(self.inits) < 2:
            raise ValueError("the ensemble needs at least 2 init times to build perturbations; "
                             "lengthen downstream_days or shorten ensemble_init_every_hours")
        low = max(0, init_number - cfg.perturbation_window)
        high = min(len(self.inits) - 2, init_number + cfg.perturbation_window)
        candidates = np.arange(low, high + 1)
        rng = np.random.default_rng([cfg.seed, init_number])
        replace = len(candidates) < cfg.ensemble_members
        chosen = rng.choice(candidates, size=cfg.ensemble_members, replace=replace)
        signs = rng.choice([-1.0, 1.0], size=cfg.ensemble_members)
        return list(zip(chosen.tolist(), signs.tolist()))

    def _perturbed_state(self, fields: dict, index: int, sign: float, physics_state_cls, jnp):
        """The truth state plus ``perturbation_scale``·sign·(X[index+1] − X[index])."""
        a, b = self.inits[index + 1][1], self.inits[index][1]
        scale = sign * self.cfg.perturbation_scale
        perturbed = {name: fields[name] + scale * (a[name] - b[name]) for name in fields}
        perturbed["specific_humidity"] = np.clip(perturbed["specific_humidity"], 0.0, None)
        return physics_state_cls(**{name: jnp.asarray(value, dtype=jnp.float32) for name, value in perturbed.items()})

    def run(self, truth_levels_out: Grid) -> xr.Dataset:
        cfg, ens = self.cfg, self.model
        jnp = ens.jcm["jnp"]
        from jcm.physics_interface import PhysicsState

        to_global = conservative_regridder(ens.grid, truth_levels_out)
        save_days = min(cfg.ensemble_leads_hours) / 24
        total_days = max(cfg.ensemble_leads_hours) / 24
        lead_index = [round(h / 24 / save_days) - 1 for h in cfg.ensemble_leads_hours]
        members = {name: [] for name in cfg.ensemble_surface + cfg.ensemble_atmospheric}
        for init_number, (when, fields) in enumerate(self.inits):
            per_member = {name: [] for name in members}
            for index, sign in self._perturbations(init_number):
                state = self._perturbed_state(fields, index, sign, PhysicsState, jnp)
                _, predictions = ens.model.run_from_state_with_carry(
                    ens.model.initial_state(state), forcing=ens.forcing, save_interval=save_days,
                    total_time=total_days, output_averages=False,
                    initial_physics_state=ens.model.initial_physics_carry(),
                    initial_time=ens.datetime(when), initial_step=jnp.int32(0))
                dyn, diag = predictions.dynamics, predictions.physics
                for lead in lead_index:
                    frame = SimpleNamespace(**{k: np.asarray(getattr(dyn, k))[lead] for k in _STATE_NAMES})
                    near = {"2m_temperature": np.asarray(diag["_surface_flux"].t0)[lead],
                            "10m_u_component_of_wind": np.asarray(diag["surface_exchange"].wind_u)[lead],
                            "10m_v_component_of_wind": np.asarray(diag["surface_exchange"].wind_v)[lead]}
                    native = _native_fields(frame, near, None, ens, cfg.ensemble_levels)
                    for name in per_member:
                        per_member[name].append(to_global(native[name]).astype(np.float32))
            for name in members:
                stacked = np.stack(per_member[name])  # (member*lead, ...)
                members[name].append(stacked.reshape((cfg.ensemble_members, len(lead_index)) + stacked.shape[1:]))
            if init_number % 20 == 0:
                log.info("ensemble init %d/%d (%s)", init_number + 1, len(self.inits), when.isoformat())
        coords = {"time": np.array([w for w, _ in self.inits], dtype="datetime64[ns]"),
                  "prediction_timedelta": np.array([np.timedelta64(h, "h") for h in cfg.ensemble_leads_hours],
                                                   dtype="timedelta64[ns]"),
                  "number": np.arange(cfg.ensemble_members), "level": np.array(cfg.ensemble_levels, dtype=np.int64),
                  "longitude": truth_levels_out.lon, "latitude": truth_levels_out.lat}
        data = {}
        for name in cfg.ensemble_surface:
            arr = np.stack(members[name]).transpose(0, 2, 1, 3, 4)  # time, lead, member, lon, lat
            data[name] = (("time", "prediction_timedelta", "number", "longitude", "latitude"), arr)
        for name in cfg.ensemble_atmospheric:
            arr = np.stack(members[name]).transpose(0, 2, 1, 3, 4, 5)
            data[name] = (("time", "prediction_timedelta", "number", "level", "longitude", "latitude"), arr)
        attrs = {"source": f"weatherpeft built-in world: {cfg.ensemble_members}-member "
                           f"T{cfg.ensemble_truncation}L{cfg.layers} ensemble from perturbed "
                           f"T{cfg.truncation} truth states"}
        return archive.annotate(xr.Dataset(data, coords=coords, attrs=attrs))


def generate(cfg: SimulationConfig) -> dict:
    """Run the whole generation; returns the timings. Writes stores, statistics, card and manifest."""
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    ensemble = _Ensemble(cfg)
    truth_grid = gaussian_grid(*_truth_shape(cfg))
    timings = _run_truth(cfg, lambda when, state: ensemble.maybe_collect(when, state, truth_grid))
    start = time.perf_counter()
    _write_committed(cfg, ensemble.run(equiangular_grid(*cfg.grid)), "ensemble.zarr")
    timings["ensemble_seconds"] = time.perf_counter() - start
    finalise(cfg, timings)
    return timings


def finalise(cfg: SimulationConfig, timings: dict | None = None) -> None:
    """Normalisation statistics from the pretraining years, the data card, then the manifest."""
    out = Path(cfg.out)
    # the archive's first time closes the first 6-h interval after archive_start (see _run_truth)
    first = dt.datetime.fromisoformat(cfg.archive_start) + dt.timedelta(hours=6)
    spec = SampleSpec(surf_vars=SURFACE_VARIABLES, atmos_vars=ATMOSPHERIC_VARIABLES, static_vars=STATIC_VARIABLES,
                      levels=cfg.levels, start=first, end=cfg.downstream_start() - dt.timedelta(hours=6))
    stats = compute_stats(Path(cfg.pretraining_out) / "pretraining.zarr", spec)
    stats.source = "pretraining.zarr"  # a path relative to nothing machine-specific, so the file is reproducible
    stats.save(out / NORMALISATION_NAME)
    write_data_card(out)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
              if k not in ("out", "pretraining_out")}
    manifest.write_manifest(out, config=config)
    if timings is not None:
        write_json(out / "generation_log.json", {"timings_seconds": timings, "config": config})


def write_data_card(out: Path) -> dict:
    """Measure the realism numbers on the stores in ``out`` and write ``data_card.json``."""
    downstream = xr.open_zarr(Path(out) / "downstream.zarr").load()
    card = {"downstream": realism.world_card(downstream)}
    ensemble_path = Path(out) / "ensemble.zarr"
    if ensemble_path.exists():
        card["ensemble"] = realism.ensemble_card(xr.open_zarr(ensemble_path).load(), downstream)
    write_json(Path(out) / "data_card.json", card)
    return card


def _truth_shape(cfg: SimulationConfig) -> tuple[int, int]:
    coords = _import_jcm()["get_speedy_coords"](layers=cfg.layers, spectral_truncation=cfg.truncation)
    return tuple(coords.horizontal.nodal_shape)
