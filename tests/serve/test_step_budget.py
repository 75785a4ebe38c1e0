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


def _decoding(s: Scheduler, n: int, prompt_len: int, tag: str) -> list[Sequence]:
    """`n` sequences admitted into `s` and past their prompts (as the engine leaves them)."""
    seqs = [_seq(prompt_len, f"{tag}{i}") for i in range(n)]
    for seq in seqs:
        s.add(seq)
    s.schedule()
    for seq in seqs:
        seq.num_computed = prompt_len
        seq.output_ids.append(1)
    return seqs


def _trained(s: Scheduler) -> Scheduler:
    for load in steps(300):
        s.record(_plan_of(load), machine(load))
    return s


def test_decode_rows_come_first_and_prompts_get_what_the_ratio_leaves():
    for ratio in (0.0, 1.0, 2.0, 4.0):
        s = _trained(Scheduler(16, max_batched_tokens=512, step_time_ratio=ratio))
        streams = _decoding(s, 14, 400, "d")
        s.add(_seq(300, "p1"))
        s.add(_seq(300, "p2"))
        plan = s.schedule()
        # Every stream past its prompt decodes this step, however many prompt tokens wait.
        assert plan.decode == streams and plan.decode_kv == 14 * 401
        tokens = plan.load.prompt_tokens
        if ratio == 0:
            assert tokens == 512 - 14  # the old fixed budget: both prompts, most of the second
            assert [c.length for c in plan.prefill] == [300, 198]
        else:
            # The step stays within `ratio` x the decode step of the full batch (16 rows)...
            full = machine(StepLoad(16, 0, 16 * 401))
            assert machine(plan.load) <= max(ratio * full * 1.1, machine(StepLoad(14, 16, 14 * 401)))
            assert 16 <= tokens < 512 - 14
            # ...and chunks go to the oldest prompt first.
            assert plan.prefill[0].seq.request.request_id == "p1"
    # A larger ratio admits prompts faster.
    sizes = []
    for ratio in (1.5, 2.0, 4.0):
        s = _trained(Scheduler(16, max_batched_tokens=512, step_time_ratio=ratio))
        _decoding(s, 14, 400, "d")
        s.add(_seq(300, "p"))
        sizes.append(s.schedule().load.prompt_tokens)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_budget_stays_within_its_bounds_whatever_the_model_has_learned():
    rng = random.Random(1)
    for trial in range(200):
        model = StepCostModel()
        # Machines from 20x faster to 20x slower than the prior, some with near-free tokens.
        speed, tok = rng.choice([0.05, 1.0, 20.0]), rng.choice([1e-7, 0.002])
        for load in steps(rng.randint(0, 60), seed=trial):
            t = speed * (0.2 + tok * (load.decode_rows + load.prompt_tokens) + 4e-6 * load.decode_kv)
            model.observe(load, t * rng.choice([1, 1, 1, 5]))
        rows = rng.randint(0, 64)
        max_tokens = rng.choice([16, 64, 512, 2048])
        ratio = rng.choice([0, 1, 1.5, 2, 10])
        budget = prefill_budget(
            model, rows, rows * rng.randint(1, 4000), max(rows, rng.randint(1, 64)),
            ratio=ratio, max_tokens=max_tokens,
        )  # fmt: skip
        room = max(max_tokens - rows, 0)
        assert budget <= room, (trial, budget, room)
        # Prompts always progress while streams decode (min chunk), unless the cap leaves no room.
        assert budget >= min(16, room), (trial, budget)
        if rows == 0 or ratio == 0:
            assert budget == room


def test_budget_follows_a_machine_that_slows_down_for_good():
    model = StepCostModel()
    for load in steps(300):
        model.observe(load, machine(load))
    before = model.predict(StepLoad(16, 0, 4000))
    # Another process now shares the cores: every step takes 1.8x as long (not a one-off stall).
    # It follows within a few hundred steps (forgetting factor 0.995: a ~200-step memory).
    loads = list(steps(600, seed=5))
    for load in loads[:150]:
        model.observe(load, 1.8 * machine(load))
    assert model.predict(StepLoad(16, 0, 4000)) > 1.3 * before
    for load in loads[150:]:
        model.observe(load, 1.8 * machine(load))
    assert model.predict(StepLoad(16, 0, 4000)) == pytest.approx(1.8 * before, rel=0.08)


def test_scheduling_settings_are_validated_with_clear_errors(tmp_path, capsys):
    from serve.cli import main
    from serve.config import ConfigError, ServeConfig, load_config

    cfg = ServeConfig()
    assert (cfg.step_time_ratio, cfg.batch_wait_ms, cfg.max_num_batched_tokens) == (2.0, 20.0, None)
    assert ServeConfig(step_time_ratio=0).step_time_ratio == 0  # off
    bad = {
        "step_time_ratio": (0.5, "use 0 (off"),
        "step_time_ratio ": (float("nan"), "finite"),
        "max_num_batched_tokens": (8, "greater than or equal to 16"),
        "batch_wait_ms": (-1, "greater than or equal to 0"),
    }
    for key, (value, words) in bad.items():
        path = tmp_path / "serve.yaml"
        path.write_text(f"{key.strip()}: {value}\n")
        with pytest.raises(ConfigError) as err:
            load_config(path, {})
        assert key.strip() in str(err.value) and words in str(err.value) and str(path) in str(err.value)
    # From the command line: exit code 2 and the reason, before any weights load.
    assert main(["--step-time-ratio", "0.5"]) == 2
    assert "step_time_ratio" in capsys.readouterr().err


def test_steps_that_run_over_their_prediction_are_planned_smaller(monkeypatch):
    """Prompt tokens next to decoding rows costing more, and more erratically, than the model can see
    (cache contention, say): the measured/predicted margin shrinks later budgets, so the slow tail
    of such steps keeps to the target instead of only their mean."""
    from serve.engine import step_budget

    def run() -> tuple[StepCostModel, list[float]]:
        rng = random.Random(7)
        model = StepCostModel()
        for load in steps(300):
            model.observe(load, machine(load))
        full = machine(StepLoad(16, 0, 16 * 400))
        over = []
        for _ in range(300):
            decode = StepLoad(16, 0, 16 * 400)
            model.observe(decode, machine(decode))
            tokens = prefill_budget(model, 15, 15 * 400, 16, ratio=2.0, max_tokens=512)
            load = StepLoad(15, tokens, 15 * 400)
            t = machine(load) + 0.002 * tokens * rng.uniform(0.0, 1.0)  # up to 2x a prompt token
            model.observe(load, t)
            over.append(t / full)
        return model, sorted(over[-150:])[134]  # the 90th percentile, once settled

    model, p90 = run()
    assert 1.05 < model.margin() <= 1.5
    monkeypatch.setattr(step_budget, "MARGIN_MAX", 1.0)  # the model alone plans for the mean
    _, p90_blind = run()
    print(f"90th percentile step / full decode step: {p90:.3f} with the margin, {p90_blind:.3f} without")
    assert p90 <= 2.0 * 1.08
    assert p90_blind > 2.0 * 1.1 and p90_blind > p90 + 0.1
    assert StepCostModel().margin() == 1.0  # nothing seen yet: no margin
