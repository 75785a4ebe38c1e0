"""Per-app state shared by the routers (engine, served models, settings, metrics, tokenizer thread)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from serve.config import ServeConfig
from serve.engine.base import Engine
from serve.metrics import Metrics
from serve.served import ServedModels


@dataclass
class AppContext:
    engine: Engine
    served: ServedModels | None  # None until the engine has loaded its tokenizer
    config: ServeConfig
    metrics: Metrics
    load_error: str | None = None
    grammars: object = None  # serve.structured.compiler.GrammarCompiler for the engine's tokenizer
    # Chat templates and tokenizers run here, not on the event loop: a megabyte of text takes seconds
    # and would stall every stream and probe. One thread, because transformers' fast tokenizers mutate
    # their truncation/padding state on each call and are not safe to call from two threads at once.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="llm-serve-tokenizer")
    )

    async def tokenize(self, fn, /, *args, **kwargs):
        """Run `fn(*args, **kwargs)` (tokenizer or chat-template work) on the tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizer_pool, lambda: fn(*args, **kwargs))


def get_ctx(request: Request) -> AppContext:
    return request.app.state.ctx
