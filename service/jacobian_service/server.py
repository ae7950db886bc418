"""``jacobian-service serve``: the supervisor, its engine processes, N HTTP front ends.

    serve (this process: supervisor, no torch)
      ├── engine process per device   python -m jacobian_service.engine.process
      └── front-end process × N       uvicorn, each on its own listening socket

The listening sockets are bound here, one per front end, all on one port with
``SO_REUSEPORT``: the kernel spreads new connections evenly over them. (One shared
socket, as uvicorn's own multi-worker mode uses, lets whichever front end wakes first
accept a whole burst: measured here, one of two front ends took nearly all of wrk's 64
keep-alive connections and ran at a full core while the other idled.) Where the
platform has no ``SO_REUSEPORT`` the front ends share one socket. A front end that dies
is started again on its socket (connections queued there wait for it); engines are the
supervisor's. SIGTERM drains the front ends (``/readyz`` 503
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
import time
from pathlib import Path
from typing import Any

from .heap import FRONT_END_YOUNG, freeze_heap
from .orphans import stop_with_parent
from .procfs import stopped
from .settings import FRONT_END_ONLY, Settings

__all__ = ["serve", "serve_in_process"]

log = logging.getLogger("jacobian_service")


def _uvicorn_config(app: Any, settings: Settings) -> Any:
    import uvicorn

    from .connections import guarded_protocol
    from .middleware import cors_answer_headers

    metrics = app.service_state.metrics
    return uvicorn.Config(
        app,
        # uvicorn's own protocol (httptools, else h11) with a deadline for request headers;
        # what it answers itself carries the app's CORS headers.
        http=guarded_protocol(settings.header_timeout_s, lambda phase: metrics.connection_timeouts.labels(phase).inc(),
                              cors=cors_answer_headers(settings.cors_origin_list) if settings.cors_origin_list else None,
                              drain=(settings.send_timeout_s, settings.min_send_rate_bytes_per_s)),
        # No WebSocket endpoints: an upgrade request is served as the plain HTTP request
        # it also is, by the guarded protocol above. (With a WebSocket library installed,
        # uvicorn would hand the app a websocket scope, which it serves as the same GET:
        # upgrades.py.)
        ws="none",
        host=settings.host,
        port=settings.port,
        root_path=settings.root_path,
        timeout_graceful_shutdown=max(1, round(settings.drain_grace_s)),
        # An idle keep-alive is closed by the header deadline (HEADER_TIMEOUT_S after its
        # last answer was taken: connections.py); uvicorn's own clock only backs it up.
        # At uvicorn's 5 s, httpx's own keep-alive expiry (5 s, counted from when it has
        # read an answer, later than the server's clock starts) lost the race: a pooled
        # client reused a connection the server closed as its request came (reset,
        # unanswered: test_concurrency's 64 clients under load).
        timeout_keep_alive=settings.header_timeout_s + 1,
        log_level="info",
        access_log=False,  # the app logs each request with its request id
        # uvicorn's X-Forwarded-For / -Proto rewrite of the scope's client and scheme:
        # nothing here reads either (no URL is built from the request, no client address
        # logged), and it was a layer of its own scanning every request's headers.
        proxy_headers=False,
    )


def raise_open_file_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit (at most 2**20),
    for it and every process it starts.

    Each client connection holds a file descriptor in a front end. At a soft limit of
    1024 (the usual default for a shell or a systemd service, whose hard limit is far
    higher), one client holding a thousand idle connections left none for anyone else:
    uvloop then accepts each new connection and closes it at once, so every other
    client was refused for as long as the idle ones were held. Go's runtime raises the
    soft limit the same way at start-up."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The kernel refuses more than fs.nr_open (2**20 by default), and RLIM_INFINITY is -1.
    target = min(_MAX_OPEN_FILES, _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < _FEW_OPEN_FILES:
        log.warning("the open-file limit is %d (hard limit %d): a client holding that many idle connections "
                    "would leave none for other clients; raise it (ulimit -n, LimitNOFILE, --ulimit nofile)",
                    soft, hard)


_MAX_OPEN_FILES = 1 << 20
_FEW_OPEN_FILES = 4096


def serve_in_process(settings: Settings) -> int:
    """One process: HTTP and engine threads (debugging, and the v1 layout)."""
    from .app import create_app
    from .drain import DrainingServer

    raise_open_file_limit()
    app = create_app(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a clean drain exits 0, not "killed by SIGTERM"
        signal.signal(sig, lambda *_: None)
    freeze_heap()
    DrainingServer(_uvicorn_config(app, settings), app, settings.drain_delay_s).run()
    return 0


def _front_end(run_dir: str, sock: socket.socket, count: int, channel: Any, api_keys: tuple[str, ...],
               registry: dict[str, Any], admin_keys: tuple[str, ...] = ()) -> None:
    """One front-end process (spawned: no torch, no state from the parent). ``channel``
    (``supervision.Channel``), ``api_keys`` and ``admin_keys`` come through the spawn's pipe: they are
    in no environment a function could read (``/proc/PID/environ``); so does the
    ``registry`` ``serve`` read at start-up: the run directory's file is in a function's
    reach, and a front end started again read whatever it had written there."""
    from .app import create_app
    from .drain import DrainingServer

    settings = Settings()
    app = create_app(settings, run_dir=Path(run_dir), front_ends=count, channel=channel, api_keys=api_keys,
                     registry_doc=registry, admin_keys=admin_keys)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    stop_with_parent(settings.drain_delay_s + settings.drain_grace_s + 5)  # it drains and stops if serve is killed
    freeze_heap(young=FRONT_END_YOUNG)
    DrainingServer(_uvicorn_config(app, settings), app, settings.drain_delay_s).run(sockets=[sock])


def forget_environment(names: frozenset[str]) -> None:
    """Take the variables ``names`` (in any case) out of this process's environment, and
    out of what ``/proc/PID/environ`` shows of it: the block the kernel gave the process
    at exec, which unsetting a variable leaves as it was. A function in an engine reads
    any process's ``/proc/PID/environ`` of its user (Landlock does not cover it): the API
    keys were there, in ``serve``'s and in every front end's (which inherit it)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
        i = 0
        while (entry := environ[i]) is not None:
            name, eq, value = ctypes.string_at(entry).partition(b"=")
            if eq and name.decode(errors="replace").upper() in names:
                ctypes.memset(entry + len(name) + 1, ord("*"), len(value))
            i += 1
    except (OSError, AttributeError, ValueError):  # no C environ to reach here: os.environ below still goes
        pass
    for name in [n for n in os.environ if n.upper() in names]:
        del os.environ[name]


