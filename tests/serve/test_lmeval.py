"""lm-eval's own `local-completions` client against a real `llm-serve`, scored the same as lm-eval's
local HF model: the server's echo+logprobs path must give the same log-likelihoods, with the
choices after the first served from the prefix cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers.server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
DATA = Path(__file__).resolve().parents[1] / "data" / "lmeval"


def run_lm_eval(model: str, model_args: str, include: Path, out: Path) -> dict:
    exe = str(Path(sys.executable).parent / "lm_eval")
    cmd = [exe, "--model", model, "--model_args", model_args, "--tasks", "capitals_mc",
           "--include_path", str(include), "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = sorted(out.rglob("samples_capitals_mc_*.jsonl"))
    assert samples, f"no samples written under {out}"
    rows = sorted(
        (json.loads(line) for line in samples[-1].read_text().splitlines()), key=lambda r: r["doc_id"]
    )
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]["capitals_mc"]
    return {"acc": results["acc,none"], "loglik": [[float(r[0][0]) for r in row["resps"]] for row in rows]}


def test_local_completions_matches_local_hf(default_model, tmp_path):
    include = tmp_path / "tasks"
    include.mkdir()
    task = (DATA / "capitals.yaml.in").read_text().replace("@DATA@", str(DATA / "capitals.jsonl"))
    (include / "capitals.yaml").write_text(task)
    with start_server(["--max-num-seqs", "8"]) as server:
        served = run_lm_eval(
            "local-completions",
            f"model=SmolLM2-135M-Instruct,base_url={server.base_url}/v1/completions,"
            "tokenizer_backend=remote,num_concurrent=4,max_retries=1,timeout=600",
            include,
            tmp_path / "served",
        )
        metrics = httpx.get(f"{server.base_url}/metrics").text
    # The choices of a question share their context: later ones come from the prefix cache, and
    # their log-likelihoods still match lm-eval's local model below.
    hits = next(line for line in metrics.splitlines() if line.startswith("llm_serve_prefix_cache_hits_total"))
    assert float(hits.split()[-1]) > 0
    local = run_lm_eval("hf", f"pretrained={default_model.path},dtype=float32", include, tmp_path / "local")
    assert served["acc"] == local["acc"]
    assert served["acc"] >= 0.5  # the default model knows most capitals
    flat_served = [x for row in served["loglik"] for x in row]
    flat_local = [x for row in local["loglik"] for x in row]
    assert len(flat_served) == len(flat_local) == 32
    assert max(abs(a - b) for a, b in zip(flat_served, flat_local, strict=True)) < 1e-3
