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
