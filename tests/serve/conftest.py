"""Fixtures shared by the serve end-to-end modules: one real `llm-serve` (default model) for them all.

It serves a start-up adapter (`persona`), an empty `--adapter-dir` with runtime loading on, and an
API key; starting it once per run of tests/serve saves the half minute a second server takes. Tests
that put adapters in its directory remove them before they end, so every test sees the same listing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

E2E_KEY = "test-key"


@pytest.fixture(scope="package")
def e2e_adapter(default_model, tmp_path_factory) -> Path:
    from tests.helpers.adapters import make_lora_adapter

    return make_lora_adapter(
        default_model.path, tmp_path_factory.mktemp("e2e") / "persona", seed=3, scale=0.02
    )


@pytest.fixture(scope="package")
def e2e_server(e2e_adapter, tmp_path_factory):
    from tests.helpers.server import start_server

    root = tmp_path_factory.mktemp("e2e-saves") / "saves"
    root.mkdir()
    args = ["--adapter", f"persona={e2e_adapter}", "--api-key", E2E_KEY, "--max-num-seqs", "4"]
    args += ["--adapter-dir", str(root), "--allow-runtime-lora", "--max-loras", "2"]
    with start_server(args) as server:
        server.adapter_root = root
        yield server
