"""One export run, top to bottom: plan, merge, verify, GGUF, verify, Modelfile, report, rename.

Everything is written into a staging directory beside `--out` (serve.artifacts.publish) and renamed
into place only when every check passed; a failed verification leaves the work in `OUT.rejected/`
(with its export_report.json) and raises `VerificationError` naming the failed checks. A killed
export leaves `--out` as it was, and the next export to the same `--out` removes its staging folder.
Library code: raises, never exits; `cli.main` turns the exceptions into messages and exit codes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from serve.artifacts.provenance import package_versions
from serve.artifacts.publish import publish_dir, staged_dir
from serve.cli_runner import UserError
from train.export.config import ExportConfig
from train.export.merge import ExportError, plan_full, plan_merge

logger = logging.getLogger(__name__)
REPORT_NAME = "export_report.json"


class VerificationError(UserError, RuntimeError):
    """The export was written but failed a numerical or metadata check; nothing was installed."""

    exit_code = 1

    def __init__(self, failed: list[str], report_path: Path):
        self.failed = failed
        self.report_path = report_path
        super().__init__(f"verification failed: {', '.join(failed)} (report: {report_path})")


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def run_export(cfg: ExportConfig, after_write: Callable[[str, Path], None] | None = None) -> dict:
    """Run the export described by `cfg`; returns the report (also written to OUT/export_report.json).

    `after_write(kind, path)` is called after the merged checkpoint ("merged") and each GGUF ("gguf")
    is written and before it is verified: a seam for tests that corrupt a file to see verification fail.
    """
    out = cfg.out.expanduser().resolve()
    check_output(out, cfg.overwrite)
    plan = plan_full(cfg.model) if cfg.model else plan_merge(cfg.adapters, cfg.base)
    _fail_fast(cfg, plan)
    with staged_dir(out) as tmp:
        report = _export_into(tmp, out.name, cfg, plan, after_write)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        if report["failed_checks"]:
            rejected = out.with_name(out.name + ".rejected")
            publish_dir(tmp, rejected)
            raise VerificationError(report["failed_checks"], rejected / REPORT_NAME)
        publish_dir(tmp, out)
        return report


def _fail_fast(cfg: ExportConfig, plan) -> None:
    """Checks that need no weights: an unsupported GGUF architecture or Modelfile template fails in a second."""
    from train.export import gguf_writer, modelfile

    if cfg.gguf:
        gguf_writer.read_config(plan.base.path)
    if cfg.modelfile:
        modelfile.template_family(plan.chat_template)


def _export_into(tmp: Path, out_name: str, cfg: ExportConfig, plan, after_write) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from train.export import gguf_writer, merge, modelfile, verify

    timings: dict = {}
    t0 = time.monotonic()
    tokenizer = merge.load_tokenizer(plan)
    eos_ids = merge.generation_eos_ids(tokenizer, plan.chat_template, plan.base)
    peft_model = merge.load_with_adapters(plan)
    timings["load_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    prompt_ids = verify.render_prompts(tokenizer, plan.chat_template)
    reference = verify.probe(peft_model, prompt_ids, cfg.max_new_tokens, eos_ids)
    timings["reference_probe_s"] = time.monotonic() - t0
    logger.info("reference (base+adapters) probed in %.1f s", timings["reference_probe_s"])

    t0 = time.monotonic()
    merged = merge.merge(peft_model)
    timings["merge_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    merge.save_merged(merged, tokenizer, tmp, eos_ids, cfg.max_shard_size)
    timings["save_s"] = time.monotonic() - t0
    logger.info("merged in %.2f s, saved in %.1f s", timings["merge_s"], timings["save_s"])
    del merged, peft_model
    if after_write:
        after_write("merged", tmp)

    t0 = time.monotonic()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    checks, merged_probe = verify.check_merged(reference, reloaded, cfg.max_new_tokens, eos_ids)
    del reloaded
    timings["verify_merged_s"] = time.monotonic() - t0

    gguf_info: dict = {}
    timings["gguf_write_s"], timings["gguf_verify_s"] = {}, {}
    for i, qtype in enumerate(dict.fromkeys(cfg.gguf)):
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir(exist_ok=True)
        path = gguf_dir / f"{out_name}-{qtype}.gguf"
        t0 = time.monotonic()
        result = gguf_writer.write_gguf(tmp, path, qtype, eos_id=eos_ids[0], name=out_name)
        timings["gguf_write_s"][qtype] = time.monotonic() - t0
        logger.info(
            "wrote %s (%.1f MB) in %.1f s", path.name, result.size_bytes / 1e6, timings["gguf_write_s"][qtype]
        )
        if after_write:
            after_write("gguf", path)
        t0 = time.monotonic()
        checks += verify.check_gguf(
            path,
            qtype,
            merged_probe,
            tokenizer=tokenizer,
            template=plan.chat_template,
            eos_id=eos_ids[0],
            max_new_tokens=cfg.max_new_tokens,
            eos_ids=eos_ids,
            byte_level=gguf_writer.is_byte_level(tmp),
        )
        timings["gguf_verify_s"][qtype] = time.monotonic() - t0
        gguf_info[qtype] = {
            "file": f"gguf/{path.name}",
            "size_bytes": result.size_bytes,
            "tensor_types": result.tensor_types,
        }
        if cfg.modelfile:
            name = "Modelfile" if i == 0 else f"Modelfile.{qtype}"
            mf = modelfile.write_modelfile(
                path, tokenizer, plan.chat_template, eos_ids, plan.system_prompt, filename=name
            )
            gguf_info[qtype]["modelfile"] = f"gguf/{mf.name}"

    failed = [c.name for c in checks if not c.passed]
    return {
        "status": "failed" if failed else "passed",
        "failed_checks": failed,
        "base": {"name": plan.base.name, "path": str(plan.base.path)},
        "adapters": [{"name": s.name, "path": str(s.path), "base_model": s.base_model} for s in plan.specs],
        "eos_token_ids": eos_ids,
        "eos_tokens": tokenizer.convert_ids_to_tokens(eos_ids),
        "chat_template_from": str(plan.tokenizer_dir),
        "prompts": list(verify.PROMPTS),
        "replies": [tokenizer.decode(g, skip_special_tokens=True) for g in reference.greedy],
        "checks": verify.as_dicts(checks),
        "gguf": gguf_info,
        "timings_s": timings,
        "versions": package_versions(("torch", "transformers", "peft", "gguf"), missing=True),
    }
