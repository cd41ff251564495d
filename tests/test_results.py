"""Score tables and maps: what people read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from weatherpeft.plots import save_field_maps
from weatherpeft.results import results_markdown, write_results

SCORES = {"model/rmse/2t": 0.31, "bilinear/rmse/2t": 0.52, "model/rmse/z500": 65.3,
          "model/seeps/tp/12h": 0.61, "climatology/seeps/tp/12h": 0.83, "model/bias/2t": -2e-5}


def test_markdown_puts_sources_side_by_side_model_first():
    table = results_markdown(SCORES).splitlines()
    assert table[0] == "| metric | channel | lead | **model** | bilinear | climatology |"
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|"))[:3]: line for line in table[2:]}
    assert "0.31" in rows[("rmse", "2t", "")] and "0.52" in rows[("rmse", "2t", "")]
    assert rows[("rmse", "z500", "")].rstrip().endswith("| — | — |")  # no reference for z500
    assert "-2.000e-05" in rows[("bias", "2t", "")]
    assert "0.61" in rows[("seeps", "tp", "12h")] and "0.83" in rows[("seeps", "tp", "12h")]


def test_bad_keys_are_named():
    with pytest.raises(ValueError, match="'rmse'"):
        results_markdown({"rmse": 1.0})


def test_write_results_writes_json_and_markdown(tmp_path):
    json_path, markdown_path = write_results(SCORES, tmp_path / "out", {"task": "downscaling"})
    content = json.loads(json_path.read_text())
    assert content["scores"] == SCORES and content["task"] == "downscaling"
    assert markdown_path.read_text() == results_markdown(SCORES)


def test_maps_are_written_and_shapes_checked(tmp_path):
    lat = np.linspace(-87.1875, 87.1875, 32)
    lon = np.arange(64) * 5.625
    truth = np.cos(np.deg2rad(lat))[:, None] * np.ones((32, 64))
    path = save_field_maps(truth + 0.1, truth, lat, lon, tmp_path / "map.png", title="t", units="K")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="differ in shape"):
        save_field_maps(truth[:, :10], truth, lat, lon, tmp_path / "bad.png", title="t")
    with pytest.raises(ValueError, match="do not match"):
        save_field_maps(truth, truth, lat[:5], lon, tmp_path / "bad.png", title="t")
    assert not (tmp_path / "bad.png").exists()
