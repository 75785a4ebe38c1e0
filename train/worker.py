"""The training process `llm-train` starts: LLaMA-Factory's own entry point plus one callback.

Run as: `python -m train.worker RESOLVED.yaml` (what `llamafactory-cli train RESOLVED.yaml` runs, with
`run_exp(callbacks=[...])`). On SIGINT or SIGTERM the callback asks the trainer to save a checkpoint
at the end of the current step and stop; the process then exits with 130, so `llm-train` keeps the
run resumable instead of publishing a half-trained adapter.
"""

from __future__ import annotations

import os
import signal
import sys

import yaml

INTERRUPTED_EXIT = 130


def _stop_callback(stop: dict[str, bool]):
    from transformers import TrainerCallback

    class SaveAndStopOnSignal(TrainerCallback):
        """Turn a signal into 'save a checkpoint now, then stop' at the next step boundary."""

        def on_step_end(self, args, state, control, **kwargs):
            if stop["requested"]:
                control.should_save = True
                control.should_training_stop = True
            return control

    return SaveAndStopOnSignal()


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

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    import torch

    threads = int(os.environ.get("LLM_TRAIN_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    from llamafactory.train.tuner import run_exp

    run_exp(args, callbacks=[_stop_callback(stop)])
    return INTERRUPTED_EXIT if stop["requested"] else 0


if __name__ == "__main__":
    sys.exit(main())
