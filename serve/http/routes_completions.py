"""POST /v1/completions: raw prompts (text or token ids), echo and log-probabilities.

This is what lm-eval's `local-completions` client uses for log-likelihood tasks: `echo=true`,
`max_tokens=1`, `logprobs=1`, prompts as token-id lists; it reads
`choices[i].logprobs.token_logprobs[ctxlen:-1]` and `top_logprobs`.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from serve.engine.types import GenerationOutput, GenerationRequest, TokenLogprob
from serve.errors import BadRequestError, InternalError
from serve.http.context import get_ctx
from serve.http.generation import check_ready, clamp_max_tokens, collect, merge, submit
from serve.http.sse import sse_response
from serve.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage

router = APIRouter()


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request):
    ctx = get_ctx(request)
    check_ready(ctx)
    model = ctx.served.get(body.model)
    tok = ctx.served.tokenizer
    vocab = len(tok)
    prompts: list[list[int]] = []
    for p in body.prompts():
        if isinstance(p, str):
            prompts.append(tok.encode(p, add_special_tokens=True))
        else:
            if any(not 0 <= t < vocab for t in p):
                raise BadRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompts.append(list(p))
        if not prompts[-1]:
            raise BadRequestError("prompt must not be empty", param="prompt")
    # max_tokens=0 (score the prompt only) generates one token and drops it.
    score_only = body.max_tokens == 0
    rid = f"cmpl-{uuid.uuid4().hex}"
    requests = []
    for pi, ids in enumerate(prompts):
        max_tokens = clamp_max_tokens(ctx, len(ids), 1 if score_only else body.max_tokens, "prompt")
        for j in range(body.n):
            params = body.to_sampling_params(max_tokens, model.eos_token_ids)
            if params.seed is not None:
                params.seed += j
            requests.append(GenerationRequest(f"{rid}-{pi}-{j}", ids, params, model.adapter))
    started = time.monotonic()
    streams = await submit(ctx, requests)
    ctx.metrics.ttft.labels(model.id).observe(time.monotonic() - started)
    prompt_of = [prompts[i // body.n] for i in range(len(requests))]

    def account(outs_per_choice) -> Usage:
        prompt_tokens = sum(len(p) for p in prompts)
        completion = 0 if score_only else sum(o[-1].num_generated_tokens for o in outs_per_choice if o)
        ctx.metrics.prompt_tokens.labels(model.id).inc(prompt_tokens)
        ctx.metrics.generation_tokens.labels(model.id).inc(completion)
        ctx.metrics.latency.labels("/v1/completions", model.id).observe(time.monotonic() - started)
        ctx.metrics.requests.labels("/v1/completions", model.id, "200").inc()
        return Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
        )

    if not body.stream:
        results = await collect(streams, request)
        choices = [_choice(i, outs, prompt_of[i], body, tok, score_only) for i, outs in enumerate(results)]
        return CompletionResponse(id=rid, model=model.id, choices=choices, usage=account(results))

    if score_only:
        raise BadRequestError("max_tokens=0 cannot be streamed", param="stream")
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        last: dict[int, GenerationOutput] = {}
        sent_echo: set[int] = set()
        async for i, out in merge(streams):
            last[i] = out
            if out.finish_reason == "error":
                raise InternalError("generation failed; see the server log")
            text = out.text
            if body.echo and i not in sent_echo:
                text = tok.decode(prompt_of[i]) + text
                sent_echo.add(i)
            choice = CompletionChoice(index=i, text=text, finish_reason=out.finish_reason)
            if body.logprobs is not None:
                choice.logprobs = _logprobs(
                    [(lp.token_id, lp) for lp in out.logprobs or []], tok, body.logprobs
                )
            yield CompletionResponse(id=rid, created=created, model=model.id, choices=[choice]).model_dump(
                exclude_none=True
            )
        usage = account([[last[i]] for i in sorted(last)])
        if include_usage:
            yield CompletionResponse(
                id=rid, created=created, model=model.id, choices=[], usage=usage
            ).model_dump()

    return sse_response(events())


def _choice(index, outs, prompt_ids, body: CompletionRequest, tok, score_only: bool) -> CompletionChoice:
    gen_lps: list[TokenLogprob] = [lp for o in outs for lp in (o.logprobs or [])]
    text = "".join(o.text for o in outs)
    if score_only:
        text, gen_lps = "", []
    prefix = tok.decode(prompt_ids) if body.echo else ""
    choice = CompletionChoice(
        index=index, text=prefix + text, finish_reason="length" if score_only else outs[-1].finish_reason
    )
    if body.logprobs is not None:
        entries: list[tuple[int, TokenLogprob | None]] = []
        if body.echo:
            prompt_lps = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
            entries += list(zip(prompt_ids, prompt_lps or [None] * len(prompt_ids), strict=True))
        entries += [(lp.token_id, lp) for lp in gen_lps]
        choice.logprobs = _logprobs(entries, tok, body.logprobs)
    return choice


def _logprobs(entries: list[tuple[int, TokenLogprob | None]], tok, k: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs block; the first prompt token has no logprob (None), as in vLLM."""
    lp = CompletionLogprobs()
    offset = 0
    for token_id, e in entries:
        s = tok.decode([token_id])
        lp.tokens.append(s)
        lp.text_offset.append(offset)
        offset += len(s)
        lp.token_logprobs.append(e.logprob if e is not None else None)
        if e is None:
            lp.top_logprobs.append(None)
        else:
            top = {tok.decode([t]): v for t, v in e.top[:k]} if k else {}
            top.setdefault(s, e.logprob)
            lp.top_logprobs.append(top)
    return lp
