"""The WeatherBench2-layout reader: layout, alignment, equivalence of store variants, errors."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest
import torch
import xarray as xr
from aurora import Batch
from conftest import LEVELS, N_TIMES, START, make_world, write_wb2_zarr

from weatherpeft.data.wb2 import (
    SampleSpec,
    WB2Dataset,
    canonicalise,
    collate_batches,
    open_store,
    validate,
)

SURF = ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind",
        "mean_sea_level_pressure", "total_precipitation_6hr")
ATMOS = ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind",
         "specific_humidity")
SURF_AURORA = {"2m_temperature": "2t", "10m_u_component_of_wind": "10u",
               "10m_v_component_of_wind": "10v", "mean_sea_level_pressure": "msl",
               "total_precipitation_6hr": "tp"}
ATMOS_AURORA = {"geopotential": "z", "temperature": "t", "u_component_of_wind": "u",
                "v_component_of_wind": "v", "specific_humidity": "q"}
SPEC = SampleSpec(surf_vars=SURF, atmos_vars=ATMOS)


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


def at(k: int) -> datetime:
    """The k-th time of the synthetic world."""
    return START.to_pydatetime() + hours(6 * k)


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert a.surf_vars.keys() == b.surf_vars.keys()
    assert a.atmos_vars.keys() == b.atmos_vars.keys()
    assert a.static_vars.keys() == b.static_vars.keys()
    for group in ("surf_vars", "atmos_vars", "static_vars"):
        for name, value in getattr(a, group).items():
            torch.testing.assert_close(value, getattr(b, group)[name], rtol=0, atol=0,
                                       msg=f"{group}[{name}] differs")
    torch.testing.assert_close(a.metadata.lat, b.metadata.lat, rtol=0, atol=0)
    torch.testing.assert_close(a.metadata.lon, b.metadata.lon, rtol=0, atol=0)
    assert a.metadata.time == b.metadata.time
    assert a.metadata.atmos_levels == b.metadata.atmos_levels


# ---------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------


def test_open_store_gives_canonical_form(wb2_store):
    ds = open_store(wb2_store)
    assert ds["temperature"].dims == ("time", "level", "longitude", "latitude")
    assert ds["2m_temperature"].dims == ("time", "longitude", "latitude")
    assert ds["land_sea_mask"].dims == ("longitude", "latitude")
    assert np.all(np.diff(ds.latitude.values) > 0)
    assert list(ds.level.values) == list(LEVELS)


@pytest.mark.parametrize("in_memory", [True, False])
def test_batch_shapes_dtypes_and_coordinates(wb2_store, world_decoded, in_memory):
    dataset = WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, in_memory=in_memory))
    inputs, target = dataset[0]
    h, w = 32, 64
    assert set(inputs.surf_vars) == set(SURF_AURORA.values())
    assert set(inputs.atmos_vars) == set(ATMOS_AURORA.values())
    assert set(inputs.static_vars) == {"lsm", "z"}
    for value in inputs.surf_vars.values():
        assert value.shape == (1, 2, h, w) and value.dtype == torch.float32
    for value in inputs.atmos_vars.values():
        assert value.shape == (1, 2, len(LEVELS), h, w) and value.dtype == torch.float32
    for value in inputs.static_vars.values():
        assert value.shape == (h, w) and value.dtype == torch.float32
    for value in target.surf_vars.values():
        assert value.shape == (1, 1, h, w)
    for value in target.atmos_vars.values():
        assert value.shape == (1, 1, len(LEVELS), h, w)
    lat = inputs.metadata.lat.numpy()
    assert np.all(np.diff(lat) < 0), "Aurora needs strictly decreasing latitudes"
    np.testing.assert_array_equal(lat, world_decoded.latitude.values[::-1].astype(np.float32))
    np.testing.assert_array_equal(inputs.metadata.lon.numpy(),
                                  world_decoded.longitude.values.astype(np.float32))
    assert inputs.metadata.atmos_levels == LEVELS
    assert inputs.metadata.time == (at(1),) and target.metadata.time == (at(2),)


def test_values_sit_at_the_right_point_after_the_flip(wb2_store, world_decoded):
    dataset = WB2Dataset(wb2_store, SPEC)
    inputs, target = dataset[3]  # inputs at times 3, 4; target at 5
    lat_values = world_decoded.latitude.values
    for lat, lon in [(-87.1875, 90.0), (59.0625, 354.375), (2.8125, 0.0)]:
        row = int(np.nonzero(inputs.metadata.lat.numpy() == lat)[0][0])
        col = int(np.nonzero(inputs.metadata.lon.numpy() == lon)[0][0])
        assert row == len(lat_values) - 1 - int(np.nonzero(lat_values == lat)[0][0])
        point = world_decoded.sel(latitude=lat, longitude=lon)
        for name, short in SURF_AURORA.items():
            expected = point[name].isel(time=[3, 4]).values.astype(np.float32)
            np.testing.assert_array_equal(inputs.surf_vars[short][0, :, row, col].numpy(), expected)
            assert target.surf_vars[short][0, 0, row, col] == np.float32(point[name].isel(time=5))
        for name, short in ATMOS_AURORA.items():
            expected = point[name].sel(level=500).isel(time=4).values.astype(np.float32)
            assert inputs.atmos_vars[short][0, 1, LEVELS.index(500), row, col] == expected
        assert inputs.static_vars["lsm"][row, col] == np.float32(point["land_sea_mask"])
        assert inputs.static_vars["z"][row, col] == np.float32(point["geopotential_at_surface"])


def test_packed_values_are_decoded_to_physical_units(wb2_store, world):
    inputs, _ = WB2Dataset(wb2_store, SPEC)[0]
    original = world["2m_temperature"].isel(time=1).transpose("latitude", "longitude").values[::-1]
    np.testing.assert_allclose(inputs.surf_vars["2t"][0, 1].numpy(), original, atol=0.0026)
    assert inputs.surf_vars["2t"].dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Time alignment
# ---------------------------------------------------------------------------------------


def test_lead_6h_history_2_alignment(wb2_store, world_decoded):
    dataset = WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, lead=hours(6)))
    assert len(dataset) == N_TIMES - 2  # first input needs a predecessor, last needs a target
    for index in (0, len(dataset) - 1):
        inputs, target = dataset[index]
        input_times, target_time = dataset.sample_times(index)
        assert input_times == (at(index), at(index + 1)) and target_time == at(index + 2)
        assert inputs.metadata.time == (at(index + 1),) and target.metadata.time == (at(index + 2),)
        field = world_decoded["temperature"].transpose("time", "level", "latitude", "longitude")
        np.testing.assert_array_equal(inputs.atmos_vars["t"][0].numpy(),
                                      field.isel(time=[index, index + 1]).values[..., ::-1, :])
        np.testing.assert_array_equal(target.atmos_vars["t"][0, 0].numpy(),
                                      field.isel(time=index + 2).values[..., ::-1, :])


def test_lead_zero_targets_the_last_input(wb2_store):
    dataset = WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, lead=hours(0)))
    assert len(dataset) == N_TIMES - 1
    inputs, target = dataset[0]
    assert target.metadata.time == inputs.metadata.time == (at(1),)
    torch.testing.assert_close(target.surf_vars["msl"][:, 0], inputs.surf_vars["msl"][:, -1])
    torch.testing.assert_close(target.atmos_vars["q"][:, 0], inputs.atmos_vars["q"][:, -1])


def test_history_3_lead_12h(wb2_store):
    dataset = WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, history=3,
                                               lead=hours(12)))
    assert len(dataset) == N_TIMES - 2 - 2
    assert dataset.sample_times(0) == ((at(0), at(1), at(2)), at(4))
    assert dataset[0][0].surf_vars["2t"].shape[1] == 3


def test_time_range_is_inclusive_and_bounds_every_time(wb2_store):
    spec = SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, start=at(2), end=at(6))
    dataset = WB2Dataset(wb2_store, spec)
    assert [dataset.sample_times(i) for i in range(len(dataset))] == [
        ((at(2), at(3)), at(4)), ((at(3), at(4)), at(5)), ((at(4), at(5)), at(6))]


def test_gap_in_time_never_bridged(world_decoded):
    gappy = world_decoded.drop_isel(time=[5])  # 06-hourly with one hole
    dataset = WB2Dataset(gappy, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS))
    assert len(dataset) == N_TIMES - 2 - 3  # three samples touched time 5
    for index in range(len(dataset)):
        inputs, target = dataset.sample_times(index)
        assert inputs[1] - inputs[0] == hours(6) and target - inputs[1] == hours(6)
        assert at(5) not in (*inputs, target)
    report = validate(gappy, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS))
    assert report.gaps == ((at(4), at(6)),) and report.step == hours(6)


def test_negative_and_out_of_range_index(wb2_store):
    dataset = WB2Dataset(wb2_store, SPEC)
    assert dataset[-1][1].metadata.time == (at(N_TIMES - 1),)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


# ---------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------


def test_collate_stacks_along_batch_dim(wb2_store):
    dataset = WB2Dataset(wb2_store, SPEC)
    inputs, target = collate_batches([dataset[0], dataset[4]])
    assert inputs.surf_vars["2t"].shape == (2, 2, 32, 64)
    assert inputs.atmos_vars["z"].shape == (2, 2, len(LEVELS), 32, 64)
    assert target.atmos_vars["z"].shape == (2, 1, len(LEVELS), 32, 64)
    assert inputs.static_vars["lsm"].shape == (32, 64)
    assert inputs.metadata.time == (at(1), at(5)) and target.metadata.time == (at(2), at(6))
    torch.testing.assert_close(inputs.surf_vars["2t"][1], dataset[4][0].surf_vars["2t"][0])


def test_collate_works_as_dataloader_collate_fn(wb2_store):
    dataset = WB2Dataset(wb2_store, SPEC)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_batches)
    sizes = [inputs.surf_vars["msl"].shape[0] for inputs, _ in loader]
    assert sizes == [4, 4, 2]


def test_collate_rejects_mismatched_levels(wb2_store):
    a = WB2Dataset(wb2_store, SPEC)[0]
    b = WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, levels=(500,)))[0]
    with pytest.raises(ValueError, match="levels"):
        collate_batches([a, b])


# ---------------------------------------------------------------------------------------
# Store variants give the same Batch
# ---------------------------------------------------------------------------------------


def test_descending_latitude_store_gives_same_batch(wb2_store, descending_store):
    canonical = WB2Dataset(wb2_store, SPEC)
    descending = WB2Dataset(descending_store, SPEC)
    assert len(canonical) == len(descending)
    for index in (0, len(canonical) - 1):
        for a, b in zip(canonical[index], descending[index]):
            assert_same_batch(a, b)


@pytest.mark.parametrize("in_memory", [True, False])
def test_era5_netcdf_store_gives_same_batch(wb2_store, era5_netcdf, in_memory):
    canonical = WB2Dataset(wb2_store, SPEC)
    era5 = WB2Dataset(era5_netcdf, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, in_memory=in_memory))
    assert len(canonical) == len(era5)
    for index in (0, 5):
        for a, b in zip(canonical[index], era5[index]):
            assert_same_batch(a, b)


def test_spec_accepts_aurora_and_store_names(wb2_store):
    by_canonical = WB2Dataset(wb2_store, SampleSpec(surf_vars=("2m_temperature",),
                                                    atmos_vars=("temperature",),
                                                    static_vars=("geopotential_at_surface",)))[2]
    by_short = WB2Dataset(wb2_store, SampleSpec(surf_vars=("2t",), atmos_vars=("t",),
                                                static_vars=("z",)))[2]
    for a, b in zip(by_canonical, by_short):
        assert_same_batch(a, b)


def test_custom_name_table(world_decoded):
    renamed = world_decoded.rename({"temperature": "air_temp", "level": "isobar"})
    dataset = WB2Dataset(renamed, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS,
                                             names={"air_temp": "temperature", "isobar": "level"}))
    assert dataset[0][0].atmos_vars["t"].shape == (1, 2, len(LEVELS), 32, 64)


def test_orography_named_z_without_levels_becomes_static(world_decoded):
    single_level = world_decoded[["2m_temperature", "geopotential_at_surface"]].rename(
        {"geopotential_at_surface": "z"})
    assert "geopotential_at_surface" in canonicalise(single_level).data_vars


def test_levels_in_pascal_are_converted(world_decoded):
    in_pa = world_decoded.assign_coords(level=world_decoded.level * 100)
    in_pa["level"].attrs["units"] = "Pa"
    assert list(canonicalise(in_pa).level.values) == list(LEVELS)


def test_level_subset_in_requested_order(wb2_store, world_decoded):
    dataset = WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, levels=(850, 300)))
    inputs, _ = dataset[0]
    assert inputs.metadata.atmos_levels == (850, 300)
    expected = world_decoded["u_component_of_wind"].sel(level=300).isel(time=1)
    np.testing.assert_array_equal(inputs.atmos_vars["u"][0, 1, 1].numpy(),
                                  expected.transpose("latitude", "longitude").values[::-1])


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_missing_variable_names_it_and_lists_the_store(wb2_store):
    with pytest.raises(ValueError, match=r"'relative_humidity'.*it has:.*2m_temperature"):
        WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=("relative_humidity",)))


def test_missing_level_lists_available(wb2_store):
    with pytest.raises(ValueError, match=r"level 700 hPa.*available: \[300, 500, 850\]"):
        WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, levels=(500, 700)))


@pytest.mark.parametrize("start, end", [("2000-01-01", "2001-03-02"), ("2001-03-02", "2001-03-09")])
def test_time_range_outside_store_shows_store_range(wb2_store, start, end):
    with pytest.raises(ValueError, match=r"not inside.*covers 2001-03-01 00:00:00 – 2001-03-03 18:00:00"):
        WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, start=start, end=end))


def test_range_too_short_for_a_sample(wb2_store):
    with pytest.raises(ValueError, match="no complete samples"):
        WB2Dataset(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, start=at(2), end=at(3)))


def test_nonexistent_path_is_named(tmp_path):
    missing = tmp_path / "nowhere.zarr"
    with pytest.raises(FileNotFoundError, match="nowhere.zarr"):
        WB2Dataset(missing, SPEC)


def test_unsupported_format(tmp_path):
    (tmp_path / "notes.txt").write_text("not weather")
    with pytest.raises(ValueError, match="unsupported format"):
        open_store(tmp_path / "notes.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="not a zarr store"):
        open_store(tmp_path / "empty_dir")
    (tmp_path / "broken.nc").write_bytes(b"CDF\x01garbage")
    with pytest.raises(ValueError, match="cannot read .*broken.nc"):
        open_store(tmp_path / "broken.nc")


@pytest.fixture(scope="module")
def nan_store(tmp_path_factory) -> object:
    """A packed store with one NaN in 2m_temperature (time 5) and one in t at 850 hPa (time 9)."""
    world = make_world(seed=1)
    world["2m_temperature"][5, 10, 20] = np.nan  # stored as the int16 _FillValue
    world["temperature"][9, 2, 3, 4] = np.nan
    return write_wb2_zarr(world, tmp_path_factory.mktemp("nan") / "nan.zarr")


def test_nan_is_reported_when_a_sample_is_read(nan_store):
    dataset = WB2Dataset(nan_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, in_memory=False))
    dataset[0]  # times 0..2: clean
    with pytest.raises(ValueError, match=r"'2m_temperature' at time 2001-03-02 06:00:00 \(store time index 5\), "
                                         r"latitude 25.3125 \(row 11\), longitude 56.25 \(column 10\)"):
        dataset[3]  # times 3, 4 → 5
    with pytest.raises(ValueError, match=r"'temperature' at level 850 hPa at time 2001-03-03 06:00:00 \(store time "
                                         r"index 9\), latitude -64.6875 \(row 27\), longitude 16.875 \(column 3\)"):
        dataset[8]


def test_nan_is_reported_when_samples_are_loaded_into_memory(nan_store):
    with pytest.raises(ValueError, match=r"'2m_temperature' at time 2001-03-02 06:00:00"):
        WB2Dataset(nan_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, in_memory=True))
    clean_part = SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, in_memory=True, start=at(6), end=at(8))
    assert len(WB2Dataset(nan_store, clean_part)) == 1


def test_validate_reports_first_nan_and_passes_clean_store(nan_store, wb2_store):
    with pytest.raises(ValueError, match=r"'2m_temperature' at time 2001-03-02 06:00:00"):
        validate(nan_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS))
    report = validate(wb2_store, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS))
    assert report.n_samples == N_TIMES - 2 and report.n_times == N_TIMES and report.gaps == ()
    clean_part = SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, start=at(6), end=at(8))
    assert validate(nan_store, clean_part).n_samples == 1


def test_nan_in_static_field_fails_at_construction(world_decoded):
    broken = world_decoded.copy(deep=True)
    broken["land_sea_mask"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"static variable 'land_sea_mask', latitude -87.1875 \(row 31\), "
                                         r"longitude 0 \(column 0\)"):
        WB2Dataset(broken, SPEC)


def test_bad_spec_values():
    with pytest.raises(ValueError, match="history"):
        SampleSpec(history=0)
    with pytest.raises(ValueError, match="lead"):
        SampleSpec(lead=hours(-6))


def test_batch_runs_through_a_small_aurora(wb2_store):
    """The Batch is what Aurora accepts: a tiny untrained Aurora runs a forward pass on it."""
    from aurora import Aurora

    from weatherpeft.data.stats import compute_stats

    spec = SampleSpec(surf_vars=SURF[:4], atmos_vars=ATMOS, start=at(0), end=at(11))
    model = Aurora(surf_vars=("2t", "10u", "10v", "msl"), static_vars=("lsm", "z"),
                   atmos_vars=("z", "u", "v", "t", "q"), encoder_depths=(1, 1), decoder_depths=(1, 1),
                   encoder_num_heads=(2, 4), decoder_num_heads=(4, 2), embed_dim=32, num_heads=2,
                   latent_levels=2, patch_size=4, window_size=(1, 2, 4), use_lora=False)
    inputs, _ = collate_batches([WB2Dataset(wb2_store, spec)[i] for i in (0, 1)])
    with compute_stats(wb2_store, spec).installed(), torch.no_grad():
        prediction = model.eval()(inputs)
    assert prediction.surf_vars["2t"].shape == (2, 1, 32, 64)
    assert prediction.atmos_vars["z"].shape == (2, 1, len(LEVELS), 32, 64)
    assert prediction.metadata.time == (at(2), at(3))


def test_lazy_reader_reopens_the_store_in_a_forked_worker(era5_netcdf):
    dataset = WB2Dataset(era5_netcdf, SampleSpec(surf_vars=SURF, atmos_vars=ATMOS, in_memory=False))
    before = dataset[1]
    opened = dataset._ds
    dataset._pid = -1  # as if in a DataLoader worker forked after construction
    after = dataset[1]
    assert dataset._ds is not opened
    for a, b in zip(before, after):
        assert_same_batch(a, b)


def test_cftime_standard_calendar_is_converted(world_decoded):
    cf_times = xr.date_range(str(START), periods=N_TIMES, freq="6h", calendar="standard", use_cftime=True)
    dataset = WB2Dataset(world_decoded.assign_coords(time=cf_times), SPEC)
    assert dataset.sample_times(0) == ((at(0), at(1)), at(2))
