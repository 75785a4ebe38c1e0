"""llama.cpp LoRA GGUF export: the file's metadata and tensors read back with gguf's reader, its
alpha/rank x B@A equals what PEFT merges into our own base GGUF's tensors (names, q/k permutation,
rsLoRA and rank/alpha patterns included), adapters llama.cpp cannot take are refused naming the folder,
and a real `llama-server --lora` greedy-decodes the PEFT model's tokens (slow; skipped, naming
`make llama-cpp`, when llama.cpp is not built)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.export.tiny_models import tiny_checkpoint
from train.export.gguf_lora import GgufLoraError, lora_gguf_for, main, write_lora_gguf
from train.export.gguf_writer import _permute, write_gguf

LAYERS = 2
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def peft_adapter(base_dir: Path, out: Path, *, seed: int = 0, scale: float = 0.05, **lora) -> Path:
    """A PEFT LoRA adapter for `base_dir` with any LoraConfig options and random non-zero lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": list(TARGETS), **lora})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, list[int]]]:
    """(metadata, tensors as numpy arrays in row-major (out, in) order, ggml ne shapes)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    return fields, tensors, shapes


def merged_deltas(base_dir: Path, base_gguf: Path, adapter_dir: Path, tmp: Path) -> dict[str, np.ndarray]:
    """Per base GGUF tensor: PEFT's merged weights minus the base, both through our GGUF writer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged_dir = tmp / "merged"
    shutil.copytree(base_dir, merged_dir)
    merged.save_pretrained(merged_dir, safe_serialization=True)
    write_gguf(merged_dir, tmp / "merged.gguf", "f32")
    _, base, _ = read_gguf(base_gguf)
    _, after, _ = read_gguf(tmp / "merged.gguf")
    return {name: after[name].astype(np.float64) - base[name] for name in base}


def lora_deltas(path: Path) -> dict[str, np.ndarray]:
    """What llama.cpp adds to each base tensor at scale 1: alpha/rank x B@A."""
    fields, tensors, _ = read_gguf(path)
    alpha = fields["adapter.lora.alpha"]
    out = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            a, b = tensors[name].astype(np.float64), tensors[f"{base}.lora_b"].astype(np.float64)
            out[base] = alpha / a.shape[0] * (b @ a)
    return out


@pytest.fixture(scope="module")
def small_qwen2(tmp_path_factory, small_tokenizers) -> Path:
    return tiny_checkpoint("qwen2", small_tokenizers["bpe"], tmp_path_factory.mktemp("small-qwen2"))


