"""The llama.cpp build's bookkeeping (no compiling): where a build is found, what counts as finished,
the reason and command when it is missing, and the llama-server command line the bench uses."""

from __future__ import annotations

import json
import shutil

import pytest

from serve import llama_server


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SERVE_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    return tmp_path


def _fake_build(root, finished: bool):
    (root / "bin").mkdir(parents=True)
    exe = root / "bin" / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    if finished:
        (root / "build.json").write_text(json.dumps({"version": llama_server.VERSION}))
    return exe


def test_only_a_finished_build_is_found(home, capsys):
    assert llama_server.server_binary() is None
    assert "make llama-cpp" in llama_server.missing_reason()
    assert llama_server.main(["path"]) == 1 and "make llama-cpp" in capsys.readouterr().err
    root = llama_server.install_dir()
    assert root == home / "llama.cpp" / llama_server.VERSION
    exe = _fake_build(root, finished=False)  # interrupted: no build.json
    assert llama_server.server_binary() is None
    (root / "build.json").write_text("{}")
    assert llama_server.server_binary() == exe and llama_server.missing_reason() is None
    assert llama_server.main(["path"]) == 0 and capsys.readouterr().out.strip() == str(exe)


def test_cached_build_returns_at_once_and_missing_tools_are_named(home, monkeypatch, capsys):
    exe = _fake_build(llama_server.install_dir(), finished=True)
    monkeypatch.setattr(shutil, "which", lambda tool: None)  # cached: no tool is even looked for
    assert llama_server.build() == exe
    assert llama_server.main(["build", "--version", "0.0.1"]) == 1
    assert "cmake is not installed" in capsys.readouterr().err


def test_llama_server_override(home, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "nope"))
    assert llama_server.server_binary() is None
    assert "$LLAMA_SERVER" in llama_server.missing_reason()
    exe = _fake_build(tmp_path / "mine", finished=False)
    monkeypatch.setenv("LLAMA_SERVER", str(exe))
    assert llama_server.server_binary() == exe


def test_server_command_has_one_slot_per_stream(tmp_path):
    cmd = llama_server.server_command(
        tmp_path / "llama-server", tmp_path / "m.gguf", 8123, threads=2, parallel=16, ctx_per_seq=320,
        alias="base",
    )  # fmt: skip
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert args["-np"] == "16" and args["-c"] == str(16 * 320) and args["-t"] == "2"
    assert args["--host"] == "127.0.0.1" and args["--port"] == "8123" and args["--alias"] == "base"
