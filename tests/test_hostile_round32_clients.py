"""Clients and memory, round thirty-two: one client's share of the request-body budget
while other clients wait for room.

Each test names what a user saw before. They share one real server of this module (two
API keys: two clients) with a body budget of 16 MiB.
"""

from __future__ import annotations

import io
import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from jacobian_client import wire

from . import clients28_functions
from ._client_support import real_server
from .conftest import assert_problem
from .test_hostile_round27_clients import _head
from .test_hostile_round28_clients import _queue_depth

HOSTILE, HONEST = "hostile-key", "honest-key"
BUDGET = 16 << 20
MIB = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with real_server(functions="jacobian_service.examples,tests.clients28_functions,tests.clients32_functions",
                     api_keys=f"{HOSTILE},{HONEST}", body_budget_bytes=BUDGET) as url:
        yield url


def _npy(x: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, x)
    return out.getvalue()


def _npz(x: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez(out, x=x)
    return out.getvalue()


def _held(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {HONEST}"}, timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("jacobian_service_body_bytes_in_flight ")))


def _wait_held(url: str, least: float) -> None:
    deadline = time.monotonic() + 20
    while _held(url) < least:
        assert time.monotonic() < deadline, _held(url)
        time.sleep(0.02)


def _post(url: str, path: str, body: bytes, key: str, content_type: str = wire.NPY, accept: str = wire.NPY,
          ) -> httpx.Response:
    return httpx.post(url + path, content=body, timeout=60,
                      headers={"content-type": content_type, "accept": accept, "authorization": f"Bearer {key}"})


def _answer(s: socket.socket) -> httpx.Response:
    """The whole answer on ``s`` (the server closes after it)."""
    s.settimeout(5)
    with s.makefile("rb") as f:
        raw = f.read()
    head, _, content = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return httpx.Response(int(lines[0].split()[1]), headers=[tuple(h.split(": ", 1)) for h in lines[1:]], content=content)


def _trickler(url: str, nbytes: int) -> socket.socket:
    """A hostile upload: a body declared one byte longer than the ``nbytes`` it sends, the
    last byte never sent (it could trickle one each read_idle_timeout_s, 30 s, for
    read_timeout_s, 300 s): it holds ``nbytes`` of the budget for as long."""
    s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/functions/slow_double/evaluate HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-npy\r\n"
              b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (HOSTILE.encode(), nbytes + 1)
              + b"\0" * nbytes)
    return s


X = np.linspace(-1, 1, 3 * MIB // 4 // 2, dtype=np.float32)  # 1.5 MiB of float32 (3 MiB as float64 from JSON)
HONEST_BODIES = {
    "npy": (wire.NPY, _npy(np.tile(X, 4))),  # 6 MiB
    "npz": (wire.NPZ, _npz(np.tile(X, 2))),  # 3 MiB, and 3 more expanded
    "json": (wire.JSON, json.dumps({"inputs": [np.tile(X, 4)[:60_000].tolist()]}).encode()),  # ~5.6 MiB to parse
}


@pytest.mark.parametrize("form", sorted(HONEST_BODIES))
def test_bodies_one_client_trickles_past_half_the_budget_are_cut_off_for_another_clients_request(
        server: str, form: str) -> None:
    """One client that sent five bodies of 3 MiB and held back each one's last byte held
    15 of the 16 MiB budget for as long as it trickled (read_timeout_s, 300 s, then
    again): another client's 6 MiB request (.npy, .npz with its expansion, or JSON at its
    parse cost) was 503 'the server is receiving other bodies and has 1048576 of
    16777216 free' at every retry. Now the hostile client's bodies past half the budget
    are cut off there (429 overloaded with a problem document, Retry-After: 1,
    Connection: close; the largest first, as few as make room) and the other client's
    request is answered at once."""
    content_type, body = HONEST_BODIES[form]
    sockets = [_trickler(server, 3 * MIB) for _ in range(5)]
    try:
        _wait_held(server, 15 * MIB)
        r = _post(server, "/v1/functions/slow_double/evaluate", body, HONEST, content_type)
        assert r.status_code == 200, r.text
        expected = 2 * {"npy": np.tile(X, 4), "npz": np.tile(X, 2), "json": np.tile(X, 4)[:60_000]}[form]
        np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), expected)
        readable, _, _ = select.select(sockets, [], [], 2)
        time.sleep(0.2)  # (any other cut off would be answered by now)
        readable, _, _ = select.select(sockets, [], [], 0)
        cut = [_answer(s) for s in readable]
        assert len(cut) == 2, cut  # as few as made room: the client kept 9 MiB, over half, still receiving
        for response in cut:
            detail = assert_problem(response, 429, "overloaded")["detail"]
            assert "another client" in detail and "body_budget_bytes" in detail, detail
            assert response.headers["retry-after"] == "1" and response.headers["connection"] == "close"
    finally:
        for s in sockets:
            s.close()
    deadline = time.monotonic() + 10
    while _held(server) > 0:  # (the rest given back once their sockets closed)
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_client_alone_may_hold_the_whole_budget(server: str) -> None:
    """The share bites only under contention: one client's five bodies of 3 MiB (15 of
    16 MiB) are all read and answered where no other client waits."""
    x = _npy(np.tile(X, 2))
    answers: list[httpx.Response] = []
    sockets = [_trickler(server, 3 * MIB) for _ in range(4)]
    try:
        _wait_held(server, 12 * MIB)
        r = _post(server, "/v1/functions/slow_double/evaluate", x, HOSTILE)  # its fifth: 15 MiB, over half
        answers.append(r)
        for s in sockets:
            s.sendall(b"\0")  # each body whole now (garbage .npy: 400)
            s.settimeout(10)
            answers.append(httpx.Response(_head(s)[0]))
    finally:
        for s in sockets:
            s.close()
    assert [a.status_code for a in answers] == [200, 400, 400, 400, 400]