@pytest.fixture(scope="module")
def base_ggufs(tmp_path_factory, small_llama, small_qwen2) -> dict[str, tuple[Path, Path]]:
    """arch -> (checkpoint, its f32 GGUF from our writer)."""
    root = tmp_path_factory.mktemp("base-gguf")
    out = {}
    for arch, ckpt in (("llama", small_llama), ("qwen2", small_qwen2)):
        write_gguf(ckpt, root / f"{arch}.gguf", "f32")
        out[arch] = (ckpt, root / f"{arch}.gguf")
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_metadata_names_shapes_and_deltas_match_peft_merged_into_our_base_gguf(tmp_path, base_ggufs, arch):
    base_dir, base_gguf = base_ggufs[arch]
    adapter = peft_adapter(base_dir, tmp_path / "adapter", seed=1)
    out = tmp_path / "lora.gguf"
    write_lora_gguf(adapter, base_dir, out)

    fields, tensors, shapes = read_gguf(out)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == arch
    assert fields["general.name"] == "adapter"
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)  # alpha/rank = 16/8 = PEFT's lora_alpha/r
    expected = {
        f"blk.{i}.{n}.weight.{ab}" for i in range(LAYERS) for n in GGUF_NAMES for ab in ("lora_a", "lora_b")
    }
    assert set(tensors) == expected

    # llama-adapter.cpp's checks, against the base GGUF's ggml shapes (ne = [in, out]).
    _, _, base_shapes = read_gguf(base_gguf)
    for name in {n.rpartition(".")[0] for n in expected}:
        a, b, w = shapes[f"{name}.lora_a"], shapes[f"{name}.lora_b"], base_shapes[name]
        assert (a[0], b[1], a[1], b[0]) == (w[0], w[1], 8, 8), name

    want = merged_deltas(base_dir, base_gguf, adapter, tmp_path)
    got = lora_deltas(out)
    assert set(got) == {n for n in want if np.abs(want[n]).max() > 0}  # exactly the adapted tensors
    for name, delta in got.items():
        assert np.abs(delta).max() > 1e-3, name  # the adapter matters
        np.testing.assert_allclose(delta, want[name], atol=1e-6, err_msg=name)
    if arch == "llama":  # the same comparison fails without the q/k row permutation: the test sees it
        from safetensors.numpy import load_file

        peft = load_file(adapter / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.k_proj.lora_{}.weight"
        unpermuted = 2.0 * peft[key.format("B")].astype(np.float64) @ peft[key.format("A")]
        assert not np.allclose(unpermuted, want["blk.0.attn_k.weight"], atol=1e-4)
        np.testing.assert_allclose(_permute(unpermuted, 4, 2), want["blk.0.attn_k.weight"], atol=1e-6)


@pytest.mark.parametrize(
    ("lora", "alpha"),
    [
        ({"use_rslora": True}, 16 * math.sqrt(8)),  # PEFT: 16/sqrt(8) = alpha/rank with alpha = 16*sqrt(8)
        ({"rank_pattern": {"v_proj": 4}}, 16.0),  # alpha/r is per module rank in both: nothing to fold
        ({"alpha_pattern": {"o_proj": 64, "down_proj": 4}}, 16.0),  # o/down's other ratio folded into B
        ({"r": 4, "lora_alpha": 32, "rank_pattern": {"k_proj": 2}, "use_rslora": True}, None),
    ],
)
def test_scaling_matches_peft(tmp_path, base_ggufs, lora, alpha):
    base_dir, base_gguf = base_ggufs["llama"]
    adapter = peft_adapter(base_dir, tmp_path / "adapter", seed=2, **lora)
    out = tmp_path / "lora.gguf"
    write_lora_gguf(adapter, base_dir, out)
    fields, tensors, _ = read_gguf(out)
    if alpha is not None:
        assert fields["adapter.lora.alpha"] == pytest.approx(alpha)
    for module, rank in lora.get("rank_pattern", {}).items():
        name = GGUF_NAMES[TARGETS.index(module)]
        assert tensors[f"blk.1.{name}.weight.lora_a"].shape[0] == rank
    want = merged_deltas(base_dir, base_gguf, adapter, tmp_path)
    for name, delta in lora_deltas(out).items():
        np.testing.assert_allclose(delta, want[name], atol=1e-6, err_msg=name)


def test_half_precision_types_stay_close(tmp_path, small_llama, small_llama_adapter):
    import gguf

    f32, f16 = tmp_path / "f32.gguf", tmp_path / "f16.gguf"
    write_lora_gguf(small_llama_adapter, small_llama, f32)
    write_lora_gguf(small_llama_adapter, small_llama, f16, "f16")
    reader = gguf.GGUFReader(f16)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    ref, got = lora_deltas(f32), lora_deltas(f16)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-3 * np.abs(ref[name]).max(), err_msg=name)


