"""Bounded fuzzing (hypothesis) of what reads user input: the adapter loader, the config
parser, and method options. Each must succeed correctly or raise one of its documented
errors — never another exception type, never a hang. Example counts are fixed (``EXAMPLES``)
so that the file runs in CI in well under a minute."""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_pretrained_tiny
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from weatherpeft.adapters import (
    CONFIG_FILE,
    TENSOR_FILE,
    AdapterError,
    _record_digest,
    adapter_tensors,
    load_adapter,
    save_adapter,
)
from weatherpeft.config import build_config
from weatherpeft.finetune import FinetuneConfig, parse_options
from weatherpeft.methods.registry import apply_method, get_method, method_names
from weatherpeft.train import TrainConfig

#: Examples per fuzz test (reported by the test run).
EXAMPLES = {"adapter_tensor_bytes": 120, "adapter_record_bytes": 100, "adapter_record_fields": 150,
            "config_yaml": 300, "config_flags": 200, "parse_options": 300, "method_options": 300}


def fuzz(name: str):
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``common`` three draws in four, ``rare`` the fourth."""
    return st.integers(0, 3).flatmap(lambda i: rare if i == 3 else common)  # 0 is drawn most


#: JSON values of every kind, small: what an edited file or a config could hold.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


# -- byte mutations -----------------------------------------------------------------------------


@st.composite
def mutations(draw) -> tuple:
    """One edit of a byte string: flip a bit, insert, delete, overwrite, truncate, or replace."""
    kind = draw(st.sampled_from(["flip", "insert", "delete", "overwrite", "truncate", "replace"]))
    return kind, draw(st.integers(0, 2**20)), draw(st.binary(min_size=1, max_size=32)), draw(st.integers(1, 64))


def mutate(data: bytes, mutation: tuple) -> bytes:
    kind, where, chunk, length = mutation
    at = where % (len(data) + 1)
    if kind == "flip" and data:
        at %= len(data)
        return data[:at] + bytes([data[at] ^ (1 << (length % 8))]) + data[at + 1:]
    if kind == "insert":
        return data[:at] + chunk + data[at:]
    if kind == "delete":
        return data[:at] + data[at + length:]
    if kind == "overwrite":
        return data[:at] + chunk + data[at + len(chunk):]
    if kind == "truncate":
        return data[:at]
    return chunk


# -- the adapter loader -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine():
    return load_pretrained_tiny()


@pytest.fixture(scope="module")
def original(pristine, tmp_path_factory):
    """(tensors, adapter.json bytes, adapter.safetensors bytes, scratch folder) of a small SSF
    adapter with random values."""
    adaptation = apply_method("ssf", copy.deepcopy(pristine), 0.001)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in adaptation.added_parameters().values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    folder = save_adapter(adaptation, tmp_path_factory.mktemp("fuzz") / "adapter")
    return (adapter_tensors(adaptation), (folder / CONFIG_FILE).read_bytes(),
            (folder / TENSOR_FILE).read_bytes(), folder)


def load_or_refuse(folder: Path, pristine) -> dict[str, torch.Tensor] | None:
    """The loaded adapter's tensors, or None when refused with AdapterError (anything else fails)."""
    try:
        tensors = adapter_tensors(load_adapter(folder, copy.deepcopy(pristine)))
    except AdapterError as error:
        event(f"refused: {_gist(error)}")
        return None
    event("loaded")
    return tensors


