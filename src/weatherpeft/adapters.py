"""Adapter files: what a method trained, and nothing else, in safetensors + JSON.

An adapter is a folder with two files:

- ``adapter.safetensors``: ``added.<name>`` (parameters the method created: TADP generators,
  LoRA matrices, prompts), ``dense.<name>`` (pretrained tensors trained whole),
  ``sparse.<name>.indices`` / ``sparse.<name>.values`` (flat indices, int32 where they fit,
  and trained values of the entries a masked update changed — never dense tensors),
  ``head.<name>`` (task head),
  ``encoder_decoder.<name>`` (the encoder/decoder, trained whole under the "train" protocol);
- ``adapter.json``: format, weatherpeft version, method, options, budget, the
  ``encoder_decoder`` protocol (files without it were written under "frozen"), parameter report,
  the backbone's config and fingerprint, the variable set, the tensor inventory, the
  sha256 of the tensor file and ``record_sha256``, the sha256 of the fields that rebuild the
  model (method, options, budget, protocol, backbone, inventory, tensor checksum).

:func:`load_adapter` rebuilds the method on a fresh backbone (same options and budget, so the
same modules) and writes the tensors in: outputs are reproduced exactly. It refuses a backbone
with another variable set, and one whose fingerprint differs unless forced, and raises
:class:`AdapterError` for anything else that is wrong: an unreadable or edited ``adapter.json``
(invalid JSON, missing keys, wrong types, a record that no longer matches ``record_sha256``), a
tensor file that is missing, truncated or corrupt, tensors unlike the inventory or the rebuilt
method, NaN/inf values, or options and a budget the method refuses. Nothing is ever unpickled.
:func:`save_adapter` refuses NaN/inf tensors and never replaces an earlier adapter with a
partial one. :func:`save_merged` writes a deployable model: the
backbone with every sparse and dense change folded into its weights (its own checkpoint
format) plus fixed prompt tokens where the method prompts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from aurora import Batch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from weatherpeft.atomic import atomic_directory
from weatherpeft.backbones.base import ENCODER_DECODER_PROTOCOLS, Backbone
from weatherpeft.methods.base import Adaptation, check_budget
from weatherpeft.methods.prompts import PromptInjector
from weatherpeft.methods.registry import apply_method

__all__ = ["ADAPTER_FORMAT", "AdapterError", "DeployedModel", "adapter_info", "adapter_tensors",
           "check_adapter_fits", "load_adapter", "load_merged", "read_adapter_config",
           "read_adapter_tensors", "save_adapter", "save_merged"]

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "weatherpeft.adapter/1"
CONFIG_FILE = "adapter.json"
TENSOR_FILE = "adapter.safetensors"
MERGED_FORMAT = "weatherpeft.merged/1"
MERGED_FILE = "merged.json"
PROMPTS_FILE = "prompts.safetensors"
_ROLES = ("added", "dense", "sparse", "head", "encoder_decoder")


class AdapterError(ValueError):
    """An adapter file is unreadable, corrupt or edited, or does not fit the backbone it is
    loaded onto; or an adapter to save holds NaN/inf."""


#: adapter.json's keys and their JSON types (a number: int or float, never a boolean).
_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "method": str, "options": dict, "budget": (int, float), "backbone": dict, "tensors": dict,
    "sha256": str, "report": dict, "variables": list, "weatherpeft_version": str}
#: The keys that rebuild the model, which ``record_sha256`` covers.
_REBUILD_KEYS = ("method", "options", "budget", "backbone", "tensors", "sha256")
#: Rebuild keys added later: covered when present (older records lack them and stay valid).
_LATER_REBUILD_KEYS = ("encoder_decoder",)


def _version() -> str:
    try:
        return importlib.metadata.version("weatherpeft")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_tensors(adaptation: Adaptation) -> dict[str, torch.Tensor]:
    """Every tensor the adapter file holds, under its file key (CPU, contiguous copies)."""
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        if key in tensors:
            raise ValueError(f"two parts of method '{adaptation.method}' both store '{key}'")
        tensors[key] = value.detach().to("cpu").contiguous().clone()

    for name, parameter in adaptation.added_parameters().items():
        put(f"added.{name}", parameter)
    for name, parameter in adaptation.dense_parameters().items():
        put(f"dense.{name}", parameter)
    for update in adaptation.masked_updates:
        for name, indices in update.moved_indices().items():
            narrow = update.parameters[name].numel() <= torch.iinfo(torch.int32).max
            put(f"sparse.{name}.indices", indices.to(torch.int32) if narrow else indices)
            put(f"sparse.{name}.values", update.parameters[name].detach().reshape(-1)[indices])
    for name, parameter in adaptation.head_parameters().items():
        put(f"head.{name}", parameter)
    for name, parameter in adaptation.encoder_decoder_parameters().items():
        put(f"encoder_decoder.{name}", parameter)
    return tensors


def _record_digest(config: Mapping[str, Any]) -> str:
    """sha256 of the keys that rebuild the model, as canonical JSON."""
    keys = _REBUILD_KEYS + tuple(key for key in _LATER_REBUILD_KEYS if key in config)
    record = json.dumps({key: config.get(key) for key in keys}, sort_keys=True,
                        separators=(",", ":"))
    return hashlib.sha256(record.encode()).hexdigest()


def save_adapter(adaptation: Adaptation, path: str | os.PathLike,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write the adapter folder ``path`` atomically (a temporary folder, then a rename).

    Raises :class:`AdapterError`, naming the tensor, if one holds NaN/inf; on any error an
    earlier adapter at ``path`` is kept as it was.
    """
    tensors = adapter_tensors(adaptation)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(f"refusing to save adapter {path}: tensor '{key}' holds {bad} NaN/inf "
                               f"value(s) of {tensor.numel()} (did training diverge?)")
    backbone = adaptation.backbone
    config = {
        "format": ADAPTER_FORMAT,
        "weatherpeft_version": _version(),
        "method": adaptation.method,
        "options": adaptation.options,
        "budget": adaptation.budget,
        "encoder_decoder": adaptation.encoder_decoder,
        "resolved": adaptation.resolved,
        "report": adaptation.report().as_dict(),
        "variables": list(backbone.embedding_variables),
        "backbone": {"fingerprint": backbone.fingerprint(), "config": backbone.config},
        "tensors": {key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                    for key, t in sorted(tensors.items())},
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        **dict(extra or {}),
    }

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / TENSOR_FILE), metadata={"format": ADAPTER_FORMAT})
        config["sha256"] = _sha256(folder / TENSOR_FILE)
        config["record_sha256"] = _record_digest(json.loads(json.dumps(config)))  # as read back
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")

    return atomic_directory(path, write, marker=CONFIG_FILE)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise AdapterError(f"{path} is not valid JSON: {error}") from error


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter's JSON record, checked for format, keys, types, budget and ``record_sha256``
    (the tensor file is not read)."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{path} is not an adapter folder: {CONFIG_FILE} is missing")
    config = _read_json(config_path)
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{config_path} is not a weatherpeft adapter (format {ADAPTER_FORMAT}, "
                           f"found {config.get('format') if isinstance(config, dict) else type(config).__name__})")
    _check_record(config, config_path)
    return config


