"""What the stack offers against our engine, in one process, on the same prompts (no HTTP).

Issue 3 asks to use transformers' own machinery before writing our own, and to measure each choice.
This runs the same greedy workload through each of them and writes the figures:

- `hf-generate`: `model.generate` (dynamic cache, SDPA), one stream, and 16 prompts as one padded
  static batch; `hf-generate-static`: the same with `cache_implementation="static"`;
  `hf-generate-compiled` (`--compile`, ~90 s of compiling here): static cache + `torch.compile`.
- `hf-generate-batch`: transformers' continuous batching (`generate_batch`, paged SDPA), 16 streams.
- `engine-transformers` / `engine-native`: llm-serve's engine (`serve/engine/hf.py`) on transformers'
  modeling code and on its own decoder (`serve/engine/llama.py`).

`python -m serve.bench.stack [--compile]` prints a table and writes
`artifacts/bench/stack-<timestamp>.json`; ratios are against `engine-native` in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from serve.atomic import write_json_atomic

REFERENCE = "engine-native"


def _hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _generate(model, prompts: list[list[int]], new_tokens: int, **kwargs) -> float:
    """tok/s of `model.generate` on `prompts` as one left-padded batch."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, **kwargs,
        )  # fmt: skip
    return (out.shape[1] - width) * len(prompts) / (time.perf_counter() - t0)


def _generate_batch(model, prompts: list[list[int]], new_tokens: int) -> float:
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    return sum(len(o.generated_tokens) for o in out.values()) / (time.perf_counter() - t0)


def _engine(model_name: str, impl: str, workloads: dict, new_tokens: int) -> dict[str, float]:
    from serve.config import ServeConfig
    from serve.engine.hf import HFEngine
    from serve.engine.types import GenerationRequest, SamplingParams
    from serve.models import resolve_model

    async def main() -> dict[str, float]:
        config = ServeConfig(model=model_name, max_num_seqs=16, model_impl=impl)
        engine = HFEngine(config, resolve_model(model_name), [])
        await engine.start()

        async def one(rid: str, ids: list[int]) -> int:
            params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
            return sum([len(o.token_ids) async for o in engine.generate(GenerationRequest(rid, ids, params))])

        figures = {}
        for name, prompts in workloads.items():
            t0 = time.perf_counter()
            tokens = await asyncio.gather(*[one(f"{name}-{i}", p) for i, p in enumerate(prompts)])
            figures[name] = sum(tokens) / (time.perf_counter() - t0)
        await engine.shutdown()
        return figures

    return asyncio.run(main())


def _transformers_candidates(path: str, workloads: dict, new_tokens: int, compile_: bool, record) -> None:
    """transformers' own generation paths; the model is freed when this returns."""
    model = _hf_model(path)
    static = {"cache_implementation": "static"}
    for workload, prompts in workloads.items():
        record("hf-generate", workload, lambda p=prompts: _generate(model, p, new_tokens))
        record("hf-generate-static", workload, lambda p=prompts: _generate(model, p, new_tokens, **static))
    record(
        "hf-generate-batch", "16 streams", lambda: _generate_batch(model, workloads["16 streams"], new_tokens)
    )
    if compile_:
        import torch

        model.forward = torch.compile(model.forward)
        t0 = time.perf_counter()
        _generate(model, workloads["1 stream"], 4, **static)
        compile_seconds = time.perf_counter() - t0
        record("compile seconds", "1 stream", lambda: compile_seconds)
        record(
            "hf-generate-compiled",
            "1 stream",
            lambda: _generate(model, workloads["1 stream"], new_tokens, **static),
        )


def run(model_name: str, new_tokens: int, compile_: bool) -> dict:
    from transformers import AutoTokenizer

    from serve.bench.prompts import build_prompts
    from serve.models import resolve_model

    path = str(resolve_model(model_name).path)
    tok = AutoTokenizer.from_pretrained(path)

    def ids(texts: list[str]) -> list[list[int]]:
        chats = [[{"role": "user", "content": t}] for t in texts]
        rendered = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        return [tok.encode(r, add_special_tokens=False) for r in rendered]

    workloads = {
        "1 stream": ids(build_prompts(tok, 1, 64, seed=0)),
        "16 streams": ids(build_prompts(tok, 16, 128, seed=1)),
    }
    results: dict[str, dict[str, float]] = {}

    def record(candidate: str, workload: str, fn) -> None:
        results.setdefault(candidate, {})[workload] = round(fn(), 2)
        print(f"[stack] {candidate} / {workload}: {results[candidate][workload]} tok/s", flush=True)

    _transformers_candidates(path, workloads, new_tokens, compile_, record)
    for impl in ("transformers", "native"):
        for workload, figure in _engine(model_name, impl, workloads, new_tokens).items():
            record(f"engine-{impl}", workload, lambda f=figure: f)
    return results


def render(results: dict) -> str:
    workloads = ["1 stream", "16 streams"]
    ref = results.get(REFERENCE, {})
    lines = [f"{'candidate':<22}" + "".join(f"{w + ' tok/s':>18}{'/ native':>10}" for w in workloads)]
    for candidate, figures in results.items():
        if candidate == "compile seconds":
            continue
        row = f"{candidate:<22}"
        for w in workloads:
            value = figures.get(w)
            ratio = value / ref[w] if value is not None and ref.get(w) else None
            row += f"{value if value is not None else '-':>18}{f'{ratio:.2f}' if ratio else '-':>10}"
        lines.append(row)
    if "compile seconds" in results:
        lines.append(f"torch.compile took {results['compile seconds']['1 stream']} s before its first token")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = argparse.ArgumentParser(prog="python -m serve.bench.stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="also time static cache + torch.compile")
    p.add_argument("--out-dir", default="artifacts/bench")
    args = p.parse_args(argv)
    results = run(args.model, args.new_tokens, args.compile)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out_dir) / f"stack-{stamp}.json"
    machine = platform.processor() or platform.machine()
    record = {"model": args.model, "new_tokens": args.new_tokens, "machine": machine, "cpus": os.cpu_count()}
    write_json_atomic(out, {**record, "tok_s": results})
    print(render(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
