"""Adapter directories and runtime loading through the app (TestClient, scripted engine, real checks).

The adapters are real PEFT folders for the tiny model; the checks that refuse them are the real
start-up ones (`preflight.AdapterChecker`), so every row of the path-escape table is answered with
the status and reason a client would get from `llm-serve`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.adapter_dirs import AdapterRoots
from serve.adapter_registry import AdapterRegistry
from serve.config import ConfigError, ServeConfig, load_config
from serve.http.app import build_app
from serve.models import ResolvedModel
from serve.preflight import AdapterChecker
from serve.served import ServedModels
from tests.helpers.adapters import make_lora_adapter
from tests.serve.fakes import FakeEngine

MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def made(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters made once: two for the tiny model, one for another base (more layers)."""
    from tests.helpers.models import make_tiny_llama

    src = tmp_path_factory.mktemp("made")
    other = make_tiny_llama(tiny_model_dir, src / "other-base", layers=3)
    return {
        "a": make_lora_adapter(tiny_model_dir, src / "a", seed=1, targets=("q_proj", "v_proj")),
        "b": make_lora_adapter(tiny_model_dir, src / "b", seed=2, targets=("q_proj", "v_proj")),
        "other": make_lora_adapter(other, src / "other", seed=3, targets=("q_proj",)),
    }


@pytest.fixture
def root(tmp_path, made) -> Path:
    root = tmp_path / "saves"
    shutil.copytree(made["a"], root / "a")
    shutil.copytree(made["b"], root / "persona" / "v2")
    shutil.copytree(made["a"], root / ".c.partial")  # llm-train's staging folder: never served
    (root / "notes").mkdir()  # not an adapter
    return root


def make_client(tiny_model_dir, engine, root: Path, **cfg) -> TestClient:
    config = ServeConfig(model=str(tiny_model_dir), adapter_dirs=[str(root)], **cfg)
    resolved = ResolvedModel(name=str(tiny_model_dir), path=tiny_model_dir, served_id="tiny")

    def served(eng) -> ServedModels:
        def registry(make_model, list_model, reserved):
            checker = AdapterChecker(config, resolved)
            return AdapterRegistry(
                eng, checker, AdapterRoots(config.adapter_dirs), make_model, list_model, reserved
            )

        return ServedModels("tiny", str(tiny_model_dir), [], eng.tokenizer, registry_factory=registry)

    return TestClient(build_app(engine, config, served))


@pytest.fixture
def engine(real_tokenizer_dir):
    return FakeEngine(real_tokenizer_dir, adapters=())


def ids(client) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


def chat(client, model: str):
    return client.post("/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 2})


def test_directory_adapters_are_listed_loaded_on_first_request_and_follow_the_disk(
    tiny_model_dir, engine, root, made
):
    with make_client(tiny_model_dir, engine, root) as client:
        assert ids(client) == ["tiny", "a", "persona/v2"]
        assert engine.added == {}  # listing reads no weights
        assert chat(client, "persona/v2").status_code == 200
        (key,) = engine.added
        assert key.startswith("persona/v2@") and engine.requests[-1].adapter == key
        assert chat(client, "persona/v2").status_code == 200 and len(engine.added) == 1  # loaded once

        # llm-train renames a finished run into place: served at once, under its relative path.
        shutil.copytree(made["b"], root / ".new.partial")
        os.rename(root / ".new.partial", root / "new")
        assert chat(client, "new").status_code == 200 and "new" in ids(client)

        # Rewritten in place (a new file): the next request gets a new version; the old one retires.
        shutil.rmtree(root / "persona" / "v2")
        shutil.copytree(made["a"], root / "persona" / "v2")
        assert chat(client, "persona/v2").status_code == 200
        new_key = engine.requests[-1].adapter
        assert new_key != key and (key, new_key) in engine.removed

        # Deleted: unlisted, 404, and the engine lets the version go.
        shutil.rmtree(root / "persona")
        r = chat(client, "persona/v2")
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert "persona/v2" not in ids(client) and (new_key, None) in engine.removed
        assert chat(client, ".c.partial").status_code == 404  # staging folders never served


def test_runtime_loading_is_off_by_default_and_behind_the_api_key(tiny_model_dir, engine, root):
    body = {"lora_name": "x", "lora_path": str(root / "a")}
    with make_client(tiny_model_dir, engine, root) as client:
        r = client.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 404 and "--allow-runtime-lora" in r.json()["error"]["message"]
    with make_client(tiny_model_dir, engine, root, allow_runtime_lora=True, api_key="k") as client:
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 401
        auth = {"Authorization": "Bearer k"}
        r = client.post("/v1/load_lora_adapter", json=body, headers=auth)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'x' added successfully."


def test_runtime_load_reload_in_place_and_unload(tiny_model_dir, engine, root):
    with make_client(tiny_model_dir, engine, root, allow_runtime_lora=True) as client:
        load = {"lora_name": "mine", "lora_path": str(root / "a")}
        assert client.post("/v1/load_lora_adapter", json=load).status_code == 200
        assert "mine" in ids(client) and chat(client, "mine").status_code == 200
        first = engine.requests[-1].adapter
        r = client.post("/v1/load_lora_adapter", json={**load, "lora_path": str(root / "persona/v2")})
        assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]
        r = client.post("/v1/load_lora_adapter", json={**load, "load_inplace": True})
        assert r.status_code == 200 and chat(client, "mine").status_code == 200
        second = engine.requests[-1].adapter
        assert second != first and (first, second) in engine.removed
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "mine"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'mine' removed successfully."
        assert (second, None) in engine.removed and "mine" not in ids(client)
        assert chat(client, "mine").status_code == 404
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "mine"})
        assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": str(root / "a")})
        assert r.status_code == 400 and "base model" in r.json()["error"]["message"]


