"""In ./.venv-vllm: a vLLM engine core that dies turns `/health` to 503, and requests fail at once.

vLLM runs its engine core in a separate process; when that process is killed, `VLLMEngine.health`
reports the engine dead (from vLLM's own `errored`/`dead_error`), so a load balancer stops routing to
the replica and clients get a 503 that says the engine stopped instead of a hang or a 500.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip(
    "vllm", reason="needs ./.venv-vllm (make vllm-env): run ./.venv-vllm/bin/python -m pytest tests/vllm"
)

from tests.helpers.server import start_server  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.e2e]

VLLM_SERVE = Path(sys.executable).parent / "llm-serve"
ARGS = ["--model", "default", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "2"]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def engine_cores(pid: int) -> list:
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    return [c for c in children if "EngineCore" in c.name() or "EngineCore" in " ".join(c.cmdline())]


def test_killed_engine_core_turns_health_503_and_requests_fail_fast():
    with start_server(
        [*ARGS, "--engine", "vllm", "--enforce-eager"], timeout=600, executable=str(VLLM_SERVE)
    ) as srv:
        assert httpx.post(srv.base_url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
        cores = engine_cores(srv.proc.pid)
        assert cores, "no vLLM engine core process found under the server"
        for core in cores:
            core.kill()
        deadline = time.monotonic() + 60
        while httpx.get(srv.base_url + "/health", timeout=10).status_code != 503:
            # vLLM notices a dead core when it next talks to it: keep asking for work.
            httpx.post(srv.base_url + "/v1/chat/completions", json=CHAT, timeout=30)
            assert time.monotonic() < deadline, "health still 200 a minute after the engine core died"
            time.sleep(0.5)
        assert "vLLM engine stopped" in httpx.get(srv.base_url + "/health").json()["detail"]
        t0 = time.monotonic()
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert time.monotonic() - t0 < 5
        assert httpx.get(srv.base_url + "/ready").status_code == 503
