"""`create_app(settings, engine=None)`: the FastAPI app, its lifespan, error shapes and request metrics.

Design choices:
- The lifespan loads the model once (or takes the engine it was given: tests pass a tiny random one),
  opens the database (`init_db` creates or migrates the schema) and starts the one `Scheduler`. The
  `ChatService` exists before that, so the web UI can be mounted on it when the app is created.
- Every error leaves in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: validation
  errors (including malformed JSON) are 400 `invalid_request_error`, as OpenAI answers them, not FastAPI's
  422; unknown paths and methods keep their 404/405; anything unexpected is a 500 with a generic message
  (the traceback goes to the log, never to the client).
- With API keys set, the web UI at /ui and the API docs (/docs, /redoc, /openapi.json: the schema maps every
  route and parameter, which is reconnaissance for anyone who may not call them) ask for one too. A browser
  cannot add a bearer header to a page's own requests, so these accept HTTP Basic auth as well (any user name,
  an API key as the password), for which browsers show a login prompt and then send with every request of
  the page (Swagger's fetch of /openapi.json included). Only /health stays open, for probes.
  KServe V2 routes answer `{"error": "..."}`, as that protocol specifies.
- Request bodies over `max_request_bytes` are refused with a 413 before anything parses them (`limits.py`).
- Request metrics come from a small ASGI middleware that reads the matched route's template after routing,
  so streamed responses are timed to their last byte.
"""

from __future__ import annotations

import base64
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mini_claude.catalog import BUNDLED_NAME, bundled_model_path, resolve_model
from mini_claude.db import init_db, make_engine
from mini_claude.engine import Engine
from mini_claude.server import routes
from mini_claude.server.errors import APIError, validation_error
from mini_claude.server.files import FileService
from mini_claude.server.fine_tunes import FineTuneService
from mini_claude.server.limits import BodyLimitMiddleware
from mini_claude.server.metrics import Metrics
from mini_claude.server.predict import PredictService
from mini_claude.server.protocol import ErrorDetail, ErrorResponse
from mini_claude.server.service import ChatService
from mini_claude.server.vector_stores import VectorStoreService
from mini_claude.settings import Settings

log = logging.getLogger(__name__)

HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def load_engine(settings: Settings) -> Engine:
    """The model named by the settings (the bundled one by default), as `mini-claude serve` loads it."""
    path = resolve_model(settings.model)
    name = BUNDLED_NAME if path == bundled_model_path() else path.name.removesuffix(".gguf")
    return Engine.load(
        path, dtype=settings.dtype, quantize=settings.quantize, threads=settings.threads, name=name,
        adapters=settings.adapters,
    )  # fmt: skip


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the server. The model loads when the app starts (its lifespan), unless `engine` is given."""
    settings = settings or Settings()
    service = ChatService(settings, Metrics())
    fine_tunes = FineTuneService(service)
    files = FileService(service)
    vector_stores = VectorStoreService(service, files)
    predict = PredictService(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = engine if engine is not None else await anyio.to_thread.run_sync(load_engine, settings)
        database = make_engine(settings.database_url)
        try:
            await anyio.to_thread.run_sync(init_db, database)
            service.start(loaded, database)
            await anyio.to_thread.run_sync(fine_tunes.start)
            await anyio.to_thread.run_sync(predict.start)
            log.info("serving %s (context %d)", ", ".join(service.model_ids), loaded.context_window)
            # What start-up made (modules, the model, the tokenizer, the predict models) lives as long as the
            # server: out of the collector's sight, a full collection walks only what serving made since.
            # (Thawed at shutdown, for processes that go on: tests start many apps.)
            gc.freeze()
            yield
        finally:
            gc.unfreeze()
            await anyio.to_thread.run_sync(predict.stop)
            await anyio.to_thread.run_sync(fine_tunes.stop)
            vector_stores.stop()
            service.stop()
            database.dispose()

    app = FastAPI(
        title="Mini-Claude", version="0.1.0", lifespan=lifespan,
        description="OpenAI-compatible chat and completions over a from-scratch engine, with stored conversations.",
    )  # fmt: skip
    app.state.service = service
    app.state.fine_tunes = fine_tunes
    app.state.files, app.state.vector_stores = files, vector_stores
    app.state.predict = predict
    app.state.settings = settings
    for router in routes.ROUTERS:
        app.include_router(router)
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)

    ui = settings.ui and _mount_ui(app, service)
    if settings.api_keys:
        docs = (app.docs_url, app.redoc_url, app.openapi_url, "/docs/oauth2-redirect")
        app.add_middleware(BrowserAuthMiddleware, service=service, paths=tuple(p for p in docs if p),
                           prefixes=("/ui",) if ui else ())  # fmt: skip

    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse("/ui" if ui else "/docs")

    return app


def _mount_ui(app: FastAPI, service: ChatService) -> bool:
    """Mount the web UI at /ui when its package (and Gradio) is installed; the API works without it."""
    try:
        from mini_claude.ui import mount_ui  # type: ignore[attr-defined]
    except ImportError:
        return False
    mount_ui(app, service)
    return True


def _error(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body().model_dump(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc.errors())
        return JSONResponse(error.body().model_dump(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"Unknown path: {request.method} {request.url.path}"
        detail = ErrorDetail(message=message, type=kind, code=HTTP_ERROR_CODES.get(exc.status_code))
        return _error(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        detail = ErrorDetail(message="The server had an error processing your request.", type="server_error")
        return _error(500, detail)


class BrowserAuthMiddleware:
    """Requires an API key (Basic password or Bearer token) for `paths` and everything under `prefixes`: the
    pages a browser opens (the web UI, the API docs), which cannot send a bearer header of their own."""

    def __init__(
        self, app: ASGIApp, service: ChatService, paths: tuple[str, ...] = (), prefixes: tuple[str, ...] = ()
    ) -> None:
        self.app, self.service, self.paths, self.prefixes = app, service, set(paths), prefixes

    def _token(self, scope: Scope) -> str:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return ""
        return value.strip() if scheme.lower() == "bearer" else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        guarded = path in self.paths or any(path == p or path.startswith(p + "/") for p in self.prefixes)
        if scope["type"] not in ("http", "websocket") or not guarded or self.service.authorized(self._token(scope)):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            headers = {"WWW-Authenticate": 'Basic realm="mini-claude", charset="UTF-8"'}
            await PlainTextResponse("Log in with any user name and an API key as the password.", 401, headers)(
                scope, receive, send
            )


class MetricsMiddleware:
    """Counts and times every HTTP request by route template and status (see `metrics.py`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(template, scope["method"], status, time.perf_counter() - start)
