"""Constrained decoding inside the HF engine's batch (tiny random Llama, real tokenizer).

A batch mixing grammar-constrained rows, free rows, base and adapter rows: the free rows must produce
exactly the tokens they produce in a batch with no constrained row, and the constrained rows must
produce output their grammar accepts, ending with `finish_reason="stop"` (or "length" when cut).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from serve.engine.types import GenerationRequest, SamplingParams
from serve.structured.compiler import GrammarCompiler
from serve.structured.spec import OutputConstraint
from tests.helpers.adapters import make_lora_adapter
from tests.serve.test_engine_hf import make_engine, run_all

PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4 5"]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
}


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "a", seed=3, scale=0.3)


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_free_rows_are_untouched_by_constrained_rows_in_the_batch(tiny_model_dir, adapter, impl):
    eos = 2

    async def main():
        engine = make_engine(tiny_model_dir, {"a": adapter}, max_num_seqs=16, model_impl=impl)
        await engine.start()
        compiler = GrammarCompiler(engine.tokenizer, 49152)
        schema = compiler.compile(OutputConstraint.json_schema(SCHEMA, "p"))
        choice = compiler.compile(OutputConstraint.choice(["alpha", "beta", "gamma"], "p"))

        def free(i, prompt, adapter_name):
            ids = engine.tokenizer.encode(prompt)
            params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[eos])
            return GenerationRequest(f"free-{i}-{adapter_name}", ids, params, adapter_name)

        def constrained(i, prompt, adapter_name, grammar):
            ids = engine.tokenizer.encode(prompt)
            params = SamplingParams(max_tokens=40, temperature=0.8, seed=i, stop_token_ids=[eos])
            return GenerationRequest(f"c-{i}-{adapter_name}", ids, params, adapter_name, grammar=grammar)

        free_reqs = [free(i, p, a) for i, p in enumerate(PROMPTS) for a in (None, "a")]
        alone = await run_all(engine, free_reqs)
        free_again = [free(i, p, a) for i, p in enumerate(PROMPTS) for a in (None, "a")]
        extra = [
            constrained(i, p, a, g) for i, p in enumerate(PROMPTS) for a, g in ((None, schema), ("a", choice))
        ]
        mixed = await run_all(engine, [*free_again[:3], *extra, *free_again[3:]])
        await engine.shutdown()
        return alone, mixed[:3] + mixed[3 + len(extra) :], mixed[3 : 3 + len(extra)]

    alone, mixed_free, mixed_constrained = asyncio.run(main())
    assert [toks for toks, _ in mixed_free] == [toks for toks, _ in alone]
    for k, (toks, outs) in enumerate(mixed_constrained):
        text = "".join(o.text for o in outs)
        if k % 2 == 0:  # the JSON schema, on the base model
            if outs[-1].finish_reason == "stop":
                value = json.loads(text)
                assert isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
            else:
                assert outs[-1].finish_reason == "length" and len(toks) == 40
        else:  # the choice, on the adapter: short, so it always completes
            assert outs[-1].finish_reason == "stop" and text in {"alpha", "beta", "gamma"}
            assert toks[-1] == eos
