"""Ollama Modelfile: template family detection, stop parameters, system prompt (no model)."""

from __future__ import annotations

import pytest

from train.export.modelfile import ModelfileError, render_modelfile, template_family

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
LLAMA3 = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{% endfor %}"
MISTRAL = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


@pytest.mark.parametrize(
    ("template", "family"), [(CHATML, "chatml"), (LLAMA3, "llama3"), (MISTRAL, "mistral")]
)
def test_template_family(template, family):
    assert template_family(template) == family


def test_unknown_template_is_refused_with_the_supported_families():
    with pytest.raises(ModelfileError, match="ChatML, Llama 3, Mistral"):
        template_family("{{ messages[0]['content'] }}")
    with pytest.raises(ModelfileError):
        template_family(None)


def test_render_chatml_modelfile():
    text = render_modelfile("m-q8_0.gguf", CHATML, ["<|im_end|>", "<|im_end|>", 'a"b'], "Be brief.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./m-q8_0.gguf"
    assert text.count('PARAMETER stop "<|im_end|>"') == 1
    assert 'PARAMETER stop "a\\"b"' in text
    assert 'SYSTEM """Be brief."""' in text
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text


def test_default_system_prompt_of_the_smollm2_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from train.export.modelfile import default_system

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert default_system(tok, tok.chat_template).startswith("You are a helpful AI assistant named SmolLM")
    assert default_system(tok, CHATML) is None
