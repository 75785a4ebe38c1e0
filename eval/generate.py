"""Generate each target's replies to the reference prompts, with a cache so a re-run is cheap.

Replies are cached in one SQLite file keyed by sha256(target fingerprint + chat messages + sampling
parameters): the same adapter weights, prompt and parameters never generate twice. Local targets
generate in left-padded batches with the tokenizer's chat template; server targets call
`/v1/chat/completions` with a few requests in flight. Greedy by default; with a temperature the
`seed` makes sampling repeatable.

    cache = GenerationCache(path)
    replies = generate_replies(target, examples, params, cache, local_model=(model, tokenizer))
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field


class GenerationParams(BaseModel):
    """How replies are sampled; part of the cache key."""

    max_tokens: int = Field(128, ge=1, description="Most new tokens per reply.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass when temperature > 0.")
    seed: int = Field(0, description="Sampling seed (makes temperature > 0 repeatable).")


@dataclass
class Generation:
    """One reply and whether it came from the cache."""

    text: str
    cached: bool
    seconds: float


class GenerationCache:
    """A SQLite key/value store of replies; safe for several processes (WAL, one row per key)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._db = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()

    @staticmethod
    def key(fingerprint: str, messages: list[dict], params: GenerationParams) -> str:
        blob = json.dumps([fingerprint, messages, params.model_dump()], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        if self._db is None:
            return None
        row = self._db.execute("SELECT value FROM replies WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0])["text"] if row else None

    def put(self, key: str, text: str) -> None:
        if self._db is None:
            return
        value = json.dumps({"text": text}, ensure_ascii=False)
        self._db.execute("INSERT OR REPLACE INTO replies (key, value) VALUES (?, ?)", (key, value))
        self._db.commit()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def generate_replies(
    fingerprint: str,
    chats: Sequence[list[dict]],
    params: GenerationParams,
    cache: GenerationCache,
    backend: Callable[[list[list[dict]]], list[str]],
    *,
    batch_size: int = 8,
    desc: str = "generating",
) -> list[Generation]:
    """Replies for `chats` in order: cached ones looked up, the rest sent to `backend` in batches."""
    from tqdm.auto import tqdm

    keys = [GenerationCache.key(fingerprint, chat, params) for chat in chats]
    out: list[Generation | None] = []
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get(key)
        out.append(Generation(hit, True, 0.0) if hit is not None else None)
        if hit is None:
            todo.append(i)
    with tqdm(total=len(chats), initial=len(chats) - len(todo), desc=desc, unit="reply") as bar:
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            t0 = time.monotonic()
            texts = backend([chats[i] for i in idx])
            per = (time.monotonic() - t0) / len(idx)
            for i, text in zip(idx, texts, strict=True):
                cache.put(keys[i], text)
                out[i] = Generation(text, False, per)
            bar.update(len(idx))
    return [g for g in out if g is not None]


def local_backend(model, tokenizer, params: GenerationParams) -> Callable[[list[list[dict]]], list[str]]:
    """Batched `generate` with the chat template, left padding, stopping at the EOS/end-of-turn ids."""
    import torch

    def run(chats: list[list[dict]]) -> list[str]:
        prompts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats
        ]
        enc = tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        kwargs = {"max_new_tokens": params.max_tokens, "do_sample": params.temperature > 0}
        if params.temperature > 0:
            kwargs |= {"temperature": params.temperature, "top_p": params.top_p}
            torch.manual_seed(params.seed)
        if tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        with torch.no_grad():
            ids = model.generate(**enc, **kwargs)
        new = ids[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    return run


def server_backend(
    base_url: str, model_id: str, api_key: str | None, params: GenerationParams, concurrency: int = 4
) -> Callable[[list[list[dict]]], list[str]]:
    """Chat completions on an OpenAI-compatible server, `concurrency` requests in flight."""
    import requests

    url = f"{base_url.rstrip('/')}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def one(chat: list[dict]) -> str:
        body = {"model": model_id, "messages": chat, **params.model_dump()}
        resp = requests.post(url, json=body, headers=headers, timeout=600)
        if resp.status_code != 200:
            raise RuntimeError(f"{url} answered {resp.status_code} for model {model_id!r}: {resp.text[:300]}")
        return (resp.json()["choices"][0]["message"].get("content") or "").strip()

    def run(chats: list[list[dict]]) -> list[str]:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, chats))

    return run
