"""The chat-template match between LLaMA-Factory and the default model's tokenizer (real tokenizer)."""

from __future__ import annotations

import pytest

from train.template import PROBES, TemplateMismatchError, check_template, choose_template

pytestmark = pytest.mark.slow

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model.path))


def test_default_model_gets_smollm2_with_its_own_system_prompt(tokenizer):
    persona = [
        {"role": "system", "content": "用四郎的口吻回答问题"},
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "朕乃大清天子。"},
    ]
    choice = choose_template(tokenizer, [*PROBES, persona], "SmolLM2-135M-Instruct")
    assert (choice.name, choice.default_system) == ("smollm2", SMOLLM_SYSTEM)
    assert choice.keeps_tokenizer_template  # the adapter is saved with the model's own chat template


def test_llamafactory_smollm2_default_differs_by_one_full_stop(tokenizer):
    # LLaMA-Factory's smollm2 template ends its default system prompt with '.', the model's does not.
    with pytest.raises(TemplateMismatchError, match=r"differ at token \d+: .*Hugging Face\.<\|im_end\|>"):
        check_template(tokenizer, "smollm2", None, PROBES)


def test_foreign_template_is_a_mismatch(tokenizer):
    with pytest.raises(TemplateMismatchError, match="template 'llama3' .* differ at token 1"):
        check_template(tokenizer, "llama3", None, PROBES)
    with pytest.raises(TemplateMismatchError, match="does not exist in LLaMA-Factory"):
        check_template(tokenizer, "no-such-template", None, PROBES)
