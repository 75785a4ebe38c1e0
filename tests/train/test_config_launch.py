"""llm-train's config, LLaMA-Factory argument building, launch commands and on-disk safety (no model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, TrainConfig, load_config, parse_override
from train.launch import DEEPSPEED_PRESETS, Launch, command, deepspeed_config, environment, estimate_steps
from train.launch import llamafactory_args as lf_args
from train.run import Options, TrainError, _check_output_state, last_complete_checkpoint, staging_dir

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))


def cfg(**kw) -> TrainConfig:
    return TrainConfig.model_validate({"dataset": "d", "output_dir": "out", **kw})


def build(c: TrainConfig, cpu: bool = True, **kw) -> dict:
    base = dict(model_path=Path("/m"), output_dir=Path("/o"), dataset_dir=Path("/d"), template="smollm2")
    return lf_args(c, **{**base, "default_system": None, "cpu": cpu, "estimated_steps": 20, **kw})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_loads(path):
    c = load_config(path)
    assert c.stage in ("sft", "pt", "dpo", "kto", "rm", "ppo") and c.output_dir


def test_examples_cover_every_stage_and_finetuning_type():
    loaded = [load_config(p) for p in CONFIGS]
    assert {c.stage for c in loaded} >= {"sft", "pt", "dpo", "kto", "rm", "ppo"}
    assert {c.finetuning_type for c in loaded} >= {"lora", "full", "freeze"}
    huangdi = load_config(REPO / "configs" / "train" / "huangdi.yaml")
    assert huangdi.model_name_or_path == "default"


def test_overrides_are_typed_and_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "d", "output_dir": "o", "max_steps": 5, "lora_dropout": 0.1}))
    c = load_config(path, ["max_steps=7", "learning_rate=3e-4", "bf16=true", "output_dir=elsewhere"])
    assert (c.max_steps, c.learning_rate, c.bf16, c.output_dir) == (7, 3e-4, True, "elsewhere")
    assert c.extra_keys() == {"lora_dropout": 0.1}  # unknown keys pass through to LLaMA-Factory
    assert parse_override("dataset=a,b") == ("dataset", "a,b")
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("max_steps")


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"stage": "grpo"}, "stage: Input should be 'sft', 'pt', 'dpo', 'kto', 'rm' or 'ppo'"),
        ({"stage": "ppo", "val_size": 0.1}, "stage ppo cannot evaluate during training"),
        (
            {"stage": "rm", "val_size": 0.1, "early_stopping_steps": 2},
            "does not support early_stopping_steps",
        ),
        ({"reward_model": "saves/rm"}, "reward_model/reward_model_type only apply to stage: ppo"),
        ({"finetuning_type": "qlora"}, "finetuning_type: Input should be 'lora', 'full' or 'freeze'"),
        ({"cutoff_len": 0}, "cutoff_len: Input should be greater than 0"),
        ({"early_stopping_steps": 3}, "early_stopping_steps needs an evaluation set"),
        ({"val_size": 0.1, "eval_dataset": "e"}, "either val_size or eval_dataset"),
        ({"quantization_bit": 4, "finetuning_type": "full"}, "only works with finetuning_type: lora"),
    ],
)
def test_bad_values_name_the_key(tmp_path, raw, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "d", "output_dir": "o", **raw}))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found; the examples are in configs/train/"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "b.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "b.yaml")


def test_dataset_dir_relative_to_config_file(tmp_path):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "data").mkdir()
    path = tmp_path / "cfgs" / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "d", "output_dir": "o", "dataset_dir": "../data"}))
    assert Path(load_config(path).dataset_dir).resolve() == (tmp_path / "data").resolve()


def test_cpu_defaults_are_sane_and_overridable():
    args = build(cfg(bf16=True))
    assert args["bf16"] is False and args["fp16"] is False
    assert args["disable_gradient_checkpointing"] is True  # the measured CPU speed fix
    assert args["dataloader_pin_memory"] is False and args["dataloader_num_workers"] == 0
    assert args["include_num_input_tokens_seen"] == "non_padding"
    assert args["lora_alpha"] == 16 and args["do_train"] is True and args["report_to"] == "none"
    assert build(cfg(disable_gradient_checkpointing=False))["disable_gradient_checkpointing"] is False
    gpu = build(cfg(bf16=True), cpu=False)
    assert gpu["bf16"] is True and "disable_gradient_checkpointing" not in gpu


def test_template_and_default_system_are_passed():
    args = build(cfg(), default_system="You are SmolLM")
    assert args["template"] == "smollm2" and args["default_system"] == "You are SmolLM"
    assert build(cfg(default_system="mine"), default_system="theirs")["default_system"] == "mine"


def test_qlora_refused_on_cpu():
    with pytest.raises(ConfigError, match=r"quantization_bit: 4 \(QLoRA\) needs a CUDA GPU"):
        build(cfg(quantization_bit=4))
    assert build(cfg(quantization_bit=4), cpu=False)["quantization_bit"] == 4


def test_eval_and_early_stopping_arguments():
    args = build(cfg(val_size=0.2))
    assert (args["eval_strategy"], args["eval_steps"], args["val_size"]) == ("steps", 4, 0.2)
    args = build(cfg(val_size=0.2, eval_steps=3, early_stopping_steps=2))
    assert args["early_stopping_steps"] == 2 and args["save_steps"] == 3 == args["eval_steps"]
    assert args["load_best_model_at_end"] is True and args["metric_for_best_model"] == "eval_loss"
    assert args["greater_is_better"] is False
    assert "eval_strategy" not in build(cfg())


def test_estimate_steps():
    assert estimate_steps(cfg(max_steps=7), 100) == 7
    assert estimate_steps(cfg(num_train_epochs=2, per_device_train_batch_size=4), 10) == 6
    assert estimate_steps(cfg(num_train_epochs=1, val_size=0.5, per_device_train_batch_size=1), 10) == 5
    assert estimate_steps(cfg(num_train_epochs=1, max_samples=8, per_device_train_batch_size=2), 100, 2) == 2


def test_single_process_command_and_environment():
    launch = Launch()
    argv = command(Path("/s/c.yaml"), launch)
    assert argv[1:] == ["-m", "train.worker", "/s/c.yaml"]
    env = environment(cpu=True, launch=launch)
    assert env["HF_HUB_OFFLINE"] == "1" and env["DISABLE_VERSION_CHECK"] == "1"
    assert int(env["OMP_NUM_THREADS"]) >= 1 and env["LLM_TRAIN_THREADS"] == env["OMP_NUM_THREADS"]
    assert env["OMP_WAIT_POLICY"] in ("PASSIVE", "passive", "ACTIVE", "active")
    assert "FORCE_TORCHRUN" not in env


def test_multi_node_deepspeed_launch_runs_this_pythons_torchrun():
    launch = Launch(
        nproc_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29501, deepspeed="z3"
    )
    argv = command(Path("/s/c.yaml"), launch)
    # `python -m torch.distributed.run`, never a `torchrun` looked up on PATH (absent without an activated venv)
    assert argv[0] == sys.executable and argv[1:3] == ["-m", "torch.distributed.run"]
    assert argv[3:] == [
        "--nnodes=2",
        "--node-rank=1",
        "--nproc-per-node=8",
        "--master-addr=10.0.0.1",
        "--master-port=29501",
        "-m",
        "train.worker",
        "/s/c.yaml",
    ]
    assert "FORCE_TORCHRUN" not in environment(cpu=False, launch=launch)
    args = build(cfg(), cpu=False, deepspeed=deepspeed_config("z3"))
    assert args["deepspeed"].endswith("configs/deepspeed/ds_z3_config.json")


def test_cpu_ranks_share_the_cores(monkeypatch):
    monkeypatch.setattr("train.launch.cpu_threads", lambda: 16)
    assert environment(cpu=True, launch=Launch(nproc_per_node=4))["OMP_NUM_THREADS"] == "4"
    assert environment(cpu=True, launch=Launch(nproc_per_node=32))["OMP_NUM_THREADS"] == "1"
    assert environment(cpu=True, launch=Launch())["LLM_TRAIN_THREADS"] == "16"
    assert "OMP_NUM_THREADS" not in environment(cpu=False, launch=Launch(nproc_per_node=2))


@pytest.mark.parametrize("preset", sorted(DEEPSPEED_PRESETS))
def test_deepspeed_presets_exist_and_parse(preset):
    ds = json.loads(deepspeed_config(preset).read_text())
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert ds["train_micro_batch_size_per_gpu"] == "auto"


def test_launch_checks():
    with pytest.raises(ConfigError, match="--node-rank 2 must be in 0..1"):
        Launch(nnodes=2, node_rank=2).check()
    with pytest.raises(ConfigError, match="not found"):
        deepspeed_config("/nope.json")


def make_checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    ckpt = run / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def test_last_complete_checkpoint_skips_half_written(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 12, complete=False)
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"


def test_output_state_refuses_and_resumes(tmp_path):
    out = tmp_path / "adapter"
    stage = staging_dir(out)
    assert stage == tmp_path / ".adapter.partial"
    assert _check_output_state(out, stage, Options()) is None  # fresh
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(TrainError, match="is not empty; pass --overwrite"):
        _check_output_state(out, stage, Options())
    assert _check_output_state(out, stage, Options(overwrite=True)) is None
    with pytest.raises(TrainError, match="nothing to resume"):
        _check_output_state(out, stage, Options(resume=True))
    ckpt = make_checkpoint(stage, 4)
    with pytest.raises(TrainError, match="an interrupted run is in .* pass --resume"):
        _check_output_state(tmp_path / "other", stage, Options())
    assert _check_output_state(out, stage, Options(resume=True)) == ckpt
    assert _check_output_state(out, stage, Options(overwrite=True)) is None and not stage.exists()
