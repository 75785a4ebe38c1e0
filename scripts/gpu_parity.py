"""Engine parity on CUDA (step 1 of scripts/gpu-check.sh): llm-serve's HF engine on the GPU, native
decoder and transformers' modeling code, against transformers' own greedy generation on the GPU, for
the base and a LoRA adapter in one mixed batch. float32, so the tokens must be identical.

Run as: .venv/bin/python scripts/gpu_parity.py [--model default] [--tokens 24] [--device cuda]
Prints one line per implementation and exits 1 on the first mismatch. `--device cpu` runs the same
comparison without a GPU (how the script itself is checked on a CPU machine).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["The capital of France is", "用四郎的口吻回答问题", "def fibonacci(n):", "1 2 3 4 5 6 7 8"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args()
    device = args.device

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from serve.adapters import load_adapter_spec
    from serve.config import ServeConfig
    from serve.engine.hf import HFEngine
    from serve.engine.types import GenerationRequest, SamplingParams
    from serve.models import resolve_model
    from tests.helpers.adapters import make_lora_adapter

    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_parity: no CUDA device (--device cpu checks the same on CPU)", file=sys.stderr)
        return 1
    model = resolve_model(args.model)
    adapter_dir = make_lora_adapter(model.path, Path(tempfile.mkdtemp()) / "a", seed=1, scale=0.05)

    def reference(adapter: bool) -> list[list[int]]:
        ref = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).to(device)
        if adapter:
            ref = PeftModel.from_pretrained(ref, str(adapter_dir)).to(device)
        outs = []
        for ids in prompt_ids:
            x = torch.tensor([ids], device=device)
            out = ref.generate(
                x, max_new_tokens=args.tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            outs.append(out[0, len(ids) :].tolist())
        del ref
        if device == "cuda":
            torch.cuda.empty_cache()
        return outs

    async def engine_run(impl: str) -> dict:
        spec = load_adapter_spec("a", adapter_dir)
        cfg = ServeConfig(model=args.model, device=device, dtype="float32", model_impl=impl, max_num_seqs=8)
        engine = HFEngine(cfg, model, [spec])
        await engine.start()

        async def one(rid: str, ids: list[int], name: str | None) -> list[int]:
            params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
            toks: list[int] = []
            async for out in engine.generate(GenerationRequest(rid, ids, params, name)):
                toks += out.token_ids
            return toks

        jobs = [(name, i, ids) for i, ids in enumerate(prompt_ids) for name in (None, "a")]
        results = await asyncio.gather(*[one(f"{i}-{name}", ids, name) for name, i, ids in jobs])
        await engine.shutdown()
        return {(name, i): toks for (name, i, _), toks in zip(jobs, results, strict=True)}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    want = {None: reference(False), "a": reference(True)}
    if want[None] == want["a"]:
        print(
            "gpu_parity: the adapter does not change the output; the check would prove nothing",
            file=sys.stderr,
        )
        return 1
    for impl in ("native", "transformers"):
        got = asyncio.run(engine_run(impl))
        bad = [(n, i) for (n, i), toks in got.items() if toks != want[n][i]]
        if bad:
            print(
                f"gpu_parity: {impl}: {len(bad)} of {len(got)} sequences differ, e.g. {bad[0]}",
                file=sys.stderr,
            )
            return 1
        print(f"gpu_parity: {impl} on {device}: {len(got)} sequences (base + adapter, mixed batch) identical")
    where = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"gpu_parity: ok on {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
