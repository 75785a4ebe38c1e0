"""How far `--quantize int8` moves the model's outputs from the float model's, per prompt.

Run as:
    python -m serve.bench.quant_drift                         # default model, 8 chat prompts, 32 tokens
    python -m serve.bench.quant_drift --tokens 64 --adapter huangdi=saves/huangdi

Loads the model twice in this process as `llm-serve` does (`HFEngine.load`: the float native decoder
and the int8 one). For each prompt the float model's greedy continuation is the reference sequence;
both models then read it the way the engine does: the prompt as one prefill chunk (int8: the bf16
matmul path, many rows) and the continuation one decode step at a time (int8: the int8 kernel, one
row). Reported: the largest absolute logit difference and its median per position (logits of this
model span ~30), how often the int8 model's top token is the float model's (teacher-forced), and the
int8 model's own greedy continuation: tokens equal to the reference before the first difference.

Writes `artifacts/bench/quant-drift-<timestamp>.json` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "How do I reverse a list in Python?",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23? Show your steps.",
    "Give me a short tip for sleeping better.",
]


def load(model: str, quantize: str, adapters: list[tuple[str, Path]], max_len: int = 512):
    from serve.adapters import load_adapter_spec
    from serve.config import ServeConfig
    from serve.engine.hf import HFEngine
    from serve.models import resolve_model

    specs = [load_adapter_spec(name, path) for name, path in adapters]
    config = ServeConfig(
        model=model, max_num_seqs=1, max_model_len=max_len, quantize=quantize, model_impl="native"
    )
    engine = HFEngine(config, resolve_model(model), specs)
    engine.load()
    return engine


def read_sequence(engine, ids: list[int], n_prompt: int, adapter: int = -1):
    """Logits `[len(ids) - 1, V]` predicting ids[1:]: the prompt as one prefill chunk, then the rest
    one decode step at a time (slot 0)."""
    import torch

    from serve.engine.kv_cache import PrefillSegment, StepLayout, finalize_layout

    cache, native, ctx = engine.cache, engine.native, engine.lora_ctx
    empty = torch.empty(0, dtype=torch.long)
    out = []
    with torch.inference_mode():
        cache.mark_written(0, n_prompt)
        layout = finalize_layout(
            StepLayout(cache, empty, empty, 0, prefills=[PrefillSegment(0, 0, n_prompt, 0)])
        )
        ctx.set_rows([adapter] * n_prompt)
        out.append(
            engine.lm_head(native.forward(torch.tensor(ids[:n_prompt]), torch.arange(n_prompt), layout))
        )
        for pos in range(n_prompt, len(ids) - 1):
            cache.ensure_initialized([0], pos + 1)
            layout = finalize_layout(StepLayout(cache, torch.tensor([0]), torch.tensor([pos]), pos + 1))
            ctx.set_rows([adapter])
            out.append(engine.lm_head(native.forward(torch.tensor([ids[pos]]), torch.tensor([pos]), layout)))
    return torch.cat(out).float()


def greedy_decode(engine, prompt: list[int], n: int, adapter: int = -1) -> list[int]:
    """Greedy continuation with one prefill, then one decode step per token (as served)."""
    import torch

    from serve.engine.kv_cache import PrefillSegment, StepLayout, finalize_layout

    cache, native, ctx = engine.cache, engine.native, engine.lora_ctx
    empty = torch.empty(0, dtype=torch.long)
    with torch.inference_mode():
        p = len(prompt)
        cache.mark_written(0, p)
        layout = finalize_layout(StepLayout(cache, empty, empty, 0, prefills=[PrefillSegment(0, 0, p, 0)]))
        ctx.set_rows([adapter] * p)
        hidden = native.forward(torch.tensor(prompt), torch.arange(p), layout)
        ids = [int(engine.lm_head(hidden[-1:]).argmax())]
        for pos in range(p, p + n - 1):
            cache.ensure_initialized([0], pos + 1)
            layout = finalize_layout(StepLayout(cache, torch.tensor([0]), torch.tensor([pos]), pos + 1))
            ctx.set_rows([adapter])
            ids.append(
                int(
                    engine.lm_head(
                        native.forward(torch.tensor([ids[-1]]), torch.tensor([pos]), layout)
                    ).argmax()
                )
            )
    return ids


def compare(ref_engine, test_engine, prompts: list[list[int]], n: int, adapter: int = -1) -> dict:
    """Drift of `test_engine` from `ref_engine` over `prompts` (token ids), `n` generated tokens each."""
    rows = []
    for prompt in prompts:
        cont = greedy_decode(ref_engine, prompt, n, adapter)
        seq = prompt + cont
        ref = read_sequence(ref_engine, seq, len(prompt), adapter)
        got = read_sequence(test_engine, seq, len(prompt), adapter)
        diff = (got - ref).abs().amax(dim=-1)
        top1 = (got.argmax(-1) == ref.argmax(-1)).float()
        own = greedy_decode(test_engine, prompt, n, adapter)
        same = next((i for i, (a, b) in enumerate(zip(own, cont, strict=True)) if a != b), n)
        gen = slice(len(prompt) - 1, None)  # rows predicting the continuation
        rows.append({
            "prompt_tokens": len(prompt),
            "max_abs_logit_diff": float(diff.max()),
            "median_abs_logit_diff": float(diff.median()),
            "logit_range": float((ref.amax(-1) - ref.amin(-1)).median()),
            "top1_agreement_prompt": float(top1[: len(prompt) - 1].mean()) if len(prompt) > 1 else 1.0,
            "top1_agreement_generated": float(top1[gen].mean()),
            "greedy_tokens_equal_before_first_difference": same,
        })  # fmt: skip
    return {
        "prompts": len(rows),
        "generated_tokens": n,
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
        "median_abs_logit_diff": statistics.median(r["median_abs_logit_diff"] for r in rows),
        "top1_agreement": statistics.fmean(
            (r["top1_agreement_prompt"] + r["top1_agreement_generated"]) / 2 for r in rows
        ),
        "top1_agreement_generated": statistics.fmean(r["top1_agreement_generated"] for r in rows),
        "greedy_identical_prompts": sum(r["greedy_tokens_equal_before_first_difference"] == n for r in rows),
        "greedy_equal_prefix_mean": statistics.fmean(
            r["greedy_tokens_equal_before_first_difference"] for r in rows
        ),
        "per_prompt": rows,
    }


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def render(name: str, r: dict) -> str:
    return (
        f"{name}: {r['prompts']} prompts x {r['generated_tokens']} tokens: logits max |diff| "
        f"{r['max_abs_logit_diff']:.3f} (median per position {r['median_abs_logit_diff']:.3f}); top-1 agreement "
        f"{100 * r['top1_agreement']:.1f}% (generated positions {100 * r['top1_agreement_generated']:.1f}%); "
        f"greedy continuation identical for {r['greedy_identical_prompts']}/{r['prompts']} prompts "
        f"(mean {r['greedy_equal_prefix_mean']:.1f} tokens equal before the first difference)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serve.bench.quant_drift", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--adapter", action="append", default=[], help="NAME=PATH; also measured with it")
    p.add_argument("--out-dir", type=Path, default=Path("artifacts/bench"))
    args = p.parse_args(argv)
    from serve.atomic import write_json_atomic

    try:
        adapters = [(a.split("=", 1)[0], Path(a.split("=", 1)[1])) for a in args.adapter]
    except IndexError:
        print("error: --adapter needs NAME=PATH", file=sys.stderr)
        return 1
    try:
        ref = load(args.model, "none", adapters)
        int8 = load(args.model, "int8", adapters)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    prompts = [chat_ids(ref.tokenizer, t) for t in PROMPTS]
    results = {"base": compare(ref, int8, prompts, args.tokens)}
    for i, (name, _) in enumerate(adapters):
        results[name] = compare(ref, int8, prompts, args.tokens, adapter=i)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out_dir / f"quant-drift-{stamp}.json"
    write_json_atomic(out, {"model": args.model, "quantize": "int8", "results": results})
    for name, r in results.items():
        print(render(name, r))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