def _resume_if_stopped(index: int, pid: int, since: dict[int, float], grace_s: float) -> None:
    """A front end stopped by a signal (SIGSTOP from a function where the engines'
    confinement cannot keep it off: a kernel without Landlock) is alive to
    ``is_alive``, and the connections the kernel gives its socket wait for ever: one
    stopped longer than ``grace_s`` is resumed (SIGCONT; its connections go on)."""
    if not stopped(pid):
        since.pop(pid, None)
        return
    now = time.monotonic()
    if now - since.setdefault(pid, now) > grace_s:
        log.error("front end %d (pid %d) was stopped by a signal for more than %g s; resuming it", index, pid, grace_s)
        since.pop(pid, None)
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:  # gone just now: started again at the next look
            pass


# How often serve looks at its front ends (alive, stopped) and its autogroup, and, apart,
# at its own and the front ends' out-of-memory scores: memory a function uses up goes in
# well under 0.5 s (a container's 1-2 GiB), and a read of the score costs ~5 us.
_LOOK_S = 0.5
_OOM_LOOK_S = 0.05


def _oom_score_adj(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/oom_score_adj") as f:
            return int(f.read())
    except (OSError, ValueError):  # gone, or no /proc
        return None


def _keep_oom_score(what: str, pid: int, taken: int | None, running: Any) -> None:
    """``serve``'s and the front ends' out-of-memory score adjustment as ``serve`` started
    (the engines raise their own: the killer's first choice). Any process of the user may
    raise another's, by its ``/proc/PID/oom_score_adj``: an engine's function that wrote
    1000 to ``serve``'s made it, not the engine, the one killed the next time memory ran
    out (a function's leak, a large request), and the whole service went, for as long as
    ``serve`` lived. Put back (lowering to ``serve``'s own value needs no privilege)."""
    if taken is not None and (now := _oom_score_adj(pid)) is not None and now > taken:
        _put_back(f"/proc/{pid}/oom_score_adj", f"{what}'s out-of-memory score adjustment", now, taken, running)


def _autogroup_nice() -> int | None:
    try:
        with open("/proc/self/autogroup") as f:
            return int(f.read().rsplit("nice", 1)[1])
    except (OSError, ValueError, IndexError):  # no autogroups here
        return None


def _keep_autogroup_nice(taken: int | None, running: Any) -> None:
    """The niceness of ``serve``'s scheduling autogroup (its session's, the front ends'
    too) as ``serve`` started: any process of the user may raise it by
    ``/proc/PID/autogroup``, and one an engine's function set to 19 left the whole front
    end a 15/1024 share of the CPU against the engines' sessions, for good. Put back."""
    if taken is not None and (now := _autogroup_nice()) is not None and now > taken:
        _put_back("/proc/self/autogroup", "serve's scheduling autogroup's niceness", now, taken, running)


def _put_back(path: str, what: str, now: int, taken: int, running: Any) -> None:
    """``taken`` written back to ``path`` (``what``, raised to ``now``), said in the log
    with what the engines' boards said ran (their word: the best this process knows)."""
    try:
        with open(path, "w") as f:
            f.write(str(taken))
    except OSError as exc:
        log.error("%s was raised to %d and cannot be put back (%s)", what, now, exc)
        return
    log.error("%s was raised to %d, by another process of this user (%s); put back to %d", what, now,
              running() or "no engine said it was running a function", taken)


def _forget_metrics(pid: int | None) -> None:
    """Drop a dead front end's live gauges (its counters still count)."""
    from prometheus_client import multiprocess

    if pid:
        multiprocess.mark_process_dead(pid)


def base_url(address: tuple[Any, ...]) -> str:
    """The URL a bound socket serves, for the start-up line: a user copies it into a
    browser or curl (a tuple such as ('127.0.0.1', 8000) they would have to translate)."""
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _bind(settings: Settings, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port (``SO_REUSEPORT``), or one shared socket
    where the platform lacks it (or ``count`` is 1)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET

    def bind(port: int, reuse_port: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((settings.host, port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        return sock

    # First a plain socket: it fails if anything listens on the port, even another
    # server with SO_REUSEPORT, which our sockets would otherwise silently join.
    first = bind(settings.port, reuse_port=False)
    if count == 1 or not hasattr(socket, "SO_REUSEPORT"):
        return [first]
    port = first.getsockname()[1]  # port 0: the one the kernel gave
    first.close()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(bind(port, reuse_port=True))
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def serve(settings: Settings) -> int:
    from .logs import configure_logging
    from .supervision import Channel
    from .supervisor import Supervisor

    # No repeat filter here (the front ends and engines set their own): serve's lines are
    # the supervisor's, each engine's death, start and quarantine, every one of which an
    # operator needs, at most at the rate engines restart; what functions print comes
    # through output_relay's budget.
    configure_logging(settings.log_format, repeats=False)
    api_keys = settings.load_api_keys()  # fail closed, here, before anything starts
    admin_keys = settings.load_admin_keys()
    forget_environment(FRONT_END_ONLY)  # the front ends get the keys from here, and no engine needs them
    if settings.port:  # a port taken is said at once, not after an engine has loaded torch (seconds)
        try:
            _bind(settings, 1)[0].close()
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc.strerror or exc)
            return 1
    raise_open_file_limit()  # before any process starts: they inherit it
    run_dir = Path(tempfile.mkdtemp(prefix="jacobian-service-"))
    supervisor = Supervisor(settings, run_dir, Channel.new(run_dir))
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
    # No allocator variables: each engine fixes its own heap policy once started
    # (engine/devices.keep_free_heap), and a stream gives its freed memory back between
    # chunks (release_free_heap); the trade-offs are measured there.
    try:
        doc = supervisor.start_first()
        supervisor.start()
        count = settings.front_end_count
        try:
            socks = _bind(settings, count)
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc.strerror or exc)
            return 1
        ctx = multiprocessing.get_context("spawn")
        url = base_url(socks[0].getsockname())
        log.info("serving %d functions on %s with %d front ends (%s); engines on %s",
                 len(doc["functions"]), url, count, "a socket each" if len(socks) > 1 else "one shared socket",
                 ", ".join(doc["devices"]))

        def start(i: int) -> Any:
            sock = socks[i % len(socks)]
            p = ctx.Process(target=_front_end,
                            args=(str(run_dir), sock, count, supervisor.channel, api_keys, doc, admin_keys), name=f"front-end-{i}",
                            daemon=False)
            p.start()
            return p

        front_ends.extend(start(i) for i in range(count))
        announced = False
        stopped_since: dict[int, float] = {}  # front ends found stopped by a signal, since when
        oom_score = _oom_score_adj(os.getpid())  # what serve started with: the front ends' too
        autogroup_nice = _autogroup_nice()
        looked = 0.0
        while not stopping.is_set():
            # The out-of-memory scores every _OOM_LOOK_S: a function that raised serve's
            # and then used up the memory had the kernel kill serve (the whole service)
            # if it did so before the next look; the rest every _LOOK_S.
            _keep_oom_score(f"serve (pid {os.getpid()})", os.getpid(), oom_score, supervisor.running_functions)
            for i, p in enumerate(front_ends):
                if p.pid:  # (one that died is started again at the next full look)
                    _keep_oom_score(f"front end {i} (pid {p.pid})", p.pid, oom_score, supervisor.running_functions)
            if time.monotonic() - looked < _LOOK_S:
                stopping.wait(_OOM_LOOK_S)
                continue
            looked = time.monotonic()
            if not announced and supervisor.all_ready():
                # What a user who ran `make serve` does next: where to point a browser or curl.
                log.info("ready: %s (interactive API docs: %s/docs; functions: %s/v1/functions)", url, url, url)
                announced = True
            for i, p in enumerate(front_ends):
                if not p.is_alive() and not stopping.is_set():
                    log.error("front end %d exited (%s); starting it again", i, p.exitcode)
                    _forget_metrics(p.pid)
                    front_ends[i] = start(i)
                elif p.pid:
                    _resume_if_stopped(i, p.pid, stopped_since, settings.hang_grace_s)
            _keep_autogroup_nice(autogroup_nice, supervisor.running_functions)
            stopping.wait(_OOM_LOOK_S)
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
