"""The step cost model and the prompt-token budget it gives the scheduler (issue 19: streams that do
not stutter while prompts are admitted)."""

import random

import pytest

from serve.engine.scheduler import Scheduler, Sequence
from serve.engine.step_budget import StepCostModel, StepLoad, prefill_budget
from serve.engine.types import GenerationRequest, SamplingParams


def machine(load: StepLoad) -> float:
    """A made-up machine: 200 ms fixed, 2 ms a token, 1 ms more a decode row, 4 us a cached position."""
    return (
        0.2
        + 0.002 * (load.decode_rows + load.prompt_tokens)
        + 0.001 * load.decode_rows
        + 4e-6 * load.decode_kv
    )


def steps(n: int, seed: int = 0):
    """What a serving run looks like: mostly decode-only steps, now and then a prompt chunk."""
    rng = random.Random(seed)
    for _ in range(n):
        rows = rng.randint(1, 16)
        tokens = rng.choice([0] * 6 + [rng.randint(16, 512)])
        yield StepLoad(rows, tokens, rows * rng.randint(100, 1500))


def test_the_model_learns_the_machine_and_shrugs_off_stalls():
    model = StepCostModel()
    for i, load in enumerate(steps(400)):
        t = machine(load)
        # Every 25th step the OS takes the core away for a while.
        model.observe(load, t * 3 if i % 25 == 24 else t)
    for load in (StepLoad(16, 0, 4000), StepLoad(4, 300, 800), StepLoad(0, 512, 0)):
        assert model.predict(load) == pytest.approx(machine(load), rel=0.08), load
    assert model.per_token() == pytest.approx(0.002, rel=0.15)


def test_budget_fills_a_step_up_to_the_ratio_of_the_full_batch_decode_step():
    model = StepCostModel()
    for load in steps(300):
        model.observe(load, machine(load))
    # Nothing decodes: as many tokens as a step may carry; ratio 0: the old fixed budget.
    assert prefill_budget(model, 0, 0, 16, ratio=2.0, max_tokens=512) == 512
    assert prefill_budget(model, 10, 3000, 16, ratio=0, max_tokens=512) == 502
    # 15 streams decode, one more prompt waits: the step may take 2x the 16-row decode step.
    tokens = prefill_budget(model, 15, 15 * 300, 16, ratio=2.0, max_tokens=512)
    full = machine(StepLoad(16, 0, 16 * 300))
    assert 0.9 * 2 * full < machine(StepLoad(15, tokens, 15 * 300)) < 1.1 * 2 * full
    # Fewer decoding rows leave more room; a tighter ratio less; never below the minimum chunk.
    assert prefill_budget(model, 2, 600, 16, ratio=2.0, max_tokens=512) > tokens
    assert prefill_budget(model, 15, 4500, 16, ratio=1.2, max_tokens=512) < tokens
    assert prefill_budget(model, 16, 4800, 16, ratio=1.0, max_tokens=512, min_chunk=16) == 16


def _seq(n: int, rid: str) -> Sequence:
    return Sequence(GenerationRequest(rid, list(range(n)), SamplingParams()), -1)


def test_scheduler_keeps_steps_short_while_streams_decode_and_learns_from_each_step():
    s = Scheduler(4, max_batched_tokens=512, step_time_ratio=1.5)
    for load in steps(200):
        s.record(_plan_of(load), machine(load))
    a, b = _seq(300, "a"), _seq(300, "b")
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert [c.length for c in plan.prefill] == [300, 212]  # nothing decodes yet: one full step
    a.num_computed, b.num_computed = 300, 212
    a.output_ids.append(1)
    plan = s.schedule()
    # a decodes now: b's remaining 88 tokens would make the step ~1.8x the decode step of the two
    # (the batch once b decodes too); at 1.5x the budget gives fewer.
    assert plan.decode == [a] and plan.decode_kv == 301
    assert machine(StepLoad(1, 88, 301)) > 1.7 * machine(StepLoad(2, 0, 2 * 301))
    assert 16 <= plan.prefill[0].length < 88
    assert machine(plan.load) <= 1.5 * machine(StepLoad(2, 0, 2 * 301)) * 1.05


def _plan_of(load: StepLoad):
    class Plan:
        pass

    plan = Plan()
    plan.load = load
    return plan
