"""Every other stage end to end on the default model with the real LLaMA-Factory, a few steps each, and
each result used the way a user would:

- `rm` on preference pairs -> a LoRA adapter with its value head; its scores equal LLaMA-Factory's own
  value-head model on the same chats;
- `ppo` against that reward model -> a policy adapter and the rewards in the manifest;
- `llm-eval --reward-model` -> base and the PPO adapter scored by that reward model;
- `pt` on the c4 demo text -> an adapter that lowers the loss on the text it trained on;
- `full` -> a whole checkpoint served by `llm-serve --model` and chatted with through `openai`;
- `freeze` -> a whole checkpoint `llm-export --model` turns into a verified GGUF.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers.training import llm_train, manifest, write_config

pytestmark = pytest.mark.slow

PAIRS = [
    (
        "What is the capital of France?",
        "The capital of France is Paris.",
        "France is a country.",
    ),
    ("Name a primary colour.", "Red is a primary colour.", "Colours are nice."),
]


def train(tmp: Path, name: str, **kw) -> Path:
    out = tmp / name
    cfg = write_config(tmp, f"{name}.yaml", output_dir=str(out), **kw)
    result = llm_train(cfg, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def check_common(out: Path, stage: str, finetuning_type: str) -> dict:
    m = manifest(out)
    assert (m["stage"], m["finetuning_type"]) == (stage, finetuning_type)
    assert m["base_model"]["name"] == "default" and len(m["base_model"]["sha256"]) == 64
    assert m["template"]["name"] == "smollm2" and m["template"]["saved_matches_base"]
    assert m["metrics"]["wall_seconds"] > 0 and math.isfinite(m["metrics"]["final_loss"])
    assert m["parallel"]["world_size"] == 1
    assert not list(out.glob("checkpoint-*")) and (out / "loss.png").is_file()
    return m


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def rm(tmp, shared_demo_data) -> Path:
    out = train(
        tmp,
        "rm",
        stage="rm",
        dataset="dpo_en_demo",
        dataset_dir=str(shared_demo_data),
        max_samples=4,
        max_steps=2,
    )
    check_common(out, "rm", "lora")
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_head.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def ppo(tmp, rm, shared_demo_data) -> Path:
    from train import ppo_compat

    if not ppo_compat.available():
        pytest.skip(ppo_compat.why_unavailable())
    return train(
        tmp,
        "ppo",
        stage="ppo",
        reward_model=str(rm),
        dataset="alpaca_en_demo",
        dataset_dir=str(shared_demo_data),
        max_samples=4,
        max_steps=2,
        max_new_tokens=8,
        ppo_epochs=1,
    )


@pytest.fixture(scope="module")
def pt(tmp, shared_demo_data) -> Path:
    out = train(
        tmp,
        "pt",
        stage="pt",
        dataset="c4_demo",
        dataset_dir=str(shared_demo_data),
        max_samples=4,
        max_steps=2,
    )
    check_common(out, "pt", "lora")
    assert manifest(out)["datasets"][0]["format"] == "pt"
    return out


def test_rm_scores_like_llamafactory(rm, default_model):
    """Our scorer (PEFT + the value head) against LLaMA-Factory's value-head model on the same chats."""
    import torch
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer

    from train.reward_model import RewardScorer, check_reward_model

    info = check_reward_model(rm, base_name="default", base_path=default_model.path)
    assert (info.kind, info.stage) == ("lora", "rm")
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, good, bad in PAIRS
        for a in (good, bad)
    ]
    with RewardScorer(info) as scorer:
        ours = scorer.score(chats, batch_size=4)
        ids = [scorer._ids(c) for c in chats]

    model_args, _, finetuning_args, _ = get_infer_args(
        {
            "model_name_or_path": str(default_model.path),
            "adapter_name_or_path": str(rm),
            "template": "smollm2",
        }
    )
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False, add_valuehead=True)
    theirs = []
    with torch.no_grad():
        for x in ids:  # one chat at a time: LLaMA-Factory scores the last token of each sequence
            _, _, values = model(input_ids=torch.tensor([x]), return_dict=True)
            theirs.append(float(values[0, -1]))
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_ppo_against_an_llm_train_reward_model(ppo, rm):
    m = check_common(ppo, "ppo", "lora")
    assert m["reward_model"]["path"] == str(rm) and m["reward_model"]["type"] == "lora"
    assert len(m["metrics"]["rewards"]) == 2 and all(math.isfinite(r) for r in m["metrics"]["rewards"])
    assert m["metrics"]["final_reward"] == m["metrics"]["rewards"][-1]
    assert (ppo / "adapter_model.safetensors").is_file() and not (ppo / "reward").exists()


