"""Shared fixtures: the real default model, its real tokenizer alone, a tiny random Llama with it, offline env.

Fast tests (`-m "not slow"`) use `real_tokenizer_dir` and `tiny_model_dir`, which need no model
conversion; `default_model` bootstraps the real model and is for tests marked slow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As llm-serve does: busy-waiting OpenMP threads collapse small GEMMs when the other core is busy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "llamafactory-demo"


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct, float32), bootstrapped once."""
    from serve.models import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory) -> Path:
    """The default model's tokenizer files and chat template, without its weights (fast tests)."""
    from tests.helpers.models import write_real_tokenizer

    return write_real_tokenizer(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama with the default model's real tokenizer (fast tests)."""
    from tests.helpers.models import make_tiny_llama

    return make_tiny_llama(real_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def shared_demo_data() -> Path:
    """LLaMA-Factory's demo datasets, present beside the repository in CI."""
    if not (SHARED_DATA / "dataset_info.json").is_file():
        pytest.skip(f"LLaMA-Factory demo data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """The fast tier never bootstraps the real model: a test that asks for it must be marked slow."""
    for item in items:
        if "default_model" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(
                f"{item.nodeid} uses the default_model fixture but is not marked slow; use "
                "real_tokenizer_dir or tiny_model_dir, or mark it @pytest.mark.slow"
            )


# The fast tier starts no process either. Library probes that shell out once per process or machine
# (platform's `uname -p`, ctypes.util's `ldconfig`/compiler lookups, matplotlib's `fc-list` while it
# builds its font cache on a fresh machine) are not a test's process.
_PROBES = {"uname", "ldconfig", "ld", "gcc", "cc", "objdump", "fc-list"}
_SPAWN_EVENTS = ("subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn")
_watch = {"on": False, "spawned": []}


def _spawn_audit(event, args):
    if _watch["on"] and event in _SPAWN_EVENTS:
        exe = (
            Path(str(args[0])).name
            if event in ("subprocess.Popen", "os.posix_spawn", "os.exec") and args
            else ""
        )
        if exe not in _PROBES:
            _watch["spawned"].append(f"{event} {exe}".strip())


sys.addaudithook(_spawn_audit)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _watch["on"], _watch["spawned"] = item.get_closest_marker("slow") is None, []


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process():
    yield
    spawned, _watch["spawned"] = _watch["spawned"], []
    if spawned:
        pytest.fail(
            f"a test outside the slow tier started a process ({', '.join(sorted(set(spawned)))}); "
            "mark it @pytest.mark.slow (make test-fast runs none)"
        )


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    _watch["on"] = False
