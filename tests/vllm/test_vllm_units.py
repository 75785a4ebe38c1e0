"""Fast checks of the vLLM engine's pure parts (no vLLM needed; runs in the main venv too).

Output mapping from vLLM's cumulative/delta `CompletionOutput`s to incremental `GenerationOutput`s,
the LoRA settings derived from adapters, the refusal of adapters vLLM cannot load, and the engine
arguments built from `ServeConfig`. vLLM-shaped inputs are plain objects with vLLM's field names.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from serve.adapters import AdapterError, load_adapter_spec
from serve.config import ServeConfig
from serve.engine.vllm import build_engine_kwargs
from serve.engine.vllm_lora import check_vllm_adapter, lora_settings, slot_rank
from serve.engine.vllm_outputs import OutputTracker, to_token_logprob


def lp(logprob: float, rank: int) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=None)


def completion(token_ids, text, logprobs=None, finish_reason=None) -> SimpleNamespace:
    return SimpleNamespace(token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=finish_reason)


# -- outputs ---------------------------------------------------------------------------------------


def test_top_logprobs_are_ranked_and_exclude_a_chosen_token_outside_top_k():
    entries = {7: lp(-3.0, 5), 1: lp(-0.5, 1), 2: lp(-1.0, 2)}
    got = to_token_logprob(7, entries, top_k=2)
    assert (got.token_id, got.logprob) == (7, -3.0)
    assert got.top == [(1, -0.5), (2, -1.0)]
    only_chosen = to_token_logprob(7, {7: lp(-3.0, 5)}, top_k=0)
    assert only_chosen.top == [] and only_chosen.logprob == -3.0


def test_cumulative_outputs_become_increments_with_prompt_logprobs_once():
    t = OutputTracker("r", [5, 6, 7], cumulative=True, logprobs=1, prompt_logprobs=0)
    step1 = [{10: lp(-0.1, 1)}]
    step2 = step1 + [{11: lp(-0.2, 1), 12: lp(-0.9, 2)}, {2: lp(-0.3, 1)}]
    prompt_lps = [None, {6: lp(-4.0, 3)}, {7: lp(-2.0, 1)}]

    first = t.update(completion([10], "Hi", step1), prompt_lps)
    assert (first.token_ids, first.text, first.num_generated_tokens) == ([10], "Hi", 1)
    assert [x.logprob for x in first.logprobs] == [-0.1]
    assert first.prompt_logprobs[0] is None
    assert [(p.token_id, p.logprob, p.top) for p in first.prompt_logprobs[1:]] == [
        (6, -4.0, []),
        (7, -2.0, []),
    ]

    last = t.update(completion([10, 11, 2], "Hi there", step2, "stop"), prompt_lps)
    assert (last.token_ids, last.text, last.finish_reason) == ([11, 2], " there", "stop")
    assert [(x.token_id, x.top) for x in last.logprobs] == [(11, [(11, -0.2)]), (2, [(2, -0.3)])]
    assert last.prompt_logprobs is None
    assert (last.num_prompt_tokens, last.num_generated_tokens) == (3, 3)
    assert t.finished


def test_delta_outputs_pass_through_and_logprobs_are_omitted_when_not_asked():
    t = OutputTracker("r", [1], cumulative=False)
    a = t.update(completion([4, 5], "ab", [{4: lp(0, 1)}, {5: lp(0, 1)}]))
    b = t.update(completion([6], "c", None, "length"))
    assert (a.token_ids, a.text, a.logprobs) == ([4, 5], "ab", None)
    assert (b.token_ids, b.text, b.finish_reason, b.num_generated_tokens) == ([6], "c", "length", 3)


def test_an_unfinished_stream_closes_with_abort():
    t = OutputTracker("r", [1, 2], cumulative=True)
    t.update(completion([3], "x"))
    end = t.aborted()
    assert (end.finish_reason, end.num_generated_tokens, end.token_ids) == ("abort", 1, [])


# -- LoRA ------------------------------------------------------------------------------------------


def write_adapter(path: Path, tensors: dict[str, np.ndarray], r: int = 8, **cfg) -> Path:
    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"], **cfg}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def q_proj_lora(r: int = 8) -> dict[str, np.ndarray]:
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    return {
        f"{prefix}.lora_A.weight": np.zeros((r, 64), np.float32),
        f"{prefix}.lora_B.weight": np.zeros((64, r), np.float32),
    }


def test_slot_rank_rounds_up_to_a_vllm_size_and_refuses_above_512():
    assert [slot_rank(r) for r in (1, 4, 8, 12, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(AdapterError, match="rank 1024 is above the largest rank vLLM supports .512."):
        slot_rank(1024, "big")


def test_lora_settings_cover_every_adapter(tmp_path):
    a = load_adapter_spec("a", write_adapter(tmp_path / "a", q_proj_lora(8), r=8))
    b = load_adapter_spec("b", write_adapter(tmp_path / "b", q_proj_lora(12), r=12))
    s = lora_settings([a, b])
    assert s.engine_kwargs() == {"enable_lora": True, "max_loras": 2, "max_cpu_loras": 2, "max_lora_rank": 16}
    assert lora_settings([]).engine_kwargs() == {"enable_lora": False}


def test_lora_settings_with_adapter_dirs_follow_max_loras_and_the_slot_rank(tmp_path):
    a = load_adapter_spec("a", write_adapter(tmp_path / "a", q_proj_lora(8), r=8))
    dirs = ServeConfig(adapter_dirs=[str(tmp_path)])
    # Adapters may arrive while serving: LoRA stays on, 4 slots of rank 8 by default.
    assert lora_settings([], dirs).engine_kwargs() == {
        "enable_lora": True, "max_loras": 4, "max_cpu_loras": 4, "max_lora_rank": 8,
    }  # fmt: skip
    tuned = ServeConfig(
        adapter_dirs=[str(tmp_path)], allow_runtime_lora=True, max_loras=8, max_cpu_loras=64, max_lora_rank=12
    )
    assert lora_settings([a], tuned).engine_kwargs() == {
        "enable_lora": True, "max_loras": 8, "max_cpu_loras": 64, "max_lora_rank": 16,
    }  # fmt: skip
    # Start-up adapters only: one slot each, as before; --max-loras caps the batch, none is evicted.
    assert lora_settings([a], ServeConfig(max_loras=1)).engine_kwargs()["max_cpu_loras"] == 1


def test_plain_adapter_passes_and_vocab_changes_are_refused(tmp_path):
    ok = load_adapter_spec("ok", write_adapter(tmp_path / "ok", q_proj_lora()))
    check_vllm_adapter(ok, base_vocab_size=100)

    saved = write_adapter(tmp_path / "saved", q_proj_lora(), modules_to_save=["embed_tokens", "lm_head"])
    with pytest.raises(AdapterError, match=r"modules_to_save.*--engine hf"):
        check_vllm_adapter(load_adapter_spec("saved", saved), base_vocab_size=100)

    tensors = {
        **q_proj_lora(),
        "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((8, 104), np.float32),
        "base_model.model.model.embed_tokens.lora_embedding_B": np.zeros((64, 8), np.float32),
    }
    resized = write_adapter(tmp_path / "resized", tensors)
    with pytest.raises(AdapterError, match=r"shape \[8, 104\].*100 tokens.*resized vocabulary"):
        check_vllm_adapter(load_adapter_spec("resized", resized), base_vocab_size=100)

    full_head = write_adapter(
        tmp_path / "head",
        {**q_proj_lora(), "base_model.model.lm_head.weight": np.zeros((100, 64), np.float32)},
    )
    with pytest.raises(AdapterError, match="full .100, 64. copy"):
        check_vllm_adapter(load_adapter_spec("head", full_head), base_vocab_size=100)


# -- engine arguments ------------------------------------------------------------------------------


def tiny_model(tmp_path: Path, max_pos: int = 2048) -> Path:
    cfg = {
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
        "max_position_embeddings": max_pos, "vocab_size": 100,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_engine_kwargs_on_cpu_use_float32_and_a_kv_budget_for_max_num_seqs(tmp_path):
    model = tiny_model(tmp_path)
    cfg = ServeConfig(engine="vllm", max_num_seqs=4, tensor_parallel_size=2, enforce_eager=True)
    kw = build_engine_kwargs(cfg, model, [], on_gpu=False)
    assert kw["dtype"] == "float32" and kw["max_model_len"] == 2048 and kw["enable_lora"] is False
    assert (kw["tensor_parallel_size"], kw["enforce_eager"], kw["max_num_seqs"]) == (2, True, 4)
    per_token = 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head dim x fp32
    assert kw["kv_cache_memory_bytes"] == max(64 * 2**20, int(per_token * 2048 * 4 * 1.1))
    assert "gpu_memory_utilization" not in kw
    # The step token cap is vLLM's own unless set; our engine's scheduling settings are not vLLM's.
    assert "max_num_batched_tokens" not in kw
    kw = build_engine_kwargs(cfg.model_copy(update={"max_num_batched_tokens": 256}), model, [], on_gpu=False)
    assert kw["max_num_batched_tokens"] == 256


def test_engine_kwargs_on_gpu_pass_memory_settings_and_clamp_the_context(tmp_path):
    model = tiny_model(tmp_path, max_pos=1024)
    cfg = ServeConfig(engine="vllm", gpu_memory_utilization=0.5, max_model_len=8192, kv_cache_memory_gb=2)
    kw = build_engine_kwargs(cfg, model, [], on_gpu=True)
    assert kw["dtype"] == "auto" and kw["gpu_memory_utilization"] == 0.5
    assert kw["max_model_len"] == 1024 and kw["kv_cache_memory_bytes"] == 2 * 2**30


# -- structured outputs ----------------------------------------------------------------------------


def test_constraints_map_onto_vllm_structured_outputs():
    from serve.engine.vllm import structured_outputs_kwargs
    from serve.structured.spec import OutputConstraint
    from serve.tools.formats import FORMATS

    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    assert structured_outputs_kwargs(None) is None
    kw = structured_outputs_kwargs(OutputConstraint.json_schema(schema, "p"))
    assert json.loads(kw["json"]) == schema and list(json.loads(kw["json"])["properties"]) == ["b", "a"]
    assert structured_outputs_kwargs(OutputConstraint.json_object("p")) == {
        "disable_any_whitespace": False,
        "json_object": True,
    }
    assert structured_outputs_kwargs(OutputConstraint.choice(["x", "y"], "p"))["choice"] == ["x", "y"]
    assert structured_outputs_kwargs(OutputConstraint.regex("a+", "p").compacted()) == {
        "disable_any_whitespace": True,
        "regex": "a+",
    }
    assert (
        structured_outputs_kwargs(OutputConstraint.grammar('root ::= "a"', "p"))["grammar"] == 'root ::= "a"'
    )
    tag = FORMATS["hermes"].forced_tag([{"type": "function", "function": {"name": "f"}}], parallel=True)
    kw = structured_outputs_kwargs(OutputConstraint.structural_tag(tag, "tool_choice"))
    # vLLM >= 0.11 passes a JSON string with "format" straight to xgrammar's compile_structural_tag.
    assert json.loads(kw["structural_tag"])["format"]["type"] == "tags_with_separator"
