"""Build what LLaMA-Factory runs: the resolved argument dict (with CPU-sane defaults) and the command.

One process: `python -m train.worker CFG` (LLaMA-Factory's entry point plus our stop-on-signal
callback). Several processes or nodes: the same worker under the environment's own torchrun,
`python -m torch.distributed.run --nnodes N --node-rank R --nproc-per-node P --master-addr A
--master-port M -m train.worker CFG` (what `llamafactory-cli train` does with FORCE_TORCHRUN=1, except
that it looks `torchrun` up on PATH, which fails in a venv that is not activated). On CPU the ranks
talk over gloo; DeepSpeed is added by LLaMA-Factory when the YAML names a DeepSpeed JSON.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.config import ConfigError, TrainConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEEPSPEED_PRESETS = {
    "z2": "ds_z2_config.json",
    "z3": "ds_z3_config.json",
    "z3-offload": "ds_z3_offload_config.json",
}


@dataclass(frozen=True)
class Launch:
    """Where the processes run (torchrun's terms)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    deepspeed: str | None = None  # z2, z3, z3-offload or a JSON path

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1 or self.deepspeed is not None

    def check(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ConfigError("--nproc-per-node and --nnodes must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(
                f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}"
            )
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port {self.master_port} is not a TCP port")


def deepspeed_config(value: str) -> Path:
    """A preset name (z2, z3, z3-offload) or a path to a DeepSpeed JSON."""
    path = CONFIGS_DIR / "deepspeed" / DEEPSPEED_PRESETS[value] if value in DEEPSPEED_PRESETS else Path(value)
    if not path.is_file():
        raise ConfigError(
            f"--deepspeed {value}: {path} not found; use z2, z3, z3-offload or a JSON file path"
        )
    return path.resolve()


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def llamafactory_args(
    cfg: TrainConfig,
    *,
    model_path: Path,
    output_dir: Path,
    dataset_dir: Path,
    template: str | None,
    default_system: str | None,
    cpu: bool,
    estimated_steps: int,
    resume_from: Path | None = None,
    deepspeed: Path | None = None,
) -> dict[str, Any]:
    """The YAML LLaMA-Factory gets: the user's keys, resolved paths and our defaults."""
    if cpu and cfg.quantization_bit is not None:
        raise ConfigError(
            f"quantization_bit: {cfg.quantization_bit} (QLoRA) needs a CUDA GPU with bitsandbytes; this machine has "
            "none. Remove quantization_bit to train plain LoRA on CPU"
        )
    args = cfg.model_dump(exclude_none=True)
    args.update(
        model_name_or_path=str(model_path),
        output_dir=str(output_dir),
        dataset_dir=str(dataset_dir),
        do_train=True,
        report_to=args.get("report_to", "none"),
        include_num_input_tokens_seen=args.get("include_num_input_tokens_seen", "non_padding"),  # tokens/s
        plot_loss=False,  # llm-train draws train and eval loss in one plot
    )
    args.setdefault("lora_alpha", 2 * cfg.lora_rank)
    if template is not None:
        args["template"] = template
    if default_system is not None and cfg.default_system is None:
        args["default_system"] = default_system
    if cpu:
        # Measured on the default model (see train/bench.py): gradient checkpointing recomputes every
        # layer in the backward pass and made CPU steps many times slower; memory is not the limit there.
        args["bf16"] = args["fp16"] = False
        args.setdefault("disable_gradient_checkpointing", True)
        args.setdefault("dataloader_num_workers", 0)
        args.setdefault("dataloader_pin_memory", False)
    if cfg.does_eval:
        eval_steps = cfg.eval_steps or max(1, estimated_steps // 5)
        args.update(eval_strategy="steps", eval_steps=eval_steps)
        args.setdefault("per_device_eval_batch_size", cfg.per_device_train_batch_size)
        if cfg.early_stopping_steps:
            # transformers' EarlyStoppingCallback compares eval_loss at each evaluation and needs
            # checkpoints on the same steps to load the best one at the end.
            args.update(
                save_strategy="steps",
                save_steps=eval_steps,
                load_best_model_at_end=True,
                metric_for_best_model="eval_loss",
                greater_is_better=False,
            )
    if resume_from is not None:
        args["resume_from_checkpoint"] = str(resume_from)
    if deepspeed is not None:
        args["deepspeed"] = str(deepspeed)
    return args


def estimate_steps(cfg: TrainConfig, rows: int, world_size: int = 1) -> int:
    """Optimizer steps the run will take (what the trainer will compute, before it loads anything)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if cfg.max_samples:
        rows = min(rows, cfg.max_samples * max(1, len(cfg.dataset_names())))
    if cfg.val_size:
        rows -= int(cfg.val_size) if cfg.val_size >= 1 else int(rows * cfg.val_size)
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    return max(1, int(-(-max(rows, 1) // per_step) * cfg.num_train_epochs))


def environment(cpu: bool, launch: Launch) -> dict[str, str]:
    """Variables set for the training processes (merged over the caller's environment)."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if cpu:
        # The node's cores are shared by its ranks: more threads than cores makes every rank wait.
        threads = str(max(1, cpu_threads() // launch.nproc_per_node))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, LLM_TRAIN_THREADS=threads)
        # Measured on a shared 2-core machine: with spinning OpenMP threads a LoRA step ran 7x slower
        # than with one thread once other processes competed for the cores; passive waiting fixed it.
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    return env


def command(config_path: Path, launch: Launch) -> list[str]:
    """The worker, alone or under this Python's own torchrun (never a `torchrun` found on PATH)."""
    worker = ["-m", "train.worker", str(config_path)]
    if not launch.distributed:
        return [sys.executable, *worker]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={launch.nnodes}",
        f"--node-rank={launch.node_rank}",
        f"--nproc-per-node={launch.nproc_per_node}",
        f"--master-addr={launch.master_addr}",
        f"--master-port={launch.master_port}",
        *worker,
    ]


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    """The command as one copy-pasteable shell line, environment first."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])
