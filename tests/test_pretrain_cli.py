"""`weatherpeft pretrain` and `weatherpeft evaluate` end to end on a tiny synthetic store."""

from __future__ import annotations

import json

import numpy as np
from conftest import make_world, write_wb2_zarr

from weatherpeft.backbones.aurora import AuroraBackbone
from weatherpeft.cli import main
from weatherpeft.model_card import load_card


def test_pretrain_then_evaluate_writes_a_loadable_backbone_and_a_card(tmp_path, capsys):
    wb2_store = write_wb2_zarr(make_world(n_times=12), tmp_path / "world.zarr")  # 3 days
    later = make_world(n_times=20, seed=1)  # the 5 days after them: the "downstream" store
    later = later.assign_coords(time=later.time + np.timedelta64(3, "D"))
    downstream = write_wb2_zarr(later, tmp_path / "later.zarr")
    export = tmp_path / "model"
    args = ["pretrain", "--store", str(wb2_store), "--train-start", "2001-03-01T00:00",
            "--train-end", "2001-03-02T18:00", "--val-start", "2001-03-03T00:00", "--val-end", "2001-03-03T18:00",
            "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--out-dir", str(tmp_path / "run"),
            "--export", str(export), "--no-progress"]
    assert main(args) == 0
    run = json.loads((export / "pretraining.json").read_text())
    assert run["fit"]["step"] == 3 and run["pretraining"]["batch_size"] == 2
    backbone = AuroraBackbone.from_checkpoint(export)
    assert backbone.levels == (300, 500, 850)

    assert main(["evaluate", "--checkpoint", str(export), "--store", str(downstream),
                 "--reference-store", str(wb2_store), "--reference-start", "2001-03-01T00:00",
                 "--reference-end", "2001-03-02T18:00", "--stride", "1", "--write-card"]) == 0
    card = load_card(export)
    scores = card["evaluation"]["rmse"]
    assert {"model/rmse/2t/6h", "persistence/rmse/2t/6h", "climatology/rmse/2t/6h"} <= set(scores)
    assert card["evaluation"]["initialisations"] == 20 - 2 - 12 + 1
    assert card["reproducibility"]["windows"] == [0, 1, 2, 3]
    assert (export / "MODEL_CARD.md").read_text().count("| 2t |") == 1
    assert "6 h persistence" in capsys.readouterr().out