def _escapes(root: Path, made: dict[str, Path], tmp: Path) -> dict[str, str]:
    """Each attempt as the `lora_path` a client sends (the files behind it made here)."""
    outside = tmp / "outside"
    shutil.copytree(made["a"], outside)
    os.symlink(outside, root / "link-out")
    shutil.copytree(made["a"], root / "file-link")
    (root / "file-link" / "adapter_model.safetensors").unlink()
    os.symlink(outside / "adapter_model.safetensors", root / "file-link" / "adapter_model.safetensors")
    # Files serve.artifacts.model_folder reads besides the config and weights, each linked out.
    (outside / "generation_config.json").write_text('{"eos_token_id": 2}')
    shutil.copytree(made["a"], root / "gen-link")
    os.symlink(outside / "generation_config.json", root / "gen-link" / "generation_config.json")
    (tmp / "templates").mkdir()
    (tmp / "templates" / "tool_use.jinja").write_text("{{ messages }}")
    shutil.copytree(made["a"], root / "tpl-link")
    os.symlink(tmp / "templates", root / "tpl-link" / "additional_chat_templates")
    (root / "a-file").write_text("not a folder")
    shutil.copytree(made["a"], root / "pickled")
    os.rename(root / "pickled" / "adapter_model.safetensors", root / "pickled" / "adapter_model.bin")
    shutil.copytree(made["other"], root / "other-base")
    return {
        "dotdot": f"{root}/../outside",
        "absolute elsewhere": str(outside),
        "symlink out of the root": str(root / "link-out"),
        "weights symlinked out": str(root / "file-link"),
        "generation config symlinked out": str(root / "gen-link"),
        "templates folder symlinked out": str(root / "tpl-link"),
        "file instead of a folder": str(root / "a-file"),
        "pickled .bin adapter": str(root / "pickled"),
        "different base": str(root / "other-base"),
        "staging folder": str(root / ".c.partial"),
        "missing": str(root / "nope"),
        "the root itself": str(root),
        "relative escape": os.path.relpath(outside),
    }


ESCAPES = [
    ("dotdot", 403, r"resolves outside every adapter directory"),
    ("absolute elsewhere", 403, r"resolves outside every adapter directory"),
    ("symlink out of the root", 403, r"resolves outside every adapter directory"),
    ("weights symlinked out", 403, r"`file-link/adapter_model.safetensors` is a symlink to a file outside"),
    (
        "generation config symlinked out",
        403,
        r"`gen-link/generation_config.json` is a symlink to a file outside",
    ),
    (
        "templates folder symlinked out",
        403,
        r"`tpl-link/additional_chat_templates` is a symlink to a file outside",
    ),
    ("file instead of a folder", 400, r"`a-file` is a file, not an adapter folder"),
    ("pickled .bin adapter", 400, r"`pickled/adapter_model.bin` is a pickled checkpoint.*safetensors"),
    ("different base", 409, r"`other-base`.*trained on .* but the served base is 'tiny'"),
    ("staging folder", 409, r"staging folder"),
    ("missing", 404, r"`nope` does not exist"),
    ("the root itself", 400, r"is an adapter directory root"),
    ("relative escape", 403, r"resolves outside every adapter directory"),
]


def test_path_escapes_are_refused_with_status_and_reason(
    tiny_model_dir, engine, root, made, tmp_path, caplog
):
    paths = _escapes(root, made, tmp_path)
    with make_client(tiny_model_dir, engine, root, allow_runtime_lora=True) as client:
        for case, status, reason in ESCAPES:
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": paths[case]})
            err = r.json()["error"]
            assert r.status_code == status, (case, err)
            assert __import__("re").search(reason, err["message"]), (case, err["message"])
            assert str(tmp_path) not in err["message"].replace(paths[case], ""), (case, err["message"])
        assert engine.added == {}  # nothing was read into the engine
        # The same refusals for folders served from the directory, logged once however often asked.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="serve.adapter_registry"):
            for _ in range(3):
                r = chat(client, "other-base")
                assert r.status_code == 409 and "other-base" in r.json()["error"]["message"]
        assert sum("other-base" in rec.getMessage() for rec in caplog.records) == 1
        r = chat(client, "pickled")
        assert r.status_code == 400 and "pickled checkpoint" in r.json()["error"]["message"]
        assert "pickled" not in ids(client)  # incomplete folders are not listed


def test_models_answers_503_with_retry_after_while_loading(tiny_model_dir, root):
    class Slow(FakeEngine):
        async def start(self):
            import asyncio

            await asyncio.sleep(3600)

    engine = Slow(Path(os.environ.get("LLM_SERVE_TEST_TOKENIZER", tiny_model_dir)), adapters=())
    with make_client(tiny_model_dir, engine, root) as client:
        r = client.get("/v1/models")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "GET /ready" in r.json()["error"]["message"]


def test_runtime_loading_without_a_root_is_refused_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match=r"--adapter-dir DIR"):
        load_config(None, {"allow_runtime_lora": True})
    from serve.cli import main

    assert main(["--allow-runtime-lora", "--port", "0"]) == 2
    assert main(["--adapter-dir", str(tmp_path / "missing")]) == 2
