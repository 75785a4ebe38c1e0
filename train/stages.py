"""What each stage and launch needs beyond the config's own checks, checked before any weights load.

- `ppo`: trl 0.9.6 in its own directory (`train/ppo_compat.py`, `make ppo-env`), a `reward_model:`
  that `llm-train` made with `stage: rm` on the same base (`train/reward_model.py`), one process, and
  no `--resume` (LLaMA-Factory's PPO trainer cannot resume).
- `rm`/`ppo` with full or freeze fine-tuning: no `--resume` (LLaMA-Factory silently restarts them).
- `--deepspeed`: DeepSpeed must be importable (`make deepspeed-env`) and able to train here
  (`train/deepspeed_env.py`).
Returns what the manifest should record about it (the reward model, for PPO).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train.config import ConfigError, TrainConfig
from train.launch import Launch


def check_stage(
    cfg: TrainConfig, launch: Launch, model, *, resume: bool, cpu: bool = True, dry_run: bool = False
) -> dict[str, Any]:
    """Raise ConfigError with what to do, or return the stage's facts for the manifest."""
    info: dict[str, Any] = {}
    if resume and cfg.stage in ("rm", "ppo") and cfg.finetuning_type in ("full", "freeze"):
        raise ConfigError(
            f"--resume: LLaMA-Factory cannot resume stage {cfg.stage} with finetuning_type {cfg.finetuning_type} "
            "(it would silently start over); run it again without --resume and --overwrite"
        )
    if cfg.stage == "ppo":
        info["reward_model"] = _check_ppo(cfg, launch, model, resume=resume)
    if launch.deepspeed is not None:
        from train.deepspeed_env import check_deepspeed

        info["deepspeed"] = check_deepspeed(launch, cpu=cpu, dry_run=dry_run)
    return info


def _check_ppo(cfg: TrainConfig, launch: Launch, model, *, resume: bool) -> dict[str, Any]:
    from train import ppo_compat
    from train.reward_model import RewardModelError, check_reward_model

    if resume:
        raise ConfigError(
            "--resume: LLaMA-Factory's PPO trainer cannot resume from a checkpoint; run it again with --overwrite"
        )
    if launch.nproc_per_node * launch.nnodes > 1 or launch.deepspeed is not None:
        raise ConfigError(
            "stage: ppo runs in one process here: LLaMA-Factory 0.9.5's PPO trainer (on trl 0.9.6) is not "
            "tested with torchrun or DeepSpeed in llm-train; drop --nproc-per-node/--nnodes/--deepspeed"
        )
    if not ppo_compat.available():
        raise ConfigError(ppo_compat.why_unavailable())
    if not cfg.reward_model:
        raise ConfigError(
            "stage: ppo needs reward_model: the directory of a reward model trained with "
            "`llm-train configs/train/rm_lora.yaml` (stage: rm) on the same base"
        )
    if cfg.reward_model_type == "api":
        return {"path": cfg.reward_model, "type": "api"}
    try:
        rm = check_reward_model(
            Path(cfg.reward_model), base_name=cfg.model_name_or_path, base_path=model.path
        )
    except RewardModelError as exc:
        raise ConfigError(f"reward_model: {exc}") from exc
    if cfg.reward_model_type is not None and cfg.reward_model_type != rm.kind:
        raise ConfigError(
            f"reward_model_type: {cfg.reward_model_type} but {rm.path} is a {rm.kind} reward model; "
            f"remove reward_model_type or set it to {rm.kind}"
        )
    if rm.kind == "lora" and cfg.finetuning_type != "lora":
        raise ConfigError(
            "a LoRA reward model shares the policy's weights, so PPO must train LoRA too "
            f"(finetuning_type: lora, not {cfg.finetuning_type}); or give a full reward model"
        )
    return rm.manifest_entry()
