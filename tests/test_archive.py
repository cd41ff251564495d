"""Archive writer: int16 CF packing on disk, round-trip error bounds, atomic replace, append."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from weatherpeft.data import archive
from weatherpeft.data.archive import PACKING_PRECISION

INT16_STEPS = 65534


def make_dataset(n_times: int = 6, start: str = "2003-01-01", seed: int = 0) -> xr.Dataset:
    """A small WB2-layout dataset: surface, atmospheric and static variables, float32."""
    rng = np.random.default_rng(seed)
    n_lon, n_lat, levels = 8, 4, (500, 850)
    surf, atmos = (n_times, n_lon, n_lat), (n_times, len(levels), n_lon, n_lat)
    fields = {
        "2m_temperature": (("time", "longitude", "latitude"), 280 + 15 * rng.standard_normal(surf)),
        "mean_sea_level_pressure": (("time", "longitude", "latitude"), 101000 + 1500 * rng.standard_normal(surf)),
        "total_precipitation_6hr": (("time", "longitude", "latitude"), 2e-3 * rng.random(surf) ** 4),
        "geopotential": (("time", "level", "longitude", "latitude"),
                         np.array([55000.0, 14000.0])[None, :, None, None] + 800 * rng.standard_normal(atmos)),
        "specific_humidity": (("time", "level", "longitude", "latitude"), 1e-2 * rng.random(atmos) ** 2),
        "land_sea_mask": (("longitude", "latitude"), rng.random((n_lon, n_lat))),
    }
    data = {name: (dims, values.astype(np.float32)) for name, (dims, values) in fields.items()}
    coords = {"time": pd.date_range(start, periods=n_times, freq="6h"),
              "level": np.array(levels, dtype=np.int64),
              "longitude": np.arange(n_lon) * 45.0, "latitude": np.array([-67.5, -22.5, 22.5, 67.5])}
    return xr.Dataset(data, coords=coords)


def zarr_meta(store: Path, name: str) -> tuple[dict, dict]:
    """(.zarray, .zattrs) of one variable, read straight from disk."""
    return (json.loads((store / name / ".zarray").read_text()), json.loads((store / name / ".zattrs").read_text()))


def expected_step(name: str, values: np.ndarray) -> float:
    return max(PACKING_PRECISION[name], float(np.ptp(values.astype(np.float64))) / INT16_STEPS)


def test_packed_store_is_int16_on_disk_and_decodes_within_half_a_step(tmp_path):
    ds = make_dataset()
    path = archive.write(ds, tmp_path / "packed.zarr")
    assert path == tmp_path / "packed.zarr"
    assert (path / ".zmetadata").exists()  # consolidated, zarr format 2
    assert json.loads((path / ".zgroup").read_text())["zarr_format"] == 2
    decoded = xr.open_zarr(path, chunks=None).load()
    for name in ds.data_vars:
        zarray, zattrs = zarr_meta(path, name)
        assert np.dtype(zarray["dtype"]) == np.int16, name
        step = expected_step(name, ds[name].values)
        assert zattrs["scale_factor"] == pytest.approx(step, rel=1e-6), name
        original = ds[name].values.astype(np.float64)
        error = np.abs(decoded[name].values.astype(np.float64) - original)
        # half a step, plus float32 rounding of the stored scale/offset and of the original
        tolerance = step / 2 * (1 + 1e-5) + 4 * np.finfo(np.float32).eps * np.abs(original).max()
        assert error.max() <= tolerance, (name, error.max(), step)
        assert np.all(np.isfinite(decoded[name].values)), name  # nothing collided with the fill value
    # Quantisation really happened: temperature is not stored exactly.
    assert not np.array_equal(decoded["2m_temperature"].values, ds["2m_temperature"].values)


def test_huge_range_uses_the_finest_step_that_fits(tmp_path):
    rng = np.random.default_rng(3)
    ds = make_dataset()
    huge = rng.uniform(-5e6, 5e6, ds["geopotential"].shape)
    huge[0, 0, 0, 0], huge[0, 0, 0, 1] = -5e6, 5e6  # use the whole int16 range
    ds["geopotential"] = (ds["geopotential"].dims, huge.astype(np.float32))
    path = archive.write(ds, tmp_path / "huge.zarr")
    value_range = float(np.ptp(ds["geopotential"].values.astype(np.float64)))
    _, zattrs = zarr_meta(path, "geopotential")
    assert zattrs["scale_factor"] == pytest.approx(value_range / INT16_STEPS, rel=1e-6)
    assert zattrs["scale_factor"] > PACKING_PRECISION["geopotential"]
    decoded = xr.open_zarr(path, chunks=None)["geopotential"].values.astype(np.float64)
    error = np.abs(decoded - ds["geopotential"].values.astype(np.float64))
    assert np.all(np.isfinite(decoded))  # the extremes did not wrap to the fill value
    assert error.max() <= value_range / INT16_STEPS
    assert decoded.min() == pytest.approx(-5e6, abs=value_range / INT16_STEPS)
    assert decoded.max() == pytest.approx(5e6, abs=value_range / INT16_STEPS)


def test_zero_precipitation_stays_exactly_zero_and_nothing_decodes_negative(tmp_path):
    ds = make_dataset()
    rng = np.random.default_rng(5)
    # Dry almost everywhere, up to 1.0076 mm: with a mid-range offset, 0 would sit 0.76 of a
    # 5e-6 m step from a code and decode to about −1.2e-6 m.
    rain = np.where(rng.random(ds["total_precipitation_6hr"].shape) < 0.7, 0.0,
                    rng.uniform(0, 1.0076e-3, ds["total_precipitation_6hr"].shape))
    rain.flat[0] = 1.0076e-3
    ds["total_precipitation_6hr"] = (ds["total_precipitation_6hr"].dims, rain.astype(np.float32))
    ds["land_sea_mask"] = (ds["land_sea_mask"].dims, (rng.random(ds["land_sea_mask"].shape) > 0.5).astype(np.float32))
    path = archive.write(ds, tmp_path / "rain.zarr")
    decoded = xr.open_zarr(path, chunks=None).load()
    for name in ("total_precipitation_6hr", "specific_humidity", "land_sea_mask"):
        original = ds[name].values
        values = decoded[name].values
        assert values.min() >= 0.0, (name, values.min())
        np.testing.assert_array_equal(values[original == 0], 0.0)
        assert np.abs(values - original).max() <= expected_step(name, original) / 2 * (1 + 1e-5), name
    np.testing.assert_allclose(decoded["land_sea_mask"].values, ds["land_sea_mask"].values, rtol=0, atol=1e-6)


def test_unpacked_store_is_float32_and_exact(tmp_path):
    ds = make_dataset()
    path = archive.write(ds, tmp_path / "float.zarr", pack=False)
    zarray, zattrs = zarr_meta(path, "2m_temperature")
    assert np.dtype(zarray["dtype"]) == np.float32 and "scale_factor" not in zattrs
    decoded = xr.open_zarr(path, chunks=None).load()
    for name in ds.data_vars:
        np.testing.assert_array_equal(decoded[name].values, ds[name].values)


def test_all_nan_variable_is_refused_by_name(tmp_path):
    ds = make_dataset()
    ds["2m_temperature"] = ds["2m_temperature"] * np.nan
    with pytest.raises(ValueError, match="2m_temperature"):
        archive.write(ds, tmp_path / "bad.zarr")
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_an_existing_store(tmp_path):
    path = tmp_path / "store.zarr"
    archive.write(make_dataset(seed=0), path, pack=False)
    second = make_dataset(n_times=3, seed=1)
    archive.write(second, path, pack=False)
    decoded = xr.open_zarr(path, chunks=None).load()
    assert decoded.sizes["time"] == 3
    np.testing.assert_array_equal(decoded["2m_temperature"].values, second["2m_temperature"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]  # no .tmp / .old left


def test_failed_write_keeps_the_previous_store_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "store.zarr"
    first = make_dataset(seed=0)
    archive.write(first, path)
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    real_to_zarr = xr.Dataset.to_zarr
    calls = []

    def to_zarr_then_fail(self, store, *args, **kwargs):
        calls.append(Path(store))
        real_to_zarr(self, store, *args, **kwargs)  # the temporary store is (half-)written …
        raise OSError("disk full")  # … then the write fails

    monkeypatch.setattr(xr.Dataset, "to_zarr", to_zarr_then_fail)
    with pytest.raises(OSError, match="disk full"):
        archive.write(make_dataset(seed=1), path)
    monkeypatch.undo()

    assert calls and calls[0] != path  # it never wrote in place
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]
    decoded = xr.open_zarr(path, chunks=None).load()
    half_step = archive.PACKING_PRECISION["2m_temperature"] / 2
    assert np.abs(decoded["2m_temperature"].values - first["2m_temperature"].values).max() <= half_step * 1.01


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    real_to_zarr = xr.Dataset.to_zarr

    def to_zarr_then_fail(self, store, *args, **kwargs):
        real_to_zarr(self, store, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_zarr", to_zarr_then_fail)
    with pytest.raises(KeyboardInterrupt):
        archive.write(make_dataset(), tmp_path / "new.zarr")
    assert list(tmp_path.iterdir()) == []


def test_append_adds_time_steps_to_a_float32_store(tmp_path):
    path = tmp_path / "pretraining.zarr"
    first = make_dataset(n_times=3, start="1999-12-31T06:00", seed=0)
    second = make_dataset(n_times=4, start="2000-01-01T00:00", seed=1)
    archive.append(first, path)  # creates the store
    archive.append(second, path)
    store = xr.open_zarr(path, chunks=None).load()
    expected_times = pd.date_range("1999-12-31T06:00", periods=7, freq="6h")
    np.testing.assert_array_equal(store["time"].values, expected_times.values)
    for name in ("2m_temperature", "geopotential", "specific_humidity"):
        assert np.dtype(zarr_meta(path, name)[0]["dtype"]) == np.float32
        np.testing.assert_array_equal(store[name].values,
                                      np.concatenate([first[name].values, second[name].values]))
    # Static fields stay static (written once, no time axis).
    assert store["land_sea_mask"].dims == ("longitude", "latitude")
    np.testing.assert_array_equal(store["land_sea_mask"].values, first["land_sea_mask"].values)


def test_annotate_sets_cf_attributes():
    ds = make_dataset()
    ds["mystery"] = ds["2m_temperature"] * 2
    out = archive.annotate(ds)
    assert out["2m_temperature"].attrs == {"units": "K", "long_name": "2 metre temperature"}
    assert out["mean_sea_level_pressure"].attrs["units"] == "Pa"
    assert out["total_precipitation_6hr"].attrs["units"] == "m"
    assert out["geopotential"].attrs["units"] == "m**2 s**-2"
    assert out["specific_humidity"].attrs["units"] == "kg kg**-1"
    assert out["latitude"].attrs == {"units": "degrees_north", "long_name": "latitude"}
    assert out["longitude"].attrs["units"] == "degrees_east"
    assert out["level"].attrs["units"] == "hPa"
    assert "units" not in out["mystery"].attrs


def test_cf_attributes_survive_writing(tmp_path):
    path = archive.write(archive.annotate(make_dataset()), tmp_path / "s.zarr")
    decoded = xr.open_zarr(path, chunks=None)
    assert decoded["2m_temperature"].attrs["units"] == "K"
    assert decoded["level"].attrs["units"] == "hPa"
    assert decoded["latitude"].attrs["units"] == "degrees_north"
