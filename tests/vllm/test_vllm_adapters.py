"""End to end in ./.venv-vllm: adapter directories and runtime loading on `llm-serve --engine vllm`.

Run as: ./.venv-vllm/bin/python -m pytest tests/vllm/test_vllm_adapters.py (the main suite runs it
through test_vllm_suite.py when ./.venv-vllm exists). One vLLM server with `--adapter-dir`,
`--allow-runtime-lora`, one LoRA slot and one adapter in vLLM's host cache, so every switch between
the two adapters makes vLLM evict one and read the other from its folder again. The official
`openai` client checks that each name gets its own weights through loads, an in-place reload, an
unload and a deletion, and that a path outside the directory is refused.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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
ARGS = ["--model", "default", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
        "--engine", "vllm", "--enforce-eager", "--allow-runtime-lora", "--max-loras", "1",
        "--max-cpu-loras", "1", "--max-lora-rank", "8"]  # fmt: skip
PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


def make_adapters(base: Path, root: Path) -> None:
    """Two real PEFT adapters (random non-zero lora_B), written by the main venv (which has PEFT)."""
    code = (
        "import sys; from pathlib import Path; from tests.helpers.adapters import make_lora_adapter; "
        "b, r = Path(sys.argv[1]), Path(sys.argv[2]); "
        "make_lora_adapter(b, r / 'a', seed=1, r=8); make_lora_adapter(b, r / 'team' / 'b', seed=2, r=8)"
    )
    subprocess.run([str(MAIN_PY), "-c", code, str(base), str(root)], cwd=REPO, check=True, timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not MAIN_PY.is_file():
        pytest.skip(f"making the adapters needs the main venv at {MAIN_PY} (make setup)")
    from serve.models import resolve_model

    root = tmp_path_factory.mktemp("vllm-adapters") / "saves"
    make_adapters(resolve_model("default").path, root)
    srv = start_server([*ARGS, "--adapter-dir", str(root)], timeout=600, executable=str(VLLM_SERVE))
    srv.root = root
    yield srv
    srv.stop()


def reply(server, model: str) -> str:
    import openai

    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = c.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=16)
    return r.choices[0].message.content


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=300)


def test_directory_and_runtime_adapters_on_vllm(server):
    import openai

    ids = [m["id"] for m in httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]]
    assert "a" in ids and "team/b" in ids
    base = ids[0]
    a, b, plain = reply(server, "a"), reply(server, "team/b"), reply(server, base)
    assert len({a, b, plain}) == 3  # each adapter changes the reply
    assert reply(server, "a") == a  # read again after the one slot went to team/b

    r = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(server.root / "a")})
    assert r.status_code == 200 and "added successfully" in r.text
    assert reply(server, "c") == a
    r = post(
        server,
        "/v1/load_lora_adapter",
        {"lora_name": "c", "lora_path": str(server.root / "team" / "b"), "load_inplace": True},
    )
    assert r.status_code == 200 and reply(server, "c") == b
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        reply(server, "c")

    outside = server.root.parent / "outside"
    shutil.copytree(server.root / "a", outside)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(outside)})
    assert r.status_code == 403 and "outside every adapter directory" in r.json()["error"]["message"]

    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert 'llm_serve_adapter_requests_total{adapter="a"}' in metrics
    loads = re.search(r"^llm_serve_adapter_load_duration_seconds_count (\S+)$", metrics, re.M)
    assert loads and float(loads.group(1)) >= 3  # a, team/b, c (twice): vLLM's add_lora, timed

    shutil.rmtree(server.root / "a")
    with pytest.raises(openai.NotFoundError):
        reply(server, "a")
