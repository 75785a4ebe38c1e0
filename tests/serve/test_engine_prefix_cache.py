"""Prompts served from the prefix cache against PEFT: per adapter, after eviction, with prompt logprobs.

The tiny random Llama (real tokenizer) and a cache of a few hundred tokens, so that chat turns hit
the cache, adapters evict each other's prefixes and freed rows are reused by other sequences; every
greedy continuation and prompt log-probability must still equal what PEFT computes from scratch.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.engine.types import GenerationRequest, SamplingParams
from tests.serve.test_engine_hf import adapters, make_engine, reference_greedy, reference_model, run_all

__all__ = ["adapters"]  # the module-scoped fixture, shared with test_engine_hf
ROW_BYTES = 2 * 2 * 2 * 16 * 4  # tiny Llama: layers x (k, v) x kv_heads x head_dim x fp32


def cache_gb(tokens: int) -> float:
    return tokens * ROW_BYTES / 2**30


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_chat_turns_from_the_cache_match_peft_per_adapter_and_after_eviction(tiny_model_dir, adapters, impl):
    n = 6

    async def main():
        engine = make_engine(
            tiny_model_dir, adapters, max_num_seqs=4, model_impl=impl, prefix_cache_memory_gb=cache_gb(150)
        )
        await engine.start()
        tok, sched = engine.tokenizer, engine.scheduler
        history = tok.encode("We talked about the weather in Paris, in Rome and in Berlin last week. " * 2)
        runs, hits_after_eviction = [], 0

        async def ask(adapter, ids):
            nonlocal hits_after_eviction
            before = sched.cache_hit_tokens
            req = GenerationRequest(
                f"r{len(runs)}", ids, SamplingParams(max_tokens=n, temperature=0), adapter
            )
            [(toks, _)] = await run_all(engine, [req])
            runs.append((adapter, ids, toks))
            if sched.prefix_cache.evicted_tokens:
                hits_after_eviction += sched.cache_hit_tokens - before
            return toks

        # Two turns per adapter, the same history for all of them: each turn 2 starts from its own
        # adapter's turn 1, and the 150-token cache holds about two conversations, so every new
        # one evicts the least recently used and reuses its rows.
        for round_ in range(2):
            for adapter in (None, "a", "b"):
                reply = await ask(adapter, history)
                await ask(adapter, history + reply + tok.encode(f" And then, round {round_}?"))
        stats = sched.cache_stats()
        await engine.shutdown()
        return runs, stats, hits_after_eviction

    runs, stats, hits_after_eviction = asyncio.run(main())
    assert stats["prefix_cache_hits"] > 0 and stats["prefix_cache_evicted_tokens"] > 0
    assert hits_after_eviction > 0
    refs = {name: reference_model(tiny_model_dir, adapters.get(name)) for name in (None, "a", "b")}
    for adapter, ids, toks in runs:
        assert toks == reference_greedy(refs[adapter], ids, n), f"adapter={adapter} prompt={ids}"
    # Same history, different adapters, different replies: a cross-adapter hit would show.
    assert len({tuple(toks) for _, _, toks in runs[:6:2]}) == 3


def test_prompt_logprobs_from_the_cache_match_peft(tiny_model_dir, adapters):
    """lm-eval's pattern: one context, several choices, scored with echo + logprobs."""

    async def main():
        engine = make_engine(tiny_model_dir, adapters, max_num_seqs=4, prefix_cache_memory_gb=cache_gb(400))
        await engine.start()
        tok = engine.tokenizer
        context = tok.encode("Question: Which city is the capital of France, and why?\nAnswer:")
        jobs = []
        for adapter in (None, "a", "b"):
            for top, choice in ((1, " Paris"), (1, " Rome"), (2, " Berlin, because"), (1, " Paris")):
                ids = context + tok.encode(choice)
                params = SamplingParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=top)
                [(_, outs)] = await run_all(engine, [GenerationRequest(f"{len(jobs)}", ids, params, adapter)])
                jobs.append((adapter, ids, top, outs[0].prompt_logprobs))
        hits = engine.scheduler.cache_hit_tokens
        await engine.shutdown()
        return jobs, hits, len(context)

    jobs, hits, context_len = asyncio.run(main())
    # Per adapter: choices 2 and 4 reuse the context (top-1 records); the top-2 choice cannot.
    assert hits >= 3 * (2 * (context_len - 1) - 1)
    refs = {name: reference_model(tiny_model_dir, adapters.get(name)) for name in (None, "a", "b")}
    for adapter, ids, top, lps in jobs:
        with torch.no_grad():
            want = torch.log_softmax(refs[adapter](torch.tensor([ids])).logits[0], -1)
        assert lps[0] is None and len(lps) == len(ids)
        for j in range(1, len(ids)):
            assert lps[j].token_id == ids[j] and len(lps[j].top) == top
            assert lps[j].logprob == pytest.approx(want[j - 1, ids[j]].item(), abs=1e-4), f"{adapter} {j}"
            assert lps[j].top[0][0] == int(want[j - 1].argmax())
