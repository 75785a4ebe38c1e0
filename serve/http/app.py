"""The app factory: `build_app(engine, config, make_served)` wires routers, auth, limits and errors.

The engine starts in the background when the app starts, so `/health` answers while weights load
and `/ready` turns 200 once the engine has produced a token. Nothing is loaded at import time.

Errors: every answer that is not a 2xx carries OpenAI's error body. Typed API errors, validation
errors (400 naming the parameter, never FastAPI's 422) and routing errors (404; 405 with `Allow`)
go through the handlers below; anything else a route raises is caught by `ErrorBoundary`, answered
with a 500 and logged, and the connection stays usable (Starlette's own last-resort handler re-raises,
which makes uvicorn drop a keep-alive connection after the reply).
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
from serve.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    to_api_error,
)
from serve.http import routes_adapters, routes_chat, routes_completions, routes_models, routes_tokenize
from serve.http.context import AppContext
from serve.http.openapi import install_openapi
from serve.metrics import Metrics
from serve.served import ServedModels
from serve.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)


def build_app(
    engine: Engine,
    config: ServeConfig,
    make_served: Callable[[Engine], ServedModels],
    *,
    mount_ui: Callable[[FastAPI], None] | None = None,
) -> FastAPI:
    key = config.resolved_api_key()
    metrics = Metrics(engine, hide_adapter_names=bool(key) and not config.metrics_need_key)
    ctx = AppContext(engine=engine, served=None, config=config, metrics=metrics)

    async def start_engine() -> None:
        try:
            await engine.start()
            ctx.grammars = GrammarCompiler(engine.tokenizer, getattr(engine, "vocab_size", None))
            ctx.served = make_served(engine)
            metrics.served = ctx.served
            logger.info("ready: serving %s", ", ".join(m.id for m in ctx.served.all()))
        except Exception as exc:
            logger.exception("engine failed to start")
            ctx.load_error = f"{type(exc).__name__}: {exc}"
            return
        try:
            # The grammar compiler's vocabulary table (about a second), after readiness, on the tokenizer
            # thread (it reads the tokenizer); a constrained request that comes first waits for it.
            await ctx.tokenize(ctx.grammars.warm)
        except Exception as exc:  # constrained requests then get a 400 saying why; the rest is served
            logger.warning("grammar-constrained output is unavailable: %s", exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(start_engine())
        yield
        if not task.done():
            task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await engine.shutdown(config.shutdown_timeout)
        ctx.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llm-serve", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ctx
    auth = [Depends(_require_api_key(key))]
    app.include_router(routes_models.ops_router)
    app.include_router(routes_models.metrics_router, dependencies=auth if config.metrics_need_key else [])
    app.include_router(routes_tokenize.router, dependencies=auth)
    app.include_router(routes_models.router, dependencies=auth)
    app.include_router(routes_chat.router, dependencies=auth)
    app.include_router(routes_completions.router, dependencies=auth)
    app.include_router(routes_adapters.router, dependencies=auth)
    _install_error_handlers(app, ctx)
    app.add_middleware(ErrorBoundary, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    install_openapi(
        app,
        api_key_set=bool(key),
        open_paths={"/health", "/ready"} | (set() if config.metrics_need_key else {"/metrics"}),
        vocab_size=lambda: len(ctx.served.tokenizer) if ctx.served is not None else None,
    )
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


def error_json(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers or None)


def _route_label(request: Request) -> str:
    return getattr(request.scope.get("route"), "path", "unmatched")  # bounded label values


def _install_error_handlers(app: FastAPI, ctx: AppContext) -> None:
    def respond(request: Request, exc: APIError) -> JSONResponse:
        ctx.metrics.requests.labels(_route_label(request), "-", str(exc.status_code)).inc()
        return error_json(exc)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return respond(request, validation_to_400(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err: APIError = NotFoundError(f"no route {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = MethodNotAllowedError(f"method {request.method} is not allowed on {request.url.path}")
        else:
            err = APIError(str(exc.detail))
            err.status_code = exc.status_code
            err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.headers = dict(exc.headers or {})  # e.g. `Allow` on a 405
        return respond(request, err)


# Pydantic names the branch of a union it tried in `loc` (`str`, `list[TextPart]`, `function-after[...]`);
# the client's parameter path is the rest.
_TYPE_MISMATCH_SUFFIX = "_type"


def validation_to_400(errors: list[dict]) -> BadRequestError:
    """One 400 for pydantic's errors: the most specific one, with `param` as the field's path."""
    if not errors:
        return BadRequestError("invalid request")
    # Of a union's alternatives, the one whose type matched says what is wrong with the value.
    err = next((e for e in errors if not str(e.get("type", "")).endswith(_TYPE_MISMATCH_SUFFIX)), errors[0])
    if err.get("type") == "json_invalid":
        return BadRequestError("the request body is not valid JSON")
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_branch_label(p)]
    # A validator that knows which field is wrong (an unsupported extra field) says so itself.
    param = getattr((err.get("ctx") or {}).get("error"), "param", None) or ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return BadRequestError(f"{param}: {msg}" if param else msg, param=param)


def _is_branch_label(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict"})


class ErrorBoundary:
    """Answer anything a route raised with an OpenAI-shaped error, without dropping the connection."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            err = to_api_error(exc)  # logs anything unexpected with its traceback
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, "-", str(err.status_code)).inc()
            if not started:
                await error_json(err)(scope, receive, send)


class BodySizeLimit:
    """413 for bodies over the limit, by Content-Length or while reading a chunked body.

    A chunked body is read here, up to the limit, before the route sees it: over the limit the client
    gets the 413 (the route's JSON parser would otherwise turn the interruption into a 400).
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:
                return await error_json(self._too_large())(scope, receive, send)
            return await self.app(scope, receive, send)  # the server holds the body to its length
        buffered, seen = [], 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await error_json(self._too_large())(scope, receive, send)
            if not message.get("more_body"):
                break
        replay = iter(buffered)

        async def replay_receive():
            return next(replay, None) or await receive()

        return await self.app(scope, replay_receive, send)

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"request body exceeds the server's limit of {self.max_bytes} bytes")
