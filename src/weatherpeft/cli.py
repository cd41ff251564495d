"""The ``weatherpeft`` command line: ``data generate|check|info|card`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np

from weatherpeft.config import add_dataclass_arguments, build_config

log = logging.getLogger("weatherpeft")


def _forecast_layout(ds) -> bool:
    return "prediction_timedelta" in ds.dims or "number" in ds.dims


def _spec_for_store(ds):
    """A SampleSpec covering every variable of a canonical analysis store."""
    from weatherpeft.data.wb2 import SampleSpec

    surface = tuple(n for n, v in ds.data_vars.items() if "time" in v.dims and "level" not in v.dims)
    atmospheric = tuple(n for n, v in ds.data_vars.items() if "level" in v.dims)
    static = tuple(n for n, v in ds.data_vars.items() if "time" not in v.dims)
    return SampleSpec(surf_vars=surface, atmos_vars=atmospheric, static_vars=static, history=1,
                      lead=timedelta(0), in_memory=False)


def _check_forecast_store(ds, path: Path) -> str:
    for name, variable in ds.data_vars.items():
        for index in range(ds.sizes["time"]):
            values = variable.isel(time=index).values
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{path}: NaN/inf in '{name}' at init {str(ds.time.values[index])[:16]}")
    return f"{ds.sizes['time']} inits, {ds.sizes.get('number', 1)} members, all finite"


def check_store(path: Path) -> str:
    """Validate one store (layout, coordinates, finite values); returns a one-line summary."""
    from weatherpeft.data import wb2

    ds = wb2.open_store(path)
    if _forecast_layout(ds):
        return _check_forecast_store(ds, path)
    report = wb2.validate(ds, _spec_for_store(ds))
    return f"{report.n_times} times {str(report.first)[:16]} … {str(report.last)[:16]}, step {report.step}, all finite"


def cmd_data_check(args) -> int:
    from weatherpeft.data import manifest

    path = Path(args.path)
    if (path / manifest.MANIFEST_NAME).is_file():
        problems = manifest.verify_manifest(path)
        if problems:
            for problem in problems:
                print(f"manifest: {problem}")
            return 1
        print(f"manifest: {len(json.loads((path / manifest.MANIFEST_NAME).read_text())['files'])} files match")
        stores = sorted(p for p in path.iterdir() if p.suffix == ".zarr")
    else:
        stores = [path]
    for store in stores:
        print(f"{store.name}: {check_store(store)}")
    return 0


def describe_store(path: Path) -> str:
    """Variables, levels, grid and time range of a store, a few lines."""
    from weatherpeft.data import wb2

    ds = wb2.open_store(path)
    lines = [f"{path}"]
    if "time" in ds.dims:
        lines.append(f"  time: {ds.sizes['time']} × {str(ds.time.values[0])[:16]} … {str(ds.time.values[-1])[:16]}")
    if "level" in ds.dims:
        lines.append(f"  level (hPa): {[int(v) for v in ds.level.values]}")
    lat, lon = ds.latitude.values, ds.longitude.values
    lines.append(f"  grid: {len(lon)}×{len(lat)} lon×lat, lat {lat[0]:.4g}…{lat[-1]:.4g}, lon {lon[0]:.4g}…{lon[-1]:.4g}")
    for dim in ("prediction_timedelta", "number"):
        if dim in ds.dims:
            lines.append(f"  {dim}: {ds.sizes[dim]}")
    lines.append("  variables: " + ", ".join(sorted(ds.data_vars)))
    return "\n".join(lines)


def cmd_data_info(args) -> int:
    print(describe_store(Path(args.path)))
    return 0


def cmd_data_generate(args) -> int:
    from weatherpeft.data.simulate import SimulationConfig, generate

    cfg = build_config(SimulationConfig, args)
    timings = generate(cfg)
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return 0


def cmd_data_card(args) -> int:
    from weatherpeft.data.builtin import builtin_dir
    from weatherpeft.data.simulate import write_data_card

    card = write_data_card(Path(args.path) if args.path else builtin_dir())
    print(json.dumps(card, indent=1))
    return 0


def cmd_demo(args) -> int:
    """Load the built-in world, check it, read a sample, and print a short summary."""
    from weatherpeft.data import builtin, manifest, wb2
    from weatherpeft.data.stats import NormalisationStats

    root = builtin.builtin_dir()
    problems = manifest.verify_manifest(root)
    if problems:
        print("built-in world does not match its manifest:\n  " + "\n  ".join(problems))
        return 1
    content = json.loads((root / manifest.MANIFEST_NAME).read_text())
    print(f"built-in world at {root}: {len(content['files'])} files, "
          f"{content['total_bytes'] / 2**20:.1f} MiB, checksums verified")
    for name in builtin.STORES:
        print(describe_store(builtin.store_path(name)))
    stats = NormalisationStats.load(root / "normalisation.json")
    dataset = wb2.WB2Dataset(builtin.store_path("downstream"), wb2.SampleSpec(
        surf_vars=("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind",
                   "mean_sea_level_pressure", "total_precipitation_6hr")))
    inputs, target = wb2.collate_batches([dataset[0], dataset[len(dataset) // 2]])
    print(f"forecasting samples (2 inputs 6 h apart → +6 h): {len(dataset)}; a batch of 2:")
    for key, value in {**inputs.surf_vars, **inputs.atmos_vars}.items():
        location, scale = (stats.locations.get(key), stats.scales.get(key))
        norm = f", normalised by ({location:.4g}, {scale:.3g})" if location is not None else ""
        print(f"  {key:>4}: input {tuple(value.shape)}, target {tuple(target.surf_vars.get(key, target.atmos_vars.get(key)).shape)}{norm}")
    card_path = root / "data_card.json"
    if card_path.is_file():
        world = json.loads(card_path.read_text())["downstream"]
        print("realism (downstream year): " + ", ".join(
            f"{k} = {v:.3g}" for k, v in world.items() if isinstance(v, float) and
            k in ("global_mean_precipitation_mm_per_day", "dry_fraction_6h_below_0.1mm", "itcz_seasonal_shift_deg",
                  "t2m_global_mean_k", "jet_max_zonal_mean_u500_nh_ms")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from weatherpeft.data.simulate import SimulationConfig

    parser = argparse.ArgumentParser(prog="weatherpeft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="the built-in world and WeatherBench2-layout stores")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    generate = data_commands.add_parser(
        "generate", help="regenerate the built-in world with the jcm SPEEDY GCM (needs weatherpeft[simulate])",
        description="Spin up a T42L8 SPEEDY-physics run from rest, then sample it 6-hourly into a pretraining "
                    "archive (first years, not committed), a downstream archive (the next year, global 5.625°), "
                    "a regional 2.8125° archive and a T21 10-member ensemble, all in WeatherBench2's layout. "
                    "A reduced run for testing: --spinup-days 1 --pretraining-days 2 --downstream-days 3 "
                    "--truncation 21 --ensemble-members 2 --out /tmp/world --pretraining-out /tmp/world-pre")
    add_dataclass_arguments(generate, SimulationConfig)
    generate.set_defaults(func=cmd_data_generate)
    check = data_commands.add_parser("check", help="validate a store, or a folder with a manifest (checksums too)")
    check.add_argument("path", type=Path)
    check.set_defaults(func=cmd_data_check)
    info = data_commands.add_parser("info", help="describe a store: variables, levels, grid, times")
    info.add_argument("path", type=Path)
    info.set_defaults(func=cmd_data_info)
    card = data_commands.add_parser("card", help="measure the realism numbers of a world folder (data_card.json)")
    card.add_argument("path", type=Path, nargs="?", help="folder with downstream.zarr (default: built-in)")
    card.set_defaults(func=cmd_data_card)

    demo = commands.add_parser("demo", help="load the built-in world and print a summary")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"weatherpeft: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
