"""Weather foundation models behind one contract (:class:`Backbone`): Aurora and Prithvi-WxC."""

from __future__ import annotations

import json
import os
from pathlib import Path

from weatherpeft.backbones.aurora import AURORA_PRESETS, ERA5_LEVELS, AuroraBackbone, AuroraPreset
from weatherpeft.backbones.base import Backbone, LoadReport
from weatherpeft.backbones.prithvi import PRITHVI_PRESETS, PrithviBackbone, PrithviPreset
from weatherpeft.data.paths import resolve_path
from weatherpeft.data.stats import NormalisationStats

__all__ = ["AURORA_PRESETS", "ERA5_LEVELS", "PRITHVI_PRESETS", "AuroraBackbone", "AuroraPreset",
           "Backbone", "LoadReport", "PrithviBackbone", "PrithviPreset", "backbone_statistics",
           "build_backbone", "load_backbone"]


def load_backbone(path: str | os.PathLike, **kwargs) -> Backbone:
    """Load a backbone checkpoint folder written by weatherpeft, whichever model it holds
    (a relative path: from the working folder, else the checkout; see :mod:`weatherpeft.data.paths`)."""
    path = resolve_path(path, "backbone checkpoint folder")
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a backbone checkpoint folder (no config.json)")
    kind = json.loads(config_path.read_text()).get("preset", "")
    if kind in AURORA_PRESETS:
        return AuroraBackbone.from_checkpoint(path, **kwargs)
    if kind in PRITHVI_PRESETS:
        return PrithviBackbone.from_checkpoint(path, **kwargs)
    raise ValueError(f"{config_path}: unknown backbone preset {kind!r}; known: "
                     f"{sorted(AURORA_PRESETS) + sorted(PRITHVI_PRESETS)}")


def build_backbone(preset: str, **kwargs) -> Backbone:
    """A backbone of preset ``preset`` (Aurora's or Prithvi-WxC's), built with ``kwargs``."""
    if preset in AURORA_PRESETS:
        return AuroraBackbone(preset, **kwargs)
    if preset in PRITHVI_PRESETS:
        return PrithviBackbone(preset, **kwargs)
    raise ValueError(f"unknown backbone preset {preset!r}; known: "
                     f"{sorted(AURORA_PRESETS) + sorted(PRITHVI_PRESETS)}")


def backbone_statistics(path: str | os.PathLike) -> NormalisationStats:
    """The normalisation statistics saved with a backbone checkpoint folder (without loading it)."""
    stats_path = resolve_path(path, "backbone checkpoint folder") / "normalisation.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{path} is not a backbone checkpoint folder (no normalisation.json)")
    return NormalisationStats.load(stats_path)
