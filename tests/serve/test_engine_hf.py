"""The HF engine against references: transformers' own greedy generation and PEFT's adapters.

Runs on the tiny random Llama (real tokenizer), so every check is numerical and fast: mixed batches
of base and adapter requests must produce exactly what each request produces alone in PEFT.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.adapters import load_adapter_spec
from serve.config import ServeConfig
from serve.engine.hf import HFEngine
from serve.engine.types import GenerationRequest, SamplingParams
from serve.models import ResolvedModel
from tests.helpers.adapters import make_lora_adapter

PROMPTS = ["Hello there", "The capital of France is", "用四郎的口吻回答问题", "1 2 3 4 5 6 7 8 9 10 11 12"]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_lora_adapter(tiny_model_dir, root / "a", seed=1, scale=0.3),
        "b": make_lora_adapter(tiny_model_dir, root / "b", seed=2, scale=0.3, targets=("q_proj", "v_proj")),
    }


def make_engine(model_dir, adapters, **cfg) -> HFEngine:
    specs = [load_adapter_spec(n, p) for n, p in adapters.items()]
    resolved = ResolvedModel(name=str(model_dir), path=model_dir, served_id="tiny")
    return HFEngine(ServeConfig(model=str(model_dir), **cfg), resolved, specs)


def reference_model(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir) if adapter_dir is not None else model


def reference_greedy(model, prompt_ids, n):
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt_ids) :].tolist()


def run_mixed(model_dir, adapters, prompts, names, params: SamplingParams, impl: str):
    """Every prompt under every name in `names` (None: the base) as one concurrent batch.

    Returns `[(adapter, prompt_ids, (tokens, outputs))]`, after checking the engine ran `impl`.
    """

    async def main():
        engine = make_engine(model_dir, adapters, max_num_seqs=8, model_impl=impl)
        await engine.start()
        assert engine.impl == impl
        jobs = []
        for i, prompt in enumerate(prompts):
            ids = engine.tokenizer.encode(prompt)
            for adapter in names:
                jobs.append((adapter, ids, GenerationRequest(f"{i}-{adapter}", ids, params, adapter)))
        results = await run_all(engine, [j[2] for j in jobs])
        await engine.shutdown()
        return [(adapter, ids, result) for (adapter, ids, _), result in zip(jobs, results, strict=True)]

    return asyncio.run(main())


async def run_all(engine, requests):
    async def one(req):
        toks, outs = [], []
        async for out in engine.generate(req):
            toks += out.token_ids
            outs.append(out)
        return toks, outs

    return await asyncio.gather(*[one(r) for r in requests])


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_mixed_batch_matches_peft_reference(tiny_model_dir, adapters, impl):
    n = 12
    runs = run_mixed(
        tiny_model_dir, adapters, PROMPTS, (None, "a", "b"), SamplingParams(max_tokens=n, temperature=0), impl
    )
    refs = {name: reference_model(tiny_model_dir, adapters.get(name)) for name in (None, "a", "b")}
    for adapter, ids, (toks, outs) in runs:
        ref = reference_greedy(refs[adapter], ids, n)
        assert toks == ref, f"adapter={adapter} prompt={ids}"
        assert outs[-1].finish_reason == "length" and outs[-1].num_generated_tokens == n
    # The adapters really change the output, or the comparison above proves little.
    by_adapter = {adapter: toks for adapter, _, (toks, _) in runs[:3]}
    assert by_adapter[None] != by_adapter["a"] and by_adapter[None] != by_adapter["b"]


def test_prompt_logprobs_match_full_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    async def main():
        engine = make_engine(tiny_model_dir, {}, max_num_seqs=2)
        await engine.start()
        ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=2)
        [(toks, outs)] = await run_all(engine, [GenerationRequest("p", ids, params)])
        await engine.shutdown()
        return ids, toks, outs

    ids, toks, outs = asyncio.run(main())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    prompt_lps = outs[0].prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == len(ids)
    for j in range(1, len(ids)):
        assert prompt_lps[j].token_id == ids[j]
        assert prompt_lps[j].logprob == pytest.approx(logprobs[j - 1, ids[j]].item(), abs=1e-4)
        assert len(prompt_lps[j].top) == 2
    gen = outs[-1].logprobs[0]
    assert gen.token_id == toks[0] == int(logprobs[-1].argmax())
    assert gen.logprob == pytest.approx(logprobs[-1].max().item(), abs=1e-4)


def test_long_prompt_is_chunked_and_stop_and_abort(tiny_model_dir):
    async def main():
        engine = make_engine(tiny_model_dir, {}, max_num_seqs=2)
        await engine.start()
        engine.scheduler.max_batched_tokens = 16  # force several prefill chunks
        tok = engine.tokenizer
        long_ids = tok.encode(" ".join(str(i) for i in range(60)))
        params = SamplingParams(max_tokens=5, temperature=0)
        [(chunked, _)] = await run_all(engine, [GenerationRequest("long", long_ids, params)])
        engine.scheduler.max_batched_tokens = 4096
        [(whole, _)] = await run_all(engine, [GenerationRequest("long2", long_ids, params)])
        # EOS handling: stop on the first generated token's id.
        stop_params = SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[whole[0]])
        [(stopped, outs)] = await run_all(engine, [GenerationRequest("stop", long_ids, stop_params)])
        # Abort: closing the stream frees the slot at once.
        gen = engine.generate(
            GenerationRequest("abort", long_ids, SamplingParams(max_tokens=10_000, temperature=0))
        )
        await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            if not engine.scheduler.running:
                break
            await asyncio.sleep(0.02)
        running = len(engine.scheduler.running)
        await engine.shutdown()
        return chunked, whole, stopped, outs, running

    chunked, whole, stopped, outs, running = asyncio.run(main())
    assert chunked == whole
    assert stopped == [whole[0]] and outs[-1].finish_reason == "stop" and outs[-1].text == ""
    assert running == 0


def test_seeded_sampling_is_reproducible(tiny_model_dir):
    async def main():
        engine = make_engine(tiny_model_dir, {}, max_num_seqs=4)
        await engine.start()
        ids = engine.tokenizer.encode("Once upon a time")

        def mk(rid, seed):
            return GenerationRequest(
                rid, ids, SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=seed)
            )

        res = await run_all(engine, [mk("x", 7), mk("y", 7), mk("z", 8)])
        await engine.shutdown()
        return [r[0] for r in res]

    x, y, z = asyncio.run(main())
    assert x == y and x != z


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_shared_prompt_prefix_is_reused_and_changes_nothing(tiny_model_dir, adapters, impl):
    """Requests sharing a long prefix (a system prompt) copy it from a running sequence's slot;
    each still produces exactly what PEFT produces for it alone."""
    n = 6
    system = "You are a careful assistant who answers in full sentences and cites sources. " * 2

    async def main():
        engine = make_engine(tiny_model_dir, adapters, max_num_seqs=4, model_impl=impl)
        await engine.start()
        engine.scheduler.max_batched_tokens = 24  # the first prompt is computed over several steps
        tok = engine.tokenizer
        jobs = []
        for i, question in enumerate(["What is two plus two?", "Name a colour.", "Say hello."]):
            ids = tok.encode(system + question)
            for adapter in (None, "a"):
                params = SamplingParams(max_tokens=n, temperature=0)
                jobs.append((adapter, ids, GenerationRequest(f"{i}-{adapter}", ids, params, adapter)))
        results = await run_all(engine, [j[2] for j in jobs])
        shared = engine.scheduler.shared_prefix_tokens
        await engine.shutdown()
        return jobs, results, shared

    jobs, results, shared = asyncio.run(main())
    assert shared >= 2 * 16  # at least the later base and adapter requests started from a copy
    refs = {name: reference_model(tiny_model_dir, adapters.get(name)) for name in (None, "a")}
    for (adapter, ids, _), (toks, _) in zip(jobs, results, strict=True):
        assert toks == reference_greedy(refs[adapter], ids, n), f"adapter={adapter} prompt={ids}"
