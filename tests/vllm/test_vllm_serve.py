"""End to end in ./.venv-vllm: `llm-serve --engine vllm` against `llm-serve` (HF engine) from ./.venv.

Run as: ./.venv-vllm/bin/python -m pytest tests/vllm -x   (the main suite does this through
test_vllm_suite.py when ./.venv-vllm exists). One vLLM server and one HF server start per run, side by
side, both serving the default model in float32 and the same PEFT LoRA adapter (made with PEFT in the
main venv, since this venv has no PEFT). The official `openai` client drives both:
- parity: greedy chat replies of the two engines agree, for the base and for the adapter, and so do
  the prompt log-probabilities lm-eval's log-likelihood requests read;
- the vLLM server streams, lists and routes adapters by model name, and aborts a request whose client
  went away.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip(
    "vllm", reason="needs ./.venv-vllm (make vllm-env): run ./.venv-vllm/bin/python -m pytest tests/vllm"
)

from tests.helpers.server import start_server  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
MAIN_PY = REPO / ".venv" / "bin" / "python"
VLLM_SERVE = Path(sys.executable).parent / "llm-serve"
ADAPTER = "tuned"
COMMON = ["--model", "default", "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "4"]
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
]
MAX_TOKENS = 24


def make_adapter(base: Path, out: Path) -> Path:
    """A real PEFT adapter with random non-zero lora_B, written by the main venv (which has PEFT)."""
    code = (
        "import sys; from pathlib import Path; from tests.helpers.adapters import make_lora_adapter; "
        "make_lora_adapter(Path(sys.argv[1]), Path(sys.argv[2]), seed=0, r=8)"
    )
    subprocess.run([str(MAIN_PY), "-c", code, str(base), str(out)], cwd=REPO, check=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(vLLM server, HF server), started in parallel; both stopped at the end of the module."""
    if not MAIN_PY.is_file():
        pytest.skip(f"the HF side of the parity test needs the main venv at {MAIN_PY} (make setup)")
    from serve.models import resolve_model

    base = resolve_model("default").path
    adapter = make_adapter(base, tmp_path_factory.mktemp("adapter") / ADAPTER)
    args = [*COMMON, "--adapter", f"{ADAPTER}={adapter}"]
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(
                start_server,
                [*args, "--engine", "vllm", "--enforce-eager"],
                timeout=600,
                executable=str(VLLM_SERVE),
            ),
            pool.submit(
                start_server, args, timeout=600, executable=str(REPO / ".venv" / "bin" / "llm-serve")
            ),
        ]
    errors = [f.exception() for f in futures if f.exception() is not None]
    started = [f.result() for f in futures if f.exception() is None]
    if errors:
        for s in started:
            s.stop()
        raise errors[0]
    vllm_server, hf_server = started
    yield vllm_server, hf_server
    for s in (vllm_server, hf_server):
        s.stop()


def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


_replies: dict[tuple[str, str], list[str]] = {}


def greedy_replies(server, model: str) -> list[str]:
    """Greedy chat replies to PROMPTS, sent together (both engines batch them); cached per server+model."""
    key = (server.base_url, model)
    if key not in _replies:
        c = client(server)

        def ask(prompt: str) -> str:
            r = c.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=MAX_TOKENS,
            )
            return r.choices[0].message.content

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            _replies[key] = list(pool.map(ask, PROMPTS))
    return _replies[key]


def base_id(server) -> str:
    ids = [m.id for m in client(server).models.list().data]
    return next(i for i in ids if i != ADAPTER)


def test_engines_list_the_same_models(servers):
    vllm_server, hf_server = servers
    vllm_ids = sorted(m.id for m in client(vllm_server).models.list().data)
    hf_ids = sorted(m.id for m in client(hf_server).models.list().data)
    assert vllm_ids == hf_ids and ADAPTER in vllm_ids


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_greedy_replies_match_the_hf_engine(servers, which):
    vllm_server, hf_server = servers
    model = ADAPTER if which == "adapter" else base_id(vllm_server)
    with ThreadPoolExecutor(2) as pool:
        vllm_replies, hf_replies = pool.map(greedy_replies, (vllm_server, hf_server), (model, model))
    assert vllm_replies == hf_replies
    assert all(r.strip() for r in vllm_replies)


def test_the_adapter_changes_the_replies(servers):
    vllm_server, _ = servers
    assert greedy_replies(vllm_server, ADAPTER) != greedy_replies(vllm_server, base_id(vllm_server))


