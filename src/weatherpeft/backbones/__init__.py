"""Weather foundation models behind one contract (:class:`Backbone`): Aurora, later Prithvi-WxC."""

from weatherpeft.backbones.aurora import AURORA_PRESETS, ERA5_LEVELS, AuroraBackbone, AuroraPreset
from weatherpeft.backbones.base import Backbone, LoadReport

__all__ = ["AURORA_PRESETS", "ERA5_LEVELS", "AuroraBackbone", "AuroraPreset", "Backbone",
           "LoadReport"]
