"""End to end: adapters without restarts on a real `llm-serve` (default model), through `openai`.

The session's shared server (tests/serve/conftest.py: `--adapter-dir D --allow-runtime-lora
--max-loras 2`, an API key, 4 sequences at once):
- a real `llm-train` run writes a new adapter into D while the server runs; it is listed, chatted
  with, then deleted and answered with 404, with no restart;
- 8 clients stream from an adapter while it is reloaded in place and another is loaded and
  unloaded: no 5xx, no dropped stream, and every greedy reply is exactly what one version of the
  adapter gives alone (never a mix of the two).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.helpers.adapters import make_lora_adapter
from tests.serve.conftest import E2E_KEY

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
LLM_TRAIN = str(Path(sys.executable).parent / "llm-train")
QUESTION = [{"role": "user", "content": "Name a colour."}]
TOKENS = 10
AUTH = {"Authorization": f"Bearer {E2E_KEY}"}


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server


@pytest.fixture(scope="module")
def root(server) -> Path:
    return server.adapter_root


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=E2E_KEY, max_retries=0, timeout=600)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=AUTH, timeout=300)


def metric_label(name: str) -> str:
    """How an open /metrics on a server with a key names an adapter (serve.metrics)."""
    return "adapter-" + hashlib.sha256(name.encode()).hexdigest()[:10]


def ids(client) -> list[str]:
    return [m.id for m in client.models.list().data]


def test_llm_train_into_the_adapter_dir_is_served_without_a_restart(server, client, root, tmp_path):
    cfg = {
        "model_name_or_path": "default", "dataset": "huangdi_demo",
        "dataset_dir": str(REPO / "configs" / "data" / "demo"), "cutoff_len": 32, "max_samples": 2,
        "per_device_train_batch_size": 2, "max_steps": 1, "logging_steps": 1,
        "output_dir": str(root / "persona" / "v1"),
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run(
        [LLM_TRAIN, str(tmp_path / "cfg.yaml"), "--no-progress"], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "persona/v1" in ids(client)
    reply = client.chat.completions.create(model="persona/v1", messages=QUESTION, max_tokens=8, temperature=0)
    assert reply.model == "persona/v1" and reply.choices[0].message.content
    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert f'llm_serve_adapter_loads_total{{adapter="{metric_label("persona/v1")}"}} 1.0' in metrics

    shutil.rmtree(root / "persona")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="persona/v1", messages=QUESTION, max_tokens=4)
    assert "persona/v1" not in ids(client)


def greedy(client, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=TOKENS, temperature=0)
    return r.choices[0].message.content


def test_load_reload_in_place_and_unload_under_8_streaming_clients(server, client, root, default_model):
    for name, seed in (("v1", 11), ("v2", 12)):
        make_lora_adapter(default_model.path, root / "runtime" / name, seed=seed, scale=0.05)

    def load(name: str, version: str, inplace: bool = False) -> httpx.Response:
        body = {"lora_name": name, "lora_path": str(root / "runtime" / version), "load_inplace": inplace}
        return post(server, "/v1/load_lora_adapter", body)

    # What each version gives alone (the directory serves both under their own names).
    alone = {v: greedy(client, f"runtime/{v}") for v in ("v1", "v2")}
    assert alone["v1"] != alone["v2"]
    assert load("live", "v1").status_code == 200

    results: list[tuple[float, float, str | Exception]] = []
    stop = threading.Event()

    def stream_forever() -> None:
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key=E2E_KEY, max_retries=0, timeout=600)
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                chunks = c.chat.completions.create(
                    model="live", messages=QUESTION, max_tokens=TOKENS, temperature=0, stream=True
                )
                text, finish = "", None
                for ch in chunks:
                    if ch.choices:
                        text += ch.choices[0].delta.content or ""
                        finish = ch.choices[0].finish_reason or finish
                results.append((t0, time.monotonic(), text if finish else RuntimeError("no finish_reason")))
            except openai.NotFoundError as exc:  # after the final unload: expected, and the client stops
                results.append((t0, time.monotonic(), exc))
                return
            except Exception as exc:  # a 5xx or a dropped stream
                results.append((t0, time.monotonic(), exc))
                return

    threads = [threading.Thread(target=stream_forever) for _ in range(8)]
    for t in threads:
        t.start()

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 600
        while len(results) < n and time.monotonic() < deadline:
            time.sleep(0.1)

    wait_for(8)
    reload_start = time.monotonic()
    assert load("live", "v2", inplace=True).status_code == 200
    reload_end = time.monotonic()
    assert load("side", "v1").status_code == 200  # a second adapter comes and goes meanwhile
    assert greedy(client, "side") == alone["v1"]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "side"}).status_code == 200
    wait_for(len(results) + 8)
    unload_start = time.monotonic()
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "live"}).status_code == 200
    stop.set()
    for t in threads:
        t.join(600)

    errors = [
        r for _, _, r in results if isinstance(r, Exception) and not isinstance(r, openai.NotFoundError)
    ]
    assert not errors, errors[:3]
    replies = [(t0, t1, r) for t0, t1, r in results if isinstance(r, str)]
    assert len(replies) >= 16
    for t0, t1, text in replies:
        assert text in (alone["v1"], alone["v2"]), text  # one version's reply, never a mix
        if t1 < reload_start:
            assert text == alone["v1"]
        if reload_end < t0:
            assert text == alone["v2"]
    assert any(t == alone["v2"] for _, _, t in replies) and any(t == alone["v1"] for _, _, t in replies)
    gone = [t1 for _, t1, r in results if isinstance(r, openai.NotFoundError)]
    assert all(t1 >= unload_start for t1 in gone)  # 404 only once the unload was sent
    shutil.rmtree(root / "runtime")  # the shared server's listing is back to what other tests expect
