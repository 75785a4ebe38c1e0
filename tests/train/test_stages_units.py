"""Stage and launch checks that run before any weights load, the manifest's new fields, the worker's
agreed stop, and the reward-model directory checks (no model, no process)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from train import deepspeed_env, ppo_compat
from train.config import ConfigError, TrainConfig
from train.launch import Launch
from train.manifest import build_manifest, checkpoint_tokens, parallel_layout, read_metrics
from train.reward_model import RewardModelError, check_reward_model
from train.stages import check_stage
from train.worker import STOP_FILE, _stop_callback

BASE = SimpleNamespace(path=Path("/nonexistent-base"))


def cfg(**kw) -> TrainConfig:
    return TrainConfig.model_validate({"dataset": "d", "output_dir": "out", **kw})


def rm_dir(
    tmp_path: Path, *, stage="rm", value_head=True, base="HuggingFaceTB/SmolLM2-135M-Instruct"
) -> Path:
    path = tmp_path / "rm"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": 8}))
    (path / "adapter_model.safetensors").write_bytes(b"x")
    if value_head:
        (path / "value_head.safetensors").write_bytes(b"head")
    (path / "run_manifest.json").write_text(json.dumps({"stage": stage, "base_model": {"name": "default"}}))
    return path


@pytest.fixture
def ppo_ready(monkeypatch, tmp_path):
    trl = tmp_path / "extras" / "ppo"
    (trl / "trl").mkdir(parents=True)
    (trl / "trl" / "__init__.py").write_text("")
    monkeypatch.setattr(ppo_compat, "TRL_DIR", trl)
    return trl


def test_ppo_needs_its_trl(monkeypatch, tmp_path):
    monkeypatch.setattr(ppo_compat, "TRL_DIR", tmp_path / "none")
    with pytest.raises(ConfigError, match=r"stage: ppo needs trl 0\.9\.6.*make ppo-env"):
        check_stage(cfg(stage="ppo", reward_model=str(tmp_path)), Launch(), BASE, resume=False)


def test_ppo_refusals_before_weights_load(ppo_ready, tmp_path):
    with pytest.raises(ConfigError, match="stage: ppo needs reward_model"):
        check_stage(cfg(stage="ppo"), Launch(), BASE, resume=False)
    with pytest.raises(ConfigError, match="PPO trainer cannot resume"):
        check_stage(cfg(stage="ppo", reward_model="x"), Launch(), BASE, resume=True)
    with pytest.raises(ConfigError, match="runs in one process"):
        check_stage(cfg(stage="ppo", reward_model="x"), Launch(nproc_per_node=2), BASE, resume=False)
    with pytest.raises(ConfigError, match="reward_model: reward model .* is not a directory"):
        check_stage(cfg(stage="ppo", reward_model=str(tmp_path / "nope")), Launch(), BASE, resume=False)
    api = check_stage(
        cfg(stage="ppo", reward_model="http://rm:8000", reward_model_type="api"), Launch(), BASE, resume=False
    )
    assert api["reward_model"] == {"path": "http://rm:8000", "type": "api"}


def test_full_rm_cannot_resume():
    with pytest.raises(ConfigError, match="cannot resume stage rm with finetuning_type full"):
        check_stage(cfg(stage="rm", finetuning_type="full"), Launch(), BASE, resume=True)
    assert check_stage(cfg(stage="rm"), Launch(), BASE, resume=True) == {}


def test_reward_model_directory_checks(tmp_path):
    with pytest.raises(RewardModelError, match="has no value_head.safetensors .* not a reward model"):
        check_reward_model(rm_dir(tmp_path, value_head=False), base_name="default", base_path=BASE.path)


def test_reward_model_must_come_from_stage_rm(tmp_path):
    with pytest.raises(RewardModelError, match="trained with stage 'sft', not rm"):
        check_reward_model(rm_dir(tmp_path, stage="sft"), base_name="default", base_path=BASE.path)


def test_reward_model_on_another_base_is_refused(tmp_path):
    path = rm_dir(tmp_path, base="meta-llama/Llama-3-8B")
    (path / "run_manifest.json").unlink()
    with pytest.raises(RewardModelError, match="was trained on 'meta-llama/Llama-3-8B'"):
        check_reward_model(path, base_name="default", base_path=BASE.path)


def test_deepspeed_missing_is_refused_but_dry_run_warns(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(deepspeed_env, "DS_DIR", tmp_path / "none")
    launch = Launch(nproc_per_node=2, deepspeed="z2")
    with pytest.raises(ConfigError, match="DeepSpeed is not installed .*make deepspeed-env"):
        check_stage(cfg(), launch, BASE, resume=False)
    info = check_stage(cfg(), launch, BASE, resume=False, dry_run=True)
    assert info["deepspeed"]["config"].endswith("ds_z2_config.json")
    assert "warning: --deepspeed z2: DeepSpeed is not installed" in capsys.readouterr().err


def test_parallel_layout():
    layout = parallel_layout(
        2, 4, {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2}, "gloo"
    )
    assert layout["world_size"] == 8 and layout["effective_batch_size"] == 48 and layout["backend"] == "gloo"


def write_run(run: Path, tokens: int, runtime: float, log: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "all_results.json").write_text(
        json.dumps({"num_input_tokens_seen": tokens, "train_runtime": runtime})
    )
    (run / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def test_tokens_per_second_after_resume_counts_this_session_only(tmp_path):
    run = tmp_path / "run"
    write_run(run, 1000, 10.0, [{"current_steps": 4, "loss": 1.0, "total_tokens": 1000}])
    ckpt = run / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"num_input_tokens_seen": 600}))
    assert checkpoint_tokens(ckpt) == 600 and checkpoint_tokens(None) == 0
    assert read_metrics(run)["tokens_per_second"] == 100.0
    resumed = read_metrics(run, tokens_before=600)
    assert resumed["tokens_per_second"] == 40.0 and resumed["tokens_this_session"] == 400


def test_manifest_records_ppo_rewards_parallel_layout_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr("train.manifest.model_sha256", lambda path: "0" * 64)
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"current_steps": 1, "loss": 0.1, "reward": -1.5, "elapsed_time": "0:00:42"},
        {"current_steps": 2, "loss": 0.2, "reward": 0.5, "elapsed_time": "0:01:27"},
    ]
    (run / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = run / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"num_input_tokens_seen": 7}))
    m = build_manifest(
        base_name="default",
        base_path=tmp_path,
        template={},
        datasets=[],
        config={"stage": "ppo", "finetuning_type": "lora"},
        lf_args={"per_device_train_batch_size": 2},
        run_dir=run,
        output_dir=tmp_path / "out",
        command=["llm-train"],
        parallel=parallel_layout(1, 2, {"per_device_train_batch_size": 2}, "gloo"),
        resumed={"checkpoint": ckpt.name, "tokens_before": checkpoint_tokens(ckpt)},
        stage_info={"reward_model": {"path": "/rm", "type": "lora"}, "wall_seconds": 12.5},
    )
    assert m.metrics["rewards"] == [-1.5, 0.5] and m.metrics["final_reward"] == 0.5
    assert m.metrics["train_runtime"] == 87.0  # from the last row's elapsed_time (PPO writes no results)
    assert m.metrics["wall_seconds"] == 12.5 and m.reward_model.path == "/rm"  # typed: serve.artifacts
    assert m.parallel.effective_batch_size == 4 and m.resumed.model_dump() == {
        "checkpoint": "checkpoint-1",
        "tokens_before": 7,
    }


class Control(SimpleNamespace):
    should_save = False
    should_training_stop = False


def test_worker_stops_on_signal_or_stop_file(tmp_path):
    stop = {"requested": False}
    callback = _stop_callback(stop, tmp_path / STOP_FILE)
    control = callback.on_step_end(None, None, Control())
    assert not control.should_training_stop
    (tmp_path / STOP_FILE).write_text("signal 2\n")  # what llm-train writes on Ctrl-C
    control = callback.on_step_end(None, None, Control())
    assert control.should_save and control.should_training_stop and stop["requested"]


def test_ppo_compat_puts_extras_after_the_project(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.path", ["/repo", "/usr/lib/python3.11", "/venv/lib/python3.11/site-packages"])
    ppo_compat.put_before_site_packages(tmp_path)
    import sys

    assert sys.path == ["/repo", "/usr/lib/python3.11", str(tmp_path), "/venv/lib/python3.11/site-packages"]


def test_eval_reward_model_needs_data():
    from pydantic import ValidationError

    from eval.config import EvalConfig

    with pytest.raises(ValidationError, match="--reward-model scores style replies, so it needs --data"):
        EvalConfig(suite="demo", reward_model=Path("saves/rm"))


def test_export_takes_adapters_or_a_full_model():
    from pydantic import ValidationError

    from train.export.config import ExportConfig

    assert ExportConfig(model="saves/full", out=Path("o")).adapters == []
    with pytest.raises(ValidationError, match="give --adapter .* or --model"):
        ExportConfig(out=Path("o"))
    with pytest.raises(ValidationError, match="give --adapter .* or --model"):
        ExportConfig(adapters=["a"], model="m", out=Path("o"))


def test_deepspeed_on_cpu_needs_a_compiler(monkeypatch, tmp_path):
    ds = tmp_path / "ds"
    (ds / "deepspeed").mkdir(parents=True)
    (ds / "deepspeed" / "__init__.py").write_text("")
    monkeypatch.setattr(deepspeed_env, "DS_DIR", ds)
    monkeypatch.setattr(deepspeed_env.shutil, "which", lambda name: None)
    launch = Launch(nproc_per_node=2, deepspeed="z2")
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler is on PATH"):
        check_stage(cfg(), launch, BASE, resume=False, cpu=True)
    assert check_stage(cfg(), launch, BASE, resume=False, cpu=False)["deepspeed"]["dir"] == str(ds)