# Above radon C on purpose: one branch per field of the adapter record, each failing with its own message.
def _check_record(config: Mapping[str, Any], config_path: Path) -> None:
    """Raise :class:`AdapterError` naming the first missing, mistyped or edited field."""
    def fail(problem: str) -> NoReturn:
        raise AdapterError(f"{config_path}: {problem}")

    for key, kind in _RECORD_TYPES.items():
        if key not in config:
            fail(f"'{key}' is missing")
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            fail(f"'{key}' must be a JSON {'number' if key == 'budget' else kind.__name__}, got "
                 f"{type(config[key]).__name__} {json.dumps(config[key])[:80]}")
    backbone = config["backbone"]
    if not isinstance(backbone.get("fingerprint"), str) or not isinstance(backbone.get("config"), dict):
        fail("'backbone' must hold 'fingerprint' (a string) and 'config' (an object)")
    for key, spec in config["tensors"].items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(shape, list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            fail(f"tensor inventory entry '{key}' must be {{\"dtype\": str, \"shape\": [int ≥ 0, ...]}}, "
                 f"got {json.dumps(spec)[:80]}")
    try:
        check_budget(config["budget"])
    except ValueError as error:
        fail(str(error))
    if config.get("encoder_decoder", "frozen") not in ENCODER_DECODER_PROTOCOLS:
        fail(f"'encoder_decoder' must be one of {list(ENCODER_DECODER_PROTOCOLS)}, got "
             f"{json.dumps(config['encoder_decoder'])[:80]}")
    if "record_sha256" not in config:
        log.warning("%s has no record_sha256 (written before weatherpeft recorded one): edits to its "
                    "method, options or budget cannot be detected", config_path)
    elif config["record_sha256"] != _record_digest(config):
        fail("its method, options, budget, backbone or tensor inventory were edited after saving "
             "(they no longer match record_sha256)")


def read_adapter_tensors(path: str | os.PathLike, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the adapter folder ``path`` whose checked record is ``config``, verified
    against its checksum and inventory and for NaN/inf."""
    path = Path(path)
    tensor_path = path / TENSOR_FILE
    if not tensor_path.is_file():
        raise AdapterError(f"{tensor_path} is missing")
    if _sha256(tensor_path) != config.get("sha256"):
        raise AdapterError(f"{tensor_path} does not match the checksum in {CONFIG_FILE}: the file "
                           "is truncated, corrupt, or from another adapter")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"cannot read {tensor_path}: {error}") from error
    inventory = config["tensors"]
    if set(tensors) != set(inventory):
        raise AdapterError(f"{tensor_path} holds {sorted(set(tensors) ^ set(inventory))[:10]} "
                           f"unlike its inventory in {CONFIG_FILE}")
    for key, tensor in tensors.items():
        found = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        if found != {"dtype": inventory[key]["dtype"], "shape": inventory[key]["shape"]}:
            raise AdapterError(f"tensor '{key}' in {tensor_path} is {found}, its inventory in "
                               f"{CONFIG_FILE} says {inventory[key]}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"tensor '{key}' in {tensor_path} holds NaN/inf")
    return tensors


def adapter_info(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of an adapter folder for people: method, budget, report, sizes, backbone."""
    path = Path(path)
    config = read_adapter_config(path)
    roles = dict.fromkeys(_ROLES, 0)
    for key, spec in config["tensors"].items():
        role = key.split(".", 1)[0]
        if not key.endswith(".indices"):
            roles[role] = roles.get(role, 0) + int(torch.Size(spec["shape"]).numel())
    return {
        "path": str(path),
        "method": config["method"],
        "budget": config["budget"],
        "encoder_decoder": config.get("encoder_decoder", "frozen"),
        "options": config["options"],
        "report": config["report"],
        "entries_by_role": roles,
        "file_bytes": (path / TENSOR_FILE).stat().st_size if (path / TENSOR_FILE).exists() else None,
        "backbone_fingerprint": config["backbone"]["fingerprint"],
        "backbone_preset": config["backbone"]["config"].get("preset"),
        "variables": config["variables"],
        "weatherpeft_version": config["weatherpeft_version"],
    }


def _split(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {role: {} for role in _ROLES}
    for key, value in tensors.items():
        role, _, name = key.partition(".")
        if role not in parts or not name:
            raise AdapterError(f"unknown tensor key '{key}' (roles: {list(_ROLES)})")
        parts[role][name] = value
    return parts


def _assign(target: Mapping[str, torch.nn.Parameter], given: Mapping[str, torch.Tensor],
            role: str) -> None:
    missing, unknown = sorted(set(target) - set(given)), sorted(set(given) - set(target))
    if missing or unknown:
        raise AdapterError(f"{role} tensors do not match the rebuilt method: missing {missing[:10]}, "
                           f"unknown {unknown[:10]}")
    for name, value in given.items():
        if tuple(value.shape) != tuple(target[name].shape):
            raise AdapterError(f"{role} tensor '{name}' has shape {list(value.shape)}, the model "
                               f"expects {list(target[name].shape)}")
        target[name].data.copy_(value)


def _assign_sparse(adaptation: Adaptation, given: Mapping[str, torch.Tensor]) -> None:
    owners = {name: update for update in adaptation.masked_updates for name in update.parameters}
    names = {key.rsplit(".", 1)[0] for key in given}
    for name in sorted(names):
        indices, values = given.get(f"{name}.indices"), given.get(f"{name}.values")
        if name not in owners or indices is None or values is None:
            raise AdapterError(f"sparse tensor '{name}' does not fit the rebuilt method (no masked "
                               "update owns it, or its indices/values are missing)")
        parameter = owners[name].parameters[name]
        if indices.dtype not in (torch.int32, torch.int64) or indices.ndim != 1 \
                or values.shape != indices.shape:
            raise AdapterError(f"sparse tensor '{name}': indices must be 1-D int32/int64 and "
                               "values match them")
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= parameter.numel()):
            raise AdapterError(f"sparse tensor '{name}': indices outside its {parameter.numel()} entries")
        parameter.data.view(-1)[indices.to(parameter.device)] = values.to(parameter.device, parameter.dtype)
        owners[name].mark_moved(name, indices)


def check_adapter_fits(path: Path, config: Mapping[str, Any], backbone: Backbone,
                       force: bool = False) -> None:
    """Raise :class:`AdapterError` when the adapter (record ``config``) was made for another
    variable set or, unless ``force``, another backbone (fingerprint); nothing is read or
    changed."""
    saved_vars, current_vars = config["variables"], list(backbone.embedding_variables)
    if sorted(saved_vars) != sorted(current_vars):
        raise AdapterError(f"{path} was made for the variables {saved_vars}; this backbone has "
                           f"{current_vars} (missing {sorted(set(saved_vars) - set(current_vars))}, "
                           f"extra {sorted(set(current_vars) - set(saved_vars))}): load it onto a "
                           "backbone built for its task")
    saved, current = config["backbone"]["fingerprint"], backbone.fingerprint()
    if saved != current:
        message = (f"{path} was trained on backbone {saved[:12]}… "
                   f"({config['backbone']['config'].get('preset')}), this backbone is {current[:12]}…")
        if not force:
            raise AdapterError(message + ": refusing to load (force=True / --force overrides)")
        log.warning("%s; loading anyway (forced)", message)


def load_adapter(path: str | os.PathLike, backbone: Backbone, force: bool = False) -> Adaptation:
    """Rebuild the adapter's method on ``backbone`` under its protocol (files without one:
    "frozen") and load its tensors (see module doc)."""
    path = Path(path)
    config = read_adapter_config(path)
    check_adapter_fits(path, config, backbone, force)
    tensors = read_adapter_tensors(path, config)
    try:
        adaptation = apply_method(config["method"], backbone, config["budget"], config["options"],
                                  encoder_decoder=config.get("encoder_decoder", "frozen"))
    except ValueError as error:  # unknown method or option, a value or budget the method refuses
        raise AdapterError(f"{path / CONFIG_FILE} does not rebuild its method: {error}") from error
    parts = _split(tensors)
    with torch.no_grad():
        _assign(adaptation.added_parameters(), parts["added"], "added")
        _assign(adaptation.dense_parameters(), parts["dense"], "dense")
        _assign(adaptation.head_parameters(), parts["head"], "head")
        _assign(adaptation.encoder_decoder_parameters(), parts["encoder_decoder"], "encoder_decoder")
        _assign_sparse(adaptation, parts["sparse"])
    adaptation.invalidate_prompts()
    return adaptation


# --------------------------------------------------------------------------------------
# Merged models for deployment
# --------------------------------------------------------------------------------------


def save_merged(adaptation: Adaptation, path: str | os.PathLike) -> Path:
    """Write a deployable model: ``backbone/`` (the backbone's checkpoint with every trained
    weight folded in), ``prompts.safetensors`` (each site's fixed prompts, if the method
    prompts) and ``merged.json``. Outputs equal the adaptation's in eval mode."""
    adaptation.eval()
    tokens = adaptation.prompt_tokens()
    adaptation.merge()
    prompts = {f"{site}#{i}": t.to("cpu").contiguous() for site, ts in tokens.items()
               for i, t in enumerate(ts)}
    record = {"format": MERGED_FORMAT, "weatherpeft_version": _version(),
              "method": adaptation.method, "budget": adaptation.budget,
              "encoder_decoder": adaptation.encoder_decoder,
              "options": adaptation.options, "resolved": adaptation.resolved,
              "report": adaptation.report().as_dict(),
              "base_fingerprint": adaptation.backbone.fingerprint(),
              "prompt_layers": max((len(ts) for ts in tokens.values()), default=0)}

    def write(folder: Path) -> None:
        adaptation.backbone.save_checkpoint(folder / "backbone")
        if prompts:
            save_file(prompts, str(folder / PROMPTS_FILE), metadata={"format": MERGED_FORMAT})
        (folder / MERGED_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

    return atomic_directory(path, write, marker=MERGED_FILE)


class DeployedModel(torch.nn.Module):
    """A merged model: the backbone, with fixed prompts prepended where the method prompted."""

    def __init__(self, backbone: Backbone, prompts: Mapping[str, list[torch.Tensor]]) -> None:
        super().__init__()
        self.backbone = backbone
        layers = max((len(ts) for ts in prompts.values()), default=0)
        self.injectors = []
        for layer in range(layers):
            fixed = {site: ts[layer] for site, ts in prompts.items() if len(ts) > layer}
            self.injectors.append(PromptInjector(backbone, lambda fixed=fixed: fixed).attach())

    def forward(self, batch: Batch) -> Batch:
        return self.backbone(batch)


def load_merged(path: str | os.PathLike) -> DeployedModel:
    """Load a folder written by :func:`save_merged`."""
    from weatherpeft.backbones import load_backbone

    path = Path(path)
    record_path = path / MERGED_FILE
    if not record_path.is_file():
        raise AdapterError(f"{path} is not a merged model folder: {MERGED_FILE} is missing")
    record = _read_json(record_path)
    if not isinstance(record, dict) or record.get("format") != MERGED_FORMAT:
        raise AdapterError(f"{record_path} is not a weatherpeft merged model ({MERGED_FORMAT})")
    backbone = load_backbone(path / "backbone")
    prompts: dict[str, list[torch.Tensor]] = {}
    if (path / PROMPTS_FILE).is_file():
        try:
            flat = load_file(str(path / PROMPTS_FILE))
        except (SafetensorError, OSError, ValueError) as error:
            raise AdapterError(f"cannot read {path / PROMPTS_FILE}: {error}") from error
        for key in sorted(flat, key=lambda k: (k.rsplit("#", 1)[0], int(k.rsplit("#", 1)[1]))):
            prompts.setdefault(key.rsplit("#", 1)[0], []).append(flat[key])
    backbone.eval()
    return DeployedModel(backbone, prompts)
