"""``create_app(settings)``: the app factory and its lifespan, which owns all state.

The lifespan loads the registry, starts one worker per device, warms every function up
(the first jacrev of a function costs ~1 s) and only then reports ready. State lives on
``app.state.service``; nothing is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from typing import Any, AsyncIterator

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .engine import Call, Engine
from .errors import InternalError, InvalidInput, MethodNotAllowed, NotFound, ServiceError
from .responses import problem_response
from .logs import configure_logging
from .metrics import Metrics
from .registry import FunctionSpec, Registry
from .routes import DERIVATIVE_KINDS, handle, router
from .scheduler import Scheduler
from .docs_ui import add_docs
from .settings import Settings
from .state import ServiceState

__all__ = ["create_app"]

log = logging.getLogger("jacobian_service")
access_log = logging.getLogger("jacobian_service.access")


def resolve_devices(setting: str) -> list[torch.device]:
    """``auto``: every visible GPU, else the CPU; ``cuda``: every visible GPU."""
    if setting == "cpu":
        return [torch.device("cpu")]
    has_cuda = torch.cuda.is_available()
    if setting == "auto":
        setting = "cuda" if has_cuda else "cpu"
        if setting == "cpu":
            return [torch.device("cpu")]
    if not has_cuda:
        raise RuntimeError(f"device {setting!r} asked for, but CUDA is not available")
    if setting == "cuda":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    index = int(setting.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"device {setting!r} asked for, but only {torch.cuda.device_count()} GPUs are visible")
    return [torch.device("cuda", index)]


def default_memory_budget(device: torch.device) -> int:
    """256 MiB on the CPU (streams stay small; larger chunks gain little there); half the
    free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 256 << 20


def _warmup_call(spec: FunctionSpec) -> Call:
    """Small inputs of the declared shapes (symbols bound to 3)."""
    args = []
    for inp in spec.inputs:
        shape = tuple(3 if isinstance(d, str) else d for d in (inp.shape or (3,)))
        args.append(np.random.default_rng(0).random(shape).astype("float32" if inp.default_dtype == "bfloat16" else inp.default_dtype))
    floating = tuple(i for i, inp in enumerate(spec.inputs) if inp.default_dtype.startswith(("float", "bfloat")))
    return Call(spec=spec, args=args, dtypes=[i.default_dtype for i in spec.inputs], argnums=floating[:1] or (0,))


async def _warm_up(state: ServiceState) -> None:
    deadline_s = 120.0
    for spec in state.registry:
        for index in range(len(state.scheduler.workers)):
            call = _warmup_call(spec)
            try:
                await state.scheduler.run(lambda eng: eng.jacobian(call), deadline=time.monotonic() + deadline_s, worker=index)
            except Exception as exc:  # a function that needs special inputs still serves
                log.warning("warm-up of %s failed: %s", spec.name, exc)
    state.ready = True
    log.info("ready: %d functions on %s", len(state.registry), ", ".join(map(str, state.devices)))


class AccessMiddleware:
    """Echo the client's ``X-Request-ID`` (or make one) on every response, and log one
    line per request with that id (never any array data)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
        request_id = request_id if request_id.isprintable() and request_id else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] not in ("/healthz", "/readyz", "/metrics"):
                access_log.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status or "aborted",
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1e3, 3),
                    },
                )


_DERIVATIVE_PATH = re.compile(r"/v1/functions/(?P<name>[^/]+)/(?P<kind>[a-z]+)")


class FastPath:
    """POST /v1/functions/{name}/{kind} straight to ``routes.handle``.

    FastAPI's routing, dependency solving and exception middleware took about half of a
    small request's event-loop time (profiled with py-spy on the mlp Jacobian); the hot
    endpoints skip them. The FastAPI routes of the same paths stay for the OpenAPI
    document and call the same ``handle``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _DERIVATIVE_PATH.fullmatch(scope["path"])
            if match and match["kind"] in DERIVATIVE_KINDS:
                request = Request(scope, receive)
                try:
                    response = await handle(request, match["name"], match["kind"])  # type: ignore[arg-type]
                except Exception:  # a bug of ours: logged, never shown
                    log.exception("unhandled error on POST %s", scope["path"])
                    response = problem_response(InternalError("internal error; see the server log"), _request_id(request))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "") or uuid.uuid4().hex


def _openapi(app: FastAPI, registry: Registry) -> dict[str, Any]:
    """FastAPI's document, with the served function names as the ``name`` enum."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        names = [spec.name for spec in registry]
        for path, item in doc["paths"].items():
            for operation in item.values():
                for param in operation.get("parameters", []):
                    if param["name"] == "name" and "/functions/{name}" in path:
                        param["schema"] = {"type": "string", "enum": names}
        app.openapi_schema = doc
    return app.openapi_schema


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """Build the ASGI app. ``registry`` overrides the modules named in ``settings``."""
    settings = settings or Settings()
    configure_logging(settings.log_format)
    # Loading the functions is configuration, not a resource: do it here, so a bad user
    # module fails at start-up and /openapi.json can list the names.
    registry = registry if registry is not None else Registry.from_modules(settings.function_modules)
    api_keys = settings.load_api_keys()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threads = settings.torch_threads if settings.torch_threads is not None else max(1, (os.cpu_count() or 2) // 2)
        if threads:
            torch.set_num_threads(threads)
        devices = resolve_devices(settings.device)
        metrics = Metrics()
        scheduler = Scheduler(
            [Engine(d, settings.memory_budget_bytes or default_memory_budget(d)) for d in devices],
            settings.max_queue,
            max_batch=settings.max_batch_size,
            batch_wait_s=settings.max_batch_wait_ms / 1e3,
            on_batch=metrics.batch_size.observe,
        )
        state = ServiceState(settings, registry, scheduler, metrics, devices, api_keys)
        app.state.service = state
        scheduler.start()
        warm = asyncio.create_task(_warm_up(state)) if settings.warmup else None
        if warm is None:
            state.ready = True
        try:
            yield
        finally:
            state.ready = False
            state.draining = True
            if warm is not None:
                warm.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warm
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(
        title="jacobian-service",
        version=__version__,
        description="Jacobians of registered PyTorch functions, computed like torch.func.jacrev.",
        lifespan=lifespan,
        docs_url=None,  # docs_ui serves /docs and /redoc without a CDN
        redoc_url=None,
    )
    app.include_router(router)
    add_docs(app)
    app.add_middleware(FastPath)
    app.add_middleware(AccessMiddleware)  # added last: outermost, so it sees every request
    app.openapi = lambda: _openapi(app, registry)  # type: ignore[method-assign]

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Any:
        return problem_response(exc, _request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if exc.status_code == 404:
            error: ServiceError = NotFound(f"no route for {request.method} {request.url.path}")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        else:
            error = ServiceError(str(exc.detail))
            error.status, error.code, error.title = exc.status_code, "http_error", "HTTP error"
        return problem_response(error, _request_id(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        return problem_response(InvalidInput(f"invalid request: {exc.errors()[:3]}"), _request_id(request))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(InternalError("internal error; see the server log"), _request_id(request))

    return app
