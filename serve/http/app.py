"""The app factory: `build_app(engine, config, make_served)` wires routers, auth, limits and errors.

The engine starts in the background when the app starts, so `/health` answers while weights load
and `/ready` turns 200 once the engine has produced a token. Nothing is loaded at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import ServeConfig
from serve.engine.base import Engine
from serve.errors import APIError, AuthenticationError, BadRequestError, InternalError, PayloadTooLargeError
from serve.http import routes_chat, routes_completions, routes_models, routes_tokenize
from serve.http.context import AppContext
from serve.metrics import Metrics
from serve.served import ServedModels

logger = logging.getLogger(__name__)


def build_app(
    engine: Engine,
    config: ServeConfig,
    make_served: Callable[[Engine], ServedModels],
    *,
    mount_ui: Callable[[FastAPI], None] | None = None,
) -> FastAPI:
    ctx = AppContext(engine=engine, served=None, config=config, metrics=Metrics(engine))

    async def start_engine() -> None:
        try:
            await engine.start()
            ctx.served = make_served(engine)
            logger.info("ready: serving %s", ", ".join(m.id for m in ctx.served.all()))
        except Exception as exc:
            logger.exception("engine failed to start")
            ctx.load_error = f"{type(exc).__name__}: {exc}"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(start_engine())
        yield
        if not task.done():
            task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await engine.shutdown(config.shutdown_timeout)

    app = FastAPI(title="llm-serve", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ctx
    auth = [Depends(_require_api_key(config.resolved_api_key()))]
    app.include_router(routes_models.ops_router)
    app.include_router(routes_tokenize.router)
    app.include_router(routes_models.router, dependencies=auth)
    app.include_router(routes_chat.router, dependencies=auth)
    app.include_router(routes_completions.router, dependencies=auth)
    _install_error_handlers(app, ctx)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    if mount_ui is not None:
        mount_ui(app)
    return app


def _require_api_key(key: str | None):
    async def check(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise AuthenticationError(
                "Incorrect or missing API key: send `Authorization: Bearer <key>` with the server's --api-key"
            )

    return check


def _install_error_handlers(app: FastAPI, ctx: AppContext) -> None:
    def respond(request: Request, exc: APIError) -> JSONResponse:
        route = getattr(request.scope.get("route"), "path", "unmatched")  # bounded label values
        ctx.metrics.requests.labels(route, "-", str(exc.status_code)).inc()
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        else:
            msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return respond(request, BadRequestError(msg.removeprefix("Value error, "), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(str(exc.detail))
        err.status_code = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return respond(request, err)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return respond(request, InternalError("internal server error; see the server log"))


class BodySizeLimit:
    """413 for bodies over the limit, by Content-Length or while reading a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = PayloadTooLargeError(f"request body exceeds the server's limit of {self.max_bytes} bytes")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        return await self.app(scope, limited_receive, send)
