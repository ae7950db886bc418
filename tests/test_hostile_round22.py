"""Red team, round twenty-two: hostile clients over raw sockets (one client opening many
streamed Jacobians at once and reading none of them; a Host header that is no host;
pipelined heads whose bytes add up; ...).

Each names what a user saw before. The server cases run the real service on a thread of
this process (``_client_support.real_server``: engines on threads, no process to start)
with a queue of 8 and a trusted proxy on loopback, so that the clients here are told
apart as they would be behind a proxy (``X-Forwarded-For``); the HTTP cases run the
in-process app (``client``) or a bare app under the server's guarded protocol class
(``test_connections._guarded_uvicorn``).
"""

from __future__ import annotations

import io
import socket
import time
from typing import Iterator

import httpx
import numpy as np
import pytest

from ._client_support import real_server
from .test_hostile_round16 import _npy, _softmax_jacobian  # a .npy body; softmax's Jacobian in numpy

MAX_QUEUE = 8  # a client's share: MAX_QUEUE / 2 streams (one front end)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with real_server(functions="jacobian_service.examples", max_queue=MAX_QUEUE, trusted_proxies="127.0.0.1",
                     stream_threshold_bytes=64 << 10, send_timeout_s=30) as served:
        yield served


def _head(sock: socket.socket) -> bytes:
    """A response's head (status line and headers), read a byte at a time so that
    nothing of the body is taken from the socket."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        piece = sock.recv(1)
        assert piece, head
        head += piece
    return head


def _answered(sock: socket.socket, requests: bytes, count: int, last_body: bytes) -> None:
    """Send ``requests`` and read until ``count`` 200 answers are in, the last ending in
    ``last_body``, on a connection that stays open; then close it."""
    sock.sendall(requests)
    sock.settimeout(10)
    raw = b""
    while raw.count(b"HTTP/1.1 200 OK") < count or not raw.endswith(last_body):
        piece = sock.recv(65536)
        assert piece, raw[-300:]
        raw += piece
    sock.close()


# ------------------------------------------------------------ one client, many streams


def test_one_client_holding_many_streams_leaves_the_others_served(url: str) -> None:
    """Left by round twenty: each stream a client keeps open (reading none of it) holds a
    place in the engine's queue, its forward pass and room on the stream budget, for as
    long as the minimum send rate allows, and a client may open as many as it likes. One
    client that opened MAX_QUEUE streams had every other client's every request refused,
    429 "the engine holds 0 requests and 8 open streams (limit 8 in all)", for as long as
    it kept opening them. Now a client (its key, else its address, or the one a trusted
    proxy forwarded for) holds at most MAX_STREAMS_PER_CLIENT streams (MAX_QUEUE / 2 per
    front end by default) and half the stream budget: past that it is answered 429 at
    once, and the others are served, streams too."""
    x = np.linspace(-1, 1, 1500).astype(np.float32)  # a 9 MB Jacobian: far past socket buffers
    body = _npy(x)
    request = ("POST /v1/functions/softmax/jacobian?chunk_size=16 HTTP/1.1\r\nHost: t\r\n"
               "X-Forwarded-For: 198.51.100.7\r\nContent-Type: application/x-npy\r\nAccept: application/x-npy\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    greedy: list[socket.socket] = []
    try:
        statuses = []
        for _ in range(MAX_QUEUE):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (it reads nothing anyway)
            s.settimeout(30)
            greedy.append(s)
            s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            s.sendall(request)
            head = _head(s)
            statuses.append(int(head.split()[1]))
            if statuses[-1] == 429:
                assert b"retry-after: 1\r\n" in head.lower() and b"application/problem+json" in head, head
        assert statuses == [200] * (MAX_QUEUE // 2) + [429] * (MAX_QUEUE // 2), statuses
        info = httpx.get(f"{url}/v1/info", timeout=10).json()["limits"]
        assert info["max_streams_per_client"] == MAX_QUEUE // 2

        other = {"X-Forwarded-For": "203.0.113.9"}  # another client behind the same proxy
        r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]}, headers=other, timeout=30)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(np.float32([0.5, 1.0]))), rtol=1e-6)
        small = np.linspace(-1, 1, 300).astype(np.float32)  # 360 KB: streamed (threshold 64 KiB)
        r = httpx.post(f"{url}/v1/functions/softmax/jacobian", content=_npy(small), timeout=30,
                       headers={**other, "Content-Type": "application/x-npy", "Accept": "application/x-npy"})
        assert r.status_code == 200 and "x-chunk-size" in r.headers, (r.status_code, r.headers)  # (streamed)
        np.testing.assert_allclose(np.load(io.BytesIO(r.content)), _softmax_jacobian(small), atol=1e-6)

        # the greedy client itself, a further stream: refused at once, saying why
        r = httpx.post(f"{url}/v1/functions/softmax/jacobian", content=_npy(small), timeout=30,
                       headers={"X-Forwarded-For": "198.51.100.7", "Content-Type": "application/x-npy",
                                "Accept": "application/x-npy"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        problem = r.json()
        assert problem["code"] == "overloaded" and "MAX_STREAMS_PER_CLIENT" in problem["detail"], problem
        assert "Traceback" not in r.text
    finally:
        for s in greedy:
            s.close()


# ------------------------------------------------------------ who a client is


def test_a_client_is_its_key_else_its_address_or_what_a_trusted_proxy_says() -> None:
    """A client's identity: the key it was let in with (behind any proxy), else the
    address a trusted proxy appended to X-Forwarded-For, else the peer's address: a
    client that is no trusted proxy names itself in X-Forwarded-For for nothing, and
    more connections (other ports) are the same client."""
    from jacobian_service.clients import KEY, client_of, parse_proxies

    proxies = parse_proxies("10.0.0.0/8, ::1")

    def scope(peer: str, port: int = 4000, forwarded: tuple[bytes, ...] = (), key: bytes | None = None) -> dict:
        return {"client": (peer, port), "headers": [(b"x-forwarded-for", f) for f in forwarded],
                "state": {} if key is None else {KEY: key}}

    assert client_of(scope("192.0.2.1"), proxies) == client_of(scope("192.0.2.1", 4001), proxies) == "addr:192.0.2.1"
    assert client_of(scope("192.0.2.1", forwarded=(b"203.0.113.5",)), proxies) == "addr:192.0.2.1"  # not a proxy of ours
    assert client_of(scope("10.1.2.3", forwarded=(b"6.6.6.6, 203.0.113.5",)), proxies) == "addr:203.0.113.5"
    assert client_of(scope("10.1.2.3", forwarded=(b"6.6.6.6", b"203.0.113.6")), proxies) == "addr:203.0.113.6"
    assert client_of(scope("::1", forwarded=(b"2001:db8::1",)), proxies) == "addr:2001:db8::/64"  # (its /64: round 23)
    assert client_of(scope("10.1.2.3"), proxies) == "addr:10.1.2.3"  # a proxy that forwarded for nobody
    assert client_of(scope("10.1.2.3", key=b"\x01" * 32), proxies) == client_of(scope("192.0.2.9", key=b"\x01" * 32))
    assert client_of(scope("10.1.2.3", key=b"\x01" * 32)) != client_of(scope("10.1.2.3", key=b"\x02" * 32))
    with pytest.raises(ValueError):
        parse_proxies("10.0.0.0/8,proxy.example")


def test_the_auth_middleware_names_the_key_a_request_was_let_in_with() -> None:
    """With API keys, each key is a client (its digest, never the key itself); a request
    refused (wrong key) names none."""
    import asyncio

    from jacobian_service.clients import KEY, client_of
    from jacobian_service.middleware import AuthMiddleware

    seen: list[str] = []

    async def app(scope, receive, send) -> None:
        seen.append(client_of(scope))

    auth = AuthMiddleware(app, ("alpha", "beta"), metrics_auth=False, docs_auth=True)

    async def call(key: str) -> dict:
        scope = {"type": "http", "path": "/v1/functions", "root_path": "", "state": {},
                 "headers": [(b"authorization", f"Bearer {key}".encode())], "client": ("127.0.0.1", 1)}
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await auth(scope, None, send)
        return scope

    for key in ("alpha", "beta", "alpha"):
        asyncio.run(call(key))
    assert seen[0] == seen[2] != seen[1] and all(s.startswith("key:") and "alpha" not in s for s in seen), seen
    assert KEY not in asyncio.run(call("gamma"))["state"]


def test_a_client_share_is_given_back_whole() -> None:
    """Every stream's count and bytes go back to its client when it ends, whichever way
    it was held (room of unknown size, known size, not expected to stream), so that no
    client is left refused, and no entry is left per address seen."""
    from jacobian_service.errors import Overloaded
    from jacobian_service.responses import StreamBudget

    budget = StreamBudget(64 << 20, stream_threshold=1 << 20, per_client=2)
    row = 4000
    unknown = [budget.admit(("u", i), row, 100, 1, None, "a") for i in range(3)]  # before their forward passes: all in
    heads = [hold.keep(2 * 10 * row) for hold in unknown[:2]]  # two stream: the client's share
    with pytest.raises(Overloaded):
        unknown[2].keep(2 * 10 * row)  # the third streams too: refused
    unknown[2].release()
    budget.learn("k", 10 << 20)
    with pytest.raises(Overloaded):  # known to stream: refused before any work
        budget.admit("k", row, 100, 1, None, "a")
    other = budget.admit("k", row, 100, 1, None, "b")  # another client is not
    budget.learn("g", 0)
    gathered = budget.admit("g", row, 100, 1, None, "b")  # expected to be gathered: holds nothing ...
    assert gathered.held == 0 and budget._clients["b"] == [1, other.held]
    budget.per_client = 1
    with pytest.raises(Overloaded):  # ... streams after all: b's second, past a share of one
        gathered.keep(2 * row)
    budget.per_client = 2
    for release in (*heads, other.release, gathered.release, other.release):
        release()
    assert budget.used == 0 and budget._clients == {}


# ------------------------------------------------------------ odd Host headers


@pytest.mark.parametrize("host", ["a b", "evil.example/path", "user@evil.example", "h:80:80", "h\x7f", "h\u00e9".encode()])
def test_a_host_header_that_is_no_host_is_a_400(client, host: str | bytes) -> None:
    """RFC 9112 3.2: a request with a Host that is no ``host[:port]`` is a 400, as one with
    none or two already was. Such a Host was served (``Host: a b/c@d``: 200), though a
    proxy in front could have routed it by another reading of that value. A good one,
    IPv6 literals and ports included, is served."""
    from .conftest import assert_problem

    body = assert_problem(client.get("/healthz", headers={"host": host}), 400,
                          "malformed_request")
    assert "Host" in body["detail"]
    for good in ("localhost", "localhost:8000", "[::1]:8000", "api.example.org", ""):
        r = client.get("/healthz", headers={"host": good})
        assert r.status_code == 200, (good, r.text)


# ------------------------------------------------------------ pipelined heads that add up


def test_pipelined_heads_hold_at_most_one_heads_worth_of_bytes(caplog: pytest.LogCaptureFixture) -> None:
    """Left by round twenty: at most MAX_PIPELINED (16) requests wait behind the one being
    answered, but each head may be 32 KiB, and a head of short fields waits parsed, as
    Python objects costing ~14 times its bytes: 16 heads of 30 KB (3,500 fields each)
    behind a slow request grew a front end by 6.7 MB per connection (20 connections:
    +131 MB; an idle one costs ~5.5 KiB). Now the heads waiting hold at most
    MAX_PIPELINED_HEAD_BYTES (32 KiB) in all, as one head may: past it the rest is dropped
    and the connection closes once those kept are answered, as past MAX_PIPELINED (the
    same connection measured: 212 KB). Small pipelined requests are kept as before."""
    import asyncio
    import logging
    import threading

    from jacobian_service.connections import MAX_PIPELINED_HEAD_BYTES

    from .test_connections import _connect, _guarded_uvicorn, _read_to_close

    released = threading.Event()

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/0":  # the slow one: answered once the heads behind it are all read
            while not released.is_set():
                await asyncio.sleep(0.01)
        body = scope["path"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    fields = b"".join(b"x-f%d: %s\r\n" % (i, b"v" * 110) for i in range(100))  # ~12 KB in 100 fields
    assert 2 * len(fields) < MAX_PIPELINED_HEAD_BYTES < 3 * len(fields)
    with caplog.at_level(logging.INFO, logger="jacobian_service"), _guarded_uvicorn(app, "httptools", 5.0) as served:
        s = _connect(served)
        s.sendall(b"GET /0 HTTP/1.1\r\nHost: t\r\n\r\n"
                  + b"".join(b"GET /%d HTTP/1.1\r\nHost: t\r\n%s\r\n" % (i, fields) for i in range(1, 6)))
        deadline = time.monotonic() + 5  # (the heads are read: the drop is logged, or they were all kept)
        while not any("bytes of heads" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
        released.set()
        raw = _read_to_close(s, 10)
        s.close()
        bodies = [answer.rpartition(b"\r\n\r\n")[2] for answer in raw.split(b"HTTP/1.1 200 OK\r\n")[1:]]
        assert bodies == [b"/0", b"/1", b"/2"], raw[-300:]

        # small ones are kept, all answered on a connection kept open
        _answered(_connect(served), b"".join(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(1, 9)), 8, b"/8")


def test_a_head_of_more_fields_than_the_limit_is_a_431() -> None:
    """Within the 32 KiB a head may hold, short fields ("a1:b", 3,500 of them) held ~420 KB
    of Python objects per request (~14 times their bytes), for as long as it ran: a
    request queued or streamed (its deadline, its reader) on each of many connections.
    Now a head has at most MAX_HEADER_FIELDS (256) fields: past them it is 431
    headers_too_large at once, the connection closed; 256 are served. (httptools, the
    server's parser; h11 has its own 16 KiB limit.)"""
    from jacobian_service.connections import MAX_HEADER_FIELDS

    from .test_connections import _assert_closing_problem, _connect, _guarded_uvicorn, _read_to_close

    async def app(scope, receive, send) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    def head(fields: int) -> bytes:  # Host and the rest: ``fields`` in all
        return b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"a%d:b\r\n" % i for i in range(fields - 1)) + b"\r\n"

    with _guarded_uvicorn(app, "httptools", 5.0) as served:
        s = _connect(served)
        s.sendall(head(MAX_HEADER_FIELDS + 1))
        raw = _read_to_close(s, 5)
        s.close()
        body = _assert_closing_problem(raw, 431, "headers_too_large")
        assert f"{MAX_HEADER_FIELDS} fields" in body["detail"], body
        # (and the next head on the connection counts afresh)
        _answered(_connect(served), head(MAX_HEADER_FIELDS) * 2, 2, b"ok")
