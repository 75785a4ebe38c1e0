"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from serve.engine.types import GenerationOutput, GenerationRequest
from serve.errors import BadRequestError, InternalError
from serve.http.context import get_ctx
from serve.http.generation import check_ready, clamp_max_tokens, collect, merge, submit
from serve.http.sse import sse_response
from serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatLogprobToken,
    ChatResponseMessage,
    TopLogprob,
    Usage,
)

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    ctx = get_ctx(request)
    check_ready(ctx)
    model = ctx.served.get(body.model)
    try:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
    except ValueError as exc:
        raise BadRequestError(str(exc), param="messages") from None
    prompt_ids = ctx.served.render_chat(model, messages)
    max_tokens = clamp_max_tokens(ctx, len(prompt_ids), body.requested_max_tokens(), "messages")
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    requests = []
    for i in range(body.n):
        params = body.to_sampling_params(max_tokens, model.eos_token_ids)
        if params.seed is not None:
            params.seed += i  # n choices with one seed must still differ
        requests.append(GenerationRequest(f"{rid}-{i}", prompt_ids, params, model.adapter))
    started = time.monotonic()
    streams = await submit(ctx, requests)
    ctx.metrics.ttft.labels(model.id).observe(time.monotonic() - started)
    tok = ctx.served.tokenizer
    eos = set(model.eos_token_ids)

    def logprobs_of(out: GenerationOutput) -> ChatLogprobs | None:
        if not body.logprobs or not out.logprobs:
            return None
        content = [
            ChatLogprobToken(
                **_top(tok, lp.token_id, lp.logprob),
                top_logprobs=[TopLogprob(**_top(tok, t, v)) for t, v in lp.top],
            )
            for lp in out.logprobs
            if lp.token_id not in eos
        ]
        return ChatLogprobs(content=content)

    def account(outs_per_choice) -> Usage:
        completion = sum(outs[-1].num_generated_tokens for outs in outs_per_choice if outs)
        ctx.metrics.prompt_tokens.labels(model.id).inc(len(prompt_ids))
        ctx.metrics.generation_tokens.labels(model.id).inc(completion)
        ctx.metrics.latency.labels("/v1/chat/completions", model.id).observe(time.monotonic() - started)
        ctx.metrics.requests.labels("/v1/chat/completions", model.id, "200").inc()
        return Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=completion,
            total_tokens=len(prompt_ids) + completion,
        )

    if not body.stream:
        results = await collect(streams, request)
        choices = []
        for i, outs in enumerate(results):
            lps = [lp for o in outs if (lp := logprobs_of(o))]
            choices.append(
                ChatChoice(
                    index=i,
                    message=ChatResponseMessage(content="".join(o.text for o in outs)),
                    logprobs=ChatLogprobs(content=[c for lp in lps for c in lp.content])
                    if body.logprobs
                    else None,
                    finish_reason=outs[-1].finish_reason,
                )
            )
        return ChatCompletionResponse(id=rid, model=model.id, choices=choices, usage=account(results))

    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        def chunk(choices, usage=None) -> dict:
            c = ChatCompletionChunk(id=rid, created=created, model=model.id, choices=choices, usage=usage)
            return c.model_dump(exclude_none=usage is None)

        for i in range(body.n):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        last: dict[int, GenerationOutput] = {}
        async for i, out in merge(streams):
            last[i] = out
            if out.finish_reason == "error":
                raise InternalError("generation failed; see the server log")
            if out.text or out.finish_reason or logprobs_of(out):
                yield chunk(
                    [
                        ChatChunkChoice(
                            index=i,
                            delta=ChatDelta(content=out.text or None),
                            logprobs=logprobs_of(out),
                            finish_reason=out.finish_reason,
                        )
                    ]
                )
        usage = account([[last[i]] for i in sorted(last)])
        if include_usage:
            yield chunk([], usage=usage)

    return sse_response(events())


def _top(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}