def _gist(error: Exception) -> str:
    """What kind of refusal an error is, without paths, names and values (for the statistics
    ``pytest --hypothesis-show-statistics`` prints)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\S*/\S*|\d+(\.\d+)?(e[-+]?\d+)?", "_", str(error))
    return " ".join(text.split()[:6])


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def resign(record: bytes, tensor_bytes: bytes) -> bytes:
    """adapter.json with the sha256 of ``tensor_bytes`` and a fresh record_sha256."""
    import hashlib

    config = json.loads(record)
    config["sha256"] = hashlib.sha256(tensor_bytes).hexdigest()
    config["record_sha256"] = _record_digest(config)
    return json.dumps(config).encode()


@fuzz("adapter_tensor_bytes")
@given(mutation=mutations(), resigned=st.booleans())
def test_fuzz_adapter_tensor_file(original, pristine, mutation, resigned):
    """Mutated adapter.safetensors: refused, or (only with a re-signed record) loaded exactly
    as the mutated file holds it."""
    tensors, record, tensor_bytes, folder = original
    mutated = mutate(tensor_bytes, mutation)
    (folder / TENSOR_FILE).write_bytes(mutated)
    (folder / CONFIG_FILE).write_bytes(resign(record, mutated) if resigned else record)
    loaded = load_or_refuse(folder, pristine)
    if loaded is None:
        return
    if mutated == tensor_bytes:
        assert same(loaded, tensors)
    else:
        assert resigned, "a changed tensor file loaded against its original checksum"
        assert same(loaded, load_file(str(folder / TENSOR_FILE)))


@fuzz("adapter_record_bytes")
@given(mutation=mutations())
def test_fuzz_adapter_record_bytes(original, pristine, mutation):
    """Mutated adapter.json bytes: refused, or loaded with exactly the original tensors."""
    tensors, record, tensor_bytes, folder = original
    (folder / TENSOR_FILE).write_bytes(tensor_bytes)
    (folder / CONFIG_FILE).write_bytes(mutate(record, mutation))
    loaded = load_or_refuse(folder, pristine)
    assert loaded is None or same(loaded, tensors)


RECORD_KEYS = ["format", "method", "options", "budget", "backbone", "tensors", "sha256",
               "record_sha256", "report", "variables", "weatherpeft_version", "resolved"]


@st.composite
def record_edits(draw) -> tuple[str, list, object]:
    """(action, path of keys into adapter.json, new value)."""
    key = draw(st.sampled_from(RECORD_KEYS) | st.text(max_size=8))
    path = [key]
    if key == "options":
        path.append(draw(st.sampled_from(["sites", "rank"]) | st.text(max_size=6)))
    elif key == "backbone":
        path.append(draw(st.sampled_from(["fingerprint", "config"])))
    elif key == "tensors":
        listed = "added.parts.ssf.sites.backbone_encoder_layers_0_blocks_0_attn_proj.scale"
        path.append(draw(st.sampled_from([listed, "added.x"])))
        path.extend(draw(st.lists(st.sampled_from(["dtype", "shape"]), max_size=1)))
    action = draw(st.sampled_from(["set", "delete"]))
    value = draw(json_values | st.sampled_from(["ssf", "vpt", "lora", ["attn"], ["mlp"], 0.002, 1.5,
                                                 math.nan, math.inf, -1, 0, [128], "float64"]))
    return action, path, value


def apply_edit(config: dict, edit: tuple) -> None:
    action, path, value = edit
    target = config
    for key in path[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    if action == "delete":
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value


@fuzz("adapter_record_fields")
@given(edits=st.lists(record_edits(), min_size=1, max_size=3), resigned=st.booleans())
def test_fuzz_adapter_record_fields(original, pristine, edits, resigned):
    """adapter.json with fields set to random JSON values or deleted (re-signed or not):
    refused, or loaded with exactly the original tensors."""
    tensors, record, tensor_bytes, folder = original
    config = json.loads(record)
    for edit in edits:
        apply_edit(config, edit)
    if resigned:
        config["record_sha256"] = _record_digest(config)
    (folder / TENSOR_FILE).write_bytes(tensor_bytes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    loaded = load_or_refuse(folder, pristine)
    assert loaded is None or same(loaded, tensors)


# -- the config parser --------------------------------------------------------------------------

CONFIG_CLASSES = (FinetuneConfig, TrainConfig)
FIELDS = {cls: typing.get_type_hints(cls) for cls in CONFIG_CLASSES}
ALL_KEYS = sorted({key for hints in FIELDS.values() for key in hints})
config_values = json_values | st.dates() | st.sampled_from([math.nan, math.inf, -math.inf, "1e-3", "nan", 1e300])


def plausible_value(annotation) -> st.SearchStrategy:
    """Values of a field's own type, mostly valid, so that documents also build."""
    if typing.get_origin(annotation) is tuple:
        return st.lists(plausible_value(typing.get_args(annotation)[0]), max_size=3)
    if typing.get_origin(annotation) is not None:  # X | None
        return st.none() | plausible_value(typing.get_args(annotation)[0])
    return {bool: st.booleans(), int: st.integers(-2, 2000), float: st.floats(-1, 2),
            str: st.sampled_from(["none", "ddp", "auto", "stop", "skip", "runs/x", "lora", "{}"])}.get(
        annotation, st.text(max_size=8))


def value_for(key: str) -> st.SearchStrategy:
    plausible = plausible_value(FIELDS[FinetuneConfig].get(key) or FIELDS[TrainConfig][key])
    return mostly(plausible, config_values)


#: Up to four known keys, each with a value mostly of its own type.
known_documents = st.lists(st.sampled_from(ALL_KEYS), max_size=4, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({key: value_for(key) for key in keys}))


def build_both(args: argparse.Namespace) -> list:
    """FinetuneConfig and TrainConfig sharing one YAML file, as ``weatherpeft finetune`` builds them."""
    keys = {cls: tuple(FIELDS[cls]) for cls in CONFIG_CLASSES}
    return [build_config(cls, args, shared_keys=keys[other])
            for cls, other in zip(CONFIG_CLASSES, reversed(CONFIG_CLASSES))]


