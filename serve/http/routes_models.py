"""GET /v1/models plus the operational endpoints: /health (liveness), /ready (readiness), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from serve.http.context import get_ctx
from serve.http.generation import check_ready
from serve.http.openapi import error_responses
from serve.protocol import HealthStatus, ModelCard, ModelList

router = APIRouter()
ops_router = APIRouter()
metrics_router = APIRouter()

_STATUS_503 = {503: {"model": HealthStatus, "description": "Not ready (or the engine stopped)."}}


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(request: Request) -> ModelList:
    """The base and every adapter; 503 with Retry-After until the engine is ready, so clients that
    wait on /v1/models (as they do with vLLM) start once requests can be served."""
    ctx = get_ctx(request)
    check_ready(ctx)
    return ModelList(
        data=[
            ModelCard(id=m.id, root=m.root, parent=m.parent, max_model_len=ctx.engine.max_model_len or None)
            for m in ctx.served.all()
        ]
    )


@ops_router.get("/health", response_model=HealthStatus, responses=_STATUS_503)
async def health(request: Request) -> JSONResponse:
    """Liveness: the process answers; 503 only when the model failed to load or the engine died."""
    ctx = get_ctx(request)
    state = ctx.engine.health
    if ctx.load_error or state.state == "dead":
        detail = f"the model failed to load: {ctx.load_error}" if ctx.load_error else state.detail
        return JSONResponse({"status": "error", "detail": detail}, status_code=503)
    return JSONResponse({"status": "ok"})


@ops_router.get("/ready", response_model=HealthStatus, responses=_STATUS_503)
async def ready(request: Request) -> JSONResponse:
    """Readiness: the engine has produced a token and serves requests."""
    ctx = get_ctx(request)
    state = ctx.engine.health
    if ctx.served is not None and state.state == "ready" and not ctx.load_error:
        return JSONResponse({"status": "ready"})
    status = "error" if ctx.load_error or state.state == "dead" else state.state
    return JSONResponse(
        {"status": status, "detail": ctx.load_error or state.detail},
        status_code=503,
        headers={"Retry-After": "5"} if status in ("loading", "stopping") else None,
    )


@metrics_router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **error_responses(401)},
)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format."""
    return PlainTextResponse(
        get_ctx(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