def test_prompt_logprobs_for_scoring_match_the_hf_engine(servers):
    """What lm-eval's log-likelihood requests read: echo=true, logprobs=1, token-id prompts."""
    vllm_server, hf_server = servers
    body = {
        "model": ADAPTER,
        "prompt": [[504, 3575, 282, 4649, 314, 7042, 30], [1780, 314, 260, 3575, 282, 4649, 47]],
        "max_tokens": 1,
        "logprobs": 1,
        "echo": True,
        "temperature": 0,
    }
    got = {}
    for name, server in (("vllm", vllm_server), ("hf", hf_server)):
        r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        got[name] = [c["logprobs"]["token_logprobs"][1:-1] for c in choices]
    for v_row, h_row in zip(got["vllm"], got["hf"], strict=True):
        assert len(v_row) == len(h_row) == 6
        assert v_row == pytest.approx(h_row, abs=2e-3)


def test_streaming_adds_up_to_the_full_reply(servers):
    vllm_server, _ = servers
    c = client(vllm_server)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    full = c.chat.completions.create(model=ADAPTER, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    stream = c.chat.completions.create(
        model=ADAPTER, messages=messages, temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    chunks = [ch for ch in stream if ch.choices]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert len(chunks) > 2
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def running_requests(server) -> float:
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    m = re.search(r"^llm_serve_running_requests (\S+)$", metrics, re.M)
    assert m, "llm_serve_running_requests missing from /metrics"
    return float(m.group(1))


def test_closing_a_stream_aborts_the_request(servers):
    vllm_server, _ = servers
    body = {
        "model": ADAPTER,
        "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
        "max_tokens": 600,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", vllm_server.base_url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
                seen += 1
                if seen == 3:
                    break
    # 600 tokens take minutes here; the slot must be free within seconds of the client leaving.
    deadline = time.monotonic() + 20
    while running_requests(vllm_server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running_requests(vllm_server) == 0


# -- structured outputs and tool calls: the same requests, the same parsed results ---------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
STRUCTURED_REQUESTS = {
    "json_schema": {
        "messages": [{"role": "user", "content": "Describe Paris as JSON with name and country."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "city",
                "strict": True,
                "schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 20},
                        "country": {"type": "string", "maxLength": 20},
                    },
                    "required": ["name", "country"],
                    "additionalProperties": False,
                },
            },
        },
    },
    "json_object": {
        "messages": [{"role": "user", "content": "Give a JSON object with a key answer."}],
        "response_format": {"type": "json_object"},
    },
    "choice": {
        "messages": [{"role": "user", "content": "Is Paris in France? yes or no"}],
        "structured_outputs": {"choice": ["yes", "no"]},
    },
    "regex": {
        "messages": [{"role": "user", "content": "When did the Eiffel Tower open?"}],
        "structured_outputs": {"regex": r"\d{4}"},
    },
    "required_tool": {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        # Exactly one call, then the end: with parallel calls allowed, the random adapter calls again
        # and again until max_tokens (finish_reason "length"), which tests nothing about the format.
        "parallel_tool_calls": False,
    },
}


def structured_reply(server, name: str) -> dict:
    body = {"model": ADAPTER, "temperature": 0, "max_tokens": 48, **STRUCTURED_REQUESTS[name]}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls") or []
    ]
    return {"content": message.get("content"), "calls": calls, "finish_reason": choice["finish_reason"]}


@pytest.mark.parametrize("name", sorted(STRUCTURED_REQUESTS))
def test_structured_outputs_parse_the_same_on_both_engines(servers, name):
    vllm_server, hf_server = servers
    with ThreadPoolExecutor(2) as pool:
        got_vllm, got_hf = pool.map(structured_reply, (vllm_server, hf_server), (name, name))
    assert got_vllm == got_hf
    if name == "required_tool":
        assert got_vllm["finish_reason"] == "tool_calls" and got_vllm["calls"][0][0] == "get_weather"
    elif got_vllm["finish_reason"] == "stop" and name.startswith("json"):
        assert isinstance(json.loads(got_vllm["content"]), dict)


def test_bad_structured_input_is_the_same_400_on_vllm(servers):
    vllm_server, _ = servers
    body = {
        "model": ADAPTER,
        "messages": [{"role": "user", "content": "hi"}],
        "structured_outputs": {"regex": "[a-"},
    }
    r = httpx.post(vllm_server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.regex"
