"""The native Llama-family decoder against transformers+PEFT, and the matmul layouts under it.

Each architecture it covers (Llama with scaled RoPE, Mistral, Qwen2 with q/k/v biases) is checked
numerically: prompt log-probabilities of a mixed base+adapter batch within 1e-4 of PEFT's full
forward, and greedy continuations token for token. Models it does not cover fall back to
transformers' code under `model_impl=auto` and are refused under `model_impl=native`.
"""

from __future__ import annotations

import pytest
import torch

from serve.engine.gemm import Dense, tune_single_row
from serve.engine.types import SamplingParams
from tests.helpers.adapters import make_lora_adapter
from tests.helpers.models import make_tiny_model
from tests.serve.test_engine_hf import make_engine, reference_greedy, reference_model, run_mixed

LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
}  # fmt: skip
CASES = {
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2-bias": ("qwen2", {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model_and_adapters(request, real_tokenizer_dir, tmp_path_factory):
    arch, overrides = CASES[request.param]
    root = tmp_path_factory.mktemp(f"native-{request.param}")
    model_dir = make_tiny_model(real_tokenizer_dir, root / "model", arch=arch, seed=3, **overrides)
    adapters = {
        "all": make_lora_adapter(model_dir, root / "all", seed=1, scale=0.3),
        "qv": make_lora_adapter(model_dir, root / "qv", seed=2, scale=0.3, targets=("q_proj", "v_proj")),
    }
    return model_dir, adapters


def test_native_matches_peft(model_and_adapters):
    model_dir, adapters = model_and_adapters
    prompts = ["The quick brown fox jumps over the lazy dog", "用四郎的口吻回答问题", "1 2 3 4 5 6 7 8 9 10"]
    n = 8
    params = SamplingParams(max_tokens=n, temperature=0, prompt_logprobs=0)
    runs = run_mixed(model_dir, adapters, prompts, (None, "all", "qv"), params, "native")
    refs = {name: reference_model(model_dir, adapters.get(name)) for name in (None, "all", "qv")}
    for adapter, ids, (toks, outs) in runs:
        with torch.no_grad():
            logprobs = torch.log_softmax(refs[adapter](torch.tensor([ids])).logits[0], -1)
        got = [lp.logprob for lp in outs[0].prompt_logprobs[1:]]
        want = [logprobs[j - 1, ids[j]].item() for j in range(1, len(ids))]
        assert got == pytest.approx(want, abs=1e-4), f"adapter={adapter}"
        assert toks == reference_greedy(refs[adapter], ids, n), f"adapter={adapter} prompt={ids}"
    # The adapters change the outputs, or the comparison above proves little.
    assert len({tuple(toks) for _, _, (toks, _) in runs[:3]}) == 3


def test_uncovered_model_falls_back_or_is_refused(real_tokenizer_dir, tmp_path):
    model_dir = make_tiny_model(
        real_tokenizer_dir, tmp_path / "dyn", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                "factor": 2.0},
    )  # fmt: skip
    auto = make_engine(model_dir, {}, max_num_seqs=2)
    auto.load()
    assert auto.impl == "transformers" and auto.native is None
    native = make_engine(model_dir, {}, max_num_seqs=2, model_impl="native")
    with pytest.raises(ValueError, match="rope_type=dynamic"):
        native.load()


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 200])
@pytest.mark.parametrize("transposed_copy", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_dense_formulations_agree(rows, transposed_copy, padded):
    torch.manual_seed(0)
    lead_rows, weight, bias, x = (
        torch.randn(8, 40),
        torch.randn(96, 40),
        torch.randn(96),
        torch.randn(rows, 40),
    )
    dense = Dense(torch.cat([lead_rows, weight]), bias, lead=8)
    if transposed_copy:
        dense.set_transposed(dense.weight.t().contiguous())
    if padded:  # every row count runs with 8 more rows of zeros (as tune_row_padding may choose)
        dense.pad_to = [m + 8 if m > 1 else m for m in range(300)]
    y = dense(x)
    assert y.shape == (rows, 96)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    full, transposed = dense.with_lead(x)
    full = full.t() if transposed else full
    torch.testing.assert_close(full, x @ dense.weight.t(), rtol=1e-5, atol=1e-5)


def test_row_padding_tables_only_pad_upwards_within_reach(caplog):
    import logging

    from serve.engine.gemm import PAD_REACH, SMALL_M, tune_row_padding

    denses = [Dense(torch.randn(256, 64)) for _ in range(2)] + [Dense(torch.randn(128, 96))]
    with caplog.at_level(logging.INFO, logger="serve.engine.gemm"):
        padded = tune_row_padding(denses, repeats=1)
    assert set(padded) == {(256, 64), (128, 96)}
    assert denses[0].pad_to is denses[1].pad_to  # one table per shape
    for d in denses:
        table = d.pad_to
        assert len(table) == SMALL_M + 1 and table[:2] == [0, 1]
        assert all(m <= table[m] <= min(m + PAD_REACH, SMALL_M) for m in range(2, SMALL_M + 1))
    assert "row counts run padded" in caplog.text
    # Whatever was chosen, the outputs are those of the unpadded matmul.
    for rows in (2, 7, 15, 33, 127):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(denses[2](x), x @ denses[2].weight.t(), rtol=1e-5, atol=1e-5)


def test_tuning_respects_the_memory_cap():
    denses = [Dense(torch.randn(512, 64)) for _ in range(3)]
    assert tune_single_row(denses, max_extra_bytes=0) == 0
    assert all(d.weight_t is None for d in denses)
    added = tune_single_row(denses, max_extra_bytes=1 << 30)
    kept = [d for d in denses if d.weight_t is not None]
    assert added == sum(d.weight.numel() * 4 for d in kept)
    for d in kept:
        assert torch.equal(d.weight_t, d.weight.t())


def _edited_adapter(src, dst, edit):
    """A copy of the adapter at `src` whose tensors went through `edit(dict) -> dict`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file(edit(tensors), str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_adapter_that_does_not_fit_is_refused(tiny_model_dir, tmp_path, impl):
    from serve.engine.lora import LoRALoadError

    good = make_lora_adapter(tiny_model_dir, tmp_path / "good", seed=0)

    def shrink_one_a(tensors):
        key = next(k for k in tensors if "q_proj.lora_A" in k)
        return {**tensors, key: tensors[key][:, :-1].contiguous()}

    bad = _edited_adapter(good, tmp_path / "bad", shrink_one_a)
    engine = make_engine(tiny_model_dir, {"bad": bad}, max_num_seqs=2, model_impl=impl)
    with pytest.raises(LoRALoadError, match=r"'bad'.*q_proj has A .* wrong base model"):
        engine.load()


def test_native_refuses_lora_outside_the_projections(tiny_model_dir, tmp_path):
    from serve.engine.lora import LoRALoadError

    good = make_lora_adapter(tiny_model_dir, tmp_path / "good", seed=0, targets=("q_proj",))

    def move_to_lm_head(tensors):
        return {k.replace("model.layers.0.self_attn.q_proj", "lm_head"): v for k, v in tensors.items()}

    bad = _edited_adapter(good, tmp_path / "head", move_to_lm_head)
    engine = make_engine(tiny_model_dir, {"head": bad}, max_num_seqs=2, model_impl="native")
    with pytest.raises(LoRALoadError, match="no LoRA-capable Linear 'lm_head'.*llm-export"):
        engine.load()
