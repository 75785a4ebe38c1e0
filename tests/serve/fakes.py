"""A scripted engine for app tests: real tokenizer, canned replies, and failure modes on demand."""

from __future__ import annotations

import asyncio
from pathlib import Path

from serve.engine.base import Engine, EngineHealth, EngineStats
from serve.engine.types import EngineDeadError, EngineOverloadedError, GenerationOutput, GenerationRequest


class FakeEngine(Engine):
    """Replies with `reply` one token at a time; `fail_after` tokens then an error; `overloaded` → 429."""

    def __init__(self, tokenizer_dir: Path, reply: str = "Paris is the capital.", adapters=("a",)):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.reply_ids = self.tokenizer.encode(reply, add_special_tokens=False)
        self.max_model_len = 64
        self._adapters = list(adapters)
        self._ready = False
        self.fail_after: int | None = None
        self.overloaded = False
        self.dead: str | None = None  # set to make the engine report itself dead
        self.delay = 0.0
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.added: dict[str, object] = {}  # engine key -> AdapterSpec, for adapters added while serving
        self.removed: list[tuple[str, str | None]] = []  # (key, successor)

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._ready = False

    def adapter_names(self) -> list[str]:
        return self._adapters

    async def add_adapter(self, key: str, spec) -> None:
        self.added[key] = spec
        self._adapters.append(key)

    def remove_adapter(self, key: str, successor: str | None = None) -> None:
        self.removed.append((key, successor))
        if key in self._adapters:
            self._adapters.remove(key)

    def stats(self) -> EngineStats:
        return EngineStats(waiting=0, running=0, kv_cache_usage=0.0)

    @property
    def health(self) -> EngineHealth:
        if self.dead:
            return EngineHealth("dead", self.dead)
        return EngineHealth("ready") if self._ready else EngineHealth("loading")

    async def generate(self, request: GenerationRequest):
        if self.dead:
            raise EngineDeadError(self.dead)
        if self.overloaded:
            raise EngineOverloadedError("the request queue is full (1 waiting)")
        self.requests.append(request)
        p = request.params
        finished = False
        try:
            ids = self.reply_ids[: p.max_tokens]
            for i, tok in enumerate(ids):
                await asyncio.sleep(self.delay)
                if self.fail_after is not None and i == self.fail_after:
                    finished = True
                    yield GenerationOutput(request.request_id, finish_reason="error", error="boom")
                    return
                last = i == len(ids) - 1
                finished = last
                yield GenerationOutput(
                    request.request_id,
                    token_ids=[tok],
                    text=self.tokenizer.decode([tok]),
                    finish_reason=("length" if len(ids) == p.max_tokens else "stop") if last else None,
                    num_prompt_tokens=len(request.prompt_token_ids),
                    num_generated_tokens=i + 1,
                )
        finally:
            if not finished:
                self.aborted.append(request.request_id)
