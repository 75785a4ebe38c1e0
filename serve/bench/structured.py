"""The structured-output benchmark scenario (`c16_json`): what a JSON schema costs at 16 streams.

The same 16-stream load twice per round, unconstrained and with every request carrying the same
`response_format: json_schema`, rounds interleaved (and the order flipped each round) so drift on a
shared machine hits both alike; the figure is the median over rounds of constrained / unconstrained
output tokens per second. In-process figures beside it: the grammar's own work per decode step for
16 constrained rows (fill the bitmask, mask the logits, advance the matchers). The schema
asks for at least 64 records, so every reply runs to `max_tokens` in both halves and they generate the
same number of tokens. Each constrained reply is checked to follow the schema (as a prefix: it is cut
by max_tokens). Grammar compile time for the schema is measured in-process, cold and cached.
"""

from __future__ import annotations

import statistics
import time

from serve.bench.loadgen import LoadConfig, make_requests, run
from serve.bench.stats import summarize

#: Records with a name, a score and tags: keys, strings, integers and arrays for the mask to follow.
SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "score": {"type": "integer", "minimum": 0, "maximum": 100},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
                },
                "required": ["name", "score", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "records", "schema": SCHEMA, "strict": True},
}


def compile_times(tokenizer, vocab_size: int | None = None, repeats: int = 5) -> dict:
    """Seconds to build the vocabulary table, to compile SCHEMA cold (fresh compiler) and cached."""
    from serve.structured.compiler import GrammarCompiler
    from serve.structured.spec import OutputConstraint

    constraint = OutputConstraint.json_schema(SCHEMA, "response_format.json_schema.schema")
    compiler = GrammarCompiler(tokenizer, vocab_size)
    started = time.perf_counter()
    compiler.warm()
    table_s = time.perf_counter() - started
    cold = []
    for _ in range(repeats):
        fresh = GrammarCompiler(tokenizer, vocab_size)
        fresh._compiler = compiler._xgr_compiler()  # same vocabulary table, empty caches
        fresh._compiler.clear_cache()
        started = time.perf_counter()
        fresh.compile(constraint)
        cold.append(time.perf_counter() - started)
    cached = []
    for _ in range(repeats):
        started = time.perf_counter()
        fresh.compile(constraint)
        cached.append(time.perf_counter() - started)
    return {
        "vocabulary_table_s": table_s,
        "cold_s": statistics.median(cold),
        "cached_s": statistics.median(cached),
        "repeats": repeats,
        "mask_ms_per_step_16_rows": mask_step_ms(fresh.compile(constraint), vocab_size or len(tokenizer)),
    }


def mask_step_ms(compiled, vocab_size: int, rows: int = 16, steps: int = 64) -> float:
    """Median milliseconds per decode step spent on the grammar for `rows` constrained rows: fill the
    bitmask, mask the logits, advance the matchers (the engine's whole per-step grammar work)."""
    import torch

    from serve.structured.bitmask import GrammarState, apply_bitmask, fill_bitmask

    generator = torch.Generator().manual_seed(0)
    states = [GrammarState.start(compiled, [0]) for _ in range(rows)]
    times = []
    for _ in range(steps):
        logits = torch.randn(rows, vocab_size, generator=generator)
        started = time.perf_counter()
        bitmask, constrained = fill_bitmask(states, vocab_size)
        apply_bitmask(logits, bitmask, constrained)
        for state, token in zip(states, torch.argmax(logits, dim=-1).tolist(), strict=True):
            state.accept(token)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def follows_schema(texts: list[str], tokenizer, vocab_size: int | None = None) -> int:
    """How many of `texts` the schema's grammar accepts as a prefix (replies cut by max_tokens)."""
    import xgrammar as xgr

    from serve.structured.compiler import GrammarCompiler
    from serve.structured.spec import OutputConstraint

    compiled = GrammarCompiler(tokenizer, vocab_size).compile(OutputConstraint.json_schema(SCHEMA, "p"))
    return sum(1 for t in texts if t and xgr.GrammarMatcher(compiled).accept_string(t))


def run_pair(
    load: LoadConfig, prompts: list[str], prompt_len: int, output_len: int, model: str, rounds: int, tok
):
    """Interleaved rounds of the unconstrained and the constrained load; medians and their ratio."""
    reqs = make_requests(prompts, prompt_len, output_len, [model])
    count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    constrained_load = load.model_copy(update={"extra_body": {"response_format": RESPONSE_FORMAT}})
    # Prefill every prompt once, so a server's prefix cache serves both halves alike; then alternate
    # which half goes first, so neither always runs on a warmer or quieter machine.
    run(load, make_requests(prompts, prompt_len, 1, [model]))
    per_round, free_runs, json_runs, texts = [], [], [], []
    for i in range(rounds):
        if i % 2:
            results = run(constrained_load, reqs, count_tokens=count)
            free = summarize(run(load, reqs, count_tokens=count))
        else:
            free = summarize(run(load, reqs, count_tokens=count))
            results = run(constrained_load, reqs, count_tokens=count)
        constrained = summarize(results)
        texts += [r.text for r in results if r.ok]
        free_runs.append(free)
        json_runs.append(constrained)
        if free["output_throughput"]:
            per_round.append(constrained["output_throughput"] / free["output_throughput"])
    return {
        "rounds": rounds,
        "unconstrained_tok_s": [s["output_throughput"] for s in free_runs],
        "json_schema_tok_s": [s["output_throughput"] for s in json_runs],
        "ratio": statistics.median(per_round) if per_round else None,
        "ratios": per_round,
        "failed": sum(s["failed"] for s in json_runs + free_runs),
        "unconstrained": free_runs[-1],
        "json_schema": json_runs[-1],
        "texts": texts,
    }
