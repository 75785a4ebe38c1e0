"""Scheduler bookkeeping: admission, token budget, chunked prefill, slot compaction."""

from serve.engine.scheduler import Scheduler, Sequence
from serve.engine.types import GenerationRequest, SamplingParams


def seq(n_prompt: int, rid: str = "r") -> Sequence:
    return Sequence(GenerationRequest(rid, list(range(n_prompt)), SamplingParams()), adapter_index=-1)


def test_admits_up_to_max_num_seqs_and_chunks_long_prompts():
    s = Scheduler(max_num_seqs=2, max_batched_tokens=8)
    a, b, c = seq(5, "a"), seq(20, "b"), seq(3, "c")
    for x in (a, b, c):
        s.add(x)
    plan = s.schedule()
    assert [x.request.request_id for x in s.running] == ["a", "b"] and list(s.waiting) == [c]
    assert [(ch.seq.request.request_id, ch.start, ch.length) for ch in plan.prefill] == [
        ("a", 0, 5),
        ("b", 0, 3),
    ]
    assert plan.prefill[0].completes_prompt and not plan.prefill[1].completes_prompt
    a.num_computed, b.num_computed = 5, 3
    a.output_ids.append(7)
    plan = s.schedule()
    # One decode token for a, the remaining budget (7) goes to b's next chunk.
    assert plan.decode == [a] and [(ch.start, ch.length) for ch in plan.prefill] == [(3, 7)]


def test_remove_compacts_slots():
    moves = []
    s = Scheduler(
        max_num_seqs=3, max_batched_tokens=64, move_slot=lambda src, dst, n: moves.append((src, dst, n))
    )
    a, b, c = seq(2, "a"), seq(2, "b"), seq(4, "c")
    for x in (a, b, c):
        s.add(x)
    s.schedule()
    c.num_computed = 4
    s.remove(a)
    assert moves == [(2, 0, 4)]
    assert [x.slot for x in s.running] == [0, 1] and s.running[0] is c and a.slot == -1 and a.finished
    s.remove(b)  # b is last: no move needed
    assert moves == [(2, 0, 4)] and s.running == [c]


def test_remove_waiting_sequence():
    s = Scheduler(max_num_seqs=1, max_batched_tokens=8)
    a, b = seq(2, "a"), seq(2, "b")
    s.add(a)
    s.add(b)
    s.schedule()
    s.remove(b)
    assert not s.waiting and s.running == [a]


def _seq(tokens: list[int], rid: str, adapter: int = -1, prompt_logprobs=None) -> Sequence:
    params = SamplingParams(max_tokens=4, prompt_logprobs=prompt_logprobs)
    return Sequence(GenerationRequest(rid, tokens, params), adapter)


def test_prompt_prefix_is_copied_from_a_running_sequence_of_the_same_adapter():
    copies = []
    s = Scheduler(8, max_batched_tokens=40, copy_prefix=lambda src, dst, n: copies.append((src, dst, n)))
    system = list(range(100, 130))  # a 30-token system prompt shared by every request
    a = _seq(system + [1, 2, 3], "a")
    s.add(a)
    s.schedule()  # a's first 33 tokens fit the budget: nothing computed yet to share
    a.num_computed = len(a.prompt_ids)
    b, other_adapter, scoring, unrelated = (
        _seq(system + [7, 8], "b"),
        _seq(system + [7, 8], "c", adapter=0),
        _seq(system + [7, 8], "d", prompt_logprobs=0),
        _seq([5] * 40, "e"),
    )
    for q in (b, other_adapter, scoring, unrelated):
        s.add(q)
    plan = s.schedule()
    assert copies == [(a.slot, b.slot, 30)]
    assert b.num_computed == 30 and s.shared_prefix_tokens == 30
    chunks = {c.seq.request.request_id: (c.start, c.length) for c in plan.prefill}
    assert chunks["b"] == (30, 2)  # only the new tokens are computed
    assert other_adapter.num_computed == 0 and scoring.num_computed == 0 and unrelated.num_computed == 0


def test_prefix_sharing_keeps_the_last_prompt_token_and_needs_a_minimum():
    copies = []
    s = Scheduler(
        4, max_batched_tokens=64, copy_prefix=lambda src, dst, n: copies.append(n), min_shared_prefix=8
    )
    a = _seq(list(range(20)), "a")
    s.add(a)
    s.schedule()
    a.num_computed = 20
    same, short = _seq(list(range(20)), "same"), _seq(list(range(5)) + [99] * 10, "short")
    s.add(same)
    s.add(short)
    s.schedule()
    assert copies == [19]  # an identical prompt still computes its last token, for its logits
    assert same.num_computed == 19 and short.num_computed == 0
