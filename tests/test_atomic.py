"""Crash-safe writes: the previous file or folder survives a failed write, no temporaries remain."""

from __future__ import annotations

import pytest

from weatherpeft.atomic import atomic_directory, atomic_write, write_json


def test_failed_file_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "card.json"
    write_json(path, {"a": 1})

    def half_write_then_fail(temporary):
        temporary.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_write_then_fail)
    assert path.read_text() == '{\n "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_directory_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "model"
    atomic_directory(path, lambda d: (d / "config.json").write_text("1"), marker="config.json")
    atomic_directory(path, lambda d: (d / "config.json").write_text("2"), marker="config.json")
    assert (path / "config.json").read_text() == "2"

    def fail(d):
        (d / "config.json").write_text("3")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_directory(path, fail, marker="config.json")
    assert (path / "config.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_directory_write_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        atomic_directory(tmp_path / "precious", lambda d: None, marker="config.json")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_replacing_a_folder_swaps_it_in_one_step_and_leaves_nothing_behind(tmp_path):
    from weatherpeft import atomic

    path = tmp_path / "adapter"
    atomic_directory(path, lambda d: (d / "config.json").write_text("1"), marker="config.json")
    atomic_directory(path, lambda d: (d / "config.json").write_text("2"), marker="config.json")
    assert (path / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (first / "x").write_text("a")
    if atomic._exchange(first, second):  # Linux: the swap the replacement relies on
        assert (second / "x").read_text() == "a" and not (first / "x").exists()


def test_a_kill_between_the_two_renames_is_undone_by_the_next_write(tmp_path, monkeypatch):
    from weatherpeft import atomic

    path = tmp_path / "adapter"
    atomic_directory(path, lambda d: (d / "config.json").write_text("good"), marker="config.json")
    # Where no atomic swap exists, a kill after the first rename leaves only the old copy:
    path.rename(tmp_path / ".adapter.old-1234abcd")
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)

    def fail(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_directory(path, fail, marker="config.json")
    assert (path / "config.json").read_text() == "good"  # restored, then kept
    atomic_directory(path, lambda d: (d / "config.json").write_text("new"), marker="config.json")
    assert (path / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
