"""The Train tab's run manager: one llm-train child at a time, stop/resume, failure, state on disk.

A stand-in llm-train (tests/ui/fake_llm_train.py) writes trainer_log.jsonl rows and publishes the
adapter as the real one does, in a fraction of a second; the real one runs in the browser test.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from ui.training.runs import RunManager, RunRecord, RunRefused, read_progress

FAKE = [sys.executable, str(Path(__file__).with_name("fake_llm_train.py"))]
CFG = {"model_name_or_path": "default", "stage": "sft", "dataset": "demo", "dataset_dir": "/d"}


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def saves(tmp_path) -> Path:
    path = tmp_path / "saves"
    path.mkdir()
    return path


def manager(saves: Path, served: list | None = None) -> RunManager:
    def publish(record: RunRecord):
        if served is not None:
            served.append(record.name)
        return record.name, None

    return RunManager([saves], on_finished=publish, command=FAKE)


@pytest.mark.slow  # the stand-in llm-train is a real process
def test_run_finishes_is_published_and_listed(saves, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    served: list[str] = []
    runs = manager(saves, served)
    record = runs.start(saves, "demo-sft", CFG)
    assert record.status == "running" and record.config_path.is_file()
    wait_for(lambda: record.status == "finished" and record.served_as)
    assert served == ["demo-sft"] and record.returncode == 0
    assert (saves / "demo-sft" / "adapter_model.safetensors").is_file()
    assert not (saves / ".demo-sft.partial").exists()
    progress = read_progress(record.run_dir())
    assert (progress.step, progress.total) == (4, 4)
    assert [s for s, _ in progress.train] == [1, 2, 3, 4] and [s for s, _ in progress.evals] == [2, 4]
    saved = json.loads((record.record_dir / "run.json").read_text())
    assert saved["status"] == "finished" and saved["served_as"] == "demo-sft"
    [summary] = runs.runs()
    assert (summary.name, summary.status, summary.stage, summary.data, summary.steps) == (
        "demo-sft",
        "finished",
        "sft",
        "demo",
        4,
    )
    assert summary.loss_png == saves / "demo-sft" / "loss.png"


@pytest.mark.slow  # the stand-in llm-train is a real process
def test_second_start_is_refused_then_stop_keeps_a_checkpoint_and_resume_finishes(saves, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN", "wait")
    runs = manager(saves)
    record = runs.start(saves, "long", CFG)
    wait_for(lambda: read_progress(record.run_dir()).step >= 2)
    with pytest.raises(
        RunRefused, match=r"run long is still in progress \(step \d+/10000\); one run at a time"
    ):
        runs.start(saves, "other", CFG)
    runs.stop()
    wait_for(lambda: record.status == "stopped")
    assert record.returncode == 130 and record.resumable
    assert not (saves / "long").exists()  # nothing half-written where the adapter goes
    assert "stopped (resumable)" in [s.status for s in runs.runs()]
    with pytest.raises(RunRefused, match="an interrupted run of long .*Resume it, or tick Overwrite"):
        runs.start(saves, "long", CFG)

    monkeypatch.setenv("FAKE_TRAIN", "ok")
    stopped_at = read_progress(record.run_dir()).step
    runs.resume()
    assert record.status == "running" and record.resumes == 1
    wait_for(lambda: record.status == "finished")
    assert (saves / "long" / "run_manifest.json").is_file()
    assert "--- resumed at" in record.log_path.read_text()
    assert stopped_at >= 2


@pytest.mark.slow  # the stand-in llm-train is a real process
def test_failed_run_shows_its_log_and_leaves_no_adapter(saves, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN", "fail")
    runs = manager(saves)
    record = runs.start(saves, "broken", CFG)
    wait_for(lambda: record.status == "failed")
    assert record.returncode == 1 and not record.resumable
    assert "RuntimeError: something broke in step 1" in runs.log_tail(record)
    assert not (saves / "broken").exists()
    with pytest.raises(RunRefused, match="no checkpoint to resume"):
        runs.resume()


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65])
def test_output_names_stay_inside_the_root(saves, name):
    with pytest.raises(ValueError, match="output name"):
        manager(saves).output_dir(saves, name)


def test_symlinked_output_and_foreign_roots_are_refused(saves, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (saves / "link").symlink_to(outside)
    runs = manager(saves)
    with pytest.raises(RunRefused, match="leads outside"):
        runs.output_dir(saves, "link")
    with pytest.raises(RunRefused, match="not an adapter directory of this server"):
        runs.start(outside, "x", CFG)


def test_existing_adapter_needs_overwrite(saves):
    (saves / "taken").mkdir()
    (saves / "taken" / "adapter_config.json").write_text("{}")
    with pytest.raises(
        RunRefused, match="already holds an adapter; choose another output name or tick Overwrite"
    ):
        manager(saves).start(saves, "taken", CFG)


def test_a_run_left_running_by_a_dead_server_is_interrupted(saves):
    record = RunRecord(name="ghost", root=str(saves), status="running", started_at=time.time(), pid=2**22 + 7)
    record.save()
    runs = manager(saves)
    current = runs.current()
    assert current is not None and current.name == "ghost" and current.status == "interrupted"
    assert json.loads((record.record_dir / "run.json").read_text())["status"] == "interrupted"
