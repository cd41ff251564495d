"""The built-in data's manifest: what generated it and a sha256 of every committed file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from weatherpeft.atomic import write_json

MANIFEST_NAME = "manifest.json"
#: Files beside the stores that the manifest does not hash (itself, the timing log).
UNHASHED = {MANIFEST_NAME, "generation_log.json", "data_card.json"}


def file_digests(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under ``root``, keyed by POSIX relative path, sorted."""
    root = Path(root)
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in UNHASHED:
            continue
        digests[rel] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    return digests


def write_manifest(root: Path, config: dict) -> Path:
    """Hash every store file under ``root`` and record the generating configuration."""
    files = file_digests(root)
    payload = {"config": config, "files": files, "total_bytes": sum(f["bytes"] for f in files.values())}
    path = Path(root) / MANIFEST_NAME
    write_json(path, payload)
    return path


def verify_manifest(root: Path) -> list[str]:
    """Return a list of problems (missing, extra, or changed files); empty when all match."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists():
        return [f"no {MANIFEST_NAME} in {root}"]
    expected = json.loads(manifest_path.read_text())["files"]
    actual = file_digests(root)
    problems = [f"missing: {name}" for name in sorted(set(expected) - set(actual))]
    problems += [f"not in manifest: {name}" for name in sorted(set(actual) - set(expected))]
    problems += [f"checksum differs: {name}" for name in sorted(set(expected) & set(actual))
                 if expected[name]["sha256"] != actual[name]["sha256"]]
    return problems
