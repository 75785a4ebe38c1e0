"""Prefix cache bookkeeping: longest-prefix lookup per adapter, LRU eviction, log-probabilities,
and the scheduler reusing cached prefixes on admission and caching sequences as they leave."""

from serve.engine.prefix_cache import PrefixCache
from serve.engine.scheduler import Scheduler, Sequence
from serve.engine.types import GenerationRequest, SamplingParams, TokenLogprob


def test_lookup_finds_the_longest_prefix_of_the_same_key_only():
    cache = PrefixCache(100)
    start, rows = cache.insert("a", [1, 2, 3, 4, 5])
    assert (start, rows) == (0, [0, 1, 2, 3, 4])
    # A second sequence sharing [1, 2, 3] only adds its own tokens (the node is split, not copied).
    start, rows = cache.insert("a", [1, 2, 3, 9, 9, 9])
    assert (start, rows) == (3, [5, 6, 7])
    assert cache.cached_tokens == 8
    hit = cache.lookup("a", [1, 2, 3, 9, 9, 7], limit=6)
    assert (hit.length, hit.rows) == (5, [0, 1, 2, 5, 6])
    assert cache.lookup("a", [1, 2, 3, 4, 5, 6], limit=6).rows == [0, 1, 2, 3, 4]
    assert cache.lookup("a", [1, 2, 3, 4, 5], limit=3).length == 3  # the caller keeps tokens to compute
    assert cache.lookup("a", [2, 1], limit=2).length == 0
    # Another adapter (or another load of the same name) never sees these keys/values.
    assert cache.lookup("b", [1, 2, 3, 4, 5], limit=5).length == 0


def test_eviction_drops_least_recently_used_leaves_first():
    cache = PrefixCache(10)
    cache.insert("a", [1, 1, 1, 1])
    cache.insert("a", [2, 2, 2, 2])
    cache.lookup("a", [1, 1, 1, 1], limit=4)  # [1...] is now more recent than [2...]
    start, rows = cache.insert("b", [3, 3, 3, 3])  # needs 4 rows, 2 free: evicts [2...]
    assert start == 0 and len(rows) == 4
    assert cache.evicted_tokens == 4
    assert cache.lookup("a", [2, 2, 2, 2], limit=4).length == 0
    assert cache.lookup("a", [1, 1, 1, 1], limit=4).length == 4
    assert cache.lookup("b", [3, 3, 3, 3], limit=4).length == 4
    assert cache.cached_tokens == 8


