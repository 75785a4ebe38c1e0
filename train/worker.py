"""The training process `llm-train` starts: LLaMA-Factory's own entry point plus one callback.

Run as: `python -m train.worker RESOLVED.yaml` (what `llamafactory-cli train RESOLVED.yaml` runs, with
`run_exp(callbacks=[...])`), alone or as every rank under `python -m torch.distributed.run`.

A stop is requested by SIGINT/SIGTERM to this process or by the file `STOP_FILE` appearing in the
run's output_dir (how `llm-train` asks torchrun's ranks, which sit in sessions of their own). At the
end of each step the ranks agree (an all-reduce of the flag, so no rank runs into a collective the
others skipped), save a checkpoint and stop; the process then exits with 130 and `llm-train` keeps
the run resumable instead of publishing a half-trained adapter. When the process that started this
one dies (llm-train, even by `kill -9`, or torchrun) the kernel sends PARENT_DIED, which does the same.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import yaml

INTERRUPTED_EXIT = 130
STOP_FILE = ".llm-train-stop"
# What the kernel sends when our parent dies (PR_SET_PDEATHSIG), kept apart from SIGTERM/SIGINT: it can
# arrive twice (once when the thread that started us exits, again when the last thread of the parent
# does), and two of them must not read as "Ctrl-C twice: stop at once" while the checkpoint is saved.
PARENT_DIED = signal.SIGHUP


def _stop_callback(stop: dict[str, bool], stop_file: Path):
    from transformers import TrainerCallback

    class SaveAndStopOnSignal(TrainerCallback):
        """Turn a signal or the stop file into 'save a checkpoint now, then stop' at a step boundary."""

        def on_step_end(self, args, state, control, **kwargs):
            if not stop["requested"] and stop_file.exists():
                stop["requested"] = True
            if _any_rank(stop["requested"]):
                stop["requested"] = True
                control.should_save = True
                control.should_training_stop = True
            return control

    return SaveAndStopOnSignal()


def _any_rank(flag: bool) -> bool:
    """True if any rank's flag is set (a one-int all-reduce per step; the flag itself when alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _stop_with_parent() -> None:
    """A torchrun rank (started in a session of its own) gets PARENT_DIED, so it checkpoints, if torchrun dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, PARENT_DIED)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _load_cpu_checkpoints_on_cpu(torch) -> None:
    """Let a CPU rank resume: with several processes transformers 5.6 loads the optimizer state with
    `map_location=args.device`, which accelerate sets to `cpu:0` on CPU, and torch.load cannot restore
    to `cpu:0` ("don't know how to restore data location"). Map any CPU device to plain "cpu"."""
    original = torch.load

    def load(*args, map_location=None, **kwargs):
        if isinstance(map_location, torch.device) and map_location.type == "cpu":
            map_location = "cpu"
        return original(*args, map_location=map_location, **kwargs)

    torch.load = load


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m train.worker RESOLVED.yaml", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        args = yaml.safe_load(f)

    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["requested"] = True
        print(
            f"llm-train worker: signal {signum}: saving a checkpoint after this step",
            file=sys.stderr,
            flush=True,
        )

    def parent_died(signum, frame):
        if not stop["requested"]:
            stop["requested"] = True
            print(
                "llm-train worker: its parent has gone: saving a checkpoint after this step",
                file=sys.stderr,
                flush=True,
            )

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(PARENT_DIED, parent_died)
    if "LOCAL_RANK" in os.environ:
        _stop_with_parent()

    if args.get("stage") == "ppo":
        from train import ppo_compat

        ppo_compat.install()  # trl 0.9.6 for LLaMA-Factory's PPO trainer; before anything imports trl

    if args.get("deepspeed"):
        from train import deepspeed_env

        deepspeed_env.activate()

    import torch

    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        _load_cpu_checkpoints_on_cpu(torch)
    threads = int(os.environ.get("LLM_TRAIN_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    from llamafactory.train.tuner import run_exp

    stop_file = Path(args["output_dir"]) / STOP_FILE
    run_exp(args, callbacks=[_stop_callback(stop, stop_file)])
    return INTERRUPTED_EXIT if stop["requested"] else 0


if __name__ == "__main__":
    sys.exit(main())
