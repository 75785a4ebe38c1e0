"""The one generation path behind chat and completions.

A `Generation` is the engine requests behind one API request: `n` choices for each prompt (a seed
gives choice j the seed + j, so choices differ yet repeat), submitted together and primed (so queue
and engine errors become HTTP statuses before any byte is sent), merged into one stream of
(choice index, output), cancelled when the client goes away, and accounted once: usage, tokens,
latency and the request's status in /metrics (200, 499 for a client that disconnected, 500 for a
stream that failed after its first byte; errors raised before the response are counted by the app's
error handler). An output that ends with finish_reason "error" raises `GenerationFailedError`, which
`serve.errors.to_api_error` turns into a 500 that says the step failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi import Request

from serve.engine.types import GenerationFailedError, GenerationOutput, GenerationRequest, SamplingParams
from serve.errors import BadRequestError, ServiceUnavailableError, to_api_error
from serve.http.context import AppContext
from serve.protocol import Usage
from serve.protocol.common import MAX_SAFE_INT
from serve.served import ServedModel

SEED_MODULUS = MAX_SAFE_INT + 1  # choice seeds wrap inside the range the protocol accepts


def check_ready(ctx: AppContext) -> None:
    """503 with the reason unless the engine can serve now."""
    if ctx.load_error:
        raise ServiceUnavailableError(f"the model failed to load: {ctx.load_error}", code="load_failed")
    health = ctx.engine.health
    if health.state == "dead":
        raise ServiceUnavailableError(
            f"the engine stopped ({health.detail}); restart the server", code="engine_dead"
        )
    if health.state == "stopping":
        raise ServiceUnavailableError("the server is shutting down", headers={"Retry-After": "5"})
    if ctx.served is None or health.state != "ready":
        raise ServiceUnavailableError(
            "the model is still loading; retry when GET /ready returns 200", headers={"Retry-After": "5"}
        )


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


class Generation:
    """`n` choices for each prompt, as one unit: start, stream or collect, account."""

    def __init__(
        self,
        ctx: AppContext,
        endpoint: str,
        model: ServedModel,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        n: int,
        *,
        grammar: object | None = None,
    ):
        """`grammar` is the requests' constraint (`params[i].constraint`) compiled for the engine."""
        self.ctx, self.endpoint, self.model, self.id = ctx, endpoint, model, request_id
        self.prompts, self.n = prompts, n
        self.requests: list[GenerationRequest] = []
        for ids, p in zip(prompts, params, strict=True):
            for j in range(n):
                choice = dataclasses.replace(p, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids))
                if choice.seed is not None:
                    choice.seed = (choice.seed + j) % SEED_MODULUS  # n choices with one seed must differ
                self.requests.append(
                    GenerationRequest(
                        f"{request_id}-{len(self.requests)}", ids, choice, model.adapter, grammar=grammar
                    )
                )
        self.label = ctx.metrics.model_label(model)
        self.started = 0.0
        self._gens: list = []
        self._firsts: list[GenerationOutput] = []
        self._status: str | None = None  # set once the outcome is counted
        self._collecting = False

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.n]

    async def start(self) -> None:
        """Submit every request and wait for its first output; on any error, abort them all."""
        self.started = time.monotonic()
        self._gens = [self.ctx.engine.generate(r) for r in self.requests]
        try:
            for gen in self._gens:
                first = await gen.__anext__()
                if first.finish_reason == "error":
                    raise GenerationFailedError(first.error or "the engine failed")
                self._firsts.append(first)
        except BaseException as exc:
            await self._close()
            if isinstance(exc, Exception):
                raise to_api_error(exc) from None
            raise
        self.ctx.metrics.ttft.labels(self.label).observe(time.monotonic() - self.started)

    async def stream(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """(choice index, output) as outputs arrive; closing it early aborts every choice."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                first = self._firsts[i]
                await queue.put((i, first))
                if not first.finished:
                    async for out in self._gens[i]:
                        await queue.put((i, out))
            except Exception as exc:
                await queue.put((i, exc))
            finally:
                await queue.put((i, done))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self._gens))]
        remaining = len(tasks)
        completed = False
        try:
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                elif item.finish_reason == "error":
                    raise GenerationFailedError(item.error or "the engine failed")
                else:
                    yield i, item
            completed = True
        except Exception:
            if self._collecting:  # answered through the app's error handler, which counts it
                self._status = self._status or "error"
            else:  # a streamed reply has already said 200: count the failure here
                self._count("500")
            raise
        finally:
            for t in tasks:
                t.cancel()
            await self._close()
            if not completed:
                self._count("499")  # the client went away (no-op when a failure was counted)

    async def collect(self, request: Request) -> list[list[GenerationOutput]]:
        """Every output of every choice; cancels the generation if the client disconnects."""
        results: list[list[GenerationOutput]] = [[] for _ in self._gens]

        async def work() -> None:
            async for i, out in self.stream():
                results[i].append(out)

        self._collecting = True
        task = asyncio.create_task(work())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise asyncio.CancelledError("client disconnected")
        try:
            task.result()
        except Exception as exc:
            raise to_api_error(exc) from None
        return results

    def usage(self, completion_tokens: int) -> Usage:
        """Account a request that completed: tokens, latency and a 200; the usage block for the reply."""
        prompt_tokens = sum(len(p) for p in self.prompts)
        m = self.ctx.metrics
        m.prompt_tokens.labels(self.label).inc(prompt_tokens)
        m.generation_tokens.labels(self.label).inc(completion_tokens)
        m.latency.labels(self.endpoint, self.label).observe(time.monotonic() - self.started)
        self._count("200")
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    def _count(self, status: str) -> None:
        if self._status is None:
            self._status = status
            self.ctx.metrics.requests.labels(self.endpoint, self.label, status).inc()

    async def _close(self) -> None:
        for gen in self._gens:
            with contextlib.suppress(Exception):
                await gen.aclose()


def completion_tokens(outputs_per_choice: list[list[GenerationOutput]]) -> int:
    return sum(outs[-1].num_generated_tokens for outs in outputs_per_choice if outs)
