"""A failing step or a dead engine, with the real HF engine (tiny random Llama) behind the real app.

One request must never stop the engine: a step that raises fails only its own requests (500 that
says so) and the engine keeps serving; a loop that dies turns /health to 503 and every request fails
fast with a 503 that says the engine stopped; shutdown of a dead engine returns at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.config import ServeConfig
from serve.engine.hf import HFEngine
from serve.http.app import build_app
from serve.models import ResolvedModel
from serve.served import ServedModels

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "Hello there"}]
POISON = "poison"  # a request whose prompt contains this word makes its step raise


def make_client(model_dir: Path, **cfg) -> tuple[TestClient, HFEngine]:
    resolved = ResolvedModel(name=str(model_dir), path=model_dir, served_id="tiny")
    config = ServeConfig(model=str(model_dir), max_model_len=256, max_num_seqs=4, **cfg)
    engine = HFEngine(config, resolved, [])
    app = build_app(engine, config, lambda eng: ServedModels("tiny", str(model_dir), [], eng.tokenizer))
    return TestClient(app), engine


def wait_ready(client: TestClient, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.1)


def poison_steps(engine: HFEngine) -> None:
    """Make a step raise, as a numerical or kernel fault would, when it carries a poisoned prompt:
    its prefill when the prompt says "poison", its third decode step when it says "poison later"."""
    poison = engine.tokenizer.encode(f" {POISON}", add_special_tokens=False)
    later = engine.tokenizer.encode(f" {POISON} later", add_special_tokens=False)
    real_step = engine._step

    def has(ids, sub):
        return any(ids[i : i + len(sub)] == sub for i in range(len(ids)))

    def step(plan):
        for seq in [*plan.decode, *(c.seq for c in plan.prefill)]:
            ids = seq.prompt_ids
            if has(ids, later) and len(seq.output_ids) >= 2 or has(ids, poison) and not has(ids, later):
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_step(plan)

    engine._step = step


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tiny_model_dir):
    client, engine = make_client(tiny_model_dir)
    with client:
        wait_ready(client)
        poison_steps(engine)
        cached = engine.scheduler.prefix_cache.cached_tokens
        bad = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"a {POISON} pill"}], "max_tokens": 4},
        )
        assert bad.status_code == 500, bad.text
        err = bad.json()["error"]
        assert err["code"] == "generation_failed" and "step" in err["message"]
        assert "Traceback" not in bad.text and "/" not in err["message"].split("see")[0]
        # Failing after the first byte of a stream: the failure arrives as an error chunk, then [DONE].
        streamed = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": f"a {POISON} later"}],
                "max_tokens": 8,
                "stream": True,
            },
        )
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        assert '"delta": {"content"' in streamed.text and '"generation_failed"' in streamed.text
        # Nothing a failed step touched is kept for prefix reuse.
        assert engine.scheduler.prefix_cache.cached_tokens == cached
        # The engine goes on: health stays 200, the next requests succeed, no sequence is left behind.
        assert client.get("/health").status_code == 200
        for _ in range(3):
            ok = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
            assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        assert engine.failed_steps == 2
        assert engine.stats().running == 0 and engine.stats().waiting == 0
        metrics = client.get("/metrics").text
        assert 'status="500"' in metrics and 'status="200"' in metrics


def test_a_dead_engine_answers_503_at_once_and_shuts_down_fast(tiny_model_dir):
    client, engine = make_client(tiny_model_dir)
    with client:
        wait_ready(client)

        def broken_schedule():
            raise RuntimeError("scheduler state corrupted")

        engine.scheduler.schedule = broken_schedule
        failed = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
        assert failed.status_code in (500, 503), failed.text  # the request that met the failure
        health = client.get("/health")
        assert health.status_code == 503 and "scheduler state corrupted" in health.json()["detail"]
        assert client.get("/ready").status_code == 503
        t0 = time.monotonic()
        later = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
        assert time.monotonic() - t0 < 2
        err = later.json()["error"]
        assert (
            later.status_code == 503
            and err["code"] == "engine_dead"
            and "still loading" not in err["message"]
        )
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 503
        t0 = time.monotonic()
    # Leaving the client shuts the app down: a dead engine has nothing to drain.
    assert time.monotonic() - t0 < 5
    assert engine.health.state == "dead"


def test_stats_and_shutdown_work_after_a_failed_load(tmp_path):
    import asyncio

    missing = tmp_path / "no-model"
    engine = HFEngine(ServeConfig(model=str(missing)), ResolvedModel(str(missing), missing, "x"), [])
    with pytest.raises(Exception, match="no-model"):  # transformers' own error naming the path
        engine.load()
    assert engine.stats().running == 0 and engine.health.state == "loading"
    asyncio.run(engine.shutdown(timeout=1))
    assert engine.health.state == "stopping"
