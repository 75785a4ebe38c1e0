"""The decode-step profiler on the tiny Llama: every batch size gets a step time, an op split that
adds up to the profiled step, and a rate for each weight shape."""

from __future__ import annotations

import json

import pytest

from serve.bench import decode_profile


def test_profile_splits_a_step_by_op(tiny_model_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_model_dir), "--batch", "1,3", "--context", "20", "--steps", "4",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert decode_profile.main(argv) == 0
    (written,) = tmp_path.glob("decode-profile-*.json")
    results = json.loads(written.read_text())["results"]
    assert [r["batch"] for r in results] == [1, 3]
    for r in results:
        split = r["split_ms"]
        assert split["matmul"] > 0 and split["attention"] > 0
        assert sum(split.values()) == pytest.approx(r["split_total_ms"])
        assert r["split_total_ms"] >= 0.99 * r["step_ms_min"]  # the fastest step is all accounted for
        assert r["tok_s"] == pytest.approx(r["batch"] / r["step_ms_p50"] * 1e3)
        assert {tuple(m["shape"]) for m in r["matmuls"]} >= {(49152, 64)}  # the tiny model's LM head
    assert "outside ops (Python, dispatch)" in capsys.readouterr().out


def test_bad_batch_is_refused(capsys):
    assert decode_profile.main(["--batch", "0"]) == 1
    assert "--batch" in capsys.readouterr().err
