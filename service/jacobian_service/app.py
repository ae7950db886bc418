"""``create_app``: the HTTP front end as one pure-ASGI app whose lifespan owns its state.

The app never imports torch. It reaches the engines through an engine client: engine
processes over Unix sockets (``channel.py``; the supervisor's word over ZeroMQ) when the
supervisor gave it a run directory (``serve``), else
engine threads in this process (tests, ``serve --in-process``). Requests pass through

    AccessMiddleware (request id, log line, request metric)
      -> SendGuard (responses in pieces, each under the send timeout: connections.py)
        -> CORS (only with CORS_ORIGINS: Starlette's, outside auth, as a browser's
           preflight carries no key)
          -> AuthMiddleware (API keys, every route; operators' keys for the routes the
             table marks auth="admin")
            -> Router (the one table in routes.py; OpenAPI is written from it)
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from jacobian_client import wire

from .compression import Compressible
from .connections import BodyBudget, SendGuard, abort_connection, unsent_bytes
from .engine_client import InProcessEngines, RemoteEngines
from .logs import configure_logging
from .metrics import Metrics
from .middleware import AccessMiddleware, AuthMiddleware, cors
from .openapi import build_openapi
from .registry import Registry
from .responses import EncodeBudget
from .routes import ROUTES, Route, Router
from .settings import Settings
from .state import ServiceState
from .upgrades import as_plain_get

__all__ = ["ServiceApp", "create_app"]

log = logging.getLogger("jacobian_service")


class ServiceApp:
    """The ASGI app: lifespan (engines up, then down) and the middleware stack."""

    def __init__(self, settings: Settings, engines: Any, metrics: Metrics, front_ends: int = 1,
                 api_keys: tuple[str, ...] | None = None, admin_keys: tuple[str, ...] | None = None) -> None:
        self.settings = settings
        self.service_state = ServiceState(
            settings=settings,
            engines=engines,
            metrics=metrics,
            # Encoding a result whole costs up to a few times its size (.npz builds its zip
            # in memory; large JSON is streamed in pieces instead): a burst of large
            # results is encoded within the memory budget's worth of results at a time.
            encode_budget=EncodeBudget(settings.memory_budget_bytes or (256 << 20)),
            body_budget=BodyBudget(settings.body_budget, metrics.body_bytes),
            api_keys=api_keys if api_keys is not None else settings.load_api_keys(),
            admin_keys=admin_keys if admin_keys is not None else settings.load_admin_keys(),
            front_ends=front_ends,
        )
        self.routes = [*ROUTES, *_doc_routes()]
        self.router = Router(self.routes)
        self._openapi: dict[str, Any] | None = None
        self._openapi_body: Compressible | None = None
        self._lifespans = 0
        auth: Any = AuthMiddleware(self.router, self.service_state.api_keys, settings.metrics_auth, settings.docs_auth,
                                   admin_keys=self.service_state.admin_keys)
        if settings.cors_origin_list:
            auth = cors(auth, settings.cors_origin_list)
        guard = SendGuard(auth, settings.send_timeout_s,
                          on_timeout=lambda phase: metrics.connection_timeouts.labels(phase).inc(),
                          min_rate=settings.min_send_rate_bytes_per_s)
        self.asgi = AccessMiddleware(guard, metrics, self.router)

    @property
    def registry(self) -> Registry:
        return self.service_state.registry

    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:
            self._openapi = build_openapi(ROUTES, self.registry, self.settings.root_path,
                                          api_keys=bool(self.service_state.api_keys),
                                          admin_keys=bool(self.service_state.admin_keys),
                                          metrics_auth=self.settings.metrics_auth)
        return self._openapi

    def openapi_body(self) -> Compressible:
        """The document's JSON, written once, with its gzip form (the docs pages fetch
        it at every load)."""
        if self._openapi_body is None:
            self._openapi_body = Compressible(wire.dumps(self.openapi()))
        return self._openapi_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":  # (no WebSocket endpoint: the GET it also is, as under serve)
            await as_plain_get(self, scope, receive, send)
            return
        scope["service"] = self.service_state
        scope["jacobian_app"] = self
        # The server's own send, for cutting off a client that stops reading or reads too
        # slowly (SendGuard).
        state = scope.setdefault("state", {})
        state["abort_connection"] = functools.partial(abort_connection, send)
        state["unsent"] = functools.partial(unsent_bytes, send)
        try:
            await self.asgi(scope, receive, send)
        finally:
            # That send is bound to uvicorn's request cycle, which holds this scope: left
            # here, every request would leave a cycle that only the garbage collector frees.
            state.pop("abort_connection", None)
            state.pop("unsent", None)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        engines = self.service_state.engines
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Lifespans nest when one app sits under several test clients at once
                # (a module-wide client, plus one per schemathesis case): the engines
                # start with the first and stop with the last.
                self._lifespans += 1
                try:
                    if self._lifespans == 1:
                        self.service_state.draining = False
                        await engines.start()
                except Exception as exc:
                    self._lifespans -= 1
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._lifespans -= 1
                if self._lifespans == 0:
                    self.service_state.draining = True
                    await engines.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


# ------------------------------------------------------------------ docs


async def openapi_json(request: Request) -> Response:
    body, headers = request.scope["jacobian_app"].openapi_body().choose(request.headers.get("accept-encoding", ""))
    return Response(body, media_type=wire.JSON, headers=headers)


def _doc_routes() -> list[Route]:
    from . import docs_ui

    return [
        Route("GET", "/openapi.json", openapi_json, "openapi", "This document", "docs", auth="docs"),
        # The pages hold nothing secret and load openly: they ask for the key the document
        # wants (docs_ui.py), as a browser's page load cannot send one.
        Route("GET", "/docs", docs_ui.swagger_ui, "docs", "Interactive docs (Swagger UI)", "docs", auth="public"),
        Route("GET", "/redoc", docs_ui.redoc, "redoc", "Reference docs (ReDoc)", "docs", auth="public"),
        Route("GET", docs_ui.ASSETS_URL + "/{file}", docs_ui.asset, "docsAsset", "Swagger UI and ReDoc files", "docs",
              auth="public"),
        Route("GET", "/favicon.ico", docs_ui.favicon, "favicon", "The pages' icon (browsers ask for it)", "docs",
              auth="public"),
    ]


# ------------------------------------------------------------------ factory


def create_app(
    settings: Settings | None = None, registry: Registry | None = None, *, run_dir: Path | None = None, front_ends: int = 1,
    channel: Any = None, api_keys: tuple[str, ...] | None = None, registry_doc: dict[str, Any] | None = None,
    admin_keys: tuple[str, ...] | None = None,
) -> ServiceApp:
    """The front end. With ``run_dir`` it talks to the supervisor's engine processes
    (through ``channel``, ``supervision.Channel``, which ``serve`` hands it, as it does
    the ``api_keys`` and ``admin_keys`` it loaded and the ``registry_doc`` engine 0 wrote); without, it runs engines on threads here (``registry``
    overrides the modules named in ``settings``)."""
    settings = settings or Settings()
    configure_logging(settings.log_format)
    metrics = Metrics()
    if run_dir is not None:
        engines: Any = RemoteEngines(settings, run_dir, channel, registry_doc)
    else:
        # Loading the functions is configuration, not a resource: do it here, so a bad
        # user module fails at start-up.
        registry = registry if registry is not None else Registry.from_modules(settings.function_modules)
        configure_logging(settings.log_format)  # again: a module may have configured logging as it was imported
        engines = InProcessEngines(settings, registry, on_batch=metrics.batch_size.observe)
    return ServiceApp(settings, engines, metrics, front_ends, api_keys, admin_keys)
