"""GET /v1/models plus the operational endpoints: /health, /ready, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serve.http.context import get_ctx
from serve.protocol import ModelCard, ModelList

router = APIRouter()
ops_router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    ctx = get_ctx(request)
    if ctx.served is None:
        return ModelList(data=[])
    return ModelList(
        data=[
            ModelCard(id=m.id, root=m.root, parent=m.parent, max_model_len=ctx.engine.max_model_len or None)
            for m in ctx.served.all()
        ]
    )


@ops_router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: the process answers; 503 only when the engine is dead."""
    ctx = get_ctx(request)
    if ctx.load_error or getattr(ctx.engine, "_dead", None):
        return JSONResponse(
            {"status": "error", "detail": ctx.load_error or "engine stopped"}, status_code=503
        )
    return JSONResponse({"status": "ok"})


@ops_router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: the engine has produced a token."""
    ctx = get_ctx(request)
    if ctx.served is not None and ctx.engine.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "loading" if not ctx.load_error else "error"}, status_code=503)


@ops_router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(get_ctx(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
