"""`llm-export`: merge LoRA adapters into full weights, optionally write GGUF and an Ollama Modelfile.

Run as:
    llm-export --adapter saves/demo --out saves/demo-merged --gguf q8_0 --modelfile --overwrite
    llm-export --model saves/sft-full --out saves/sft-full-export --gguf q8_0   # a full fine-tune

Every run verifies numerically (merged vs base+adapter, each GGUF read back vs merged) and writes
OUT/export_report.json. Exit codes: 0 exported and verified, 1 a verification check failed (the work
is left in OUT.rejected/), 2 bad input (adapter, base, output directory, unsupported model).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serve.cli_runner import UserError, run_cli
from train.export.config import GGUF_TYPES, ExportConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-export", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="LoRA adapter directory; repeat to merge several, applied in order",
    )
    p.add_argument(
        "--model",
        help="a full checkpoint (llm-train finetuning_type full/freeze) to export instead of adapters",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.add_argument("--base", help="base model (default: the base the adapters were trained on)")
    p.add_argument(
        "--gguf",
        action="append",
        choices=GGUF_TYPES,
        default=[],
        help="also write a GGUF file of this type (repeat for several)",
    )
    p.add_argument("--modelfile", action="store_true", help="write an Ollama Modelfile next to the GGUF")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per verification prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="llm-export: %(message)s")
    return run_cli("llm-export", lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    if args.modelfile and not args.gguf:
        raise UserError("--modelfile needs a GGUF to point at; add --gguf q8_0 (or f16/bf16/f32)")
    from pydantic import ValidationError

    from serve.settings import describe_validation_error
    from train.export.pipeline import run_export

    try:
        cfg = ExportConfig(
            adapters=args.adapter,
            model=args.model,
            out=args.out,
            base=args.base,
            gguf=args.gguf,
            modelfile=args.modelfile,
            overwrite=args.overwrite,
            max_new_tokens=args.max_new_tokens,
        )
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, ExportConfig, flags=vars(args))) from exc
    report = run_export(cfg)  # VerificationError exits 1, every other user error 2
    _print_summary(cfg.out, report)
    return 0


def _print_summary(out: Path, report: dict) -> None:
    t = report["timings_s"]
    print(f"exported to {out} (merge {t['merge_s']:.2f} s, save {t['save_s']:.1f} s); all checks passed:")
    for check in report["checks"]:
        value = check["value"]
        shown = f"{value:.3g}" if isinstance(value, float) else value
        print(f"  {check['name']:<36} {shown}")
    for qtype, info in report["gguf"].items():
        print(
            f"  {info['file']}: {info['size_bytes'] / 1e6:.1f} MB, written in {t['gguf_write_s'][qtype]:.1f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
