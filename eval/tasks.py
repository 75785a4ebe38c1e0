"""Task quality through lm-eval's Python API: shipped suites, local task YAMLs and lm-eval's own tasks.

A suite (`eval/suites/NAME.yaml` or any YAML path) lists tasks and the directory of their task
YAMLs. Each task runs with the chat template when it needs one: by default generation tasks get it
and log-likelihood tasks do not (a suite can say `chat_template: true|false` per task). Local
targets run through `HFLM(pretrained=..., peft=...)`; server targets through `local-completions`
(log-likelihoods, with the server's tokenizer via /tokenize) or `local-chat-completions`
(generation with the chat template).

    suite = load_suite("demo")
    plan = plan_tasks(suite.task_names(), suite.include_paths, chat_overrides=suite.chat_overrides())
    lm = load_local_lm(model_path, adapter_path)
    out = run_local(plan, lm, limit=20, seed=0, cache_db=None)   # {"tasks": {...}, "samples": {...}}
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from serve.cli_runner import UserError

SUITES_DIR = Path(__file__).resolve().parent / "suites"
LOGLIKELIHOOD_TYPES = {"multiple_choice", "loglikelihood", "loglikelihood_rolling"}


class TaskError(UserError, ValueError):
    """A task or suite cannot be used; the message says which and what exists."""


@dataclass
class Suite:
    """A named set of lm-eval tasks with the directories their YAMLs live in."""

    name: str
    description: str
    tasks: list[dict]  # {"name": str, "chat_template": bool | None}
    include_paths: list[Path]

    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def chat_overrides(self) -> dict[str, bool]:
        return {t["name"]: bool(t["chat_template"]) for t in self.tasks if t.get("chat_template") is not None}


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str) -> Suite:
    """`demo` (a shipped suite) or a path to a suite YAML."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = SUITES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise TaskError(
                f"unknown suite {name_or_path!r}; shipped suites: {', '.join(available_suites())} "
                "(or give a path to a suite YAML)"
            )
    if not path.is_file():
        raise TaskError(f"suite file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    raw = data.get("tasks") or []
    if not raw:
        raise TaskError(f"suite {path} lists no tasks (add `tasks: [{{name: ...}}]`)")
    tasks = [t if isinstance(t, dict) else {"name": str(t)} for t in raw]
    for t in tasks:
        if "name" not in t:
            raise TaskError(f"suite {path}: every entry under `tasks` needs a `name`")
        t.setdefault("chat_template", None)
    include = data.get("include_path") or []
    include = [include] if isinstance(include, str) else include
    return Suite(
        name=path.stem,
        description=str(data.get("description", "")),
        tasks=tasks,
        include_paths=[(path.parent / p).resolve() for p in include],
    )


@dataclass
class TaskPlan:
    """Resolved tasks: each one's output type and whether it runs with the chat template."""

    include_paths: list[Path]
    use_defaults: bool  # whether lm-eval's own task index is needed (slow to build: ~8 s)
    output_types: dict[str, str] = field(default_factory=dict)
    chat: dict[str, bool] = field(default_factory=dict)
    num_fewshot: int | None = None
    manager: object = None  # the lm-eval TaskManager built while planning, reused to run

    def groups(self) -> list[tuple[bool, list[str]]]:
        """Tasks split by chat template on/off (one lm-eval run each)."""
        out = []
        for flag in (False, True):
            names = [t for t, c in self.chat.items() if c == flag]
            if names:
                out.append((flag, names))
        return out

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        if self.manager is not None:
            return self.manager
        paths = [str(p) for p in self.include_paths] or None
        return TaskManager(include_path=paths, include_defaults=self.use_defaults)


def plan_tasks(
    names: list[str],
    include_paths: list[Path],
    *,
    chat_overrides: dict[str, bool] | None = None,
    chat_mode: str = "auto",
    num_fewshot: int | None = None,
) -> TaskPlan:
    """Check every task exists (raises TaskError listing close names) and read its output type."""
    from lm_eval.tasks import TaskManager

    # lm-eval warns about `custom_dataset` on every load of the shipped suites' tasks; it is expected.
    logging.getLogger("lm_eval.api.task").addFilter(lambda r: "Custom kwargs" not in r.getMessage())
    for p in include_paths:
        if not Path(p).is_dir():
            raise TaskError(f"--include-path {p} is not a directory of lm-eval task YAMLs")
    paths = [str(p) for p in include_paths]
    local = TaskManager(include_path=paths, include_defaults=False) if paths else None
    local_names = set(local.all_tasks) if local else set()
    use_defaults = not set(names) <= local_names
    manager = TaskManager(include_path=paths or None) if use_defaults else local
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = {n: difflib.get_close_matches(n, sorted(known), n=5) for n in unknown}
        listing = "; ".join(f"{n!r} (close: {', '.join(h) or 'none'})" for n, h in hints.items())
        shown = ", ".join(sorted(local_names) or sorted(known)[:30])
        raise TaskError(
            f"unknown task {listing}. Local tasks: {shown}. lm-eval has {len(known)} tasks and groups "
            "(`lm-eval ls tasks` lists them); local task YAMLs go in --include-path"
        )
    plan = TaskPlan(list(include_paths), use_defaults, num_fewshot=num_fewshot, manager=manager)
    for name in names:
        try:
            with _offline():
                leaves = manager.load(name)["tasks"].values()
        except Exception as exc:  # datasets raises many kinds when a hub dataset is not cached
            raise TaskError(
                f"task {name!r} could not load its data offline ({type(exc).__name__}: {str(exc)[:200]}); "
                "hub tasks need their dataset in the local Hugging Face datasets cache, or use a "
                "local task YAML with its own data (see eval/suites/tasks)"
            ) from exc
        types = {t.config.output_type for t in leaves} or {"generate_until"}
        # A group mixing kinds runs without the chat template so its log-likelihood parts can be scored.
        out_type = "generate_until" if types == {"generate_until"} else sorted(types - {"generate_until"})[0]
        plan.output_types[name] = out_type
        if chat_mode in ("on", "off"):
            plan.chat[name] = chat_mode == "on"
        elif chat_overrides and name in chat_overrides:
            plan.chat[name] = chat_overrides[name]
        else:
            plan.chat[name] = out_type == "generate_until"
    return plan


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Tasks never reach a hub: datasets and transformers read only their local caches."""
    keys = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _api_key(key: str | None) -> Iterator[None]:
    # lm-eval's API models read the key from OPENAI_API_KEY only.
    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = key or old or "EMPTY"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = old


def load_local_lm(model_path: Path, adapter_path: Path | None, batch_size: int = 8):
    """lm-eval's HFLM on CPU in float32, with the PEFT adapter applied when given."""
    from lm_eval.models.huggingface import HFLM

    with _offline():
        return HFLM(
            pretrained=str(model_path),
            peft=str(adapter_path) if adapter_path else None,
            device="cpu",
            dtype="float32",
            batch_size=batch_size,
        )


def run_local(plan: TaskPlan, lm, *, limit: int | None, seed: int, cache_db: str | None) -> dict:
    """Run every task on an already loaded HFLM; returns `{task: TaskResult dict}` plus timing."""
    return _run(plan, lambda chat: (lm, None), limit=limit, seed=seed, cache_db=cache_db)


def run_server(
    plan: TaskPlan,
    *,
    base_url: str,
    model_id: str,
    api_key: str | None,
    tokenizer: str | None,
    limit: int | None,
    seed: int,
    cache_db: str | None,
    concurrency: int = 4,
) -> dict:
    """Run every task against a served model: log-likelihoods through /v1/completions (echo +
    logprobs), chat-templated generation through /v1/chat/completions."""
    root = base_url.rstrip("/")

    def model_for(chat: bool):
        args = {"model": model_id, "num_concurrent": concurrency, "max_retries": 1, "seed": seed}
        if api_key:
            args["auth_token"] = api_key
        if chat:
            return "local-chat-completions", {**args, "base_url": f"{root}/v1/chat/completions"}
        args["base_url"] = f"{root}/v1/completions"
        if tokenizer:
            args |= {"tokenizer_backend": "huggingface", "tokenizer": tokenizer}
        return "local-completions", args

    with _api_key(api_key):
        return _run(plan, model_for, limit=limit, seed=seed, cache_db=cache_db)


def _run(plan: TaskPlan, model_for, *, limit: int | None, seed: int, cache_db: str | None) -> dict:
    import lm_eval

    manager = plan.task_manager()
    tasks: dict = {}
    samples: dict = {}
    for chat, names in plan.groups():
        model, model_args = model_for(chat)
        start = time.monotonic()
        with _offline():
            out = lm_eval.simple_evaluate(
                model=model,
                model_args=model_args,
                tasks=names,
                task_manager=manager,
                limit=limit,
                num_fewshot=plan.num_fewshot,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat and bool(plan.num_fewshot),
                bootstrap_iters=1000,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                use_cache=f"{cache_db}-{'chat' if chat else 'plain'}" if cache_db else None,
                log_samples=True,
            )
        seconds = time.monotonic() - start
        n_total = sum(int(v.get("effective", 0)) for v in out.get("n-samples", {}).values())
        for name, metrics in out["results"].items():
            n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
            tasks[name] = {
                "metrics": _metrics(metrics, n),
                "n": n,
                "chat_template": chat,
                "output_type": plan.output_types.get(name, ""),
                "higher_is_better": out.get("higher_is_better", {}).get(name, {}),
                # the group's wall time shared by sample count, for samples/s per task
                "seconds": seconds * (n / n_total) if n_total else seconds,
            }
        for name, rows in (out.get("samples") or {}).items():
            samples[name] = [_sample_row(r) for r in rows]
    return {"tasks": tasks, "samples": samples}


PROPORTION_METRICS = ("acc", "acc_norm", "exact_match", "contains", "f1_binary", "mcc_binary")


def _metrics(raw: dict, n: int) -> dict:
    """{"acc,none": .5, "acc_stderr,none": .1} -> {"acc": {"value", "stderr", "ci95", "n"}}.

    Proportions (accuracy, exact match) get a Wilson interval, which stays inside [0, 1] and is
    honest for the small n of a `--limit` run; other metrics get value +- 1.96 stderr."""
    out = {}
    for key, value in raw.items():
        metric, _, filt = key.partition(",")
        if metric.endswith("_stderr") or not isinstance(value, (int, float)) or metric == "alias":
            continue
        name = metric if filt in ("", "none") else f"{metric}[{filt}]"
        stderr = raw.get(f"{metric}_stderr,{filt}") if filt else raw.get(f"{metric}_stderr")
        stderr = stderr if isinstance(stderr, (int, float)) else None
        if metric in PROPORTION_METRICS and 0 <= value <= 1 and n > 0:
            ci = list(wilson_interval(float(value), n))
        else:
            ci = [value - 1.96 * stderr, value + 1.96 * stderr] if stderr is not None else None
        out[name] = {"value": float(value), "stderr": stderr, "ci95": ci, "n": n}
    return out


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion `p` observed over `n` samples."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _sample_row(row: dict) -> dict:
    resps = row.get("filtered_resps") or row.get("resps") or []
    return {
        "doc_id": row.get("doc_id"),
        "target": row.get("target"),
        "response": resps[0] if len(resps) == 1 else resps,
        **{k: row[k] for k in ("acc", "acc_norm", "contains", "exact_match") if k in row},
    }
