"""Which grids an Aurora backbone runs on: patches and Swin windows, checked when a task is built.

Aurora cuts a (lat × lon) grid into ``patch_size`` × ``patch_size`` patches. The longitude
count must be a multiple of the patch size; the latitude count a multiple or one more (a grid
with both poles: 33, 121, 721 rows), whose last row (the southernmost, in Aurora's
north-to-south order) Aurora drops. The token grid then passes the Swin stages, halved
(rounded up) from one stage to the next. At every stage the window, ``window_size[1:]``
tokens (lat, lon), must cover both horizontal token axes or neither: Aurora's shifted-window
mask fails otherwise (``RuntimeError: view size is not compatible …``). A window larger than
the token grid is shrunk to it, so "covers" means "at least as many tokens as the grid has".

:class:`PatchGrid` holds the rule for one architecture, :func:`backbone_grid` reads it from a
checkpoint folder, and :meth:`PatchGrid.check` names the nearest sizes that fit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AURORA_TINY_GRID", "PatchGrid", "backbone_grid", "check_aurora_variables", "preset_grid"]


@dataclass(frozen=True)
class PatchGrid:
    """The grid rule of an Aurora architecture: patch size, Swin window in tokens (lat, lon),
    number of encoder stages."""

    patch_size: int = 4
    window: tuple[int, int] = (4, 8)
    stages: int = 2

    @classmethod
    def from_architecture(cls, architecture: Mapping[str, Any]) -> PatchGrid:
        """From Aurora keyword arguments (``patch_size``, ``window_size``, ``encoder_depths``)."""
        window = tuple(architecture["window_size"])
        return cls(patch_size=int(architecture["patch_size"]), window=(int(window[1]), int(window[2])),
                   stages=len(architecture["encoder_depths"]))

    def used_rows(self, height: int) -> int:
        """The latitude rows Aurora keeps: all, or all but the last for one extra row."""
        return height - 1 if height % self.patch_size == 1 else height

    def problem(self, height: int, width: int) -> str | None:
        """Why Aurora cannot run on ``height`` × ``width`` cells (lat × lon), or None."""
        p = self.patch_size
        if width < p or width % p:
            return f"{width} longitude cells are not a multiple of the patch size {p}"
        if height < p or height % p > 1:
            return (f"{height} latitude cells are neither a multiple of the patch size {p} nor "
                    "one more (a grid with both poles)")
        rows, columns = self.used_rows(height) // p, width // p
        for stage in range(1, self.stages + 1):
            covers_rows, covers_columns = rows <= self.window[0], columns <= self.window[1]
            if covers_rows != covers_columns:
                covered, other = ("latitude", "longitude") if covers_rows else ("longitude", "latitude")
                return (f"at Swin stage {stage} the token grid is {rows} × {columns} (lat × lon) and "
                        f"the window {self.window[0]} × {self.window[1]} covers all {covered} tokens "
                        f"but not all {other} tokens")
            rows, columns = math.ceil(rows / 2), math.ceil(columns / 2)
        return None

    def fits(self, height: int, width: int) -> bool:
        return self.problem(height, width) is None

    def nearest(self, height: int, width: int) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
        """(up to three crops h ≤ height, w ≤ width, multiples of the patch size, that fit, the
        largest first; the smallest enlargement h ≥ height, w ≥ width that fits, or None)."""
        p = self.patch_size
        crops = [(h, w) for h in range(p, height + 1, p) for w in range(p, width + 1, p) if self.fits(h, w)]
        crops.sort(key=lambda hw: (height * width - hw[0] * hw[1], height - hw[0]))
        up = lambda n: -(-n // p) * p  # noqa: E731  (the next multiple of p)
        larger = [(h, w) for h in range(up(height), up(height) + 8 * p, p)
                  for w in range(up(width), up(width) + 8 * p, p) if self.fits(h, w)]
        larger.sort(key=lambda hw: (hw[0] * hw[1], hw[0]))
        return crops[:3], (larger[0] if larger else None)

    def check(self, height: int, width: int, where: str) -> None:
        """ValueError naming ``where`` (the store or region), the reason and the nearest sizes."""
        problem = self.problem(height, width)
        if problem is None:
            return
        crops, larger = self.nearest(height, width)
        options = [f"{h} × {w} (drop {height - h} latitude and {width - w} longitude cells)"
                   for h, w in crops]
        if larger is not None:
            options.append(f"{larger[0]} × {larger[1]} (a wider region)")
        raise ValueError(
            f"{where} has {height} × {width} cells (lat × lon), which the backbone (patch "
            f"{self.patch_size}, window {self.window[0]} × {self.window[1]} tokens, "
            f"{self.stages} stages) cannot run on: {problem}. Nearest sizes that fit: "
            + ("; ".join(options) or "none") + " (choose a region, e.g. the task option 'region')")


#: The rule of the shipped aurora-tiny (patch 4, window (2, 4, 8), two stages).
AURORA_TINY_GRID = PatchGrid()


def preset_grid(preset: str, architecture: Mapping[str, Any] | None = None) -> PatchGrid | None:
    """The grid rule of an Aurora preset (with a checkpoint's ``architecture`` overrides);
    None for another family (Prithvi-WxC checks its own grid)."""
    from weatherpeft.backbones.aurora import AURORA_PRESETS, _class_default

    spec = AURORA_PRESETS.get(preset)
    if spec is None:
        return None
    kwargs = spec.build_kwargs(architecture or {})
    values = {key: kwargs[key] if key in kwargs else _class_default(spec.model_class, key)
              for key in ("patch_size", "window_size", "encoder_depths")}
    return PatchGrid.from_architecture(values)


def backbone_grid(path: str | Path) -> PatchGrid | None:
    """The grid rule of the Aurora checkpoint folder ``path`` (its config.json, without loading
    weights); None for another family or a folder without config.json."""
    from weatherpeft.data.paths import resolve_path

    config_path = resolve_path(path, "backbone checkpoint folder") / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    return preset_grid(config.get("preset", ""), config.get("architecture"))


def check_aurora_variables(surf_vars, atmos_vars, static_vars, where: str) -> None:
    """Aurora embeds at least one surface, one atmospheric and one static variable (without
    one it fails deep inside with a bare StopIteration or "stack expects a non-empty
    TensorList"): a ValueError naming ``where`` and what is missing."""
    missing = [kind for kind, names in (("surface variable", surf_vars),
                                        ("atmospheric variable", atmos_vars),
                                        ("static field", static_vars)) if not tuple(names)]
    if missing:
        raise ValueError(f"{where}: an Aurora backbone needs at least one {', one '.join(missing)} "
                         f"(it has surface {list(surf_vars)}, atmospheric {list(atmos_vars)}, "
                         f"static {list(static_vars)})")
