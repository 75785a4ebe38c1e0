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


@pytest.fixture(scope="module")
def tool_samples(shared_demo_data):
    from train.data.validate import validate_file

    report = validate_file(shared_demo_data / "glaive_toolcall_en_demo.json")
    return [s for _, s in report.samples if s.has_tools][:6]


def test_tool_rows_render_the_same_in_training_and_serving(tokenizer, tool_samples):
    from train.template import check_tool_template

    info = check_tool_template(tokenizer, "smollm2", SMOLLM_SYSTEM, tool_samples)
    assert info == {"format": "default", "default_system": SMOLLM_SYSTEM}
    # Qwen's Hermes format (`<tool_call>` blocks, `<tool_response>` observations) as well.
    assert check_tool_template(tokenizer, "qwen", None, tool_samples)["format"] == "qwen"


def test_tool_rendering_drift_is_caught(tokenizer, tool_samples, monkeypatch):
    from serve.tools import formats
    from train.template import check_tool_template

    monkeypatch.setattr(
        formats, "DEFAULT_TOOL_PROMPT", formats.DEFAULT_TOOL_PROMPT.replace("tools", "functions")
    )
    with pytest.raises(TemplateMismatchError, match="with tools, template 'smollm2' .* differ at token"):
        check_tool_template(tokenizer, "smollm2", SMOLLM_SYSTEM, tool_samples)
    with pytest.raises(TemplateMismatchError, match="cannot be served with tools: .*'glm4'"):
        check_tool_template(tokenizer, "glm4", None, tool_samples)
