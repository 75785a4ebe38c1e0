"""Atomic writes: the target is replaced only by a complete file, and no temporary file is left behind."""

from __future__ import annotations

import json

import pytest

from serve.atomic import atomic_path, write_json_atomic, write_text_atomic


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "info.json"
    write_json_atomic(target, {"名": 1})
    assert json.loads(target.read_text(encoding="utf-8")) == {"名": 1}
    assert "名" in target.read_text(encoding="utf-8")  # UTF-8 kept, not \\u-escaped
    write_text_atomic(target, "second\n")
    assert target.read_text() == "second\n"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in target.parent.iterdir()) == ["info.json"]


def test_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
    with pytest.raises(TypeError):
        write_json_atomic(target, {"not json": object()})
    assert target.read_text() == "old\n" and len(list(tmp_path.iterdir())) == 1
