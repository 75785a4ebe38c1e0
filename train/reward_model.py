"""A reward model that `llm-train` made (`stage: rm`): checked before use, and scoring chats with it.

LLaMA-Factory's `rm` stage with LoRA writes a LoRA adapter plus `value_head.safetensors` (trl's value
head, `v_head.summary.{weight,bias}`: one linear layer from the last hidden state to a scalar). Its
reward for a conversation is that scalar at the conversation's last token. `check_reward_model`
reads only small files (PPO and `llm-eval --reward-model` call it before any weights load);
`RewardScorer` loads base + adapter + head once and scores many (prompt, reply) pairs the way
LLaMA-Factory computes them (same chat template, token for token, as `llm-train` checked).

    info = check_reward_model(Path("saves/rm"), base_name="default", base_path=path)
    with RewardScorer(info) as rm: rm.score([[{"role": "user", ...}, {"role": "assistant", ...}]])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serve.artifacts.model_folder import read_adapter_config
from serve.artifacts.run_manifest import ManifestError, RunManifest, read_manifest
from serve.cli_runner import UserError

VALUE_HEAD = "value_head.safetensors"


class RewardModelError(UserError, ValueError):
    """The reward model directory cannot be used; the message says which file and what to do."""


@dataclass(frozen=True)
class RewardModelInfo:
    path: Path
    base_path: Path
    kind: str  # "lora" (adapter + value head on the base) or "full" (a checkpoint with its value head)
    stage: str | None  # the run manifest's stage, when there is one
    sha256: str  # of the value head (the adapter's own checksum is in its manifest)

    def manifest_entry(self) -> dict:
        return {
            "path": str(self.path),
            "type": self.kind,
            "stage": self.stage,
            "value_head_sha256": self.sha256,
        }


def check_reward_model(path: Path, *, base_name: str, base_path: Path) -> RewardModelInfo:
    """Check a reward model directory against the base it will run on; raises RewardModelError."""
    from serve.adapters import AdapterError, base_aliases, check_base_match, load_adapter_spec
    from serve.artifacts.provenance import file_sha256, model_sha256

    path = Path(path).expanduser().resolve()
    hint = "train one with `llm-train configs/train/rm_lora.yaml` (stage: rm)"
    if not path.is_dir():
        raise RewardModelError(f"reward model {path} is not a directory; {hint}")
    head = path / VALUE_HEAD
    if not head.is_file():
        present = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
        raise RewardModelError(
            f"reward model {path} has no {VALUE_HEAD} (found: {present}), so it is not a reward model; {hint}"
        )
    manifest = _read_manifest(path)
    stage = manifest.stage if manifest else None
    if stage not in (None, "rm"):
        raise RewardModelError(f"{path} was trained with stage {stage!r}, not rm; {hint}")
    if (path / "adapter_config.json").is_file():
        try:
            spec = load_adapter_spec(path.name, path)
            check_base_match(spec, base_aliases(base_name, base_path, base_name), allow_mismatch=False)
        except AdapterError as exc:
            raise RewardModelError(f"reward model: {exc}") from exc
        kind = "lora"
    elif (path / "config.json").is_file():
        kind = "full"
    else:
        raise RewardModelError(
            f"{path} has a value head but neither adapter_config.json nor config.json; {hint}"
        )
    if manifest and kind == "lora":
        recorded = manifest.base_model.sha256
        actual = model_sha256(base_path)
        if recorded and actual and recorded != actual:
            raise RewardModelError(
                f"reward model {path} was trained on base weights {recorded[:12]}… but {base_path} has "
                f"{actual[:12]}…; use the base it was trained on"
            )
    return RewardModelInfo(path=path, base_path=base_path, kind=kind, stage=stage, sha256=file_sha256(head))


def check_reward_model_alone(path: Path) -> RewardModelInfo:
    """Check a reward model on the base it records (run manifest, else adapter_config.json)."""
    from serve.models import ModelNotFoundError, resolve_model

    path = Path(path).expanduser().resolve()
    manifest = _read_manifest(path) if path.is_dir() else None
    base = manifest.base_model.name if manifest else None
    if not base and (path / "adapter_config.json").is_file():
        base = read_adapter_config(path).base_model
    if not base:
        base = str(path)  # a full reward model is its own base
    try:
        model = resolve_model(base)
    except ModelNotFoundError as exc:
        raise RewardModelError(
            f"reward model {path}: its base {base!r} is not available here ({exc})"
        ) from exc
    return check_reward_model(path, base_name=base, base_path=model.path)


def _read_manifest(path: Path) -> RunManifest | None:
    try:
        return read_manifest(path)
    except ManifestError as exc:
        raise RewardModelError(str(exc)) from exc


class RewardScorer:
    """Base + reward adapter + value head, loaded once; `score(chats)` gives one float per chat."""

    def __init__(self, info: RewardModelInfo, *, max_length: int = 1024):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.info = info
        self.max_length = max_length
        weights = info.base_path if info.kind == "lora" else info.path
        model = AutoModelForCausalLM.from_pretrained(str(weights), dtype=torch.float32)
        if info.kind == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(info.path)).merge_and_unload()
        self.model = model.eval()
        # The tokenizer and chat template the reward model was trained with ship in its directory.
        tok_dir = info.path if (info.path / "tokenizer_config.json").is_file() else weights
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        head = load_file(str(info.path / VALUE_HEAD))
        self.weight = head["v_head.summary.weight"].float()  # [1, hidden]
        self.bias = head["v_head.summary.bias"].float()  # [1]

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.model = None

    def score(self, chats: list[list[dict]], batch_size: int = 8) -> list[float]:
        """The reward of each whole conversation (its last message is the reply being scored)."""
        import torch

        scores: list[float] = []
        for start in range(0, len(chats), batch_size):
            ids = [self._ids(chat) for chat in chats[start : start + batch_size]]
            width = max(len(x) for x in ids)
            pad = self.tokenizer.pad_token_id or 0
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            with torch.no_grad():
                out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            values = out.hidden_states[-1] @ self.weight.T + self.bias  # [batch, seq, 1]
            last = mask.sum(dim=1) - 1
            scores += values[torch.arange(len(ids)), last, 0].tolist()
        return scores

    def _ids(self, chat: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)[-self.max_length :]
