"""The Train tab's event handlers with a stand-in llm-train and a fake server API (no model, no browser)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from ui.training.handlers import SETTINGS, TrainHandlers, TrainOptions
from ui.training.serving import AdapterPublisher

FAKE = [sys.executable, str(Path(__file__).with_name("fake_llm_train.py"))]
DEMO = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo"
FORM = {
    "stage": "sft",
    "lora_rank": 8.0,
    "lora_alpha": 0.0,
    "lora_target": "all",
    "learning_rate": 1e-4,
    "num_train_epochs": 3.0,
    "max_steps": 3.0,
    "per_device_train_batch_size": 1.0,
    "cutoff_len": 32.0,
    "val_size": 0.0,
    "advanced": "",
}


def values(**changes) -> list:
    return [{**FORM, **changes}[name] for name in SETTINGS]


@pytest.fixture
def handlers(tmp_path):
    models = [{"id": "SmolLM2", "parent": None}]

    def api(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": models})
        models.append({"id": json.loads(request.content)["lora_name"], "parent": "SmolLM2"})
        return httpx.Response(200, text="ok")

    publisher = AdapterPublisher(
        "http://s:1", None, wait_s=0.1, poll_s=0.01, transport=httpx.MockTransport(api)
    )
    options = TrainOptions.for_page([tmp_path / "saves"], [], tmp_path / "feedback", "default")
    options.configs_dir = tmp_path / "configs"
    (tmp_path / "saves").mkdir()
    return TrainHandlers("http://s:1", None, options, publisher=publisher, command=FAKE, warm_up=False)


def demo_key(handlers) -> str:
    return next(key for label, key in handlers.dataset_choices()[0] if label.startswith("huangdi_demo"))


def test_picking_a_dataset_sets_its_stage_and_an_output_name(handlers):
    key = demo_key(handlers)
    assert handlers.pick_dataset(key, "") == ("sft", "huangdi_demo-sft")
    assert handlers.pick_dataset(key, "mine") == ("sft", "mine")


def test_yaml_and_save(handlers, tmp_path):
    key, root = demo_key(handlers), str(tmp_path / "saves")
    text = handlers.config_text(key, root, "run1", *values())
    assert "max_steps: 3" in text and f"output_dir: {tmp_path / 'saves' / 'run1'}" in text
    assert "cannot build the config: output name '../x'" in handlers.config_text(key, root, "../x", *values())
    assert "not an adapter directory" in handlers.config_text(key, str(tmp_path), "run1", *values())
    note = handlers.save_config(key, root, "run1", *values())
    assert note.startswith(f"Saved `{tmp_path / 'configs' / 'run1.yaml'}`")


@pytest.mark.slow  # the stand-in llm-train is a real process
def test_start_needs_a_clean_preview_then_runs_polls_and_refreshes_the_pickers(handlers, tmp_path):
    key, root = demo_key(handlers), str(tmp_path / "saves")
    refused = handlers.start(key, root, "run1", False, False, *values())
    assert "Not started:</b> the preview shows problems" in refused[0]

    view = handlers.start(key, root, "run1", False, True, *values())
    assert 'data-status="running"' in view[0] and view[-1].active  # the timer ticks while it runs
    again = handlers.start(key, root, "run2", False, True, *values())
    assert "one run at a time" in again[0]

    refreshed = []

    async def refresh_models(chat, left, right):
        refreshed.append((chat, left, right))
        return ("m", "l", "r", "e")

    deadline = time.monotonic() + 20
    seen: dict = {}
    while True:
        out = asyncio.run(handlers.poll(seen, True, "SmolLM2", "SmolLM2", None, refresh_models))
        seen = out[8]
        if not out[7].active:
            break
        assert time.monotonic() < deadline, out[0]
        time.sleep(0.05)
    status, progress, curve = out[0], out[1], out[2]
    assert 'data-status="finished"' in status and "served as <code>run1</code>" in status
    assert "step 4/4" in progress and curve.count('class="train-point"') == 4
    assert refreshed == [("SmolLM2", "SmolLM2", None)] and out[9:13] == ("m", "l", "r", "e")
    assert handlers.runs_table()[0][:2] == ["run1", "finished"]
    assert out[6]["visible"] and "run1" in out[6]["value"]  # "Open A/B" shown
    tabs, left, right = handlers.compare()
    assert (tabs.selected, left["value"], right["value"]) == ("ab", "SmolLM2", "run1")
