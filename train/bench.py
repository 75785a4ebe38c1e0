"""`make bench-train`: llm-train's tokens/s against a plain PyTorch+PEFT loop on the same data and settings.

Run as `python -m train.bench [--steps 8 --batch-size 4 --cutoff-len 64 --lf-defaults]`. Both sides
train LoRA (rank 8, all linear layers, AdamW) on the same rows rendered by the same chat template, in
fresh processes with the same threads; tokens are non-padding input tokens, time is the training loop
(model loading excluded on both sides). `--lf-defaults` adds plain `llamafactory-cli train` with
LLaMA-Factory's own defaults (gradient checkpointing on) to show what llm-train's settings change.
Writes `artifacts/bench-train/bench-train.json` and prints a table with ratios against the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from serve.artifacts.run_manifest import read_manifest
from serve.atomic import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.70


def bench_rows(source: Path, n: int) -> list[dict[str, Any]]:
    """The first `n` rows of `source`, repeated if it is shorter."""
    rows = json.loads(source.read_text(encoding="utf-8"))
    return [rows[i % len(rows)] for i in range(n)]


def plain_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """The reference: tokenize with the chat template, then fwd+bwd+AdamW per batch, nothing else."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.data.validate import validate_file

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    report = validate_file(spec["data_file"])
    examples = []
    for _, sample in report.samples:
        full = tok.apply_chat_template(sample.conversation(), tokenize=False)
        prompt = tok.apply_chat_template(
            [{"role": "system", "content": sample.system}] * bool(sample.system) + sample.messages,
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tok(full, add_special_tokens=False)["input_ids"][: spec["cutoff_len"]]
        n_prompt = min(len(tok(prompt, add_special_tokens=False)["input_ids"]), len(ids))
        examples.append((ids, n_prompt))
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(
        r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"], target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bs, tokens = spec["batch_size"], 0
    start = time.perf_counter()
    for step in range(spec["steps"]):
        batch = examples[step * bs : (step + 1) * bs]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        labels = input_ids.clone()
        for row, (ids, n_prompt) in enumerate(batch):
            labels[row, :n_prompt] = -100
            labels[row, len(ids) :] = -100
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 2), "final_loss": round(float(loss), 4)}


def run_plain(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "train.bench", "--plain-worker", f.name],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_llm_train(config: Path, out_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "train.cli",
            str(config),
            f"output_dir={out_dir}",
            "--overwrite",
            "--no-progress",
        ],
        env=env,
        cwd=REPO,
        check=True,
    )
    metrics = read_manifest(out_dir).metrics
    return {"tokens": metrics["num_input_tokens_seen"], "seconds": metrics["train_runtime"]}


def run_lf_defaults(config: dict[str, Any], work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Plain `llamafactory-cli train` with LLaMA-Factory's defaults (what users ran before llm-train)."""
    cfg = {k: v for k, v in config.items() if k not in ("disable_gradient_checkpointing",)}
    shutil.rmtree(work / "lf-defaults", ignore_errors=True)  # LLaMA-Factory would resume an old run
    cfg["output_dir"] = str(work / "lf-defaults")
    path = work / "lf-defaults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = Path(sys.executable).parent / "llamafactory-cli"
    env = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}  # as users ran it: spinning OpenMP threads
    subprocess.run([str(cli), "train", str(path)], env=env, cwd=work, check=True, capture_output=True)
    results = json.loads((work / "lf-defaults" / "all_results.json").read_text())
    return {"tokens": results["num_input_tokens_seen"], "seconds": results["train_runtime"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__)
    p.add_argument("--model", default="default", help="base model (default: the embedded SmolLM2-135M)")
    p.add_argument(
        "--data",
        default=str(REPO / "configs" / "data" / "demo" / "huangdi_demo.json"),
        help="alpaca-style JSON",
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument(
        "--lf-defaults", action="store_true", help="also run llamafactory-cli with its own defaults"
    )
    p.add_argument("--out", default=str(REPO / "artifacts" / "bench-train"), help="output directory")
    p.add_argument("--plain-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_worker:
        print(json.dumps(plain_loop(json.loads(Path(args.plain_worker).read_text()))))
        return 0

    from serve.models import resolve_model
    from train.launch import cpu_threads

    model_path = resolve_model(args.model).path
    out = Path(args.out).resolve()
    work = out / "work"
    (work / "data").mkdir(parents=True, exist_ok=True)
    n_rows = args.steps * args.batch_size  # exactly one epoch: both sides see the same rows once
    data_file = work / "data" / "bench.json"
    data_file.write_text(json.dumps(bench_rows(Path(args.data), n_rows), ensure_ascii=False))
    from train.data.register import register_dataset

    register_dataset(data_file, "bench", work / "data")
    config = {
        "model_name_or_path": str(model_path),
        "stage": "sft",
        "finetuning_type": "lora",
        "dataset": "bench",
        "dataset_dir": str(work / "data"),
        "cutoff_len": args.cutoff_len,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "max_steps": args.steps,
        "lora_rank": args.lora_rank,
        "lora_target": "all",
        "save_steps": 10_000,
        "report_to": "none",
        "template": "smollm2",
        "default_system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "do_train": True,
        "include_num_input_tokens_seen": "non_padding",
        "disable_gradient_checkpointing": True,
    }
    config_path = work / "llm-train.yaml"
    config_path.write_text(yaml.safe_dump(config))
    threads = str(cpu_threads())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": threads}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the thread settings llm-train gives its worker
    spec = {
        "model_path": str(model_path),
        "data_file": str(data_file),
        "cutoff_len": args.cutoff_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lora_rank": args.lora_rank,
    }
    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, Any]] = {}
    results["plain PyTorch+PEFT loop"] = run_plain(spec, env)
    results["llm-train"] = run_llm_train(config_path, work / "llm-train", env)
    if args.lf_defaults:
        results["llamafactory-cli, its defaults"] = run_lf_defaults(config, work, env)
    plain_tps = results["plain PyTorch+PEFT loop"]["tokens"] / results["plain PyTorch+PEFT loop"]["seconds"]
    for r in results.values():
        r["tokens_per_second"] = round(r["tokens"] / r["seconds"], 2)
        r["ratio_vs_plain"] = round(r["tokens_per_second"] / plain_tps, 3)
    report = {
        "settings": {**spec, "threads": int(threads), "load_average": [load_before, os.getloadavg()[0]]},
        "results": results,
        "target_ratio": TARGET_RATIO,
        "meets_target": results["llm-train"]["ratio_vs_plain"] >= TARGET_RATIO,
    }
    write_json_atomic(out / "bench-train.json", report)
    print(f"\n{'run':34} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs plain':>9}")
    for name, r in results.items():
        print(
            f"{name:34} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_second']:>8.1f} {r['ratio_vs_plain']:>8.0%}"
        )
    verdict = "meets" if report["meets_target"] else "misses"
    print(f"llm-train {verdict} the {TARGET_RATIO:.0%} target; JSON: {out / 'bench-train.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
