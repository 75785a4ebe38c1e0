"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from serve.engine.types import GenerationOutput
from serve.http.context import get_ctx
from serve.http.generation import Generation, check_ready, clamp_max_tokens, completion_tokens
from serve.http.openapi import error_responses, streamed_200
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
)

router = APIRouter()
ENDPOINT = "/v1/chat/completions"
RESPONSE = ChatCompletionResponse


@router.post(
    ENDPOINT,
    response_model=RESPONSE,
    responses={**streamed_200(RESPONSE), **error_responses(400, 401, 404, 413, 429, 500, 503)},
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    ctx = get_ctx(request)
    check_ready(ctx)
    model = ctx.served.get(body.model)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    prompt_ids = await ctx.tokenize(ctx.served.render_chat, model, messages)
    max_tokens = clamp_max_tokens(ctx, len(prompt_ids), body.requested_max_tokens(), "messages")
    params = body.to_sampling_params(max_tokens, model.eos_token_ids)
    gen = Generation(ctx, ENDPOINT, model, f"chatcmpl-{uuid.uuid4().hex}", [prompt_ids], [params], body.n)
    await gen.start()
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

    if not body.stream:
        results = await gen.collect(request)
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
        usage = gen.usage(completion_tokens(results))
        return ChatCompletionResponse(id=gen.id, model=model.id, choices=choices, usage=usage)

    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        def chunk(choices, usage=None) -> dict:
            c = ChatCompletionChunk(id=gen.id, created=created, model=model.id, choices=choices, usage=usage)
            return c.model_dump(exclude_none=usage is None)

        for i in range(body.n):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        last: dict[int, GenerationOutput] = {}
        async for i, out in gen.stream():
            last[i] = out
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
        usage = gen.usage(completion_tokens([[last[i]] for i in sorted(last)]))
        if include_usage:
            yield chunk([], usage=usage)

    return sse_response(events())


def _top(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}
