"""Runs the vLLM tests inside ./.venv-vllm from the main suite (`make test` runs in ./.venv).

vLLM cannot share the main environment (it needs newer transformers than LLaMA-Factory), so its tests
run as a subprocess: `./.venv-vllm/bin/python -m pytest tests/vllm -m vllm`, with a time limit. Skipped
when ./.venv-vllm has not been built (`make vllm-env`), and inside ./.venv-vllm itself.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
TIME_LIMIT_S = int(os.environ.get("LLM_SERVE_VLLM_TEST_TIMEOUT", "1200"))


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_suite_passes_in_its_own_venv(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("already inside the vLLM environment: its tests run directly")
    if not (REPO / ".venv-vllm" / ".lock-hash").is_file():
        pytest.skip("./.venv-vllm is not built; run `make vllm-env` to test the vLLM engine")
    cmd = [str(VLLM_PY), "-m", "pytest", "tests/vllm", "-m", "vllm", "-x", "-q", "-p", "no:cacheprovider", "--durations=5",
           f"--basetemp={tmp_path / 'pytest'}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    # Own process group, so a timeout also ends the servers and vLLM engine processes it started.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the vLLM suite ran past {TIME_LIMIT_S} s:\n{out[-6000:]}")
    sys.stdout.write(out[-3000:])
    assert proc.returncode == 0, f"vLLM suite failed ({proc.returncode}):\n{out[-10000:]}"
