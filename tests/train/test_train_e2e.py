"""End to end: real `llm-train` runs on the default model (SFT with kill and resume, DPO, KTO), the
manifest checked, the SFT adapter served by a real `llm-serve` and chatted with through `openai`,
and the multi-node/DeepSpeed launch through --dry-run. Tiny settings: a few steps, cutoff_len 64.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.training import LLM_TRAIN, llm_train, write_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def check_manifest(out: Path, stage: str, dataset: str) -> dict:
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["stage"] == stage and manifest["finetuning_type"] == "lora"
    base = manifest["base_model"]
    assert base["name"] == "default" and Path(base["path"], "model.safetensors").is_file()
    assert len(base["sha256"]) == 64
    assert manifest["template"]["name"] == "smollm2" and manifest["template"]["matches_tokenizer"]
    assert manifest["template"][
        "saved_matches_base"
    ]  # the adapter ships the chat template it was trained with
    assert [d["name"] for d in manifest["datasets"]] == [dataset] and len(
        manifest["datasets"][0]["sha256"]
    ) == 64
    assert manifest["hyperparameters"]["cutoff_len"] == 64
    assert manifest["metrics"]["train_runtime"] > 0 and manifest["metrics"]["num_input_tokens_seen"] > 0
    assert {"llamafactory", "torch", "transformers", "peft"} <= set(manifest["packages"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert not list(out.glob("checkpoint-*")) and not (out.parent / f".{out.name}.partial").exists()
    return manifest


def test_sft_kill_resume_eval_manifest_and_serve(tmp_path):
    import openai

    from tests.helpers.server import start_server

    cfg = write_config(
        tmp_path,
        dataset="huangdi_demo",
        dataset_dir=str(REPO / "configs" / "data" / "demo"),
        max_samples=8,
        val_size=0.25,
        eval_steps=2,
        early_stopping_steps=5,
        max_steps=4,
        output_dir=str(tmp_path / "sft"),
    )
    out, staging = tmp_path / "sft", tmp_path / ".sft.partial"
    proc = subprocess.Popen(
        [LLM_TRAIN, str(cfg), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = staging / "trainer_log.jsonl"
    deadline = time.monotonic() + 400
    while (
        not (log.is_file() and log.read_text().strip())
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # a kill mid-run
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 130, err
    assert "--resume" in err and not out.exists()
    assert list(staging.glob("checkpoint-*/trainer_state.json"))

    again = llm_train(cfg)
    assert again.returncode == 1 and "pass --resume to continue it" in again.stderr

    resumed = llm_train(cfg, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = check_manifest(out, "sft", "huangdi_demo")
    assert manifest["metrics"]["best_eval_loss"] > 0  # evaluated during training
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in rows) and max(r["current_steps"] for r in rows) == 4

    refused = llm_train(cfg)
    assert refused.returncode == 1 and "is not empty; pass --overwrite" in refused.stderr

    with start_server(["--model", "default", "--adapter", f"huangdi={out}"]) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        assert "huangdi" in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(
            model="huangdi",
            messages=[
                {"role": "system", "content": "用四郎的口吻回答问题"},
                {"role": "user", "content": "你是谁？"},
            ],
            max_tokens=16,
            temperature=0,
        )
        assert reply.choices[0].message.content.strip()


@pytest.mark.parametrize(
    "stage,dataset,samples",
    [("dpo", "dpo_en_demo", 4), ("kto", "kto_en_demo", 6)],
)
def test_preference_stages_few_steps(tmp_path, shared_demo_data, stage, dataset, samples):
    out = tmp_path / stage
    cfg = write_config(
        tmp_path,
        stage=stage,
        dataset=dataset,
        dataset_dir=str(shared_demo_data),
        max_samples=samples,
        max_steps=2,
        output_dir=str(out),
    )
    result = llm_train(cfg, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    check_manifest(out, stage, dataset)


def test_dry_run_multi_node_deepspeed_and_template_errors(tmp_path):
    cfg = write_config(
        tmp_path,
        dataset="huangdi_demo",
        dataset_dir=str(REPO / "configs" / "data" / "demo"),
        output_dir=str(tmp_path / "o"),
    )
    args = ["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8", "--master-addr", "10.0.0.1"]
    result = llm_train(cfg, *args, "--master-port", "29501", "--deepspeed", "z3", "--dry-run")
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().splitlines()[-1]
    assert command.startswith("HF_HUB_OFFLINE=1 ")
    assert (
        " -m torch.distributed.run --nnodes=2 --node-rank=1 --nproc-per-node=8 --master-addr=10.0.0.1 "
        "--master-port=29501 -m train.worker " in command
    )
    # node 1 keeps its YAML and log in a private directory: only node 0 writes into the run
    assert command.endswith("/llm_train_config.yaml") and f"{tmp_path}/.o.partial" not in command
    resolved = yaml.safe_load(result.stdout.split("# command")[0])
    assert resolved["deepspeed"] == str(REPO / "configs" / "deepspeed" / "ds_z3_config.json")
    assert resolved["template"] == "smollm2" and resolved["output_dir"] == f"{tmp_path}/.o.partial"
    assert not (tmp_path / ".o.partial").exists()  # a dry run writes nothing

    mismatch = llm_train(cfg, "template=llama3", "--dry-run")
    assert (
        mismatch.returncode == 1
        and "template 'llama3' (LLaMA-Factory) and the model's chat template" in mismatch.stderr
    )
    allowed = llm_train(cfg, "template=llama3", "--dry-run", "--allow-template-mismatch")
    assert allowed.returncode == 0 and "template: llama3" in allowed.stdout

    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "rows.json").write_text(
        json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""}])
    )
    (bad / "dataset_info.json").write_text(json.dumps({"rows": {"file_name": "rows.json"}}))
    broken = llm_train(cfg, "dataset=rows", f"dataset_dir={bad}", "--dry-run")
    assert (
        broken.returncode == 1 and f"{bad / 'rows.json'}:2: empty output (column 'output')" in broken.stderr
    )
    qlora = llm_train(cfg, "quantization_bit=4", "--dry-run")
    assert qlora.returncode == 1 and "needs a CUDA GPU" in qlora.stderr
