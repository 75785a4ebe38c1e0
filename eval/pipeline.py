"""One evaluation run: targets -> tasks and style replies -> metrics -> report, written atomically.

Library code (raises; `eval.cli.main` turns errors into messages). Each local target is loaded once
(lm-eval's HFLM with the adapter) and used for both its tasks and its style replies, then freed.

    results = run_eval(EvalConfig(suite="demo", data=Path("ref.jsonl"), adapters=["a=saves/a"]))
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from eval.config import EvalConfig
from eval.generate import GenerationCache, GenerationParams, generate_replies, local_backend, server_backend
from eval.refdata import read_reference_set
from eval.report import loss_history, write_report
from eval.targets import Target, check_api_extras, local_targets, normalize_base_url, server_targets
from eval.tasks import load_suite, plan_tasks, run_local, run_server
from serve.artifacts.publish import publish_dir, staged_dir
from serve.cli_runner import UserError


class OutputExistsError(UserError, FileExistsError):
    """--out is a non-empty directory and --overwrite was not given."""


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out} is not empty; pass --overwrite to replace it or choose another --out")


def run_eval(cfg: EvalConfig, log=print) -> dict:
    """Run everything `cfg` asks for and write the report into `cfg.out`; returns the results."""
    check_out_dir(cfg.out, cfg.overwrite)
    # Quick checks first (data, tasks, targets), then anything heavy.
    examples = read_reference_set(cfg.data, limit=cfg.limit) if cfg.data else []
    reward_model = _check_reward_model(cfg)
    plan = _plan(cfg)
    base_url = normalize_base_url(cfg.base_url) if cfg.base_url else None
    if base_url:
        if plan is not None:
            check_api_extras()
        targets = server_targets(
            base_url, cfg.api_key, cfg.model if cfg.model != "default" else None, cfg.adapters
        )
    else:
        targets = local_targets(cfg.model, cfg.adapters, cfg.allow_base_mismatch)

    if cfg.threads and not base_url:
        import torch

        torch.set_num_threads(cfg.threads)
    params = GenerationParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
    cache = GenerationCache(None if cfg.no_cache else cfg.cache_dir / "generations.sqlite")
    tasks: dict = {}
    task_samples: dict = {}
    replies: dict[str, list] = {}
    throughput: dict = {}
    try:
        for target in targets:
            log(f"[llm-eval] {target.name}: {target.describe()}")
            tasks[target.name], task_samples[target.name], replies[target.name], throughput[target.name] = (
                _run_target(cfg, target, plan, examples, params, cache, base_url)
            )
    finally:
        cache.close()

    results = {
        "meta": {
            "title": cfg.suite or ",".join(cfg.tasks) or (cfg.data.name if cfg.data else ""),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seed": cfg.seed,
            "limit": cfg.limit,
            "suite": cfg.suite,
            "tasks": list(plan.chat) if plan else [],
            "data": str(cfg.data) if cfg.data else None,
            "base_url": base_url,
            "generation": params.model_dump(),
            "config": json.loads(cfg.model_dump_json(exclude={"api_key", "judge_api_key"})),
        },
        "targets": [
            {
                "name": t.name,
                "kind": t.kind,
                "is_base": t.is_base,
                "what": t.describe(),
                "fingerprint": t.fingerprint,
                "loss": loss_history(t.adapter_path),
            }
            for t in targets
        ],
        "tasks": {n: v for n, v in tasks.items() if v},
        "throughput": throughput,
    }
    if examples:
        results["style"] = _style(cfg, examples, replies)
        if reward_model is not None:
            log(f"[llm-eval] scoring replies with the reward model {reward_model.path}")
            results["reward_model"] = _reward(cfg, reward_model, examples, replies, results["style"])
        if cfg.judge_url:
            results["judge"] = _judge(cfg, examples, replies)
    _write(cfg, results, task_samples, replies, examples)
    return results


def _plan(cfg: EvalConfig):
    names, includes, overrides = list(cfg.tasks), list(cfg.include_paths), {}
    if cfg.suite:
        suite = load_suite(cfg.suite)
        names = suite.task_names() + [n for n in names if n not in suite.task_names()]
        includes = suite.include_paths + includes
        overrides = suite.chat_overrides()
    if not names:
        return None
    return plan_tasks(
        names, includes, chat_overrides=overrides, chat_mode=cfg.chat_template, num_fewshot=cfg.num_fewshot
    )


def _run_target(cfg, target: Target, plan, examples, params, cache, base_url):
    thr: dict = {}
    task_out: dict = {"tasks": {}, "samples": {}}
    lm_cache = None if cfg.no_cache else str(cfg.cache_dir / "lm-eval" / _short(target.fingerprint))
    if lm_cache:
        Path(lm_cache).parent.mkdir(parents=True, exist_ok=True)
    lm = None
    if target.kind == "local":
        from eval.tasks import load_local_lm

        t0 = time.monotonic()
        lm = load_local_lm(target.model_path, target.adapter_path, batch_size=cfg.batch_size)
        thr["load"] = {"samples": 1, "seconds": time.monotonic() - t0, "samples_per_s": 0.0}
    try:
        if plan is not None:
            t0 = time.monotonic()
            if lm is not None:
                task_out = run_local(plan, lm, limit=cfg.limit, seed=cfg.seed, cache_db=lm_cache)
            else:
                task_out = run_server(
                    plan,
                    base_url=base_url,
                    model_id=target.model_id,
                    api_key=cfg.api_key,
                    tokenizer=cfg.tokenizer,
                    limit=cfg.limit,
                    seed=cfg.seed,
                    cache_db=lm_cache,
                    concurrency=cfg.concurrency,
                )
            n = sum(v["n"] for v in task_out["tasks"].values())
            secs = time.monotonic() - t0
            thr["tasks"] = {"samples": n, "seconds": secs, "samples_per_s": n / secs if secs else 0.0}
        gens = []
        if examples:
            if lm is not None:
                backend = local_backend(lm.model, lm.tokenizer, params)
            else:
                backend = server_backend(base_url, target.model_id, cfg.api_key, params, cfg.concurrency)
            gens = generate_replies(
                target.fingerprint,
                [e.chat() for e in examples],
                params,
                cache,
                backend,
                batch_size=cfg.batch_size if lm is not None else cfg.concurrency,
                desc=f"{target.name} replies",
            )
            fresh = [g for g in gens if not g.cached]
            secs = sum(g.seconds for g in fresh)
            thr["generation"] = {
                "samples": len(fresh),
                "seconds": secs,
                "samples_per_s": len(fresh) / secs if secs else 0.0,
                "cached": len(gens) - len(fresh),
            }
    finally:
        del lm
        gc.collect()
    return task_out["tasks"], task_out["samples"], gens, thr


def _style(cfg: EvalConfig, examples, replies: dict[str, list]) -> dict:
    from eval.style import score_targets

    refs = [e.reference for e in examples]
    texts = {name: [g.text for g in gens] for name, gens in replies.items()}
    out = score_targets(refs, texts, "base", seed=cfg.seed, embeddings=cfg.embeddings)
    out["n"] = len(refs)
    return out


def _check_reward_model(cfg: EvalConfig):
    if cfg.reward_model is None:
        return None
    from train.reward_model import check_reward_model_alone

    return check_reward_model_alone(cfg.reward_model)


def _reward(cfg: EvalConfig, info, examples, replies: dict[str, list], style: dict) -> dict:
    """Each target's replies (and the reference replies) scored by the reward model, into `style`."""
    from eval.style import bootstrap_ci
    from train.reward_model import RewardScorer

    def chats(texts: list[str]) -> list[list[dict]]:
        return [
            [*e.chat(), {"role": "assistant", "content": t}] for e, t in zip(examples, texts, strict=True)
        ]

    with RewardScorer(info) as scorer:
        for name, gens in replies.items():
            scores = scorer.score(chats([g.text for g in gens]), batch_size=cfg.batch_size)
            entry = style.setdefault("targets", {}).setdefault(name, {})
            entry["reward"] = {
                "mean": sum(scores) / len(scores),
                "ci95": list(bootstrap_ci(scores, seed=cfg.seed)),
            }
        refs = scorer.score(chats([e.reference for e in examples]), batch_size=cfg.batch_size)
    style.setdefault("reference", {})["reward"] = sum(refs) / len(refs)
    return {**info.manifest_entry(), "base": str(info.base_path)}


