"""Tiny random checkpoints with small real tokenizers, for testing each GGUF architecture and tokenizer kind.

`byte_bpe_tokenizer` trains a GPT-2 style byte-level BPE (ChatML specials at ids 0-2); `spm_tokenizer`
trains a SentencePiece BPE model with byte fallback (Llama/Mistral style, `<unk> <s> </s>`).
Both train in well under a second on a few sentences, so the GGUF round trip stays fast.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The capital of France is Paris.",
    "Write one sentence about the sea.",
    "What is the capital of France? The sea is blue and wide.",
    "Hello, how are you today? I am a small model.",
    "Numbers like 12345 and words like tokenizer, merges and vocabulary.",
] * 20
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def byte_bpe_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return out


def spm_tokenizer(out: Path) -> Path:
    """Train a SentencePiece BPE model and lay it out as Llama 2's tokenizer.json does."""
    import io

    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    extracted = SentencePieceExtractor(str(out / "tokenizer.model")).extract(models.BPE)
    vocab, merges = extracted["vocab"], extracted["merges"]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = MISTRAL
    fast.save_pretrained(out)
    return out


def tiny_checkpoint(arch: str, tokenizer_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """A random 2-layer `arch` ("llama", "mistral", "qwen2") checkpoint using `tokenizer_dir`'s tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=arch != "mistral",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # Qwen2's q/k/v biases start at zero; make them matter
                param.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out
