"""The load generator and server lifecycle against a tiny fake OpenAI server in a real subprocess."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from serve.bench import peers
from serve.bench.loadgen import LoadConfig, make_requests, run
from serve.bench.memory import RssSampler
from serve.bench.stats import summarize

FAKE = Path(__file__).with_name("fake_openai_server.py")


def fake_spec(*args: str) -> peers.ServerSpec:
    port = peers.free_port()
    return peers.ServerSpec(
        name="fake",
        cmd=[sys.executable, str(FAKE), "--port", str(port), *args],
        port=port,
        ready_path="/ready",
        adapters=("a0", "a1"),
        start_timeout_s=60,
    )


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    spec = fake_spec("--adapter", "a0", "--adapter", "a1", "--token-delay", "0.005")
    with peers.ServerProcess(spec, tmp_path_factory.mktemp("logs") / "fake.log") as proc:
        proc.wait_ready()
        yield proc


@pytest.mark.slow  # a real server process
def test_concurrent_streams_are_measured(fake_server):
    reqs = make_requests([f"prompt {i}" for i in range(8)], 16, 20, ["base", "a0", "a1"])
    assert [r.model for r in reqs[:4]] == ["base", "a0", "a1", "base"]
    cfg = LoadConfig(base_url=fake_server.spec.base_url, concurrency=4)
    with RssSampler(fake_server.pid, interval_s=0.05) as rss:
        results = run(cfg, reqs)
    assert rss.peak > 10 * 2**20  # a python+uvicorn process is well over 10 MB
    assert all(r.ok for r in results) and len(results) == 8
    assert all(r.output_tokens == 20 and r.prompt_tokens == 7 for r in results)  # from usage
    assert all(len(r.itl) == 19 and r.text == "tok " * 20 for r in results)
    s = summarize(results)
    # 4 streams of 20 tokens, 5 ms apart: each request takes >= 0.1 s, 2 waves -> >= 0.2 s
    assert s["duration_s"] >= 0.2
    # The mean, not the median: on a busy machine chunks arrive in bunches (gaps near 0, then 10 ms).
    assert s["itl_s"]["mean"] >= 0.004
    assert s["ttft_s"]["p50"] >= 0.004
    assert 0 < s["output_throughput"] <= 4 / 0.005


@pytest.mark.slow  # a real server process
def test_completions_api_and_token_counting_without_usage(tmp_path):
    spec = fake_spec("--no-usage")
    with peers.ServerProcess(spec, tmp_path / "fake.log") as proc:
        proc.wait_ready()
        assert proc.base_model() == "base"
        cfg = LoadConfig(base_url=spec.base_url, api="completions", concurrency=2)
        reqs = make_requests(["a", "b"], 5, 6, ["base"])
        counted = run(cfg, reqs, count_tokens=lambda text: len(text.split()))
        by_chunks = run(cfg, reqs)
    assert [r.output_tokens for r in counted] == [6, 6]
    assert [r.prompt_tokens for r in counted] == [5, 5]  # what we built, since no usage came back
    assert [r.output_tokens for r in by_chunks] == [6, 6]
    assert proc.proc.poll() is not None  # stopped with the whole process group


@pytest.mark.slow  # a real server process
def test_errors_are_results_not_exceptions(fake_server):
    cfg = LoadConfig(base_url=fake_server.spec.base_url, concurrency=2)
    results = run(cfg, make_requests(["x", "y"], 4, 8, ["bad", "fail-midstream"]))
    errors = sorted(r.error for r in results)
    assert not any(r.ok for r in results)
    assert errors[0].startswith("HTTP 400") and "bad model" in errors[0]
    assert errors[1] == "stream error: engine died"
    assert summarize(results)["failed"] == 2


@pytest.mark.slow  # a real server process
def test_launch_deadline_and_on_complete(fake_server):
    done = []
    cfg = LoadConfig(base_url=fake_server.spec.base_url, concurrency=1, launch_deadline_s=0.15)
    results = run(cfg, make_requests(["p"] * 20, 4, 10, ["base"]), on_complete=lambda n, r: done.append(n))
    # each request takes ~50 ms, so only the first few start before the deadline
    assert 1 <= len(results) < 20
    assert done == list(range(1, len(results) + 1))


def test_unreachable_server_is_a_failed_result():
    cfg = LoadConfig(base_url=f"http://127.0.0.1:{peers.free_port()}", concurrency=1)
    (result,) = run(cfg, make_requests(["p"], 4, 4, ["base"]))
    assert not result.ok and "ConnectError" in result.error


@pytest.mark.slow  # a real server process
def test_server_that_exits_is_reported_with_its_log(tmp_path):
    spec = peers.ServerSpec(
        name="broken",
        cmd=[sys.executable, "-c", "import sys; print('no weights here'); sys.exit(3)"],
        port=peers.free_port(),
        ready_path="/ready",
        start_timeout_s=30,
    )
    with peers.ServerProcess(spec, tmp_path / "broken.log") as proc, pytest.raises(peers.PeerError) as exc:
        proc.wait_ready()
    assert "exited with code 3" in str(exc.value) and "no weights here" in str(exc.value)