def _judge(cfg: EvalConfig, examples, replies: dict[str, list]) -> dict:
    from eval.judge import http_judge, judge_pairwise

    ask = http_judge(cfg.judge_url, cfg.judge_model, cfg.judge_api_key)
    others = {n: [g.text for g in v] for n, v in replies.items() if n != "base"}
    out = judge_pairwise(
        [e.prompt for e in examples],
        [e.reference for e in examples],
        [g.text for g in replies["base"]],
        others,
        ask,
    )
    out["judge"] = {"url": cfg.judge_url, "model": cfg.judge_model}
    return out


def _write(cfg: EvalConfig, results: dict, task_samples: dict, replies: dict, examples) -> None:
    """Everything goes into a staging sibling directory that replaces --out when complete."""
    with staged_dir(cfg.out) as tmp:
        (tmp / "samples").mkdir()
        files = []
        for name, gens in replies.items():
            if gens:
                rel = f"samples/style-{name}.jsonl"
                with open(tmp / rel, "w", encoding="utf-8") as f:
                    for e, g in zip(examples, gens, strict=True):
                        row = {
                            "row": e.row,
                            "prompt": e.prompt,
                            "reference": e.reference,
                            "reply": g.text,
                            "cached": g.cached,
                        }
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                files.append(rel)
        for name, per_task in task_samples.items():
            for task, rows in per_task.items():
                rel = f"samples/task-{task}-{name}.jsonl"
                with open(tmp / rel, "w", encoding="utf-8") as f:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                files.append(rel)
        results["files"] = {"samples": files}
        write_report(results, tmp)
        publish_dir(tmp, cfg.out)


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
