"""Pick and check the LLaMA-Factory chat template so training renders chats exactly as serving will.

Serving renders chats with the tokenizer's own chat template; LLaMA-Factory renders training samples
with its named templates. `choose_template` tries LLaMA-Factory templates on probe chats (one real
sample included) and keeps the first whose token ids equal `tokenizer.apply_chat_template`'s; a
template that would replace the tokenizer's own template is tried last. `check_template` compares one
given template and raises `TemplateMismatchError` showing where the two renderings part.

Tool rows get the same check (`check_tool_template`): LLaMA-Factory renders a sample with tools,
function calls and observations in its tool format; serving rewrites the same conversation in the
OpenAI shape with `serve.tools.render` and the chat template saved with the adapter; the ids must be
equal. The tool format and the default system prompt are recorded in the run manifest for serving.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from serve.cli_runner import UserError

# Templates tried when none is given, in order; names hinted by the model path or type go first.
CANDIDATES = ["smollm2", "smollm", "qwen", "llama3", "mistral", "gemma", "phi", "chatml", "default"]
HINTS = {"smollm": ["smollm2", "smollm"], "qwen": ["qwen"], "llama-3": ["llama3"], "mistral": ["mistral"]}

PROBES = [
    [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
]


class TemplateMismatchError(UserError, ValueError):
    """LLaMA-Factory's template and the tokenizer's chat template give different token ids."""

    exit_code = 1


@dataclass(frozen=True)
class TemplateChoice:
    name: str
    default_system: str | None  # the system prompt to pass to LLaMA-Factory (None: the template's own)
    keeps_tokenizer_template: bool  # False: LLaMA-Factory would save its own jinja over the tokenizer's


def hf_ids(tokenizer: Any, chat: list[dict[str, str]]) -> list[int]:
    """Token ids of `chat` as serving produces them (the tokenizer's chat template)."""
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def lf_ids(
    tokenizer: Any, name: str, default_system: str | None, chat: list[dict[str, str]]
) -> tuple[list[int], bool]:
    """Token ids of `chat` as LLaMA-Factory's template `name` renders a training sample.

    Returns the ids and whether LLaMA-Factory would keep the tokenizer's own chat template.
    """
    from llamafactory.hparams import DataArguments

    template, tok = fixed_template(tokenizer, DataArguments(template=name, default_system=default_system))
    system = chat[0]["content"] if chat and chat[0]["role"] == "system" else None
    turns = chat[1:] if system is not None else chat
    pairs = template.encode_multiturn(tok, turns, system, None)
    keeps = tok.chat_template == tokenizer.chat_template
    return [i for prompt, response in pairs for i in prompt + response], keeps


def fixed_template(tokenizer: Any, data_args: Any) -> tuple[Any, Any]:
    """LLaMA-Factory's template for `data_args` (its `DataArguments`) and a copy of `tokenizer` fixed for it.

    What the trainer builds at start-up (`get_template_and_fix_tokenizer`), without touching `tokenizer`
    or LLaMA-Factory's template registry, which that call mutates.
    """
    from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer

    name = data_args.template
    if name not in TEMPLATES:
        raise TemplateMismatchError(f"template {name!r} does not exist in LLaMA-Factory")
    saved = TEMPLATES[name]
    TEMPLATES[name] = copy.deepcopy(saved)
    try:
        tok = copy.deepcopy(tokenizer)
        template = get_template_and_fix_tokenizer(tok, data_args)
    finally:
        TEMPLATES[name] = saved
    return template, tok


def tokenizer_default_system(tokenizer: Any) -> str:
    """The system prompt the tokenizer's chat template inserts when a chat has none ('' if it has none)."""
    from llamafactory.data.template import parse_template

    return parse_template(copy.deepcopy(tokenizer)).default_system


def describe_difference(tokenizer: Any, ours: list[int], theirs: list[int]) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
    )
    lo = max(0, at - 8)
    return (
        f"token {at}: LLaMA-Factory renders {tokenizer.decode(ours[lo : at + 12])!r}, "
        f"the tokenizer's chat template renders {tokenizer.decode(theirs[lo : at + 12])!r}"
    )


