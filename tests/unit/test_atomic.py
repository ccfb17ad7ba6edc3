"""Atomic writes: a failed write leaves the old file whole and no temp files behind."""

from __future__ import annotations

import json

import pytest

from tuneforge.atomic import atomic_dir, atomic_path, atomic_write_json, atomic_write_jsonl, atomic_write_text


def test_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "out.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_old_content(tmp_path):
    target = atomic_write_text(tmp_path / "keep.txt", "old")

    def broken():
        yield {"ok": 1}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(target, broken())
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_path_and_dir(tmp_path):
    with pytest.raises(ValueError), atomic_path(tmp_path / "never.bin") as tmp:
        tmp.write_bytes(b"half")
        raise ValueError
    assert not (tmp_path / "never.bin").exists()

    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        (tmp / "w.txt").write_text("v1")
    with pytest.raises(KeyError), atomic_dir(folder) as tmp:
        (tmp / "w.txt").write_text("v2-partial")
        raise KeyError
    assert (folder / "w.txt").read_text() == "v1"
    with atomic_dir(folder) as tmp:
        (tmp / "w.txt").write_text("v2")
    assert (folder / "w.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_written_files_and_folders_keep_the_users_umask(tmp_path):
    import os
    import stat

    from tuneforge.atomic import atomic_dir, atomic_write_text

    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "report.md", "hello")
        with atomic_dir(tmp_path / "adapter") as folder:
            (folder / "a.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # as open() would make it, not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o750  # as mkdir() would, not mkdtemp's 0700
