"""Running engine requests for a route: submit, prime (so queue errors become HTTP statuses before
any byte is sent), merge the streams of several choices, and cancel when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from serve.engine.types import EngineDeadError, EngineOverloadedError, GenerationOutput, GenerationRequest
from serve.errors import BadRequestError, InternalError, RateLimitError, ServiceUnavailableError
from serve.http.context import AppContext


@dataclass
class PrimedStream:
    first: GenerationOutput
    rest: AsyncIterator[GenerationOutput]


def check_ready(ctx: AppContext) -> None:
    if ctx.load_error:
        raise ServiceUnavailableError(f"the model failed to load: {ctx.load_error}")
    if ctx.served is None or not ctx.engine.ready:
        raise ServiceUnavailableError("the model is still loading; retry when GET /ready returns 200")


def clamp_max_tokens(ctx: AppContext, prompt_len: int, requested: int | None, param: str) -> int:
    limit = ctx.engine.max_model_len
    if prompt_len >= limit:
        raise BadRequestError(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{prompt_len} tokens; shorten the {param}.",
            param=param,
            code="context_length_exceeded",
        )
    remaining = limit - prompt_len
    return remaining if requested is None else min(requested, remaining)


async def submit(ctx: AppContext, requests: list[GenerationRequest]) -> list[PrimedStream]:
    """Start every request and wait for its first output; on any error, abort the others."""
    gens = [ctx.engine.generate(r) for r in requests]
    primed: list[PrimedStream] = []
    try:
        for gen in gens:
            first = await gen.__anext__()
            if first.finish_reason == "error":
                raise InternalError("generation failed; see the server log")
            primed.append(PrimedStream(first, gen))
    except BaseException as exc:
        for gen in gens:
            await gen.aclose()
        if isinstance(exc, EngineOverloadedError):
            raise RateLimitError(f"{exc}; retry later") from None
        if isinstance(exc, EngineDeadError):
            raise ServiceUnavailableError(str(exc)) from None
        raise
    return primed


async def merge(streams: list[PrimedStream]) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Yield (choice index, output) from all streams as outputs arrive; closing aborts them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: PrimedStream) -> None:
        try:
            await queue.put((i, s.first))
            if not s.first.finished:
                async for out in s.rest:
                    await queue.put((i, out))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(Exception):
                await s.rest.aclose()


async def collect(streams: list[PrimedStream], request: Request) -> list[list[GenerationOutput]]:
    """Gather every output of every choice; cancel the generation if the client disconnects."""
    results: list[list[GenerationOutput]] = [[] for _ in streams]

    async def work() -> None:
        async for i, out in merge(streams):
            results[i].append(out)

    task = asyncio.create_task(work())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise asyncio.CancelledError("client disconnected")
    task.result()
    for outs in results:
        if outs and outs[-1].finish_reason == "error":
            raise InternalError("generation failed; see the server log")
    return results
