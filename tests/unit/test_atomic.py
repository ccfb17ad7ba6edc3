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
