"""Export speed and sizes on the default model: merge time, GGUF write time and size per type.

Run as `python -m train.export.bench [--out artifacts/export]`. Makes a random rank-8 LoRA adapter on
the default model (lora_B ~ N(0, 0.005), so the merge is real work and verification has something
to find), exports it with every GGUF type, and writes `bench.json` plus a printed table, sizes and
times as ratios against f32 measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from serve.atomic import write_json_atomic

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.005)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("artifacts/export"), help="where bench.json goes")
    p.add_argument("--adapter", help="an existing adapter to export (default: a random one on `default`)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="export-bench: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from serve.models import resolve_model
    from train.export.config import GGUF_TYPES, ExportConfig
    from train.export.pipeline import run_export

    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        adapter = args.adapter or str(make_adapter(resolve_model("default").path, Path(tmp) / "adapter"))
        report = run_export(ExportConfig(adapters=[adapter], out=Path(tmp) / "merged", gguf=list(GGUF_TYPES)))
    t = report["timings_s"]
    f32_size, f32_write = report["gguf"]["f32"]["size_bytes"], t["gguf_write_s"]["f32"]
    rows = {
        q: {
            "size_mb": info["size_bytes"] / 1e6,
            "size_vs_f32": info["size_bytes"] / f32_size,
            "write_s": t["gguf_write_s"][q],
            "write_vs_f32": t["gguf_write_s"][q] / f32_write,
            "verify_s": t["gguf_verify_s"][q],
            "checks": {
                c["name"].split(".", 1)[1]: c["value"]
                for c in report["checks"]
                if c["name"].startswith(f"gguf[{q}]")
            },
        }
        for q, info in report["gguf"].items()
    }
    result = {
        "model": "default (SmolLM2-135M-Instruct, float32)",
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "merge_s": t["merge_s"],
        "save_merged_s": t["save_s"],
        "load_s": t["load_s"],
        "merge_vs_load": t["merge_s"] / t["load_s"],
        "merged_max_abs_logit_diff": next(
            c["value"] for c in report["checks"] if c["name"] == "merged.max_abs_logit_diff"
        ),
        "gguf": rows,
        "timings_s": t,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "bench.json", result)
    print(f"merge {t['merge_s']:.2f} s (x{result['merge_vs_load']:.2f} of load), save {t['save_s']:.1f} s")
    print(f"{'type':<6}{'MB':>9}{'vs f32':>8}{'write s':>9}{'vs f32':>8}{'top1':>7}{'max|Δ|':>9}")
    for q, r in rows.items():
        print(
            f"{q:<6}{r['size_mb']:>9.1f}{r['size_vs_f32']:>8.2f}{r['write_s']:>9.1f}{r['write_vs_f32']:>8.2f}"
            f"{r['checks']['top1_agreement']:>7.3f}{r['checks']['max_abs_logit_diff']:>9.4f}"
        )
    print(f"written to {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
