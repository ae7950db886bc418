"""An idle keep-alive connection is never closed under a request that has arrived.

uvicorn's keep-alive timer and the header deadline (connections.py) close a connection
idle since its last response. Under load a front end's loop runs late, and uvloop runs
its due timers before the reads of the same turn: a client that reused its connection
just before the deadline had its request in the socket's receive queue, unread, when
the timer closed the connection. The kernel answers unread bytes at a close with a
reset: the client's request was lost with no answer and no line in any log
(test_concurrency's 64 clients saw httpx.ReadError reading a response's headers, at
load 15 on 2 cores). The first test stops the server's loop in a read callback right
after a response, sends the next request on that connection, lets the deadline pass
(time itself is what is waited for), and lets the loop go on: the timer is then due
before the request's bytes are read, as under load. The connection cap's choice of an
idle connection to close is checked on its own.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from .test_connections import _guarded_uvicorn


def _app(blocked: threading.Event, release: threading.Event):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        if scope["path"] == "/then-stall":
            # The loop stops in a read callback (uvloop runs them all, then its timers,
            # before it reads again), its response sent, the idle clock running.
            loop = asyncio.get_running_loop()
            r, w = socket.socketpair()

            def stall() -> None:
                loop.remove_reader(r)
                r.close()
                w.close()
                blocked.set()
                release.wait(30)

            loop.add_reader(r, stall)
            w.send(b"x")

    return app


_LARGE = 32 << 20  # more than the kernel's socket buffers take: most of it waits in the server's transport


async def _large(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b"ok" if scope["path"] == "/" else b"x" * (_LARGE - 2) + b"ok"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _answer(sock: socket.socket) -> bytes:
    got = b""
    while b"\r\n\r\n" not in got or not got.endswith(b"ok"):
        piece = sock.recv(65536)
        if not piece:
            break
        got += piece
    return got


@pytest.mark.parametrize("implementation", ["httptools", "h11"])
@pytest.mark.parametrize("clock", ["keep_alive", "header"])
def test_a_request_that_arrived_as_the_idle_clock_ran_out_is_answered(clock: str, implementation: str) -> None:
    idle_s = 0.3
    blocked, release = threading.Event(), threading.Event()
    config = {"timeout_keep_alive": idle_s if clock == "keep_alive" else 60}
    with _guarded_uvicorn(_app(blocked, release), implementation, idle_s if clock == "header" else 60.0,
                          **config) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /then-stall HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(sock).startswith(b"HTTP/1.1 200")
            assert blocked.wait(10)  # the server's loop is stopped, after the response
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # in the server's receive queue now
            time.sleep(idle_s + 0.1)  # the idle deadline passes while the loop is stopped
            release.set()
            try:
                answer = _answer(sock)
            except ConnectionResetError:
                answer = b"reset"
        assert answer.startswith(b"HTTP/1.1 200"), answer



@pytest.mark.parametrize("clock", ["keep_alive", "header"])
def test_the_idle_clock_starts_once_the_client_has_taken_its_answer(clock: str) -> None:
    """A connection is idle once its client has taken the last answer, not once the
    server handed it to its transport: a client reading a large answer slowly (64
    clients on a loaded host, a 14 MB JSON Hessian) was still reading when the idle
    clock ran out; the connection was then closed as soon as the last byte was taken,
    just as the client sent its next request on it (reset, unanswered)."""
    idle_s = 0.3
    config = {"timeout_keep_alive": idle_s if clock == "keep_alive" else 60}
    with _guarded_uvicorn(_large, "httptools", idle_s if clock == "header" else 60.0, drain=(10.0, 0), **config) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
            time.sleep(idle_s + 0.2)  # the client reads on only after the idle time (time is what is waited for)
            got = len(first) - first.index(b"\r\n\r\n") - 4
            while got < _LARGE:
                piece = sock.recv(1 << 20)
                assert piece, f"closed after {got} of {_LARGE} bytes"
                got += len(piece)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # at once, as a pool reuses it
            try:
                answer = _answer(sock)
            except ConnectionResetError:
                answer = b"reset"
        assert answer.startswith(b"HTTP/1.1 200"), answer


def test_a_connection_whose_request_has_come_is_not_closed_to_make_room() -> None:
    """At the connection cap a new connection closes the longest-idle one: never one
    whose next request is in its receive queue, unread by a loop running late (closed,
    that request was reset unanswered)."""
    from jacobian_service.connections import guarded_protocol

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def is_closing(self) -> bool:
            return False

        def get_extra_info(self, name: str) -> object:
            return self.sock if name == "socket" else None

    class Base:
        pass

    protocol = guarded_protocol(10.0, base=Base, max_connections=1)
    new, quiet, spoken = protocol(), protocol(), protocol()
    pairs = [socket.socketpair(), socket.socketpair()]
    try:
        quiet.transport, spoken.transport = Transport(pairs[0][0]), Transport(pairs[1][0])
        pairs[1][1].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # arrived, not read
        assert new._may_close(quiet)  # an idle keep-alive: closed to make room, as before
        assert not new._may_close(spoken)
    finally:
        for pair in pairs:
            for end in pair:
                end.close()


def test_an_idle_keep_alive_outlasts_httpxs_own_expiry() -> None:
    """The header deadline (HEADER_TIMEOUT_S, 10 s) is the idle clock; uvicorn's 5 s
    keep-alive, the same as httpx's keepalive_expiry (counted from later: once the
    client has read its answer), closed connections that 64 pooled httpx clients, their
    loop held up a few seconds, reused just then (ReadError, 1-2 a run of 128 requests
    with the client's loop stalled 4.5 s; none at 3 runs with the longer clock)."""
    from types import SimpleNamespace

    import httpx

    from jacobian_service.metrics import Metrics
    from jacobian_service.server import _uvicorn_config
    from jacobian_service.settings import Settings

    class App:
        service_state = SimpleNamespace(metrics=Metrics())

    settings = Settings()
    config = _uvicorn_config(App(), settings)
    assert config.timeout_keep_alive > settings.header_timeout_s > httpx.Limits().keepalive_expiry
