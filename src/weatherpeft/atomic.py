"""Crash-safe writes: write a temporary file (or folder) beside the target, fsync, then rename.

A reader never sees a half-written file, and a crash or error leaves the previous file
(if any) in place and no temporary behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then fsync and rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; written files are ordinary files
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def write_json(path: str | os.PathLike, payload: Any, sort_keys: bool = True) -> Path:
    """Write ``payload`` as indented JSON atomically."""
    return write_text(path, json.dumps(payload, indent=1, sort_keys=sort_keys) + "\n")


def torch_save(path: str | os.PathLike, content: Any) -> Path:
    """``torch.save`` atomically (load such files with ``weights_only=True``)."""
    import torch

    return atomic_write(path, lambda temporary: torch.save(content, temporary))


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], None], marker: str) -> Path:
    """Let ``write`` fill a temporary sibling folder, then move it to ``path`` in one rename.

    An existing ``path`` is replaced only if it holds ``marker`` (i.e. it is an earlier folder
    of the same kind), never an unrelated folder. On any error nothing is left behind and an
    earlier folder at ``path`` is kept.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and (path / marker).is_file()):
        raise FileExistsError(f"{path} exists and is not a folder written by weatherpeft "
                              f"(no {marker} inside): refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(temporary)
        for item in temporary.rglob("*"):
            if item.is_file():
                with open(item, "rb") as stream:
                    os.fsync(stream.fileno())
        if path.exists():
            previous = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, previous)
            try:
                os.rename(temporary, path)
            except BaseException:
                os.rename(previous, path)
                raise
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path
