"""A backbone checkpoint folder, shared by every backbone family.

A weatherpeft backbone checkpoint is a folder with ``model.safetensors`` (the model's tensors
under its library's own names), ``config.json`` (format, family, preset, architecture,
variables, levels and the fingerprint of the weights) and ``normalisation.json``. This module
reads, writes and compares such folders and loads a state dict with a :class:`LoadReport`;
the families (``aurora.py``, ``prithvi.py``) say what goes into them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from weatherpeft.atomic import atomic_directory
from weatherpeft.backbones.base import Backbone, LoadReport, compare_state
from weatherpeft.data.stats import NormalisationStats

__all__ = ["CONFIG_FILE", "FORMAT", "STATS_FILE", "VARIABLE_KEYS", "WEIGHTS_FILE",
           "CheckpointFolder", "config_differences", "from_json", "level_list",
           "load_with_report", "open_checkpoint", "read_config",
           "resolve_local", "split_extra_variables", "to_json", "verify_fingerprint",
           "write_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT = "weatherpeft.backbone/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "normalisation.json"
VARIABLE_KEYS = ("surf_vars", "static_vars", "atmos_vars")

_HUB_PREFIXES = ("hf://", "http://", "https://", "hub:")


# -- architecture values as JSON ------------------------------------------------------------


def to_json(value: Any) -> Any:
    """Architecture values as JSON (tuples → lists, timedelta and dtype tagged)."""
    if isinstance(value, timedelta):
        return {"timedelta_seconds": value.total_seconds()}
    if isinstance(value, torch.dtype):
        return {"torch_dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record architecture value {value!r} ({type(value).__name__}) as JSON")


def from_json(value: Any) -> Any:
    """Inverse of :func:`to_json` (lists come back as tuples, as the libraries' defaults are)."""
    if isinstance(value, dict):
        if set(value) == {"timedelta_seconds"}:
            return timedelta(seconds=value["timedelta_seconds"])
        if set(value) == {"torch_dtype"}:
            return getattr(torch, value["torch_dtype"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(from_json(v) for v in value)
    return value


def level_list(levels: Sequence[int | float]) -> list[int | float]:
    """Pressure levels as JSON-stable numbers (500.0 → 500)."""
    return [int(level) if float(level).is_integer() else float(level) for level in levels]


# -- finding and reading a checkpoint ---------------------------------------------------------


def resolve_local(checkpoint: str | os.PathLike, hub_message: str | None) -> Path:
    """The local path of ``checkpoint``; a hub address or a missing path is a clear error.

    ``hub_message`` (a published preset's download instructions) is added to the error;
    ``None`` for presets that only load their own folders.
    """
    text = str(checkpoint)
    if text.startswith(_HUB_PREFIXES) or text.split("@")[0] in {"microsoft/aurora", "huggingface",
                                                                 "hub"}:
        raise ValueError(f"checkpoint {text!r} is not a local path. " +
                         (hub_message or "Pass the folder written by save_checkpoint."))
    path = Path(checkpoint).expanduser()
    if not path.exists():
        hint = f" ({hub_message})" if hub_message else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    return path


def read_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, after checking the folder is whole."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: a weatherpeft backbone checkpoint "
                                    f"is a folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE} is not a weatherpeft backbone config "
                         f"(format {FORMAT})")
    absent = [k for k in ("preset", "architecture", "levels", *VARIABLE_KEYS) if k not in config]
    if absent:
        raise ValueError(f"{folder / CONFIG_FILE} lacks {absent}")
    return config


class CheckpointFolder:
    """A checkpoint folder opened for a model of ``family``: its config and carried statistics."""

    def __init__(self, path: Path, family: str) -> None:
        self.path = path
        self.config = read_config(path)
        found = self.config.get("family", "aurora")
        if found != family:
            raise ValueError(f"{path} holds a {found!r} backbone, not {family!r}")
        stats_path = path / STATS_FILE
        self.stats = NormalisationStats.load(stats_path) if stats_path.is_file() else None

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / WEIGHTS_FILE)


def open_checkpoint(path: str | os.PathLike, family: str, file_hint: str) -> CheckpointFolder:
    """The folder behind ``from_checkpoint``: a clear error for a missing path or a file
    (``file_hint`` says how the family loads files)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; a weatherpeft backbone checkpoint is a folder with "
                         f"{CONFIG_FILE} and {WEIGHTS_FILE} ({file_hint})")
    return CheckpointFolder(path, family)


def split_extra_variables(config: Mapping[str, Any], path: Path, extra_surf_vars: Sequence[str],
                          extra_atmos_vars: Sequence[str]) -> tuple[list[str], list[str]]:
    """The extra variables a saved model does not have yet (those it has load as pretrained)."""
    present = [v for v in (*extra_surf_vars, *extra_atmos_vars)
               if v in config["surf_vars"] or v in config["atmos_vars"]]
    if present:
        logger.info("%s already has %s: loaded as pretrained, not new", path, present)
    return ([v for v in extra_surf_vars if v not in config["surf_vars"]],
            [v for v in extra_atmos_vars if v not in config["atmos_vars"]])


# -- loading into a model ---------------------------------------------------------------------


def config_differences(saved: Mapping[str, Any], settings: Mapping[str, Any],
                       architecture: Mapping[str, Any]) -> list[str]:
    """Where a checkpoint's config differs from the model being built: ``settings`` (preset,
    levels, ...) and every architecture value."""
    differences = [f"{key}: checkpoint {saved.get(key)!r} vs model {ours!r}"
                   for key, ours in settings.items() if saved.get(key) != ours]
    theirs = saved.get("architecture") or {}
    differences += [f"architecture.{name}: checkpoint {theirs.get(name)!r} vs model "
                    f"{architecture.get(name)!r}"
                    for name in sorted(set(theirs) | set(architecture))
                    if theirs.get(name) != architecture.get(name)]
    return differences


def load_with_report(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *,
                     model_shapes: Mapping[str, tuple[int, ...]], source: Path, preset: str,
                     strict: bool, expected_missing: set[str] = frozenset(),
                     differences: Sequence[str] = (), notes: Sequence[str] = (),
                     hint: Callable[[LoadReport], str] = lambda report: "") -> LoadReport:
    """Load ``state`` into ``module``, reporting (or, if ``strict``, refusing) every mismatch.

    Tensors that do not fit (unexpected keys, other shapes) are skipped; ``hint`` adds a
    family-specific explanation of a mismatch to the message.
    """
    missing, unexpected, mismatches = compare_state(
        model_shapes, {k: tuple(v.shape) for k, v in state.items()}, expected_missing)
    report = LoadReport(source=str(source), missing=missing, unexpected=unexpected,
                        shape_mismatches=mismatches, config_differences=tuple(differences),
                        notes=tuple(notes))
    if not report.exact:
        if strict:
            raise ValueError(f"cannot load {source} into {preset} with strict=True:\n"
                             f"{report.problems()}{hint(report)}\n(strict=False loads the "
                             "weights that fit and skips the rest)")
        logger.warning("loaded %s into %s partially (strict=False):\n%s%s", source, preset,
                       report.problems(), hint(report))
    for note in notes:
        logger.info("%s: %s", source, note)
    skipped = set(unexpected) | {key for key, _, _ in mismatches}
    module.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return report


def verify_fingerprint(backbone: Backbone, folder: CheckpointFolder | None) -> None:
    """Refuse weights that do not match the fingerprint their folder recorded."""
    recorded = folder.config.get("fingerprint") if folder is not None else None
    if recorded and backbone.load_report.exact and recorded != backbone.fingerprint():
        raise ValueError(f"the weights in {folder.path} do not match the fingerprint in its "
                         f"{CONFIG_FILE}: the checkpoint was modified or corrupted")


# -- writing ------------------------------------------------------------------------------------


def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     stats: NormalisationStats, config: Mapping[str, Any],
                     fingerprint: str) -> Path:
    """Write a checkpoint folder atomically (a temporary folder, then a rename)."""
    content = {"format": FORMAT, "fingerprint": fingerprint, **config}

    def write(folder: Path) -> None:
        save_file(dict(tensors), str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
        stats.save(folder / STATS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")

    return atomic_directory(path, write, marker=CONFIG_FILE)
