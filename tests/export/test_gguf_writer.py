"""GGUF writer: each supported architecture and tokenizer kind round-trips through transformers' GGUF
loader with the same logits, tokens, EOS and chat template; unsupported inputs are clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.export.tiny_models import tiny_checkpoint
from train.export.gguf_writer import GGUFExportError, _permute, write_gguf
from train.export.verify import PROMPTS, load_gguf


def test_permute_is_undone_by_transformers_reverse_permute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    q = rng.standard_normal((4 * 16, 64)).astype(np.float32)  # 4 heads of dim 16
    k = rng.standard_normal((2 * 16, 64)).astype(np.float32)  # 2 KV heads
    reverse = LlamaTensorProcessor()._reverse_permute_weights
    assert not np.array_equal(_permute(q, 4, 4), q)
    np.testing.assert_array_equal(reverse(_permute(q, 4, 4), 4, 4), q)
    np.testing.assert_array_equal(reverse(_permute(k, 4, 2), 4, 2), k)


def _config_dir(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    d = _config_dir(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        GGUFExportError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    ):
        write_gguf(d, tmp_path / "x.gguf", "f16")


def test_scaled_rope_is_refused(tmp_path):
    d = _config_dir(tmp_path, architectures=["LlamaForCausalLM"], rope_parameters={"rope_type": "llama3"})
    with pytest.raises(GGUFExportError, match="rope scaling 'llama3'"):
        write_gguf(d, tmp_path / "x.gguf", "f32")


def test_unknown_type_is_refused(tmp_path):
    with pytest.raises(GGUFExportError, match="q4_k"):
        write_gguf(tmp_path, tmp_path / "x.gguf", "q4_k")


@pytest.mark.parametrize(
    ("arch", "tokenizer", "gguf_model"),
    [("qwen2", "bpe", "gpt2"), ("mistral", "spm", "llama"), ("llama", "spm", "llama")],
)
def test_round_trip_through_transformers(tmp_path, small_tokenizers, arch, tokenizer, gguf_model):
    import torch
    from gguf import GGUFReader, TokenType
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_checkpoint(arch, small_tokenizers[tokenizer], tmp_path / "model")
    path = tmp_path / "out" / "m-f32.gguf"
    path.parent.mkdir()
    result = write_gguf(src, path, "f32", eos_id=2)
    assert result.size_bytes == path.stat().st_size

    fields = GGUFReader(path).fields
    assert fields["general.architecture"].contents() == ("qwen2" if arch == "qwen2" else "llama")
    assert fields["tokenizer.ggml.model"].contents() == gguf_model
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[2] == TokenType.CONTROL
    if tokenizer == "spm":
        assert TokenType.BYTE in types and "tokenizer.ggml.scores" in fields

    model, gguf_tok = load_gguf(path)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(src)
    assert model.config.eos_token_id == 2
    assert gguf_tok.chat_template == ref_tok.chat_template
    for prompt in PROMPTS[:2]:
        ids = ref_tok(prompt, add_special_tokens=False)["input_ids"]
        assert gguf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
        with torch.no_grad():
            diff = (model(torch.tensor([ids])).logits - ref(torch.tensor([ids])).logits).abs().max()
        assert float(diff) < 1e-5
    if arch == "qwen2":  # the biases were written and read back (they are non-zero in the source)
        assert float(model.model.layers[0].self_attn.q_proj.bias.detach().abs().sum()) > 0


def test_quantised_types_shrink_and_stay_close(tmp_path, small_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.float32)
    ids = torch.tensor([AutoTokenizer.from_pretrained(small_llama)(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        want = ref(ids).logits
    sizes = {}
    for qtype in ("f32", "f16", "bf16", "q8_0"):
        d = tmp_path / qtype
        d.mkdir()
        result = write_gguf(small_llama, d / f"m-{qtype}.gguf", qtype)
        sizes[qtype] = result.size_bytes
        model, _ = load_gguf(result.path)
        with torch.no_grad():
            got = model(ids).logits
        assert float((got - want).abs().max()) < {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2}[qtype]
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]
