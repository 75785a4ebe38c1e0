"""Write a merged HF checkpoint as one GGUF file with the `gguf` package (llama.cpp's own writer).

Supports the Llama family (LlamaForCausalLM, MistralForCausalLM: llama.cpp's `llama` architecture, with
Q/K rows permuted as llama.cpp expects) and Qwen2 (`qwen2`, with attention biases). Tensor names come
from gguf's tensor name maps; f32/f16/bf16/q8_0 from gguf's quantisers (1-D tensors stay f32, q8_0
falls back to f16 for rows not divisible by 32). Metadata carries the hyper-parameters, the tokenizer
(byte-level BPE as `gpt2`, SentencePiece-style as `llama` with scores and byte tokens), special token
ids, the EOS the chat template ends a turn with, and the chat template itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serve.cli_runner import UserError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType values


class GGUFExportError(UserError, ValueError):
    """The checkpoint cannot be written as GGUF; the message says why and what is supported."""


@dataclass
class GGUFResult:
    path: Path
    qtype: str
    size_bytes: int
    tensor_types: dict[str, int]  # GGML type name -> tensor count


def read_config(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise GGUFExportError(
            f"{model_dir / 'config.json'}: architecture {arch!r} has no GGUF export; supported: "
            f"{', '.join(sorted(ARCHITECTURES))} (export without --gguf to get the merged safetensors only)"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise GGUFExportError(
            f"{model_dir / 'config.json'}: rope scaling {rope_type!r} is not supported by the GGUF export "
            "(only unscaled RoPE); export without --gguf"
        )
    if ARCHITECTURES[arch] == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise GGUFExportError(
            f"{model_dir / 'config.json'}: Llama with attention/MLP biases is not supported"
        )
    return config


def write_gguf(
    model_dir: Path, out_path: Path, qtype: str, *, eos_id: int | None = None, name: str | None = None
) -> GGUFResult:
    """Write `model_dir` (a float32 HF checkpoint with tokenizer) to `out_path` as `qtype`."""
    import gguf

    if qtype not in FILE_TYPES:
        raise GGUFExportError(f"GGUF type {qtype!r} is not supported; choose one of {', '.join(FILE_TYPES)}")
    config = read_config(model_dir)
    hf_arch = config["architectures"][0]
    arch = ARCHITECTURES[hf_arch]
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_name(name or model_dir.name)
    writer.add_type("model")
    _add_hparams(writer, config, FILE_TYPES[qtype])
    vocab_size = int(config["vocab_size"])
    _add_tokenizer(writer, model_dir, arch, vocab_size, eos_id)
    counts = _add_tensors(writer, model_dir, config, arch, qtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFResult(out_path, qtype, out_path.stat().st_size, counts)


def _add_hparams(writer, config: dict, file_type: int) -> None:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)


def _permute(weights, n_head: int, n_head_kv: int | None = None):
    # llama.cpp's convert_hf_to_gguf.LlamaModel.permute: HF's rotate-half layout -> interleaved pairs.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _quantise(data, qtype: str):
    """(array, raw_dtype) for add_tensor: 1-D stays f32; q8_0 needs rows divisible by 32, else f16."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    data = data.astype(np.float32)
    if data.ndim == 1 or qtype == "f32":
        return data, None
    if qtype == "f16" or (qtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), None
    raw = Q.BF16 if qtype == "bf16" else Q.Q8_0
    return quantize(data, raw), raw


def _add_tensors(writer, model_dir: Path, config: dict, arch: str, qtype: str) -> dict[str, int]:
    import gguf
    from safetensors import safe_open

    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(model_arch, int(config["num_hidden_layers"]))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    counts: dict[str, int] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir} has no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="np") as f:
            for key in f.keys():
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                base, _, suffix = key.rpartition(".")
                gguf_name = name_map.get_name(base)
                if gguf_name is None:
                    raise GGUFExportError(
                        f"{file}: tensor {key!r} has no GGUF name for architecture {arch!r}"
                    )
                data = f.get_tensor(key)
                if arch == "llama" and base.endswith("self_attn.q_proj"):
                    data = _permute(data, heads, heads)
                elif arch == "llama" and base.endswith("self_attn.k_proj"):
                    data = _permute(data, heads, kv_heads)
                array, raw = _quantise(data, qtype)
                writer.add_tensor(f"{gguf_name}.{suffix}", array, raw_dtype=raw)
                tname = (
                    raw.name if raw is not None else {"float32": "F32", "float16": "F16"}[array.dtype.name]
                )
                counts[tname] = counts.get(tname, 0) + 1
    return counts


def _add_tokenizer(writer, model_dir: Path, arch: str, vocab_size: int, eos_id: int | None) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    model = tok_json["model"]
    layout = json.dumps([tok_json.get("normalizer"), tok_json.get("pre_tokenizer"), tok_json.get("decoder")])
    byte_level = "ByteLevel" in layout
    if model["type"] not in ("BPE", "Unigram") or (model["type"] == "Unigram" and byte_level):
        raise GGUFExportError(
            f"{model_dir / 'tokenizer.json'}: tokenizer model {model['type']!r} is not supported "
            "(byte-level BPE or SentencePiece BPE/Unigram)"
        )
    kind = "gpt2" if byte_level else "llama"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    if model["type"] == "Unigram":
        vocab = {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
        unigram_scores = [score for _piece, score in model["vocab"]]
    else:
        vocab = dict(model["vocab"])
        unigram_scores = None
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    by_id = {i: piece for piece, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(
            f"{model_dir}: tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}"
        )
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        piece = by_id.get(i)
        if piece is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        tokens.append(piece)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif kind == "llama" and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(unigram_scores[i] if unigram_scores else (-1000.0 if i in added else -float(i)))

    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json, arch) if kind == "gpt2" else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores(scores)
        writer.add_add_space_prefix("Prepend" in layout or '"prepend_scheme": "first"' in layout)
    merges = model.get("merges") or []
    if merges:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for setter, tid in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, eos_id if eos_id is not None else tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if tid is not None:
            setter(int(tid))
    if eos_id is not None:
        writer.add_eot_token_id(int(eos_id))
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def is_byte_level(model_dir: Path) -> bool:
    """True for GPT-2 style byte-level BPE (GGUF `gpt2`), False for SentencePiece style (`llama`)."""
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    return "ByteLevel" in json.dumps([tok_json.get("pre_tokenizer"), tok_json.get("decoder")])


def _pre_tokenizer_name(tok_json: dict, arch: str) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer (it picks the split regex from this)."""
    if arch == "qwen2":
        return "qwen2"
    text = json.dumps(tok_json.get("pre_tokenizer"))
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in text:
        return "llama-bpe"
    if '"individual_digits": true' in text:
        return "smollm"
    return "gpt-2"