def _copy(adapter: Path, dst: Path, **config) -> Path:
    shutil.copytree(adapter, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return dst


# case: (LoraConfig options, what the refusal names, what it names once adapter_config.json hides the option)
REAL_REFUSALS = {
    "dora": ({"use_dora": True}, "DoRA", "DoRA magnitude"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save", "lm_head"),
    "lora_bias": ({"lora_bias": True}, "lora_bias", "lora_B.bias is a trained bias"),
    "trainable_tokens": ({"trainable_token_indices": [1, 2]}, "trainable_token_indices", "embeddings"),
    "lm_head": ({"target_modules": ["q_proj", "lm_head"]}, "lm_head", None),
    "embeddings": ({"target_modules": ["q_proj", "embed_tokens"]}, "embeddings", None),
    "bias_all": ({"bias": "all"}, r"k_proj\.bias is a trained bias", None),  # Qwen2's q/k/v biases
}
PEFT_DEFAULTS = {
    "use_dora": False,
    "modules_to_save": None,
    "lora_bias": False,
    "trainable_token_indices": None,
}


@pytest.mark.parametrize("case", sorted(REAL_REFUSALS))
def test_adapters_llama_cpp_cannot_apply_are_refused_naming_the_folder(
    tmp_path, small_llama, small_qwen2, case
):
    lora, match, tensor_match = REAL_REFUSALS[case]
    base = small_qwen2 if case == "bias_all" else small_llama
    adapter = peft_adapter(base, tmp_path / case, r=4, **{"target_modules": ["q_proj"], **lora})
    out = tmp_path / "lora.gguf"
    with pytest.raises(GgufLoraError, match=match) as err:
        write_lora_gguf(adapter, base, out)
    assert str(adapter) in str(err.value) and "llm-export --adapter" in str(err.value)
    assert not out.exists()
    if tensor_match:  # the weights alone give it away too, whatever adapter_config.json says
        hidden = _copy(adapter, tmp_path / f"{case}-hidden", **PEFT_DEFAULTS)
        with pytest.raises(GgufLoraError, match=tensor_match) as err:
            write_lora_gguf(hidden, base, out)
        assert str(hidden) in str(err.value)


def test_mismatched_and_broken_adapters_are_refused_naming_the_folder(
    tmp_path, small_llama, small_llama_adapter
):
    from safetensors.numpy import load_file, save_file

    def refused(adapter: Path, match: str, base: Path = small_llama) -> str:
        with pytest.raises(GgufLoraError, match=match) as err:
            write_lora_gguf(adapter, base, tmp_path / "lora.gguf")
        assert str(adapter) in str(err.value)
        return str(err.value)

    # A base whose k_proj is wider than the one the adapter was trained on (as if no GQA).
    other = _copy(small_llama_adapter, tmp_path / "other-base")
    weights = load_file(other / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    weights[key] = np.concatenate([weights[key], weights[key]])
    save_file(weights, other / "adapter_model.safetensors")
    assert "trained on another base" in refused(
        other, r"layers\.1\.self_attn\.k_proj is a \(64 x 64\) rank-8"
    )

    gpt2 = tmp_path / "gpt2-base"
    shutil.copytree(small_llama, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    msg = refused(
        small_llama_adapter, "GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM", gpt2
    )
    assert "llm-export --adapter" in msg

    refused(_copy(small_llama_adapter, tmp_path / "zero", lora_alpha=0), "lora_alpha is 0")
    refused(_copy(small_llama_adapter, tmp_path / "rank", r=16), "gives rank 16 but the weights have rank 8")
    refused(_copy(small_llama_adapter, tmp_path / "alora", alora_invocation_tokens=[5, 6]), "activated LoRA")
    refused(_copy(small_llama_adapter, tmp_path / "ia3", peft_type="IA3"), "peft_type is 'IA3'")
    pickled = _copy(small_llama_adapter, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    refused(pickled, "adapter_model.safetensors is missing")
    with pytest.raises(GgufLoraError, match="q4_k"):
        write_lora_gguf(small_llama_adapter, small_llama, tmp_path / "x.gguf", "q4_k")


def test_cache_rewrites_only_when_the_adapter_changes(tmp_path, small_llama, small_llama_adapter):
    adapter = tmp_path / "adapter"
    shutil.copytree(small_llama_adapter, adapter)
    cache = tmp_path / "cache"
    first = lora_gguf_for(adapter, small_llama, cache)
    written = first.stat().st_mtime_ns
    assert lora_gguf_for(adapter, small_llama, cache) == first and first.stat().st_mtime_ns == written
    weights = adapter / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = lora_gguf_for(adapter, small_llama, cache)
    assert second != first and second.is_file() and not first.exists()
    assert [p.name for p in cache.iterdir()] == [second.name]  # no temporary files left behind


def test_cli_writes_and_refuses_to_overwrite(tmp_path, small_llama, small_llama_adapter, capsys):
    out = tmp_path / "a.gguf"
    assert main([str(small_llama_adapter), "--out", str(out), "--base", str(small_llama)]) == 0
    assert read_gguf(out)[0]["general.type"] == "adapter"
    assert main([str(small_llama_adapter), "--out", str(out), "--base", str(small_llama)]) == 2
    assert "--overwrite" in capsys.readouterr().err


NEW_TOKENS = 16


def top2_margin(logits, prompt_len: int) -> float:
    """The smallest gap between the best and second-best logit over the generated positions."""
    top = logits[prompt_len - 1 : -1].topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


@pytest.mark.slow
def test_llama_server_with_the_lora_decodes_the_peft_models_tokens(tmp_path, default_model):
    """Real llama.cpp: base GGUF + our LoRA GGUF, applied per request, against PEFT on the same prompt."""
    import httpx
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve import llama_server
    from serve.bench import peers
    from tests.helpers.adapters import make_lora_adapter
    from train.export.verify import greedy, logits, render_prompts

    binary = llama_server.server_binary()
    if binary is None:
        pytest.skip(llama_server.missing_reason())
    base_dir = default_model.path
    # lora_B ~ N(0, 0.05): the first prompt's reply changes ("Paris." -> "Paris, also known as ...").
    adapter = make_lora_adapter(base_dir, tmp_path / "adapter", seed=0, scale=0.05)
    base_gguf, lora_gguf = tmp_path / "base-f32.gguf", tmp_path / "lora-f32.gguf"
    write_gguf(base_dir, base_gguf, "f32")
    write_lora_gguf(adapter, base_dir, lora_gguf)

    tok = AutoTokenizer.from_pretrained(base_dir)
    prompt = render_prompts(tok, tok.chat_template)[0]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter
    )
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    with_lora = greedy(model, prompt, NEW_TOKENS, eos)
    with model.disable_adapter():
        without = greedy(model, prompt, NEW_TOKENS, eos)
        base_margin = top2_margin(logits(model, prompt + without), len(prompt))
    lora_margin = top2_margin(logits(model, prompt + with_lora), len(prompt))
    assert with_lora != without  # the adapter changes the greedy reply
    # No near-ties on either path (measured: 0.08 base, 0.16 LoRA), far above f32 summation-order noise.
    assert min(base_margin, lora_margin) > 0.02, (base_margin, lora_margin)

    port = peers.free_port()
    cmd = llama_server.server_command(
        binary, base_gguf, port, threads=2, parallel=1, ctx_per_seq=512, alias="base"
    )
    cmd += ["--lora", str(lora_gguf), "--lora-init-without-apply"]
    spec = peers.ServerSpec(
        name="llama-server", cmd=cmd, port=port, ready_path="/health", start_timeout_s=120
    )
    with peers.ServerProcess(spec, tmp_path / "llama-server.log") as proc:
        proc.wait_ready()
        loaded = httpx.get(f"{spec.base_url}/lora-adapters", timeout=30).json()

        def complete(lora: list[dict]) -> list[int]:
            body = {"prompt": prompt, "n_predict": NEW_TOKENS, "temperature": 0, "top_k": 1, "lora": lora,
                    "return_tokens": True, "cache_prompt": False}  # fmt: skip
            return httpx.post(f"{spec.base_url}/completion", json=body, timeout=120).json()["tokens"]

        got_lora = complete([{"id": 0, "scale": 1.0}])
        got_base = complete([{"id": 0, "scale": 0.0}])
        # In this llama.cpp, --lora-init-without-apply only skips applying at start-up: a request that
        # names no adapter ("lora": [] or none) gets the --lora scale, 1.0, not the base model.
        got_default = complete([])
    assert [(a["id"], a["path"]) for a in loaded] == [(0, str(lora_gguf))]
    assert got_default == got_lora and got_lora != got_base
    # f32 on both sides, the same arithmetic up to summation order: every greedy token agrees.
    strip = lambda ids: ids[:-1] if ids and ids[-1] in eos else ids  # noqa: E731 - llama.cpp omits the EOS
    assert got_lora[: len(strip(with_lora))] == strip(with_lora), (
        tok.decode(got_lora),
        tok.decode(with_lora),
    )
    assert got_base[: len(strip(without))] == strip(without), (tok.decode(got_base), tok.decode(without))
