"""Crash-safe writes: write a temporary file (or folder) beside the target, fsync, then rename.

A reader never sees a half-written file, and an error leaves the previous file (if any) in
place and no temporary behind. After the rename the parent folder is fsynced too, so the
new name survives a power loss. A process killed outright (SIGKILL) mid-write keeps the
previous file as well, but leaves its temporary (``.<name>.<random>.tmp``) behind:
:func:`remove_leftovers` deletes those. Folders (adapters, checkpoints of backbones) replace
an earlier folder by an atomic swap where Linux allows it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fsync(path: Path) -> None:
    """Flush a file's content, or a folder's entries, to disk.

    Folders are skipped on Windows (they cannot be opened) and where the file system does
    not sync them (EINVAL, ENOTSUP).
    """
    folder = path.is_dir()
    if folder and os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if not (folder and error.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then fsync and rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        _fsync(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; written files are ordinary files
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
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


def remove_leftovers(folder: str | os.PathLike, name_pattern: str = "*") -> list[Path]:
    """Delete the temporaries that killed writes of ``folder/<name_pattern>`` left behind.

    ``name_pattern`` is a glob of target names (e.g. ``"step_*.pt"``). Call it only while
    nothing else writes such files in ``folder``: a write in progress looks the same.
    Returns what was removed.
    """
    leftovers = sorted(Path(folder).glob(f".{name_pattern}.*.tmp"))
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return leftovers


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _recover_directory(path: Path, marker: str) -> None:
    """Undo a kill between the two renames of a non-atomic replacement: if ``path`` is
    missing, move the newest complete ``.<name>.old-*`` folder back to it."""
    if path.exists():
        return
    previous = sorted((p for p in path.parent.glob(f".{path.name}.old-*") if (p / marker).is_file()),
                      key=lambda p: p.stat().st_mtime)
    if previous:
        os.rename(previous[-1], path)


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], None], marker: str) -> Path:
    """Let ``write`` fill a temporary sibling folder, then move it to ``path`` atomically.

    An existing ``path`` is replaced only if it holds ``marker`` (i.e. it is an earlier folder
    of the same kind), never an unrelated folder, by swapping the two in one step where the
    system can (Linux); elsewhere by two renames, and a kill between them is undone by the
    next write. On any error nothing is left behind and an earlier folder at ``path`` is kept.
    """
    path = Path(path)
    if path.parent.is_dir():
        _recover_directory(path, marker)
    if path.exists() and not (path.is_dir() and (path / marker).is_file()):
        raise FileExistsError(f"{path} exists and is not a folder written by weatherpeft "
                              f"(no {marker} inside): refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(temporary)
        for item in [*temporary.rglob("*"), temporary]:  # files and the folders' entries
            _fsync(item)
        if not path.exists():
            os.rename(temporary, path)
        elif not _exchange(temporary, path):  # the temporary now holds the earlier folder
            previous = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, previous)
            try:
                os.rename(temporary, path)
            except BaseException:
                os.rename(previous, path)
                raise
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(temporary, ignore_errors=True)  # the earlier folder, after a swap
    _fsync(path.parent)
    return path