def test_a_client_past_half_the_budget_may_not_grow_while_another_waits(server: str) -> None:
    """Requests queued behind a slow one hold their arrays on the budget until they run:
    a client whose queued requests held 12 of 16 MiB had another client's 6 MiB refused
    503 and went on taking the room that came free (its next 3 MiB request was queued),
    so the other client's retries found none as long as it kept sending. Now, while
    another client waits (refused room in the last 2 s), a client may not grow past half
    the budget: 429 overloaded, Retry-After: 1; the waiting client's retry is answered
    once the room is back. A client alone is not held to half (its 12 MiB queued)."""
    number = os.getpid() % 1_000_000 + 32
    gate = clients28_functions.gate(number)
    gate.unlink(missing_ok=True)
    x = np.full(3 * MIB // 4, float(number), np.float32)
    answers: dict[str, list[httpx.Response]] = {}
    threads = []

    def send(name: str, body: bytes) -> None:
        answers.setdefault(name, []).append(_post(server, "/v1/functions/holds_the_engine/evaluate", body, HOSTILE))

    try:
        for _ in range(4):  # the first holds the engine; all four hold 3 MiB
            threads.append(threading.Thread(target=send, args=("queued", _npy(x))))
            threads[-1].start()
        deadline = time.monotonic() + 20
        while _queue_depth(server) < 4:
            assert time.monotonic() < deadline, answers
            time.sleep(0.02)
        _wait_held(server, 12 * MIB)
        honest = HONEST_BODIES["npy"][1]
        assert_problem(_post(server, "/v1/functions/slow_double/evaluate", honest, HONEST), 503, "unavailable")
        more = _post(server, "/v1/functions/holds_the_engine/evaluate", _npy(x), HOSTILE)
        body = assert_problem(more, 429, "overloaded")
        assert more.headers["retry-after"] == "1" and "other clients wait" in body["detail"], body
    finally:
        gate.touch()
        for t in threads:
            t.join()
        gate.unlink(missing_ok=True)
    assert [r.status_code for r in answers["queued"]] == [200] * 4
    r = _post(server, "/v1/functions/slow_double/evaluate", honest, HONEST)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), 2 * np.tile(X, 4))


@pytest.mark.parametrize("implementation", ["h11", "httptools"])
def test_a_body_in_tiny_chunks_is_refused_and_one_in_fair_chunks_is_read(implementation: str) -> None:
    """A chunked body costs a front end a parser callback and a copy of the unread body
    per chunk, whatever its size: two clients sending 1-byte chunks as fast as they could
    took another client's median latency on `serve` from 15 ms to 2.7 s (the body's pieces,
    which read_body holds to 64 bytes on average, were few: a TCP read of 43,000 chunks is
    one piece). Past 1,024 chunks a body's chunks must average 64 bytes: 408 (a problem
    document, the connection closed) before the app has the body; 2,000 chunks of 100
    bytes are read whole."""
    from .test_connections import (
        _assert_closing_problem,
        _connect,
        _guarded_uvicorn,
        _read_to_close,
    )

    seen: list[int] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        size = 0
        while (message := await receive())["type"] == "http.request":
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                seen.append(size)
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
                await send({"type": "http.response.body", "body": b"ok"})
                return

    head = b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    with _guarded_uvicorn(app, implementation, 5.0) as url:
        s = _connect(url)
        raw = b""
        try:
            s.sendall(head + b"1\r\nx\r\n" * 2000 + b"0\r\n\r\n")
            raw = _read_to_close(s, 5)
        except OSError:
            pass
        s.close()
        body = _assert_closing_problem(raw, 408, "request_timeout")
        assert "chunks" in body["detail"] and "64 bytes" in body["detail"], body
        assert seen == []
        s = _connect(url)
        s.sendall(head + (b"64\r\n" + b"y" * 100 + b"\r\n") * 2000 + b"0\r\n\r\n")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.close()
        assert seen == [200_000]
