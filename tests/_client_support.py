"""Test helpers for the SDK tests: servers on loopback in background threads.

``serve(app)`` runs any ASGI app under uvicorn on 127.0.0.1 and a free port, in a
daemon thread with its own event loop, and yields its base URL; ``real_app()`` builds
the real service (when it is importable) with settings suited to tests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import uvicorn

__all__ = ["free_port", "real_app", "serve"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app: Any, *, ready_path: str | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Run ``app`` on loopback until the block ends; yield ``http://127.0.0.1:PORT``."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="auto",
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"test server on port {port} did not start")
        time.sleep(0.02)
    if ready_path is not None:
        import httpx

        while True:
            try:
                if httpx.get(url + ready_path, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"test server on port {port} not ready")
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def real_app(**settings: Any) -> Any:
    """The real service app (raises ImportError when the server is not there)."""
    from jacobian_service.app import create_app
    from jacobian_service.settings import Settings

    defaults: dict[str, Any] = {"device": "cpu", "warmup": False, "log_format": "text"}
    defaults.update(settings)
    return create_app(Settings(**defaults))


@contextlib.contextmanager
def real_server(**settings: Any) -> Iterator[str]:
    """The real service on loopback, serving the built-ins, tests.user_functions and
    tests._client_functions; yields its URL once /readyz answers 200."""
    settings.setdefault("functions", "jacobian_service.examples,tests.user_functions,tests._client_functions")
    with serve(real_app(**settings), ready_path="/readyz") as url:
        yield url
