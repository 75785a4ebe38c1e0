"""Load generator for any OpenAI-compatible endpoint, in the manner of `vllm bench serve`.

Sends streamed chat or completion requests with at most `concurrency` in flight and measures each
one (TTFT, inter-chunk gaps, tokens received); `serve.bench.stats.summarize` turns the results into
figures. Every request asks for `max_tokens` with `ignore_eos: true` (vLLM's extension, which our
server honours); servers that ignore it may stop early, so throughput counts the tokens received:
`usage.completion_tokens` when the server reports it, else the text re-tokenised.

Run on its own against a running server:
    python -m serve.bench.loadgen --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \
        --concurrency 8 --num-requests 16 --prompt-len 128 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from serve.bench.stats import RequestResult, summarize


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: the prompt text, its built length, the output length and the model id
    (and, for a chat turn with history, every message so far: then `prompt` is the last one)."""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    model: str
    messages: tuple[dict, ...] | None = None


class LoadConfig(BaseModel):
    """How to drive one endpoint."""

    base_url: str = Field(description="Server root, e.g. http://127.0.0.1:8000 (the /v1 path is added).")
    api: Literal["chat", "completions"] = Field(
        "chat", description="/v1/chat/completions or /v1/completions."
    )
    concurrency: int = Field(1, ge=1, description="Requests in flight at once.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature sent with every request.")
    ignore_eos: bool = Field(True, description="Send `ignore_eos: true` so outputs run to max_tokens.")
    seed: int = Field(0, description="Per-request seed is this plus the request's index.")
    api_key: str | None = Field(None, description="Bearer key, when the server wants one.")
    request_timeout_s: float = Field(900.0, gt=0, description="Longest one request may take.")
    launch_deadline_s: float | None = Field(
        None,
        gt=0,
        description="Stop starting new requests this many seconds after the first (bounds slow peers).",
    )
    extra_body: dict = Field(
        default_factory=dict, description="Fields added to every request (e.g. a response_format)."
    )


def _payload(cfg: LoadConfig, req: BenchRequest, index: int) -> dict:
    body: dict = {
        "model": req.model,
        "max_tokens": req.max_tokens,
        "temperature": cfg.temperature,
        "seed": cfg.seed + index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    if cfg.api == "chat":
        body["messages"] = list(req.messages or [{"role": "user", "content": req.prompt}])
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_text(obj: dict, api: str) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    if api == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_one(
    client, cfg: LoadConfig, req: BenchRequest, index: int, count_tokens: Callable[[str], int] | None = None
) -> RequestResult:
    """Stream one request and time it; failures come back as `ok=False` results, never raised."""
    import httpx

    path = "/v1/chat/completions" if cfg.api == "chat" else "/v1/completions"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    res = RequestResult(
        ok=False, model=req.model, prompt_tokens=req.prompt_tokens, output_tokens=0, start=0.0, end=0.0
    )
    parts: list[str] = []
    chunks = 0
    usage: dict | None = None
    last: float | None = None
    res.start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=_payload(cfg, req, index), headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:200]}"
                return res
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators and ": ping" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    res.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return res
                if obj.get("usage"):
                    usage = obj["usage"]
                text = _chunk_text(obj, cfg.api)
                if not text:
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - res.start
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
                parts.append(text)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res
    finally:
        res.end = time.perf_counter()
    res.text = "".join(parts)
    if usage and usage.get("completion_tokens") is not None:
        res.output_tokens = int(usage["completion_tokens"])
        res.prompt_tokens = int(usage.get("prompt_tokens") or req.prompt_tokens)
    elif count_tokens is not None:
        res.output_tokens = count_tokens(res.text)
    else:
        res.output_tokens = chunks
    res.ok = True
    return res


async def run_load(
    cfg: LoadConfig,
    requests: Sequence[BenchRequest],
    *,
    count_tokens: Callable[[str], int] | None = None,
    on_complete: Callable[[int, RequestResult], None] | None = None,
) -> list[RequestResult]:
    """Send `requests` in order with `cfg.concurrency` workers; `on_complete(n_done, result)` after each."""
    import httpx

    results: list[RequestResult] = []
    queue = list(enumerate(requests))
    queue.reverse()
    started: float | None = None  # when the first request went out: the deadline counts from there
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)

    async with httpx.AsyncClient(base_url=cfg.base_url, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            nonlocal started
            while queue:
                now = time.perf_counter()
                if started is None:
                    started = now
                elif cfg.launch_deadline_s is not None and now - started > cfg.launch_deadline_s:
                    return
                index, req = queue.pop()
                result = await send_one(client, cfg, req, index, count_tokens)
                results.append(result)
                if on_complete is not None:
                    on_complete(len(results), result)

        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(requests)) or 1)))
    return results


def run(cfg: LoadConfig, requests: Sequence[BenchRequest], **kwargs) -> list[RequestResult]:
    """Synchronous wrapper around `run_load`."""
    return asyncio.run(run_load(cfg, requests, **kwargs))


def make_requests(
    prompts: Sequence[str], prompt_tokens: int, max_tokens: int, models: Sequence[str]
) -> list[BenchRequest]:
    """Pair prompts with models round-robin (request i goes to models[i % len(models)])."""
    if not models:
        raise ValueError("need at least one model name")
    return [
        BenchRequest(p, prompt_tokens, max_tokens, models[i % len(models)]) for i, p in enumerate(prompts)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve.bench.loadgen", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="model id; a comma-separated list spreads requests")
    parser.add_argument("--api", choices=["chat", "completions"], default="chat")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens asked per request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer", default="default", help="tokenizer dir for building prompts (or `default`)"
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json-out", default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    from serve.bench.prompts import build_prompts, load_tokenizer

    try:
        tok = load_tokenizer(args.tokenizer)
        prompts = build_prompts(tok, args.num_requests, args.prompt_len, args.seed, chat=args.api == "chat")
        cfg = LoadConfig(
            base_url=args.base_url.rstrip("/").removesuffix("/v1"),
            api=args.api,
            concurrency=args.concurrency,
            temperature=args.temperature,
            ignore_eos=not args.no_ignore_eos,
            seed=args.seed,
            api_key=args.api_key,
        )
        reqs = make_requests(prompts, args.prompt_len, args.max_tokens, args.model.split(","))
        results = run(cfg, reqs, count_tokens=lambda t: len(tok.encode(t, add_special_tokens=False)))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = summarize(results)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).write_text(text + "\n")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