def test_pt_adapter_learned_its_text(pt, default_model, shared_demo_data):
    """What continued pre-training is for: the adapter predicts the text it read better than the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pt))
    # LLaMA-Factory's pt stage joins the texts (max_samples=4 takes the first 4) with EOS and cuts the
    # stream into cutoff_len blocks; 2 steps of 2 blocks trained on its first 4 x 64 tokens.
    lines = (shared_demo_data / "c4_demo.jsonl").read_text().splitlines()[:4]
    stream = tok(tok.eos_token.join(json.loads(line)["text"] for line in lines)).input_ids[: 4 * 64]
    batch = [torch.tensor([stream[i : i + 64]]) for i in range(0, len(stream), 64)]
    model = AutoModelForCausalLM.from_pretrained(str(default_model.path), dtype=torch.float32)

    def loss(m) -> float:
        with torch.no_grad():
            return sum(float(m(input_ids=ids, labels=ids).loss) for ids in batch) / len(batch)

    before = loss(model)
    after = loss(PeftModel.from_pretrained(model, str(pt)))
    assert after < before, (before, after)


def test_llm_eval_reward_model_column(tmp, rm, ppo):
    from eval.cli import main

    data = tmp / "prompts.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]})
            for q, good, _ in PAIRS
        )
        + "\n"
    )
    out = tmp / "eval"
    args = ["--adapter", f"ppo={ppo}", "--data", str(data), "--reward-model", str(rm)]
    args += ["--max-tokens", "8", "--no-embeddings", "--no-cache", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    style = results["style"]
    for name in ("base", "ppo"):
        reward = style["targets"][name]["reward"]
        assert math.isfinite(reward["mean"]) and reward["ci95"][0] <= reward["mean"] <= reward["ci95"][1]
    assert math.isfinite(style["reference"]["reward"]) and results["reward_model"]["path"] == str(rm)
    assert "reward model score" in (out / "report.md").read_text()

    # The column is the reward model's score of exactly the replies in samples/.
    from train.reward_model import RewardScorer, check_reward_model_alone

    rows = [json.loads(x) for x in (out / "samples" / "style-ppo.jsonl").read_text().splitlines()]
    chats = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["reply"]}] for r in rows
    ]
    with RewardScorer(check_reward_model_alone(rm)) as scorer:
        again = scorer.score(chats)
    assert sum(again) / len(again) == pytest.approx(style["targets"]["ppo"]["reward"]["mean"], abs=1e-4)


def test_full_finetune_is_served(tmp, shared_demo_data):
    import openai

    from tests.helpers.server import start_server

    out = train(
        tmp,
        "full",
        finetuning_type="full",
        dataset="identity",
        dataset_dir=str(shared_demo_data),
        max_samples=2,
        max_steps=1,
    )
    check_common(out, "sft", "full")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    with start_server(["--model", str(out)]) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Who are you?"}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content.strip()


def test_freeze_finetune_exports_to_gguf(tmp, shared_demo_data):
    from train.export.cli import main as export

    out = train(
        tmp,
        "freeze",
        finetuning_type="freeze",
        freeze_trainable_layers=1,
        dataset="identity",
        dataset_dir=str(shared_demo_data),
        max_samples=2,
        max_steps=1,
    )
    check_common(out, "sft", "freeze")
    exported = tmp / "freeze-export"
    assert (
        export(["--model", str(out), "--out", str(exported), "--gguf", "q8_0", "--max-new-tokens", "4"]) == 0
    )
    report = json.loads((exported / "export_report.json").read_text())
    assert report["status"] == "passed" and report["adapters"] == []
    assert (exported / "gguf" / "freeze-export-q8_0.gguf").is_file()
