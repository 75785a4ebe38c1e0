"""`--quantize int8`: the int8 matmul against float, adapters against PEFT, drift on the real model.

The int8 decoder is not exact, so every check is a bound: the matmul within its quantization step,
a mixed base+adapter batch within a small tolerance of PEFT's full forward (far below what the
adapters change), and on the default model the logit drift and top-1 agreement with the float model
that the README quotes.
"""

from __future__ import annotations

import pytest
import torch

from serve.config import ConfigError, load_config
from serve.engine.gemm import INT8_KERNEL_MAX_ROWS, Int8Dense, quantize_int8
from serve.engine.types import SamplingParams
from tests.helpers.adapters import make_lora_adapter
from tests.serve.test_engine_hf import make_engine, reference_model, run_all


def test_quantized_weights_are_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1)  # rows of different ranges
    w[3, 5] = 9.0  # an outlier sets its row's scale
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    step = scale.float().unsqueeze(1)
    assert ((q.float() * step - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", sorted({1, 2, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 16, 200}))
@pytest.mark.parametrize("kernel_max_rows", [INT8_KERNEL_MAX_ROWS, 0, float("inf")])
def test_int8_dense_matches_its_dequantized_weight(rows, kernel_max_rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 128) * 0.05, torch.randn(96), torch.randn(rows, 128)
    dense = Int8Dense(w, b)
    dense.kernel_max_rows = kernel_max_rows  # either path, whatever tune_int8_rows would choose
    y = dense(x)
    assert y.shape == (rows, 96) and y.dtype == torch.float32
    deq = dense.qweight.float() * dense.scale.float().unsqueeze(1)
    # Only bf16 rounding of the activations and of the output separates it from the float math.
    torch.testing.assert_close(y, torch.nn.functional.linear(x, deq, b), rtol=2e-2, atol=3e-2)
    # ... and the int8 itself stays close to the float weight it came from.
    assert (y - torch.nn.functional.linear(x, w, b)).abs().max() < 0.1


def test_int8_row_tuning_picks_the_faster_path_per_shape(caplog):
    import logging

    from serve.engine.gemm import INT8_TUNE_ROWS, tune_int8_rows

    torch.manual_seed(0)
    denses = [Int8Dense(torch.randn(256, 128)) for _ in range(2)] + [Int8Dense(torch.randn(64, 256))]
    with caplog.at_level(logging.INFO, logger="serve.engine.gemm"):
        chosen = tune_int8_rows(denses, repeats=1)
    assert set(chosen) == {(256, 128), (64, 256)}
    assert denses[0].kernel_max_rows == denses[1].kernel_max_rows == chosen[(256, 128)]
    for limit in chosen.values():  # 1 (bf16 already wins at 2 rows), a tuned count, or no limit
        assert limit in (1, *INT8_TUNE_ROWS, float("inf"))
    assert "int8 kernel up to" in caplog.text


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"engine": "vllm"}, "hf and llama-cpp engines"),
        ({"model_impl": "transformers"}, "native decoder"),
        ({"device": "cuda"}, "CPU only"),
        ({"quantize": "int4"}, "quantize"),
    ],
)
def test_quantize_settings_that_cannot_run_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"quantize": "int8", **settings})


def test_int8_with_mixed_adapters_stays_close_to_peft(tiny_model_dir, tmp_path):
    import asyncio

    from serve.engine.types import GenerationRequest

    adapters = {
        "a": make_lora_adapter(tiny_model_dir, tmp_path / "a", seed=1, scale=0.3),
        "qv": make_lora_adapter(
            tiny_model_dir, tmp_path / "qv", seed=2, scale=0.3, targets=("q_proj", "v_proj")
        ),
    }
    names = (None, "a", "qv")
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0)

    async def main():
        engine = make_engine(tiny_model_dir, adapters, max_num_seqs=8, quantize="int8")
        await engine.start()
        assert engine.impl == "native" and isinstance(engine.native.layers[0].qkv.dense, Int8Dense)
        ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog, 1 2 3 4 5")
        reqs = [GenerationRequest(f"r-{n}", ids, params, n) for n in names]  # one mixed batch
        results = await run_all(engine, reqs)
        await engine.shutdown()
        return ids, results

    ids, results = asyncio.run(main())
    worst = effect = 0.0
    base_ref = None
    for name, (_, outs) in zip(names, results, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(
                reference_model(tiny_model_dir, adapters.get(name))(torch.tensor([ids])).logits[0], -1
            )
        want = torch.tensor([ref[j - 1, ids[j]].item() for j in range(1, len(ids))])
        got = torch.tensor([lp.logprob for lp in outs[0].prompt_logprobs[1:]])
        worst = max(worst, float((got - want).abs().max()))
        base_ref = want if name is None else base_ref
        if name is not None:
            effect = max(effect, float((want - base_ref).abs().max()))
    assert worst < 0.02, f"int8 prompt logprobs differ from PEFT's by up to {worst:.4f}"
    assert effect > 10 * worst, f"the adapters change logprobs by {effect:.4f} only; the check proves little"


@pytest.mark.slow
def test_int8_drift_on_the_default_model():
    from serve.bench import quant_drift

    ref = quant_drift.load("default", "none", [])
    int8 = quant_drift.load("default", "int8", [])
    prompts = [quant_drift.chat_ids(ref.tokenizer, p) for p in quant_drift.PROMPTS[:3]]
    r = quant_drift.compare(ref, int8, prompts, 16)
    # Measured (8 prompts x 32 tokens): max 1.86, median 0.89 on logits spanning ~30; top-1 96.7%.
    assert r["max_abs_logit_diff"] < 4.0, r
    assert r["median_abs_logit_diff"] < 1.5, r
    assert r["top1_agreement"] > 0.9, r
    assert r["greedy_equal_prefix_mean"] >= 8, r


@pytest.mark.slow
@pytest.mark.e2e
def test_server_with_int8_answers_base_and_adapter(default_model, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import openai

    from tests.helpers.server import start_server

    llm_serve = str(Path(sys.executable).parent / "llm-serve")
    refused = subprocess.run(
        [llm_serve, "--quantize", "int8", "--model-impl", "transformers"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "quantize=int8 needs the native decoder" in refused.stderr
    adapter = make_lora_adapter(default_model.path, tmp_path / "persona", seed=3, scale=0.02)
    with start_server(["--quantize", "int8", "--adapter", f"persona={adapter}", "--max-num-seqs", "4"]) as s:
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="none", max_retries=0, timeout=300)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        replies = {
            model: client.chat.completions.create(
                model=model, messages=question, max_tokens=16, temperature=0
            )
            for model in ("SmolLM2-135M-Instruct", "persona")
        }
        assert "Paris" in replies["SmolLM2-135M-Instruct"].choices[0].message.content
        tuned = replies["persona"].choices[0].message.content
        assert replies["persona"].model == "persona" and tuned
        assert tuned != replies["SmolLM2-135M-Instruct"].choices[0].message.content  # the adapter applied
        assert "int8" in s.log()  # the load line says what runs
