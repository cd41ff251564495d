"""Manifest: sha256 of every file, verification finds changed, missing and extra files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from weatherpeft.atomic import write_json
from weatherpeft.data.manifest import (
    MANIFEST_NAME,
    file_digests,
    verify_manifest,
    write_manifest,
)

CONFIG = {"seed": 0, "levels": [500, 850], "truncation": 42}
FILES = {
    "downstream.zarr/.zmetadata": b'{"metadata": {}}',
    "downstream.zarr/2m_temperature/0.0.0": bytes(range(256)) * 4,
    "downstream.zarr/2m_temperature/.zarray": b'{"dtype": "<i2"}',
    "regional.zarr/geopotential/0.0.0.0": b"\x00\x01\x02\x03" * 100,
    "README.txt": b"built-in world\n",
}


def make_tree(root: Path, order=None) -> Path:
    for rel in order or FILES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(FILES[rel])
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    root = make_tree(tmp_path / "builtin")
    write_manifest(root, CONFIG)
    return root


def test_manifest_records_config_and_every_file(tree):
    payload = json.loads((tree / MANIFEST_NAME).read_text())
    assert payload["config"] == CONFIG
    assert set(payload["files"]) == set(FILES)  # POSIX relative paths, manifest itself excluded
    for rel, content in FILES.items():
        assert payload["files"][rel] == {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    assert payload["total_bytes"] == sum(len(c) for c in FILES.values())
    assert verify_manifest(tree) == []


def test_changed_byte_is_detected(tree):
    rel = "downstream.zarr/2m_temperature/0.0.0"
    path = tree / rel
    content = bytearray(path.read_bytes())
    content[500] ^= 0x01  # one bit, same size
    path.write_bytes(bytes(content))
    assert verify_manifest(tree) == [f"checksum differs: {rel}"]


def test_missing_file_is_detected(tree):
    (tree / "regional.zarr/geopotential/0.0.0.0").unlink()
    assert verify_manifest(tree) == ["missing: regional.zarr/geopotential/0.0.0.0"]


def test_extra_file_is_detected(tree):
    (tree / "downstream.zarr/2m_temperature/1.0.0").write_bytes(b"stray chunk")
    assert verify_manifest(tree) == ["not in manifest: downstream.zarr/2m_temperature/1.0.0"]


def test_several_problems_are_all_reported(tree):
    (tree / "README.txt").write_text("edited\n")
    (tree / "downstream.zarr/.zmetadata").unlink()
    (tree / "new.txt").write_text("x")
    problems = verify_manifest(tree)
    assert problems == ["missing: downstream.zarr/.zmetadata", "not in manifest: new.txt",
                        "checksum differs: README.txt"]


def test_unhashed_side_files_do_not_break_verification(tree):
    write_json(tree / "generation_log.json", {"timings_seconds": {"truth": 1.0}})
    write_json(tree / "data_card.json", {"downstream": {}})
    assert verify_manifest(tree) == []
    assert "generation_log.json" not in file_digests(tree)


def test_no_manifest_is_a_problem(tmp_path):
    root = make_tree(tmp_path / "bare")
    problems = verify_manifest(root)
    assert len(problems) == 1 and MANIFEST_NAME in problems[0]


def test_same_tree_gives_a_byte_identical_sorted_manifest(tmp_path):
    first = make_tree(tmp_path / "a")
    second = make_tree(tmp_path / "b", order=list(reversed(list(FILES))))  # created in another order
    write_manifest(first, CONFIG)
    write_manifest(second, dict(reversed(list(CONFIG.items()))))
    text = (first / MANIFEST_NAME).read_bytes()
    assert text == (second / MANIFEST_NAME).read_bytes()
    # Rewriting the same tree changes nothing either, and leaves no temporary file.
    write_manifest(first, CONFIG)
    assert (first / MANIFEST_NAME).read_bytes() == text
    assert not list(first.glob("*.tmp"))
    # Files appear in sorted order of their relative paths.
    payload = json.loads(text)
    assert list(payload["files"]) == sorted(FILES)
    assert list(file_digests(first)) == sorted(FILES)
