"""POST /v1/completions: raw prompts (text or token ids), echo and log-probabilities.

This is what lm-eval's `local-completions` client uses for log-likelihood tasks: `echo=true`,
`max_tokens=1`, `logprobs=1`, prompts as token-id lists; it reads
`choices[i].logprobs.token_logprobs[ctxlen:-1]` and `top_logprobs`.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from serve.engine.types import GenerationOutput, TokenLogprob
from serve.errors import BadRequestError
from serve.http.context import get_ctx
from serve.http.generation import Generation, check_ready, clamp_max_tokens, completion_tokens
from serve.http.openapi import error_responses, streamed_200
from serve.http.sse import sse_response
from serve.http.structured import plan_output
from serve.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse

router = APIRouter()
ENDPOINT = "/v1/completions"
RESPONSE = CompletionResponse


@router.post(
    ENDPOINT,
    response_model=RESPONSE,
    responses={**streamed_200(RESPONSE), **error_responses(400, 401, 403, 404, 409, 413, 429, 500, 503)},
)
async def completions(body: CompletionRequest, request: Request):
    ctx = get_ctx(request)
    check_ready(ctx)
    model = await ctx.served.resolve(body.model)
    tok = ctx.served.tokenizer
    plan = await plan_output(
        ctx.grammars, response_format=body.response_format, structured_outputs=body.structured_outputs
    )
    prompts = await ctx.tokenize(_token_ids, tok, body.prompts())
    # max_tokens=0 (score the prompt only) generates one token and drops it.
    score_only = body.max_tokens == 0
    params = [
        body.to_sampling_params(
            clamp_max_tokens(ctx, len(ids), 1 if score_only else body.max_tokens, "prompt"),
            model.eos_token_ids,
            plan.constraint,
        )
        for ids in prompts
    ]
    gen = Generation(
        ctx, ENDPOINT, model, f"cmpl-{uuid.uuid4().hex}", prompts, params, body.n, grammar=plan.grammar
    )
    await gen.start()

    if not body.stream:
        results = await gen.collect(request)
        choices = [
            _choice(i, outs, gen.prompt_of(i), body, tok, score_only) for i, outs in enumerate(results)
        ]
        usage = gen.usage(0 if score_only else completion_tokens(results))
        return CompletionResponse(id=gen.id, model=model.id, choices=choices, usage=usage)

    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        last: dict[int, GenerationOutput] = {}
        sent_echo: set[int] = set()
        async for i, out in gen.stream():
            last[i] = out
            text = out.text
            if body.echo and i not in sent_echo:
                text = tok.decode(gen.prompt_of(i)) + text
                sent_echo.add(i)
            choice = CompletionChoice(index=i, text=text, finish_reason=out.finish_reason)
            if body.logprobs is not None:
                choice.logprobs = _logprobs(
                    [(lp.token_id, lp) for lp in out.logprobs or []], tok, body.logprobs
                )
            yield CompletionResponse(id=gen.id, created=created, model=model.id, choices=[choice]).model_dump(
                exclude_none=True
            )
        usage = gen.usage(completion_tokens([[last[i]] for i in sorted(last)]))
        if include_usage:
            yield CompletionResponse(
                id=gen.id, created=created, model=model.id, choices=[], usage=usage
            ).model_dump()

    return sse_response(events())


def _token_ids(tok, prompts: list[str | list[int]]) -> list[list[int]]:
    """Each prompt as token ids: strings encoded, id lists checked against the vocabulary."""
    vocab = len(tok)
    out: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=True)
        elif any(t >= vocab for t in p):
            raise BadRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        else:
            ids = list(p)
        if not ids:
            raise BadRequestError("prompt must not be empty", param="prompt")
        out.append(ids)
    return out


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
        lp.token_logprobs.append(_finite(e.logprob) if e is not None else None)
        if e is None:
            lp.top_logprobs.append(None)
        else:
            top = {tok.decode([t]): _finite(v) for t, v in e.top[:k]} if k else {}
            top.setdefault(s, _finite(e.logprob))
            lp.top_logprobs.append(top)
    return lp


def _finite(logprob: float) -> float:
    """JSON has no -Infinity: a zero-probability token reports -9999.0, as chat logprobs do."""
    return max(logprob, -9999.0)
