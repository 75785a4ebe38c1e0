"""The one reader of a model or adapter folder's serving facts: chat templates, stop ids, tokenizer, LoRA.

What an adapter folder (llm-train's output, or PEFT's `save_pretrained`) holds, and who reads it:

    adapter_config.json         LoRA rank, alpha, targets, recorded base, DoRA, modules_to_save
                                                                            read_adapter_config: serve preflight,
                                                                            both engines, export, eval, llm-models
    adapter_model.safetensors   the LoRA weights (a pickled .bin is refused) the engines, PEFT in export/eval
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                the tokenizer it was trained with           read_folder: export (tokenizer source)
    chat_template.jinja (or tokenizer_config.json's chat_template, additional_chat_templates/*.jinja)
                                the chat template(s) it was trained with    read_folder: serve, export, llm-train
    run_manifest.json           serve.artifacts.run_manifest                 serve, export, eval, llm-models
    trainer_log.jsonl           serve.artifacts.trainer_log                  eval report, llm-train
    loss.png, train.log, llm_train_config.yaml    for people; no program reads them

A folder is a complete adapter (`is_adapter_folder`) when it holds adapter_config.json and
adapter_model.safetensors; `adapter_dirs` serves such folders below an --adapter-dir and checks that
every file `read_files` names stays inside the directory.

A model folder (a base checkpoint, a merged export, the converted default model) holds `config.json`,
`*.safetensors`, `generation_config.json` (its EOS ids) and the same tokenizer and template files.

EOS/stop ids are computed here only (`stop_token_ids`), so the server's stop set, the merged folder's
`generation_config.json`, the GGUF's EOS and the Ollama Modelfile's stop parameters agree by construction.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.artifacts.run_manifest import MANIFEST_FILE, RunManifest, read_manifest
from serve.cli_runner import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Pickled weights other tools write; refused because loading them can run code.
PICKLED_ADAPTER_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
EXTRA_TEMPLATES_DIR = "additional_chat_templates"
GENERATION_CONFIG = "generation_config.json"
DEFAULT_TEMPLATE = "default"
# Tokens chat templates end a turn with (ChatML, Llama 3, Phi-3, Gemma, Llama 2/Mistral).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")
_PROBE = "XYZZY-END-OF-TURN"


class FolderError(UserError, ValueError):
    """A file of a model or adapter folder cannot be read; the message names it."""


@dataclass(frozen=True)
class FolderFacts:
    """What a model or adapter folder says about serving it (read once by `read_folder`)."""

    path: Path
    chat_templates: dict[str, str] = field(default_factory=dict)  # "default" plus named ones (tool_use, ...)
    eos_token: str | None = None  # tokenizer_config.json's eos_token
    generation_config: dict[str, Any] = field(default_factory=dict)
    has_tokenizer: bool = False  # ships tokenizer.json and tokenizer_config.json
    manifest: RunManifest | None = None

    @property
    def chat_template(self) -> str | None:
        """The template a plain chat is rendered with."""
        return self.chat_templates.get(DEFAULT_TEMPLATE)

    @property
    def generation_eos_ids(self) -> list[int]:
        """generation_config.json's eos_token_id, as a list."""
        return _as_id_list(self.generation_config.get("eos_token_id"))

    def stop_token_ids(self, tokenizer, chat_template: str | None = None) -> list[int]:
        """What a generation from this folder stops on, in `tokenizer`'s ids (see `stop_token_ids`)."""
        return stop_token_ids(
            tokenizer,
            chat_template if chat_template is not None else self.chat_template,
            eos_tokens=[self.eos_token] if self.eos_token else [],
            extra_ids=self.generation_eos_ids,
        )


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of PEFT's adapter_config.json that serving and export use."""

    peft_type: str
    base_model: str  # base_model_name_or_path, "" when not recorded
    rank: int
    alpha: float
    target_modules: list[str]
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)  # full copies of modules (embeddings, head)
    trainable_token_indices: Any = None  # trained rows of the embeddings (PEFT's TrainableTokens)