def test_insert_never_evicts_its_own_prefix_and_caches_what_fits():
    cache = PrefixCache(6)
    cache.insert("a", [1, 2, 3, 4])
    # Extending [1, 2, 3, 4] by 5 tokens: only 2 rows are free and the only leaf is the prefix itself.
    start, rows = cache.insert("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (start, len(rows)) == (4, 2)
    assert cache.lookup("a", [1, 2, 3, 4, 5, 6, 7], limit=7).length == 6
    assert cache.evicted_tokens == 0


def test_drop_forgets_one_key():
    cache = PrefixCache(8)
    cache.insert("a", [1, 2, 3])
    cache.insert("b", [1, 2, 3])
    assert cache.drop("a") == 3 and cache.cached_tokens == 3
    assert cache.lookup("a", [1, 2, 3], limit=3).length == 0
    assert cache.lookup("b", [1, 2, 3], limit=3).length == 3


def _lp(token: int, top: int) -> TokenLogprob:
    return TokenLogprob(token, -float(token), [(token, -float(token)), *((t, -9.0) for t in range(top - 1))])


def test_logprob_lookup_needs_enough_alternatives_and_reinsert_improves_them():
    cache = PrefixCache(20)
    tokens = [5, 6, 7, 8]
    cache.insert("a", tokens)  # a generation request: no log-probabilities
    assert cache.lookup("a", tokens, limit=4, logprobs_top=0).length == 1  # token 0 never has one
    cache.insert("a", tokens, [None, _lp(6, 1), _lp(7, 1)])  # a scoring request, top-1, prompt [5, 6, 7]
    hit = cache.lookup("a", tokens, limit=4, logprobs_top=1)
    assert hit.length == 3 and [lp.token_id for lp in hit.logprobs[1:]] == [6, 7]
    assert cache.lookup("a", tokens, limit=4, logprobs_top=2).length == 1
    cache.insert("a", tokens, [None, _lp(6, 3), _lp(7, 3), _lp(8, 3)])
    hit = cache.lookup("a", tokens, limit=4, logprobs_top=2)
    assert hit.length == 4 and all(len(lp.top) == 2 for lp in hit.logprobs[1:])
    assert cache.cached_tokens == 4


def _seq(tokens, rid, adapter=-1, key=None, prompt_logprobs=None) -> Sequence:
    params = SamplingParams(max_tokens=4, prompt_logprobs=prompt_logprobs)
    return Sequence(GenerationRequest(rid, tokens, params), adapter, adapter_key=key)


def _scheduler(cache, log):
    return Scheduler(
        4, max_batched_tokens=64, prefix_cache=cache,
        load_cached=lambda rows, slot: log.append(("load", slot, rows)),
        save_cached=lambda slot, start, rows: log.append(("save", slot, start, rows)),
    )  # fmt: skip


def test_scheduler_caches_leaving_sequences_and_reuses_them_per_adapter_load():
    log: list = []
    cache = PrefixCache(64)
    s = _scheduler(cache, log)
    history = list(range(100, 120))
    a = _seq(history, "turn1", key="base#0")
    s.add(a)
    s.schedule()
    a.num_computed = 20
    a.output_ids += [7, 8, 9]
    a.num_computed = 22  # the last output token's keys/values are never computed
    s.remove(a)
    assert log == [("save", 0, 0, list(range(22)))]
    follow_up = _seq(history + [7, 8, 42, 43], "turn2", key="base#0")
    other_load = _seq(history + [7, 8, 42, 43], "other", adapter=0, key="a#1")
    s.add(follow_up)
    s.add(other_load)
    plan = s.schedule()
    assert log[1] == ("load", follow_up.slot, list(range(22)))
    assert follow_up.num_computed == 22 and other_load.num_computed == 0
    assert [(c.seq.request.request_id, c.start, c.length) for c in plan.prefill] == [
        ("turn2", 22, 2),
        ("other", 0, 24),
    ]
    assert s.cache_hit_tokens == 22 and s.prompt_tokens == 20 + 24 + 24
    assert s.cache_stats()["prefix_cache_hit_rate"] == 22 / 68


def test_scheduler_serves_prompt_logprobs_from_the_cache():
    log: list = []
    s = _scheduler(PrefixCache(64), log)
    context = [11, 12, 13, 14, 15, 16]
    first = _seq(context + [21], "choice-a", prompt_logprobs=1)
    s.add(first)
    s.schedule()
    first.prompt_logprobs += [_lp(t, 1) for t in first.prompt_ids[1:]]  # what the engine computes
    first.num_computed = 7
    first.output_ids.append(3)
    s.remove(first)
    second = _seq(context + [22, 23], "choice-b", prompt_logprobs=1)
    s.add(second)
    plan = s.schedule()
    # 6 context tokens match; the 6th is recomputed, its hidden state scores token 22.
    assert second.num_computed == 5 and plan.prefill[0].start == 5
    assert [lp.token_id if lp else None for lp in second.prompt_logprobs] == [None, 12, 13, 14, 15, 16]
    wider = _seq(context + [22], "top-2", prompt_logprobs=2)
    s.add(wider)
    s.schedule()
    assert wider.num_computed == 0  # the cache holds top-1 alternatives only


def test_scheduler_without_cache_flag_keeps_failed_sequences_out():
    log: list = []
    cache = PrefixCache(64)
    s = _scheduler(cache, log)
    a = _seq(list(range(10)), "a")
    s.add(a)
    s.schedule()
    a.num_computed = 10
    s.remove(a, cache=False)
    assert cache.cached_tokens == 0 and log == []


def test_metrics_export_the_cache_figures_an_engine_reports():
    from serve.engine.base import EngineStats
    from serve.metrics import Metrics

    class Stub:
        extra: dict = {}

        def stats(self):
            return EngineStats(extra=self.extra)

    engine = Stub()
    metrics = Metrics(engine)
    assert b"prefix_cache" not in metrics.render()  # engines without a cache (vLLM, fakes) show none
    s = Scheduler(2, max_batched_tokens=8, prefix_cache=PrefixCache(10))
    s.prompt_tokens, s.cache_hit_tokens = 40, 10
    s.prefix_cache.insert("a", list(range(12)))  # 10 fit
    s.prefix_cache.insert("a", [99, 98])  # evicts the first
    engine.extra = s.cache_stats()
    text = metrics.render().decode()
    for line in (
        "llm_serve_prefix_cache_queries_total 40.0",
        "llm_serve_prefix_cache_hits_total 10.0",
        "llm_serve_prefix_cache_hit_rate 0.25",
        "llm_serve_prefix_cache_blocks 2.0",
        "llm_serve_prefix_cache_capacity_blocks 10.0",
        "llm_serve_prefix_cache_evictions_total 10.0",
    ):
        assert line in text.splitlines(), line
