"""The `lmeval_mc` scenario: lm-eval's own `local-completions` client scoring the shipped
multiple-choice task through a server.

`demo_mc` (eval/suites/tasks: 40 questions x 4 choices, no chat template) is scored by
log-likelihood: 160 `/v1/completions` requests with echo + logprobs, the server's tokenizer over
`/tokenize`, `num_concurrent` in flight, as `llm-eval --base-url` runs it. The choices of a question
share their context, which a prefix cache computes once. Reports the wall time of the scoring (lm-eval's
task index is built before the clock starts), the scores, and every choice's log-likelihood so two
runs can be checked for identical results.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval" / "suites" / "tasks"
TASK = "demo_mc"


def run_lmeval(base_url: str, model: str, *, concurrency: int = 4, limit: int | None = None) -> dict:
    """Score `TASK` against the server at `base_url`; returns seconds, acc, acc_norm and logliks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("OPENAI_API_KEY", "EMPTY")  # lm-eval's API models want one; ours is open
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    args = (
        f"model={model},base_url={base_url}/v1/completions,tokenizer_backend=remote,"
        f"num_concurrent={concurrency},max_retries=1,timeout=600"
    )
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args=args, tasks=[TASK], task_manager=manager, limit=limit,
        log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    metrics = out["results"][TASK]
    rows = sorted(out["samples"][TASK], key=lambda r: r["doc_id"])
    return {
        "seconds": seconds,
        "requests": sum(len(r["resps"]) for r in rows),
        "acc": metrics["acc,none"],
        "acc_norm": metrics["acc_norm,none"],
        "logliks": [[float(resp[0][0]) for resp in r["resps"]] for r in rows],
    }