def read_folder(path: str | Path) -> FolderFacts:
    """Read the serving facts of a model or adapter folder; raises FolderError naming a broken file."""
    path = Path(path)
    tok_cfg = _read_json(path / "tokenizer_config.json")
    templates: dict[str, str] = {}
    value = tok_cfg.get("chat_template")
    if isinstance(value, str):
        templates[DEFAULT_TEMPLATE] = value
    elif isinstance(value, list):  # transformers' named templates: [{"name", "template"}, ...]
        for item in value:
            if isinstance(item, dict) and isinstance(item.get("template"), str):
                templates[str(item.get("name", DEFAULT_TEMPLATE))] = item["template"]
    extra = path / EXTRA_TEMPLATES_DIR
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    if (path / CHAT_TEMPLATE_FILE).is_file():  # what transformers writes today wins over the json key
        templates[DEFAULT_TEMPLATE] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    eos = tok_cfg.get("eos_token")
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content")
    return FolderFacts(
        path=path,
        chat_templates=templates,
        eos_token=eos if isinstance(eos, str) else None,
        generation_config=_read_json(path / GENERATION_CONFIG),
        has_tokenizer=all((path / f).is_file() for f in TOKENIZER_FILES),
        manifest=read_manifest(path),
    )


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """`path/adapter_config.json`; raises FolderError when it is missing or not valid JSON."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FolderError(f"{file} is missing")
    cfg = _read_json(file)
    targets = cfg.get("target_modules") or []
    rank = int(cfg.get("r", 8))
    return AdapterConfig(
        peft_type=str(cfg.get("peft_type", "LORA")),
        base_model=str(cfg.get("base_model_name_or_path") or ""),
        rank=rank,
        alpha=float(cfg.get("lora_alpha", rank)),
        target_modules=[targets] if isinstance(targets, str) else list(targets),
        use_rslora=bool(cfg.get("use_rslora")),
        use_dora=bool(cfg.get("use_dora")),
        modules_to_save=list(cfg.get("modules_to_save") or []),
        trainable_token_indices=cfg.get("trainable_token_indices"),
    )


def is_adapter_folder(path: str | Path) -> bool:
    """A complete PEFT adapter: adapter_config.json and adapter_model.safetensors (what llm-train
    renames into place last, so a folder still being written is not one)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def read_files(path: str | Path) -> list[Path]:
    """The files of folder `path` that the readers here (and the engines' weight readers) open, those
    present: a caller that must know where they lead (a symlink out of an adapter directory) checks these."""
    path = Path(path)
    names = [
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        *TOKENIZER_FILES,
        SPECIAL_TOKENS_MAP,
        CHAT_TEMPLATE_FILE,
        GENERATION_CONFIG,
        MANIFEST_FILE,
        EXTRA_TEMPLATES_DIR,
    ]
    found = [path / n for n in names if os.path.lexists(path / n)]
    extra = path / EXTRA_TEMPLATES_DIR
    if extra.is_dir():
        found += sorted(extra.glob("*.jinja"))
    return found


def load_tokenizer(path: str | Path, chat_template: str | None = None):
    """The folder's tokenizer (transformers), with `chat_template` set when given."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def end_of_turn_token(tokenizer, chat_template: str | None) -> str | None:
    """The special token `chat_template` writes right after an assistant message (`<|im_end|>` for ChatML).

    Found by rendering a probe conversation, so it works for any template; a template that refuses
    the probe falls back to the first known end-of-turn token it names.
    """
    if not chat_template:
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    except Exception:  # jinja raises many kinds (TemplateError, TypeError...) for shapes it refuses
        text = None
    if text and _PROBE in text:
        after = text.split(_PROBE, 1)[-1].lstrip(" ")
        specials = sorted(
            (t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True
        )
        found = next((tok for tok in specials if after.startswith(tok)), None)
        if found:
            return found
    return next((tok for tok in END_OF_TURN_TOKENS if tok in chat_template), None)


def stop_token_ids(
    tokenizer, chat_template: str | None, *, eos_tokens: list[str] = (), extra_ids: list[int] = ()
) -> list[int]:
    """The ids a generation with `chat_template` stops on, the end-of-turn token first.

    In order: the template's end-of-turn token, the tokenizer's EOS, every other known end-of-turn token
    the template names, then `eos_tokens` (by name, e.g. an adapter's own EOS) and `extra_ids` (e.g.
    generation_config.json's). Tokens the tokenizer does not have are skipped.
    """
    named = [end_of_turn_token(tokenizer, chat_template)]
    ids = _token_ids(tokenizer, named)
    for tid in [tokenizer.eos_token_id]:
        if isinstance(tid, int) and tid not in ids:
            ids.append(tid)
    in_template = [tok for tok in END_OF_TURN_TOKENS if chat_template and tok in chat_template]
    for tid in _token_ids(tokenizer, in_template + list(eos_tokens)) + [int(i) for i in extra_ids]:
        if tid not in ids:
            ids.append(tid)
    return ids


def _token_ids(tokenizer, tokens: list[str | None]) -> list[int]:
    ids: list[int] = []
    for tok in tokens:
        if not tok:
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def _as_id_list(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FolderError(f"{path} is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}
