"""Where a decode step of the native decoder spends its time, per batch size (no HTTP, no scheduler).

Run as:
    python -m serve.bench.decode_profile                      # default model, batches 1 and 16
    python -m serve.bench.decode_profile --batch 1,4,16 --context 256 --steps 20

Loads the model as `llm-serve` does (`HFEngine.load`: native decoder, tuned matmul layouts), fills
`--context` positions of each slot, then times whole decode steps (forward + LM head + greedy
sampling) and splits one profiled run of them by op with `torch.profiler`: matmuls, attention (SDPA
and the KV writes), norms/RoPE/element-wise ops, sampling, and what the ops leave of the fastest
unprofiled step, which is Python and dispatch outside any op. Each weight shape's matmul is also timed alone at that
row count (every layer's copy in turn, as in a real step) and given as GFLOP/s and GB/s. Wall times
move with whatever else runs on the machine: compare rows of one run, not runs.

Writes `artifacts/bench/decode-profile-<timestamp>.json` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

CATEGORIES = {
    "matmul": (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::linear",
        "aten::addmm_",
        "aten::_weight_int8pack_mm",
    ),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::index_copy_"),
    "sampling": ("aten::argmax", "aten::log_softmax", "aten::_log_softmax", "aten::topk", "aten::sort"),
}


def _category(op: str) -> str:
    for name, ops in CATEGORIES.items():
        if op in ops:
            return name
    return "other ops"


def load_engine(model: str, max_seqs: int, max_len: int, quantize: str = "none"):
    from serve.config import ServeConfig
    from serve.engine.hf import HFEngine
    from serve.models import resolve_model

    engine = HFEngine(
        ServeConfig(model=model, max_num_seqs=max_seqs, max_model_len=max_len, quantize=quantize),
        resolve_model(model),
        [],
    )
    engine.load()
    if engine.native is None:
        raise ValueError(f"{model} does not run on the native decoder; nothing to profile here")
    return engine


def _step_fn(engine, batch: int, context: int):
    """A closure running one decode step of `batch` rows at about `context` positions."""
    import torch

    from serve.engine.kv_cache import StepLayout, finalize_layout
    from serve.engine.sampling import RowState, sample
    from serve.engine.types import SamplingParams

    positions = [context + i % 8 for i in range(batch)]  # rows of slightly different lengths
    slots = list(range(batch))
    engine.cache.ensure_initialized(slots, max(positions) + 1)
    layout = finalize_layout(
        StepLayout(
            cache=engine.cache,
            decode_slots=torch.tensor(slots),
            decode_positions=torch.tensor(positions),
            decode_max_len=max(positions) + 1,
        )
    )
    ids = torch.randint(0, engine.native.embed.shape[0], (batch,), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor(positions)
    rows = [RowState(SamplingParams(max_tokens=1, temperature=0), [], None) for _ in range(batch)]

    def step() -> None:
        engine.lora_ctx.set_rows([-1] * batch)
        sample(engine.lm_head(engine.native.forward(ids, pos, layout)), rows)

    return step


def profile_batch(engine, batch: int, context: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    step = _step_fn(engine, batch, context)
    with torch.inference_mode():
        for _ in range(3):
            step()
        wall, cpu = [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        n_prof = max(3, steps // 4)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n_prof):
                step()
        prof_wall = (time.perf_counter() - t0) / n_prof
    split: dict[str, float] = {}
    for avg in prof.key_averages():
        split[_category(avg.key)] = (
            split.get(_category(avg.key), 0.0) + avg.self_cpu_time_total / 1e6 / n_prof
        )
    ms = statistics.median(wall)
    # What the ops leave of an unprofiled step is Python and dispatch. The fastest step is the one
    # least stretched by other processes holding the cores (the median also waits for a core).
    split["outside ops (Python, dispatch)"] = max(0.0, min(wall) - sum(split.values()))
    return {
        "batch": batch,
        "context": context,
        "step_ms_p50": ms * 1e3,
        "step_ms_min": min(wall) * 1e3,
        "step_cpu_ms_p50": statistics.median(cpu) * 1e3,
        "tok_s": batch / ms,
        "profiled_step_ms": prof_wall * 1e3,
        "split_total_ms": sum(split.values()) * 1e3,
        "split_ms": {k: v * 1e3 for k, v in sorted(split.items(), key=lambda kv: -kv[1])},
        "matmuls": matmul_rates(engine.native.denses(), batch),
    }


def matmul_rates(denses, rows: int, passes: int = 3) -> list[dict]:
    """Each weight shape at `rows` rows: µs per matmul, GFLOP/s and weight GB/s (layer copies cycled)."""
    import torch

    by_shape: dict[tuple, list] = {}
    for d in denses:
        by_shape.setdefault(tuple(d.shape), []).append(d)
    out = []
    with torch.inference_mode():
        for (n, k), group in by_shape.items():
            x = torch.randn(rows, k)
            for d in group[:2]:
                d(x)
            best = float("inf")
            for _ in range(passes):
                t0 = time.perf_counter()
                for d in group:
                    d(x)
                best = min(best, (time.perf_counter() - t0) / len(group))
            out.append({
                "shape": [n, k], "copies": len(group), "us": best * 1e6,
                "gflop_s": 2 * rows * n * k / best / 1e9,
                "weight_gb_s": _bytes_read(group[0], rows) / best / 1e9,
            })  # fmt: skip
    return out


def _bytes_read(dense, rows: int) -> int:
    """Weight bytes one matmul reads: 1 per int8 weight on the int8 kernel, 2 on its bf16 copy."""
    from serve.engine.gemm import Int8Dense

    n, k = dense.shape
    if isinstance(dense, Int8Dense):
        return n * k * (1 if rows <= dense.kernel_max_rows else 2)
    return n * k * dense.weight.element_size()


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"batch {r['batch']} at ~{r['context']} positions: {r['step_ms_p50']:.1f} ms/step "
            f"({r['tok_s']:.1f} tok/s; CPU {r['step_cpu_ms_p50']:.1f} ms); with the profiler "
            f"{r['profiled_step_ms']:.1f} ms, split:"
        )
        for name, ms in r["split_ms"].items():
            lines.append(f"  {name:<32} {ms:8.2f} ms  {100 * ms / r['split_total_ms']:5.1f}%")
        for m in r["matmuls"]:
            lines.append(
                f"  matmul {str(m['shape']):<14} x{m['copies']:<3} {m['us']:9.0f} us  "
                f"{m['gflop_s']:7.1f} GFLOP/s  {m['weight_gb_s']:6.1f} GB/s"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serve.bench.decode_profile", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="default")
    p.add_argument("--batch", default="1,16", help="comma-separated decode batch sizes")
    p.add_argument("--context", type=int, default=192, help="positions already in each sequence's cache")
    p.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="as llm-serve --quantize")
    p.add_argument("--out-dir", type=Path, default=Path("artifacts/bench"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as llm-serve sets it
    from serve.atomic import write_json_atomic

    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
        if not batches or min(batches) < 1:
            raise ValueError("--batch needs positive integers")
        engine = load_engine(args.model, max(batches), args.context + 64, args.quantize)
    except (ValueError, OSError) as exc:  # QuantizationError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results = [profile_batch(engine, b, args.context, args.steps) for b in batches]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out_dir / f"decode-profile-{stamp}.json"
    write_json_atomic(out, {"model": args.model, "quantize": args.quantize, "results": results})
    print(render(results))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
