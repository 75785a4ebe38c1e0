"""Per-app state shared by the routers (engine, served models, settings, metrics)."""

from __future__ import annotations

from dataclasses import dataclass

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


def get_ctx(request: Request) -> AppContext:
    return request.app.state.ctx
