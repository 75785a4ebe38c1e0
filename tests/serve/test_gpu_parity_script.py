"""scripts/gpu_parity.py (part of scripts/gpu-check.sh) runs its whole comparison on CPU too.

The script is the GPU machine's parity check; no GPU is lent to CI, so its code path is exercised here
with `--device cpu` (same models, same mixed base + adapter batch, float32, identical tokens).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # loads the default model twice in a child process
def test_gpu_parity_script_passes_on_cpu():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_parity.py"), "--device", "cpu", "--tokens", "4"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "native on cpu: 8 sequences (base + adapter, mixed batch) identical" in proc.stdout
    assert "transformers on cpu: 8 sequences (base + adapter, mixed batch) identical" in proc.stdout
    assert proc.stdout.rstrip().endswith("gpu_parity: ok on cpu")
