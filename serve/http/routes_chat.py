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
from serve.http.structured import history_messages, plan_output
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
    responses={**streamed_200(RESPONSE), **error_responses(400, 401, 403, 404, 409, 413, 429, 500, 503)},
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    ctx = get_ctx(request)
    check_ready(ctx)
    model = await ctx.served.resolve(body.model)
    plan = await plan_output(
        ctx.grammars,
        response_format=body.response_format,
        structured_outputs=body.structured_outputs,
        tools=body.tools,
        tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        support=model.tools,
    )
    messages = history_messages(body.messages)
    prompt_ids = await ctx.tokenize(ctx.served.render_chat, model, messages, plan.offered_tools)
    max_tokens = clamp_max_tokens(ctx, len(prompt_ids), body.requested_max_tokens(), "messages")
    params = body.to_sampling_params(max_tokens, model.eos_token_ids, plan.constraint)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    gen = Generation(ctx, ENDPOINT, model, rid, [prompt_ids], [params], body.n, grammar=plan.grammar)
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
            content, calls, finish = plan.shaper().whole(
                "".join(o.text for o in outs), outs[-1].finish_reason
            )
            choices.append(
                ChatChoice(
                    index=i,
                    message=ChatResponseMessage(content=content, tool_calls=calls),
                    logprobs=ChatLogprobs(content=[c for lp in lps for c in lp.content])
                    if body.logprobs
                    else None,
                    finish_reason=finish,
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
        shapers = [plan.shaper() for _ in range(body.n)]
        async for i, out in gen.stream():
            last[i] = out
            # Text before a tool call streams as content; a call streams as one delta once complete.
            text, calls = shapers[i].feed(out.text)
            finish = None
            if out.finish_reason:
                rest, more, finish = shapers[i].finish(out.finish_reason)
                text, calls = text + rest, calls + more
            lps = logprobs_of(out)
            if text or lps:
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=text or None), logprobs=lps)])
            if calls:
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(tool_calls=calls))])
            if finish:
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=finish)])
        usage = gen.usage(completion_tokens([[last[i]] for i in sorted(last)]))
        if include_usage:
            yield chunk([], usage=usage)

    return sse_response(events())


def _top(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}
