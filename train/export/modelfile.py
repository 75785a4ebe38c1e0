"""Write an Ollama Modelfile for an exported GGUF: FROM, TEMPLATE, stop parameters and SYSTEM.

Ollama's TEMPLATE is a Go template, not Jinja, so the chat template's family is recognised by its
markers (ChatML, Llama 3, Mistral [INST]) and the matching Go template is written; the stop parameters
are the template's end-of-turn token and the EOS tokens. The system prompt is the run's, or the
default one the chat template inserts when a conversation has none (SmolLM2's does).
"""

from __future__ import annotations

from pathlib import Path

from serve.cli_runner import UserError

CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL = (
    '{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}[INST] '
    "{{ if and $.System (eq $i 0) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }} [/INST]"
    "{{ else }}{{ $m.Content }}</s>{{ end }}{{ end }}"
)
FAMILIES = {
    "chatml": ("<|im_start|>", CHATML),
    "llama3": ("<|start_header_id|>", LLAMA3),
    "mistral": ("[INST]", MISTRAL),
}


class ModelfileError(UserError, ValueError):
    """The chat template cannot be expressed as an Ollama TEMPLATE."""


def template_family(chat_template: str | None) -> str:
    for family, (marker, _go) in FAMILIES.items():
        if chat_template and marker in chat_template:
            return family
    raise ModelfileError(
        "the chat template is not one the Modelfile writer knows (ChatML, Llama 3, Mistral [INST]); "
        "export without --modelfile and write the TEMPLATE by hand"
    )


def default_system(tokenizer, chat_template: str) -> str | None:
    """The system prompt the template adds when the conversation has none (ChatML only)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], chat_template=chat_template, tokenize=False
    )
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head) : text.index("<|im_end|>")]
    return None


def render_modelfile(gguf_name: str, chat_template: str, stops: list[str], system: str | None) -> str:
    go_template = FAMILIES[template_family(chat_template)][1]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template}"""']
    lines += [f"PARAMETER stop {_quote(s)}" for s in dict.fromkeys(stops)]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(
    gguf_path: Path,
    tokenizer,
    chat_template: str | None,
    eos_ids: list[int],
    system: str | None,
    filename: str = "Modelfile",
) -> Path:
    template_family(chat_template)  # raises before anything is written
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids]
    system = system or default_system(tokenizer, chat_template)
    path = gguf_path.parent / filename
    path.write_text(render_modelfile(gguf_path.name, chat_template, stops, system))
    return path


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
