"""The `multiturn` scenario: concurrent chat conversations whose history grows every turn.

Each of `conversations` conversations sends `turns` streamed chat requests one after the other;
every turn appends the previous reply (as the assistant message) and a new user message of
`user_len` tokens, so with the defaults (8 x 6 turns, 64-token messages, 200-token replies) the
last turn's prompt holds ~1,500 tokens. A server that keeps keys/values across requests (prefix
caching) computes only the new tokens of a turn; one that does not recomputes the whole history,
and its time to first token grows with it. `summarize_turns` reports TTFT per turn and the ratio
of the last turn's median to the first's (issue 19: at most 1.5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from serve.bench.loadgen import BenchRequest, LoadConfig, send_one
from serve.bench.stats import RequestResult, percentile, summarize


async def run_conversations(
    cfg: LoadConfig,
    model: str,
    user_messages: Sequence[Sequence[str]],
    output_len: int,
    *,
    count_tokens: Callable[[str], int] | None = None,
) -> list[list[RequestResult]]:
    """Run every conversation (its user messages, in order) at once; results per conversation and turn.

    A conversation stops at its first failed turn.
    """
    import httpx

    n = len(user_messages)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=cfg.base_url, limits=limits, timeout=timeout) as client:

        async def conversation(c: int) -> list[RequestResult]:
            messages: list[dict] = []
            results: list[RequestResult] = []
            for t, text in enumerate(user_messages[c]):
                messages.append({"role": "user", "content": text})
                req = BenchRequest(text, 0, output_len, model, messages=tuple(messages))
                res = await send_one(client, cfg, req, c * len(user_messages[c]) + t, count_tokens)
                results.append(res)
                if not res.ok:
                    break
                messages.append({"role": "assistant", "content": res.text})
            return results

        return list(await asyncio.gather(*(conversation(c) for c in range(n))))


def summarize_turns(per_conversation: Sequence[Sequence[RequestResult]]) -> dict:
    """`summarize` over every request, plus TTFT and prompt length per turn and the last/first ratio."""
    summary = summarize([r for conv in per_conversation for r in conv])
    turns = max((len(conv) for conv in per_conversation), default=0)
    rows = []
    for t in range(turns):
        done = [conv[t] for conv in per_conversation if len(conv) > t and conv[t].ok]
        ttfts = [r.ttft for r in done if r.ttft is not None]
        rows.append({
            "turn": t + 1,
            "completed": len(done),
            "prompt_tokens_p50": percentile([r.prompt_tokens for r in done], 50),
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99),
        })  # fmt: skip
    summary["turns"] = rows
    first, last = (rows[0]["ttft_p50_s"], rows[-1]["ttft_p50_s"]) if rows else (None, None)
    summary["ttft_last_over_first"] = last / first if first and last is not None else None
    return summary
