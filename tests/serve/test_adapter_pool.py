"""LoRA slots and the adapter pool: more adapters than slots, reload in place, unload mid-request.

The real HF engine on the tiny random Llama with real PEFT adapters; every greedy output is compared
token for token with PEFT running that adapter alone, so a slot holding the wrong weights, or a
request seeing a mix of two versions, fails here.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve.adapters import AdapterInvalid, load_adapter_spec
from serve.engine.adapter_pool import AdapterPool
from serve.engine.residency import Residency
from serve.engine.types import GenerationRequest, SamplingParams, UnknownAdapterError
from tests.helpers.adapters import make_lora_adapter
from tests.serve.test_engine_hf import make_engine, reference_greedy, reference_model, run_all

GREEDY = SamplingParams(max_tokens=10, temperature=0)


def test_residency_prefers_free_then_least_recently_used_idle_slots():
    r = Residency(2)
    assert r.free_slot(lambda a: True) == 0
    r.assign(0, 10)
    assert r.free_slot(lambda a: True) == 1
    r.assign(1, 11)
    r.touch(10)  # 11 is now the least recently used
    assert r.free_slot(lambda a: True) == 1
    assert r.free_slot(lambda a: a == 10) == 0
    assert r.free_slot(lambda a: False) is None  # every slot busy: wait, never fail
    assert r.assign(1, 12) == 11 and r.slot_of(11) is None and r.slot_of(12) == 1
    assert r.release(10) == 0 and r.free_slot(lambda a: False) == 0


class _Slots:
    """A stand-in decoder: `prepare` returns the adapter's name, `install` records it in the slot."""

    def __init__(self):
        self.slots: dict[int, str] = {}

    def prepare(self, name, path):
        return name

    def install(self, slot, prepared):
        self.slots[slot] = prepared

    def clear(self, slot):
        self.slots.pop(slot, None)


def _seq(pool: AdapterPool, key: str):
    return SimpleNamespace(
        adapter_index=pool.acquire(key, 1).id, lora_slot=-1, adapter_held=True, output_ids=[]
    )


def test_an_adapter_drained_for_a_slot_taken_elsewhere_takes_requests_again(tmp_path):
    """a drains for c; c gets b's slot instead: a must not stay draining (its next request waited for ever)."""
    pool = AdapterPool(_Slots(), slots=2, host_capacity=3, wake=lambda: None)
    for key in "abc":
        pool.register(key, key, tmp_path / key)
        pool.prepare_now(key)
    assert pool.install_now("a") and pool.install_now("b")
    run_a, run_b = _seq(pool, "a"), _seq(pool, "b")
    assert pool.admit(run_a) and pool.admit(run_b)
    wait_c = _seq(pool, "c")
    pool.place([wait_c])  # both slots busy: the least recently used (a) drains for c
    assert not pool.admit(wait_c) and pool._by_key["a"].draining
    pool.released(run_b, was_running=True)  # b goes idle first: c takes its slot
    pool.place([wait_c])
    assert pool.admit(wait_c)
    pool.released(run_a, was_running=True)
    next_a = _seq(pool, "a")
    pool.place([next_a])  # nobody waits for a's slot any more
    assert pool.admit(next_a) and next_a.lora_slot == pool.slot_of(pool.id_of("a"))


