"""``jacobian-service serve``: the supervisor, its engine processes, N HTTP front ends.

    serve (this process: supervisor, no torch)
      ├── engine process per device   python -m jacobian_service.engine.process
      └── front-end process × N       uvicorn on one shared listening socket

The listening socket is bound here and handed to every front end (as uvicorn's own
multi-worker mode does), so they share one port. A front end that dies is started
again; engines are the supervisor's. SIGTERM drains the front ends (``/readyz`` 503
for ``drain_delay_s``, then up to ``drain_grace_s`` for requests in flight), then
stops the engines.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from .settings import Settings

__all__ = ["serve", "serve_in_process"]

log = logging.getLogger("jacobian_service")


def _uvicorn_config(app: Any, settings: Settings) -> Any:
    import uvicorn

    from .connections import guarded_protocol

    metrics = app.service_state.metrics
    return uvicorn.Config(
        app,
        # uvicorn's own protocol (httptools, else h11) with a deadline for request headers.
        http=guarded_protocol(settings.header_timeout_s, lambda phase: metrics.connection_timeouts.labels(phase).inc()),
        host=settings.host,
        port=settings.port,
        root_path=settings.root_path,
        timeout_graceful_shutdown=max(1, round(settings.drain_grace_s)),
        timeout_keep_alive=5,
        log_level="info",
        access_log=False,  # the app logs each request with its request id
    )


def serve_in_process(settings: Settings) -> int:
    """One process: HTTP and engine threads (debugging, and the v1 layout)."""
    from .app import create_app
    from .drain import DrainingServer

    app = create_app(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a clean drain exits 0, not "killed by SIGTERM"
        signal.signal(sig, lambda *_: None)
    DrainingServer(_uvicorn_config(app, settings), app, settings.drain_delay_s).run()
    return 0


def _front_end(run_dir: str, sock: socket.socket, count: int) -> None:
    """One front-end process (spawned: no torch, no state from the parent)."""
    from .app import create_app
    from .drain import DrainingServer

    settings = Settings()
    app = create_app(settings, run_dir=Path(run_dir), front_ends=count)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    DrainingServer(_uvicorn_config(app, settings), app, settings.drain_delay_s).run(sockets=[sock])


def _forget_metrics(pid: int | None) -> None:
    """Drop a dead front end's live gauges (its counters still count)."""
    from prometheus_client import multiprocess

    if pid:
        multiprocess.mark_process_dead(pid)


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings) -> int:
    from .logs import configure_logging
    from .supervisor import Supervisor

    configure_logging(settings.log_format)
    settings.load_api_keys()  # fail closed, here, before anything starts
    run_dir = Path(tempfile.mkdtemp(prefix="jacobian-service-"))
    supervisor = Supervisor(settings, run_dir)
    stopping = threading.Event()
    front_ends: list[Any] = []

    def on_signal(sig: int, frame: Any) -> None:
        if stopping.is_set():  # a second signal: stop now
            for p in front_ends:
                if p.is_alive():
                    p.kill()
        stopping.set()
        for p in front_ends:
            if p.is_alive() and p.pid:
                os.kill(p.pid, sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Engines and front ends share their metrics through files here (see metrics.py);
    # the processes started below inherit the variable.
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # glibc raises its mmap threshold each time a large block is freed, after which
    # blocks of that size come from the heap and stay resident: streaming a 2 GB
    # Jacobian in 12 MB chunks grew an engine by 250-450 MB, against 90 MB for one
    # chunk's peak. A fixed threshold keeps large blocks mmapped and returned on free;
    # torch's huge-page allocations (THP_MEM_ALLOC_ENABLE) then keep the fresh pages
    # cheap (measured: 9.2 s for the 2 GB without them, 4.0 s with, 4.3 s before).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        doc = supervisor.start_first()
        supervisor.start()
        sock = _bind(settings)
        count = settings.front_end_count
        ctx = multiprocessing.get_context("spawn")
        log.info("serving %d functions on %s with %d front ends; engines on %s",
                 len(doc["functions"]), sock.getsockname()[:2], count, ", ".join(doc["devices"]))

        def start(i: int) -> Any:
            p = ctx.Process(target=_front_end, args=(str(run_dir), sock, count), name=f"front-end-{i}", daemon=False)
            p.start()
            return p

        front_ends.extend(start(i) for i in range(count))
        while not stopping.is_set():
            for i, p in enumerate(front_ends):
                if not p.is_alive() and not stopping.is_set():
                    log.error("front end %d exited (%s); starting it again", i, p.exitcode)
                    _forget_metrics(p.pid)
                    front_ends[i] = start(i)
            stopping.wait(0.5)
        for p in front_ends:
            p.join(settings.drain_delay_s + settings.drain_grace_s + 10)
            if p.is_alive():
                p.kill()
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        supervisor.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
