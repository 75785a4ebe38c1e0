"""`llm-eval`: score the base model and LoRA adapters on lm-eval tasks and on a reference set's style.

Run as:
    llm-eval --adapter demo=saves/demo --suite demo --data configs/data/demo/test.jsonl --limit 20 --out artifacts/eval/demo
    llm-eval --base-url http://127.0.0.1:8000 --adapter demo --tasks demo_mc --include-path eval/suites/tasks

Writes results.json, report.md, report.html, PNG plots and samples/ into --out, then prints where
the report is. Exit codes: 0 done, 2 a problem with the arguments/data/targets (message says what
to do), 1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="YAML file with any of the options below (flags override it)")
    p.add_argument("--model", help="base model: default | HF checkpoint dir | .gguf (server: the base's id)")
    p.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        metavar="[NAME=]PATH",
        help="LoRA adapter to score against the base (repeatable; server: a served adapter name)",
    )
    p.add_argument(
        "--base-url", help="score models on this OpenAI-compatible server (e.g. http://127.0.0.1:8000)"
    )
    p.add_argument("--api-key", help="bearer key for --base-url")
    p.add_argument(
        "--tokenizer",
        help="local tokenizer dir for server log-likelihood tasks if the server lacks /tokenize",
    )
    p.add_argument(
        "--data", type=Path, help="style reference set (alpaca / sharegpt / OpenAI messages, JSON or JSONL)"
    )
    p.add_argument("--tasks", help="comma-separated lm-eval tasks or groups")
    p.add_argument(
        "--include-path",
        dest="include_paths",
        action="append",
        type=Path,
        metavar="DIR",
        help="directory of extra lm-eval task YAMLs (repeatable)",
    )
    p.add_argument("--suite", help="shipped suite name (e.g. demo) or a suite YAML path")
    p.add_argument("--limit", type=int, help="at most N samples per task and N reference prompts")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument(
        "--chat-template",
        choices=["auto", "on", "off"],
        help="auto (default): generation tasks use the chat template, log-likelihood tasks do not",
    )
    p.add_argument("--out", type=Path, help="output directory (default artifacts/eval/latest)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int, help="most new tokens per style reply (default 128)")
    p.add_argument("--temperature", type=float, help="style reply temperature (default 0: greedy)")
    p.add_argument("--batch-size", type=int, help="local batch size (default 8)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads for local targets (1 is fastest on a busy CPU)"
    )
    p.add_argument("--concurrency", type=int, help="requests in flight against --base-url (default 4)")
    p.add_argument(
        "--no-embeddings",
        dest="embeddings",
        action="store_false",
        default=None,
        help="skip the all-MiniLM-L6-v2 embedding similarity",
    )
    p.add_argument("--cache-dir", type=Path, help="generation cache (default $LLM_SERVE_HOME/eval-cache)")
    p.add_argument("--no-cache", action="store_true", default=None, help="neither read nor write the cache")
    p.add_argument("--allow-base-mismatch", action="store_true", default=None)
    p.add_argument(
        "--reward-model",
        type=Path,
        metavar="DIR",
        help="score each style reply with this reward model (from `llm-train` stage rm); needs --data",
    )
    p.add_argument("--judge-url", help="OpenAI-compatible server for a pairwise LLM judge (optional)")
    p.add_argument("--judge-model", help="the judge's model id on --judge-url")
    p.add_argument("--judge-api-key")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings from lm-eval and transformers")
    return p


def config_from_args(args: argparse.Namespace):
    """Defaults < --config YAML < flags (serve.settings); a misspelt key in the YAML is an error."""
    from eval.config import EvalConfig
    from serve.settings import load_settings

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "quiet")}
    if flags.get("tasks") is not None:
        flags["tasks"] = [t.strip() for t in flags["tasks"].split(",") if t.strip()]
    return load_settings(EvalConfig, args.config, flags, prog="llm-eval")


def main(argv: list[str] | None = None) -> int:
    from serve.cli_runner import run_cli

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # ValueError: lm-eval and the data readers raise it for bad task names, files and values.
    return run_cli("llm-eval", lambda: _run(args), also=(ValueError,))


def _run(args: argparse.Namespace) -> int:
    from eval.pipeline import run_eval

    cfg = config_from_args(args)
    results = run_eval(cfg, log=lambda m: print(m, file=sys.stderr))
    print(summary(results))
    print(f"report: {cfg.out / 'report.html'} (also report.md, results.json)")
    return 0


def summary(results: dict) -> str:
    """A short plain-text table of the headline numbers."""
    names = [t["name"] for t in results["targets"]]
    lines = ["metric".ljust(28) + "".join(n[:14].rjust(15) for n in names)]
    for task in sorted({t for v in results.get("tasks", {}).values() for t in v}):
        for metric in ("acc", "acc_norm", "contains", "exact_match"):
            vals = [results["tasks"].get(n, {}).get(task, {}).get("metrics", {}).get(metric) for n in names]
            if any(vals):
                lines.append(
                    f"{task} {metric}"[:27].ljust(28)
                    + "".join((f"{v['value']:.3f}" if v else "-").rjust(15) for v in vals)
                )
    style = results.get("style", {}).get("targets", {})
    for metric in ("chrf", "rouge_l", "embedding_sim", "style_proba", "length_ratio", "reward"):
        vals = [style.get(n, {}).get(metric) for n in names]
        if any(vals):
            lines.append(
                f"style {metric}".ljust(28)
                + "".join((f"{v.get('mean', v.get('value')):.3f}" if v else "-").rjust(15) for v in vals)
            )
    for n, v in results.get("judge", {}).get("targets", {}).items():
        lines.append(f"judge win rate {n}"[:27].ljust(28) + f"{v['win_rate']:.3f}".rjust(15))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
