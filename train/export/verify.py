"""Numerical checks of an export: merged weights against base+adapters, and each GGUF read back.

`probe` runs fixed chat prompts (rendered with the export's chat template) through a model: greedy
tokens, then the logits over prompt+greedy tokens. `check_merged` compares a reloaded merged checkpoint
with the base+adapter probe (max |Δlogit| and identical greedy tokens); `check_gguf` loads a GGUF with
transformers' GGUF loader from a directory holding nothing else (so no config or tokenizer file beside
it can mask what the GGUF carries) and compares logits, top-1 agreement, EOS, chat template and
tokenisation with the merged model. Every check becomes a `Check` in export_report.json.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "你是谁？",
)
MERGED_MAX_ABS_DIFF = 1e-3
# Per GGUF type: max |Δlogit| and minimum top-1 agreement against the merged float32 model, and
# whether its greedy tokens must equal the merged model's (quantised types may drift after a tie).
GGUF_LIMITS: dict[str, dict] = {
    "f32": {"max_abs_diff": 1e-3, "min_top1": 1.0, "same_greedy": True},
    "f16": {"max_abs_diff": 0.25, "min_top1": 0.97, "same_greedy": False},
    "bf16": {"max_abs_diff": 2.0, "min_top1": 0.9, "same_greedy": False},
    "q8_0": {"max_abs_diff": 3.0, "min_top1": 0.9, "same_greedy": False},
}
# Measured on the default model with a rank-8 adapter (lora_B ~ N(0, 0.05)): max |Δlogit| f16 0.061,
# bf16 0.53, q8_0 1.64; top-1 agreement 1.0, 1.0, 0.994. A broken file scores near 0 agreement.


@dataclass
class Check:
    name: str
    passed: bool
    value: float | int | str | bool | None = None
    limit: float | str | None = None
    detail: str = ""


@dataclass
class Probe:
    prompt_ids: list[list[int]]
    greedy: list[list[int]] = field(default_factory=list)
    logits: list = field(default_factory=list)  # torch tensors [len(prompt)+len(greedy), vocab]


def render_prompts(tokenizer, template: str | None) -> list[list[int]]:
    ids = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        if template:
            text = tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=True, tokenize=False
            )
        else:
            text = prompt
        ids.append(tokenizer(text, add_special_tokens=template is None)["input_ids"])
    return ids


def greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    import torch

    inputs = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
        )
    return out[0, len(prompt_ids) :].tolist()


def logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def probe(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids: list[int]) -> Probe:
    result = Probe(prompt_ids=prompt_ids)
    for ids in prompt_ids:
        gen = greedy(model, ids, max_new_tokens, eos_ids)
        result.greedy.append(gen)
        result.logits.append(logits(model, ids + gen))
    return result


def _compare(reference: Probe, model) -> tuple[float, float, list]:
    """(max |Δlogit|, top-1 agreement, logits) of `model` against the reference on the same sequences."""
    max_diff, agree, total, all_logits = 0.0, 0, 0, []
    for ids, gen, ref in zip(reference.prompt_ids, reference.greedy, reference.logits, strict=True):
        got = logits(model, ids + gen)
        all_logits.append(got)
        max_diff = max(max_diff, float((got - ref).abs().max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0]
    return max_diff, agree / total, all_logits


def check_merged(
    reference: Probe, merged, max_new_tokens: int, eos_ids: list[int]
) -> tuple[list[Check], Probe]:
    """Checks of the merged model, and its probe on the reference's sequences (what GGUFs are compared with)."""
    max_diff, _, merged_logits = _compare(reference, merged)
    same = [greedy(merged, ids, max_new_tokens, eos_ids) for ids in reference.prompt_ids] == reference.greedy
    checks = [
        Check("merged.max_abs_logit_diff", max_diff < MERGED_MAX_ABS_DIFF, max_diff, MERGED_MAX_ABS_DIFF),
        Check(
            "merged.greedy_tokens_identical",
            same,
            same,
            detail="" if same else "greedy tokens of the merged model differ from base+adapter",
        ),
    ]
    return checks, Probe(reference.prompt_ids, reference.greedy, merged_logits)


@contextmanager
def _one_reader_per_file():
    """transformers parses the GGUF header four times per load (~100k token strings each, seconds of
    numpy slicing); its loader imports `gguf.GGUFReader` at call time, so share one reader per path."""
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def load_gguf(path: Path):
    """(model, tokenizer) through transformers' GGUF loader, from a directory holding only the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="gguf-readback-") as tmp, _one_reader_per_file():
        os.symlink(path.resolve(), Path(tmp) / path.name)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def check_gguf(
    path: Path,
    qtype: str,
    merged_probe: Probe,
    *,
    tokenizer,
    template: str | None,
    eos_id: int,
    max_new_tokens: int,
    eos_ids: list[int],
    byte_level: bool = True,
) -> list[Check]:
    """Read `path` back and compare it with the merged model's probe (same token sequences)."""
    limits = GGUF_LIMITS[qtype]
    prefix = f"gguf[{qtype}]"
    model, gguf_tokenizer = load_gguf(path)
    checks: list[Check] = []
    config_eos = model.config.eos_token_id
    config_eos = config_eos[0] if isinstance(config_eos, list) else config_eos
    checks.append(Check(f"{prefix}.eos_token_id", config_eos == eos_id, config_eos, str(eos_id)))
    same_template = (gguf_tokenizer.chat_template or None) == (template or None)
    checks.append(Check(f"{prefix}.chat_template", same_template, same_template))
    plain = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    plain_gguf = [gguf_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    checks.append(
        Check(
            f"{prefix}.tokenizer",
            plain == plain_gguf,
            plain == plain_gguf,
            detail=""
            if plain == plain_gguf
            else "the GGUF's tokenizer encodes the verification prompts differently",
        )
    )
    # transformers rebuilds SentencePiece tokenizers from GGUF without the legacy space after special
    # tokens ("<s>[INST]" vs "<s>▁[INST]"): required to match for byte-level BPE, reported for SentencePiece.
    same_ids = render_prompts(gguf_tokenizer, template) == merged_probe.prompt_ids
    checks.append(
        Check(
            f"{prefix}.chat_prompt_tokens",
            same_ids or not byte_level,
            same_ids,
            "required" if byte_level else "reported",
            detail="" if same_ids else "templated prompts tokenise differently through the GGUF's tokenizer",
        )
    )
    max_diff, top1, _ = _compare(merged_probe, model)
    checks.append(
        Check(
            f"{prefix}.max_abs_logit_diff",
            max_diff <= limits["max_abs_diff"],
            max_diff,
            limits["max_abs_diff"],
        )
    )
    checks.append(Check(f"{prefix}.top1_agreement", top1 >= limits["min_top1"], top1, limits["min_top1"]))
    gens = [greedy(model, ids, max_new_tokens, eos_ids) for ids in merged_probe.prompt_ids]
    same = gens == merged_probe.greedy
    checks.append(
        Check(
            f"{prefix}.greedy_tokens_identical",
            same or not limits["same_greedy"],
            same,
            "required" if limits["same_greedy"] else "reported",
            detail="" if same else f"first reply: {tokenizer.decode(gens[0])!r}",
        )
    )
    return checks


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
