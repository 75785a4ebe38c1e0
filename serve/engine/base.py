"""The narrow interface every engine implements (transformers+PEFT, vLLM, test fakes).

An engine is built once at start-up with the base model and its start-up adapters; adapters found
or loaded while serving are added and removed by key (`add_adapter`, `remove_adapter`), each
version under its own key, so a request keeps the weights it started with. Cancellation is
cooperative: closing the async iterator returned by `generate` (which happens when the HTTP client
disconnects) aborts the request and frees its slot. `health` says whether it can serve: /health,
/ready and every route read it, so a dead engine answers 503 at once.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from serve.adapters import AdapterError, AdapterSpec
from serve.engine.types import GenerationOutput, GenerationRequest, SamplingParams


@dataclass
class EngineStats:
    """Point-in-time load figures, exported on /metrics."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0  # fraction of the KV budget in use
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineHealth:
    """loading until `start()` returns; ready while it serves; stopping once `shutdown()` began;
    dead when its loop (or vLLM's engine core) failed and it cannot serve again (`detail` says why)."""

    state: Literal["loading", "ready", "stopping", "dead"]
    detail: str | None = None


class Engine(abc.ABC):
    """Generates tokens for a base model and its LoRA adapters."""

    #: Longest prompt + completion the engine accepts, in tokens.
    max_model_len: int
    #: A Hugging Face tokenizer (encode/decode/convert_ids_to_tokens/apply_chat_template).
    tokenizer: object

    @abc.abstractmethod
    async def start(self) -> None:
        """Load weights and start the generation loop; returns when requests can be accepted."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream incremental outputs for one request; the last one has `finish_reason` set.

        Raises EngineOverloadedError when the queue is full, before yielding anything.
        """

    @abc.abstractmethod
    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting requests, let running ones finish for up to `timeout` s, then stop."""

    @abc.abstractmethod
    def adapter_names(self) -> list[str]:
        """Names of the adapters this engine can apply (the base is `None` in requests)."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Queue and cache figures for /metrics."""

    @property
    @abc.abstractmethod
    def health(self) -> EngineHealth:
        """Whether the engine can serve now (see `EngineHealth`)."""

    async def warm_up(self) -> None:
        """One greedy token through `generate`: for engines whose first request would otherwise pay for
        lazy set-up (vLLM's, llama-server's), so /ready means a request is answered at full speed."""
        ids = self.tokenizer.encode("Hello") or [0]
        request = GenerationRequest("warmup", list(ids), SamplingParams(max_tokens=1, temperature=0.0))
        async for _ in self.generate(request):
            pass

    @property
    def ready(self) -> bool:
        """True once the engine has produced a token (a warm-up or a real request) and still serves."""
        return self.health.state == "ready"

    # Adapters added while serving. The defaults suit an engine that serves only its start-up adapters.

    def check_adapter(self, spec: AdapterSpec) -> None:
        """Engine-specific checks run before any weights are read (rank, unsupported layers);
        raises an AdapterError subclass saying what to do."""
        return None

    async def add_adapter(self, key: str, spec: AdapterSpec) -> None:
        """Make `spec` servable as `key` (reads its weights into host memory; errors raise here)."""
        raise AdapterError(f"this engine cannot add adapters while serving ({type(self).__name__})")

    def remove_adapter(self, key: str, successor: str | None = None) -> None:
        """No new requests for `key` (requests that resolved it go to `successor`, when given);
        its running requests finish on its weights, then it is freed."""
        return None

    def adapter_stats(self):
        """Per-adapter load figures (`adapter_pool.PoolStats`) for /metrics, or None."""
        return None
