"""How the engine groups requests into steps (`batch_wait_ms`): a burst arriving a few ms apart shares
one step, also right after a step that answered every request, and a full queue starts the step at
once (tiny random Llama, in-process)."""

from __future__ import annotations

import asyncio
import time

from serve.engine.types import GenerationRequest, SamplingParams
from tests.serve.test_engine_hf import make_engine


async def _burst(engine, tag: str, n: int, gap_s: float) -> tuple[int, float]:
    """`n` one-token requests, `gap_s` apart; returns (engine steps they took, seconds)."""

    async def one(i):
        await asyncio.sleep(gap_s * i)  # parsed and tokenized one after the other
        ids = engine.tokenizer.encode(f"Question {i}: what comes after {i}?")
        req = GenerationRequest(f"{tag}{i}", ids, SamplingParams(max_tokens=1, temperature=0))
        return [out async for out in engine.generate(req)]

    before, started = engine.steps, time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    return engine.steps - before, time.monotonic() - started


def test_requests_arriving_together_share_a_step(tiny_model_dir):
    async def main():
        engine = make_engine(tiny_model_dir, {}, max_num_seqs=8, batch_wait_ms=500)
        await engine.start()
        try:
            await asyncio.sleep(0.1)  # idle, as a server between bursts
            # The second burst starts as soon as the first is answered (closed-loop clients).
            first = await _burst(engine, "a", 4, 0.005)
            second = await _burst(engine, "b", 4, 0.005)
            # As many as max_num_seqs queued: no reason to wait for more.
            full = await _burst(engine, "c", 8, 0.0)
        finally:
            await engine.shutdown()
        return first, second, full

    first, second, full = asyncio.run(main())
    # Each request needs one step (prefill + its only token): four arriving over 15 ms take one.
    assert first[0] == 1 and second[0] == 1, (first, second)
    assert full[0] == 1 and full[1] < 0.4, full