def check_template(
    tokenizer: Any, name: str, default_system: str | None, chats: list[list[dict[str, str]]]
) -> TemplateChoice:
    """Raise TemplateMismatchError unless `name` renders every chat token for token like the tokenizer."""
    keeps = True
    for chat in chats:
        ours, keeps = lf_ids(tokenizer, name, default_system, chat)
        theirs = hf_ids(tokenizer, chat)
        if ours != theirs:
            raise TemplateMismatchError(
                f"template {name!r} (LLaMA-Factory) and the model's chat template (tokenizer) differ at "
                + describe_difference(tokenizer, ours, theirs)
            )
    return TemplateChoice(name, default_system, keeps)


def candidate_names(model_hint: str) -> list[str]:
    hint = model_hint.lower()
    first = [n for key, names in HINTS.items() if key in hint for n in names]
    return first + [n for n in CANDIDATES if n not in first]


def choose_template(
    tokenizer: Any, chats: list[list[dict[str, str]]], model_hint: str = ""
) -> TemplateChoice:
    """The first LLaMA-Factory template that reproduces the tokenizer's chat template on `chats`."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        raise TemplateMismatchError(
            "the model's tokenizer has no chat template; set `template:` in the config (e.g. `template: default`)"
        )
    system = tokenizer_default_system(tokenizer)
    fallback: TemplateChoice | None = None
    tried = []
    for name in candidate_names(model_hint):
        for default_system in dict.fromkeys([system or None, None]):
            try:
                choice = check_template(tokenizer, name, default_system, chats)
            except TemplateMismatchError:
                tried.append(name)
                continue
            if choice.keeps_tokenizer_template:
                return choice
            fallback = fallback or choice
    if fallback is not None:
        return fallback
    raise TemplateMismatchError(
        f"no LLaMA-Factory template reproduces the model's chat template (tried {', '.join(dict.fromkeys(tried))}); "
        "set `template:` in the config and pass --allow-template-mismatch if you accept the difference"
    )


LF_ROLES = {"user": "user", "assistant": "assistant", "function": "function", "tool": "observation"}


def check_tool_template(
    tokenizer: Any, name: str, default_system: str | None, samples: list[Any], tool_format: str | None = None
) -> dict[str, Any]:
    """How LLaMA-Factory's template `name` writes tools: `{"format", "default_system"}` for the manifest.

    Raises TemplateMismatchError unless serving renders every tool sample (`train.data` Samples)
    token for token as LLaMA-Factory trains on it, or if llm-serve cannot parse that tool format."""
    from llamafactory.hparams import DataArguments

    from serve.tools.render import llamafactory_support, render_messages

    args = DataArguments(template=name, default_system=default_system, tool_format=tool_format)
    template, tok = fixed_template(tokenizer, args)
    info = {"format": template.format_tools.tool_format, "default_system": template.default_system}
    support = llamafactory_support(info["format"], info["default_system"])
    if samples and support.format is None:
        raise TemplateMismatchError(f"template {name!r} cannot be served with tools: {support.error}")
    for sample in samples:
        turns = [*sample.messages, {"role": sample.response_role, "content": sample.response}]
        lf_turns = [{"role": LF_ROLES[t["role"]], "content": t["content"]} for t in turns]
        tools = json.dumps(sample.tools, ensure_ascii=False) if sample.tools else None
        pairs = template.encode_multiturn(tok, lf_turns, sample.system or None, tools)
        ours = [i for prompt, response in pairs for i in prompt + response]
        messages, _ = render_messages(sample.conversation(), sample.tools, support)
        text = tok.apply_chat_template(messages, tokenize=False)
        theirs = list(tok(text, add_special_tokens=False)["input_ids"])
        if ours != theirs:
            raise TemplateMismatchError(
                f"with tools, template {name!r} (LLaMA-Factory, tool format {info['format']!r}) and "
                f"llm-serve's rendering differ at " + describe_difference(tok, ours, theirs)
            )
    return info