def assert_well_typed(config) -> None:
    """Every field holds its annotated type (a number finite, a sequence a tuple of elements)."""
    for key, annotation in FIELDS[type(config)].items():
        value = getattr(config, key)
        if typing.get_origin(annotation) is tuple:
            element = typing.get_args(annotation)[0]
            assert isinstance(value, tuple) and all(isinstance(v, element) for v in value), key
        else:
            assert isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)), key
            if annotation is float:
                assert math.isfinite(value), key


def names_the_problem(error: Exception, keys, path: Path | None) -> bool:
    text = str(error)
    return (path is not None and str(path) in text) or any(str(k) in text or repr(k) in text for k in keys)


@fuzz("config_yaml")
@given(document=mostly(known_documents, st.one_of(
    st.dictionaries(st.sampled_from(ALL_KEYS) | st.text(max_size=8) | st.integers(), config_values, max_size=5),
    json_values, st.text(max_size=40))))
def test_fuzz_config_yaml(tmp_path_factory, document):
    """A random YAML document (a mapping of known and unknown keys, any value, or any text):
    both configs build with well-typed fields, or ValueError names the key (or the file)."""
    path = tmp_path_factory.getbasetemp() / "fuzz_config.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document, allow_unicode=True))
    try:
        configs = build_both(argparse.Namespace(config=path))
    except ValueError as error:
        assert names_the_problem(error, document if isinstance(document, dict) else (), path), str(error)
        event(f"refused: {_gist(error)}")
        return
    event("built")
    for config in configs:
        assert_well_typed(config)


@fuzz("config_flags")
@given(flags=known_documents | st.dictionaries(st.sampled_from(ALL_KEYS), config_values, min_size=1, max_size=4))
def test_fuzz_config_flags(flags):
    """Random values given as flags: both configs build with well-typed fields, or ValueError
    names the flag."""
    try:
        configs = build_both(argparse.Namespace(config=None, **flags))
    except ValueError as error:
        assert names_the_problem(error, flags, None), str(error)
        event(f"refused: {_gist(error)}")
        return
    event("built")
    for config in configs:
        assert_well_typed(config)


# -- method options -----------------------------------------------------------------------------


@fuzz("parse_options")
@given(text=st.text(max_size=40) | json_values.map(json.dumps))
def test_fuzz_parse_options(text):
    """--options text: a dict, or ValueError."""
    try:
        options = parse_options(text)
    except ValueError as error:
        assert "--options must be a JSON object" in str(error)
        return
    assert isinstance(options, dict)


#: Option values, with integers kept small: an explicit LoRA rank of 10^9 would be honoured
#: (rank overrides the budget) and allocate gigabytes — see the report, not a parser fault.
option_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=2),
    max_leaves=6)
words = st.sampled_from(["union", "strict", "additive", "multiplicative", "block", "stage", "auto", "linear",
                         "ia3", "lora", "vera", "loha", "2t", "msl"]) | st.text(max_size=6)
patterns = (st.sampled_from(["attn", "mlp", "blocks_0", ".*", "(", "[", "*", "a{2,1}", "(?P<", "\\"])
            | st.text(max_size=5))


def plausible_option(annotation) -> st.SearchStrategy:
    """Values of an option's own type (regular expressions for lists of strings)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        return st.lists(patterns, max_size=3)
    if origin is dict:
        keys = st.sampled_from(["r", "init_weights", "fan_in_fan_out", "bias"]) | st.text(max_size=4)
        return st.dictionaries(keys, st.integers(-2, 8) | st.booleans() | st.text(max_size=4), max_size=2)
    if args:  # X | None
        return st.none() | plausible_option(args[0])
    return {bool: st.booleans(), int: st.integers(-3, 40), float: st.floats(-1, 2), str: words}.get(
        annotation, option_values)


@st.composite
def method_requests(draw) -> tuple[str, float, dict]:
    method = draw(st.sampled_from(method_names()))
    hints = typing.get_type_hints(get_method(method).options)
    options = {}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(mostly(st.sampled_from(sorted(hints)), st.text(max_size=6)) if hints else st.text(max_size=6))
        values = mostly(plausible_option(hints[key]), option_values) if key in hints else option_values
        options[key] = draw(values)
    budget = draw(mostly(st.floats(0.0005, 0.05), st.sampled_from([0.0, -0.1, 1.5, math.nan, math.inf])))
    return method, budget, options


@fuzz("method_options")
@given(request=method_requests())
def test_fuzz_method_options(pristine, request):
    """apply_method with random options and budgets: an Adaptation, or ValueError (BudgetError
    included) — never another exception type."""
    method, budget, options = request
    try:
        adaptation = apply_method(method, copy.deepcopy(pristine), budget, options)
    except ValueError as error:
        event(f"refused: {type(error).__name__}: {_gist(error)}")
        return
    event(f"applied {method}")
    assert adaptation.method == method and adaptation.budget == budget