@pytest.fixture(scope="module")
def five(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("five")
    targets = [None, ("q_proj", "v_proj"), ("o_proj", "down_proj"), ("gate_proj", "up_proj"), None]
    return {
        f"a{i}": make_lora_adapter(
            tiny_model_dir, root / f"a{i}", seed=10 + i, scale=0.3, **({"targets": t} if t else {})
        )
        for i, t in enumerate(targets)
    }


def greedy_alone(model_dir, adapter_dir, ids, n=GREEDY.max_tokens):
    return reference_greedy(reference_model(model_dir, adapter_dir), ids, n)


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_more_adapters_than_slots_wait_for_a_slot_and_match_peft(tiny_model_dir, five, impl):
    """5 adapters + the base through 2 slots, all at once: every request waits for a slot, none fails."""

    async def main():
        engine = make_engine(
            tiny_model_dir, {}, max_num_seqs=8, model_impl=impl, max_loras=2, max_cpu_loras=2
        )
        await engine.start()
        for name, path in five.items():
            await engine.add_adapter(name, load_adapter_spec(name, path))
        ids = engine.tokenizer.encode("The capital of France is")
        names = [None, *five, *five]  # each adapter twice: a second request may find it resident
        reqs = [GenerationRequest(f"r{i}", ids, GREEDY, name) for i, name in enumerate(names)]
        results = await run_all(engine, reqs)
        stats = engine.adapter_stats()
        await engine.shutdown()
        return ids, names, results, stats

    ids, names, results, stats = asyncio.run(main())
    refs = {name: greedy_alone(tiny_model_dir, five.get(name), ids) for name in {*names}}
    for name, (toks, outs) in zip(names, results, strict=True):
        assert toks == refs[name], name
        assert outs[-1].finish_reason == "length"
    assert len({tuple(t) for t in refs.values()}) == len(refs)  # every adapter changes the output
    assert sum(stats.resident.values()) <= 2
    assert sum(t.loads for t in stats.totals.values()) >= 5 and stats.load_count >= 5
    assert all(t.requests == 2 and t.generated_tokens == 20 for t in stats.totals.values())


def test_reload_in_place_and_unload_with_requests_in_flight(tiny_model_dir, five):
    """A request running on v1 when v2 replaces it finishes on v1; one resolved before the reload
    runs on v2; an unload lets its running request finish, then frees the slot."""

    async def main():
        engine = make_engine(tiny_model_dir, {"x": five["a0"]}, max_num_seqs=4, max_loras=2)
        await engine.start()
        ids = engine.tokenizer.encode("Once upon a time")
        long = SamplingParams(max_tokens=24, temperature=0)
        old = engine.generate(GenerationRequest("old", ids, long, "x"))
        first = await old.__anext__()  # running on v1
        await engine.add_adapter("x@2", load_adapter_spec("x", five["a1"]))
        engine.remove_adapter("x", successor="x@2")
        (new_toks, _), old_rest = await asyncio.gather(
            _one(engine, GenerationRequest("new", ids, GREEDY, "x")), _rest(old)
        )
        old_toks = first.token_ids + old_rest
        # Unload v2 while a request runs on it: it finishes; new requests are refused; the slot frees.
        running = engine.generate(GenerationRequest("last", ids, long, "x@2"))
        head = await running.__anext__()
        engine.remove_adapter("x@2")
        with pytest.raises(UnknownAdapterError):
            await engine.generate(GenerationRequest("refused", ids, GREEDY, "x@2")).__anext__()
        last_toks = head.token_ids + await _rest(running)
        await asyncio.sleep(0.2)  # the engine loop frees retired adapters between steps
        stats = engine.adapter_stats()
        await engine.shutdown()
        return ids, old_toks, new_toks, last_toks, stats

    ids, old_toks, new_toks, last_toks, stats = asyncio.run(main())
    assert old_toks == greedy_alone(tiny_model_dir, five["a0"], ids, 24)
    assert new_toks == greedy_alone(tiny_model_dir, five["a1"], ids)
    assert last_toks == greedy_alone(tiny_model_dir, five["a1"], ids, 24)
    assert not any(stats.resident.values())


async def _one(engine, request):
    toks, outs = [], []
    async for out in engine.generate(request):
        toks += out.token_ids
        outs.append(out)
    return toks, outs


async def _rest(gen) -> list[int]:
    toks = []
    async for out in gen:
        toks += out.token_ids
    return toks


def test_adapter_above_the_slot_rank_is_refused_before_reading(tiny_model_dir, tmp_path):
    big = make_lora_adapter(tiny_model_dir, tmp_path / "big", r=16)
    engine = make_engine(tiny_model_dir, {}, max_lora_rank=8)
    with pytest.raises(AdapterInvalid, match=r"rank 16, above the server's --max-lora-rank 8; restart"):
        engine.check_adapter(load_adapter_spec("big", big))
