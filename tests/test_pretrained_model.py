"""The committed aurora-tiny backbone: its model card holds, and is reproducible from the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weatherpeft.backbones.aurora import AuroraBackbone
from weatherpeft.evaluation import EvaluateConfig, evaluation_task
from weatherpeft.model_card import CARD_CHANNELS, load_card, score

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "aurora-tiny"


@pytest.fixture(scope="module")
def card():
    return load_card(CHECKPOINT)


@pytest.mark.parametrize("channel", CARD_CHANNELS)
def test_card_shows_the_model_beats_persistence_and_climatology(card, channel):
    scores = card["evaluation"]["rmse"]
    for hours in (6, 24):
        assert scores[f"model/rmse/{channel}/{hours}h"] < scores[f"persistence/rmse/{channel}/{hours}h"]
    assert scores[f"model/rmse/{channel}/6h"] < scores[f"climatology/rmse/{channel}/6h"]


def test_card_rows_are_reproduced_from_the_checkpoint(card):
    backbone = AuroraBackbone.from_checkpoint(CHECKPOINT)
    assert backbone.fingerprint() == card["fingerprint"]
    # without the (uncommitted) pretraining archive: the same test windows, model scores only
    task, _ = evaluation_task(EvaluateConfig(reference_store="/nonexistent"), backbone.stats)
    recomputed = score(backbone, task, card["reproducibility"]["windows"], references=False)
    expected = card["reproducibility"]["rmse"]
    assert set(recomputed) == set(expected)
    for key, value in expected.items():
        assert recomputed[key] == pytest.approx(value, rel=1e-4), key


def test_refreshing_the_card_refuses_other_weights_and_other_windows(card, march_task):
    from weatherpeft.model_card import refresh_model_rows

    backbone = AuroraBackbone.from_checkpoint(CHECKPOINT)
    with pytest.raises(ValueError, match="evaluation windows"):
        refresh_model_rows(card, backbone, march_task, note="test")
    with torch.no_grad():
        next(iter(backbone.pretrained_parameters().values())).add_(1e-3)
    backbone.fingerprint(refresh=True)
    with pytest.raises(ValueError, match="fingerprint"):
        refresh_model_rows(card, backbone, march_task, note="test")
