"""Red team, round sixteen: hostile clients and limits (a first stream the stream budget
would refuse; a Hessian whose client left; a request asking to switch protocols; a
dense sparse result over the limit).

Each names what a user saw before. One real server for the module (one front end, no
spare engine), whose body budget of 32 MiB makes the stream budget as small, and whose
result limit is 256 KiB.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from jacobian_client import wire

from .conftest import assert_problem, live_server
from .test_connections import _connect, _problem, _read_to_close
from .test_hostile_round14 import _batches  # round 14's: batches the engines ran, from /metrics


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    global _steps
    _steps = tmp_path_factory.mktemp("steps") / "steps"
    os.environ["HOSTILE18_STEPS"] = str(_steps)
    try:
        with live_server(WORKERS=1, ENGINE_STANDBY="false", WARMUP="false", BODY_BUDGET_BYTES=32 << 20, HANG_GRACE_S=1,
                         TRUSTED_PROXIES="127.0.0.1",  # (a reader below names itself another client)
                         MAX_RESULT_BYTES=256 << 10,
                         FUNCTIONS="jacobian_service.examples,tests.hostile18_functions") as served:
            yield served
    finally:
        os.environ.pop("HOSTILE18_STEPS", None)


_steps: Path


def _steps_taken() -> int:
    return _steps.stat().st_size if _steps.exists() else 0


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _softmax_jacobian(x: np.ndarray) -> np.ndarray:
    s = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    return np.diag(s) - np.outer(s, s)


# ------------------------------------------------------------ the stream budget, first requests


def test_a_first_stream_is_refused_before_any_work_or_served_within_the_room_left(server) -> None:
    """Left open by round twelve: a stream is refused (503, Retry-After) when the row
    chunks of the streams being sent hold the front end's stream budget, but only a
    request equal to one that streamed before was refused before it reached an engine. A
    first one was refused once the engine had run its forward pass (its size known only
    then): with a softmax stream held by a client that reads nothing, a first softmax
    of 1600 asked for as .npy was a 503 after the engine's work, and a client retrying
    it, as told, had the engine run it again at every retry. Now a stream's room is
    reserved before the engine runs anything: one whose chunks cannot fit (an explicit
    ``chunk_size`` of 1500 rows, 19 MB for its two) is refused there, as .npy and as
    JSON, and one of unknown size is given what is left and the engine sizes its chunks
    to fit: served, whole and right."""
    url, _ = server
    held = np.linspace(0, 1, 2100, dtype=np.float32)  # 17.6 MB: streamed, its two chunks 16 MiB of the 32 MiB
    body = _npy(held)
    reader = _connect(url, rcvbuf=4096)  # asks for the stream and reads none of it
    try:
        # (another client than the one below, as a proxy would say: one client may hold half the budget)
        reader.sendall(b"POST /v1/functions/softmax/jacobian HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-npy\r\n"
                       b"X-Forwarded-For: 192.0.2.1\r\n"
                       b"Accept: application/x-npy\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reader.settimeout(30)
        assert reader.recv(12) == b"HTTP/1.1 200"
        x = np.linspace(0, 2, 1600, dtype=np.float32)  # never asked for before: its size unknown to the front end
        before = _batches(url)
        for accept in (wire.NPY, wire.JSON):
            r = httpx.post(f"{url}/v1/functions/softmax/jacobian?chunk_size=1500", content=_npy(x),
                           headers={"content-type": wire.NPY, "accept": accept}, timeout=30)
            problem = assert_problem(r, 503, "unavailable")
            assert "BODY_BUDGET_BYTES" in problem["detail"] and r.headers["retry-after"] == "1"
        assert _batches(url) == before, "a refused stream ran in the engine"
        # the same without a chunk_size: served beside the held stream, in smaller chunks
        r = httpx.post(f"{url}/v1/functions/softmax/jacobian", content=_npy(x),
                       headers={"content-type": wire.NPY, "accept": wire.NPY}, timeout=30)
        assert r.status_code == 200, r.text
        assert int(r.headers["x-chunk-size"]) < 1600  # streamed: in chunks that fit the room left
        J = np.load(io.BytesIO(r.content))
        assert J.shape == (1600, 1600)
        np.testing.assert_allclose(J[::97, ::89], _softmax_jacobian(x.astype(np.float64))[::97, ::89], rtol=1e-4,
                                   atol=1e-7)
    finally:
        reader.close()


def test_the_stream_budget_reserves_before_work_what_the_engine_is_then_held_to() -> None:
    """StreamBudget's bookkeeping, without a server: what ``admit`` reserves before the
    engine runs (a known size: its two chunks, or 503; an unknown one: half the room
    left, at least two rows), what the engine's chunks are then held to (``room``), and
    what ``keep`` and ``release`` give back."""
    from jacobian_service.errors import Unavailable
    from jacobian_service.responses import StreamBudget

    MB = 1 << 20
    budget = StreamBudget(32 * MB, stream_threshold=8 * MB)
    row = 6000  # bytes of one row (a softmax of 1500 float32)
    first = budget.admit("a", row, 5000, 1, None)  # unknown, the budget empty: half of it
    assert first.room == first.held == budget.used == 16 * MB
    first.keep(2 * 1500 * row)  # the engine's head: its two chunks of 1500 rows (18 MB) of 3000
    assert budget.used == 18_000_000
    budget.learn("a", 3000 * row)
    with pytest.raises(Unavailable):  # known now: its two chunks do not fit beside the first's
        budget.admit("a", row, 5000, 1, None)
    assert budget.used == 18_000_000
    other = budget.admit("b", row, 5000, 1, None)  # unknown: half the room left, chunks sized to it
    assert other.room == (32 * MB - 18_000_000) // 2 and budget.used == 18_000_000 + other.room
    other.release()
    other.release()  # (once, however often called)
    with pytest.raises(Unavailable):  # an explicit chunk_size's two chunks must fit: refused before work
        budget.admit("c", row, 1500, 1500, None)
    budget.learn("small", 0)  # gathered, not streamed: holds nothing, its chunks not bounded
    small = budget.admit("small", row, 5000, 1, None)
    assert small.room is None and small.held == 0
    assert budget.admit("rows", row, 5000, 1, 100 * row).room is None  # rows= under the threshold: never streamed
    first.release()
    assert budget.used == 0


@pytest.mark.parametrize("options", [{"batched": True}, {"mode": "fwd"}, {"as_tuple": True}])
def test_a_jacobian_the_engine_never_streams_holds_nothing_on_the_stream_budget(options) -> None:
    """What the engine gathers whatever its size (per-example Jacobians, ``mode=fwd``
    without ``rows``, several arrays differentiated) reserves no room for a stream: with
    the budget held by a slow reader, it is served, not refused for a stream it never has."""
    from jacobian_service.registry import Registry
    from jacobian_service.responses import StreamBudget
    from jacobian_service.routes import _stream_bounds
    from jacobian_service.types import Call

    sin = Registry.from_modules(["jacobian_service.examples"]).get("sin")
    budget = StreamBudget(32 << 20)
    budget.admit("reader", 6000, 5000, 1, 18_000_000)  # a slow reader's two chunks
    x = np.zeros((4, 1 << 20), np.float32)  # 16 MB: two rows would not fit beside the reader's
    call = Call(sin, [x], ["float32"], **options)
    assert budget.admit("k", *_stream_bounds(call, sparse=False)).held == 0
    for mode in ("rev", "auto"):  # ones that may stream (auto: where it falls back to reverse): refused before work
        with pytest.raises(Exception, match="BODY_BUDGET_BYTES"):
            budget.admit("k2", *_stream_bounds(Call(sin, [x], ["float32"], mode=mode), sparse=False))


# ------------------------------------------------------------ a Hessian whose client left


@pytest.mark.parametrize("how", ["client gone", "X-Request-Timeout"])
def test_a_hessian_stops_between_its_strategies_once_its_client_has_gone(server, how: str) -> None:
    """Found by a red team, measured on a real server: a client that hangs up, or whose
    X-Request-Timeout passes, stops a Jacobian's work at its next chunk, but a Hessian
    ran on to its end: a first Hessian measures each strategy twice, checks each against
    a Hessian-vector product, so it ran ten calls of the function (1.5 s of this one) for
    a client gone after 0.4 s, the engine held from everyone else. Now it stops between
    steps: at most the call under way runs after its client has gone."""
    url, _ = server
    n = 3 if how == "client gone" else 4  # a shape not seen: its strategies are measured
    body = {"inputs": [np.linspace(0.1, 1, n).tolist()]}
    before = _steps_taken()
    if how == "client gone":
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/functions/slow_hessian/hessian", json=body, timeout=0.4)
    else:
        r = httpx.post(f"{url}/v1/functions/slow_hessian/hessian", json=body, headers={"X-Request-Timeout": "0.4"},
                       timeout=30)
        assert_problem(r, 504, "timeout")
    left_at = _steps_taken()
    assert left_at > before, "the Hessian had not started: the test measured nothing"
    time.sleep(0.9)  # six more calls, had it run on
    assert _steps_taken() - left_at <= 1, f"{_steps_taken() - left_at} calls after the client left"
    # the engine is free: the next Hessian is answered, and right (sum_sin's: diag(-sin x))
    x = [0.3, 0.7]
    r = httpx.post(f"{url}/v1/functions/sum_sin/hessian", json={"inputs": [x]}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["hessian"]["data"], np.diag(-np.sin(x)), rtol=1e-6)


# ------------------------------------------------------------ Upgrade: h2c, websocket, ...

_J = b'{"inputs": [[0.5, 1.0]]}'


@pytest.mark.parametrize("upgrade", [b"h2c", b"websocket"])
def test_a_request_asking_to_switch_protocols_with_a_body_is_refused_not_read_as_empty(server, upgrade: bytes) -> None:
    """Found by a red team: a POST with ``Connection: upgrade`` and an ``Upgrade`` (as
    ``curl --http2`` sends one: h2c) had its body taken by the HTTP parser for the new
    protocol's bytes: the app read an empty body and answered 400 malformed_body "a
    zero-length, empty document" of a good JSON body, and the connection stayed open, a
    request pipelined behind it never answered. No protocol is switched to here: such a
    request is now a 400 saying why, and the connection closes. A bodiless one is served
    as the HTTP/1.1 request it also is, with ``Connection: close`` (what was pipelined
    behind it the parser dropped: it was left unanswered on a connection kept open)."""
    url, _ = server
    extra = b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n" if upgrade == b"h2c" else b"Sec-WebSocket-Version: 13\r\n"
    head = (b"POST /v1/functions/sin/jacobian HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nUpgrade: %s\r\n"
            b"Connection: Upgrade\r\n%sContent-Length: %d\r\n\r\n" % (upgrade, extra, len(_J)))
    with _connect(url) as s:
        s.sendall(head + _J + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = _read_to_close(s, 10)  # closed after the refusal: never left waiting
    status, headers, problem = _problem(raw)
    assert status == 400 and headers["content-type"] == wire.PROBLEM and headers["connection"] == "close", raw
    assert problem["code"] == "malformed_request" and "switch protocols" in problem["detail"], problem
    assert b'{"status":"ok"}' not in raw and b"Traceback" not in raw  # (the pipelined request: not read as one)
    # bodiless: served, and the connection closed after it, saying so: the parser drops
    # what follows the head in the same piece (a request pipelined behind it)
    with _connect(url) as s:
        s.sendall(b"GET /v1/functions/sin HTTP/1.1\r\nHost: t\r\nUpgrade: %s\r\nConnection: Upgrade\r\n%s\r\n"
                  b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" % (upgrade, extra))
        raw = _read_to_close(s, 10)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"\r\nconnection: close" in head.lower(), raw[:300]
    assert b'"name":"sin"' in body and b'{"status":"ok"}' not in body
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", content=_J, headers={"content-type": wire.JSON}, timeout=30)
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos([0.5, 1.0])), rtol=1e-6)


# ------------------------------------------------------------ a dense sparse result over the limit


def test_a_sparse_jacobian_asked_for_densely_over_the_result_limit_is_refused_before_its_pattern(server) -> None:
    """Found by a red team: ``sparse_format=dense`` asks for the sparse Jacobian as a dense
    matrix, whose size (outputs x inputs) is known from the shapes; but the result limit
    was checked only once the pattern had been detected and coloured: a 20,000-element
    lorenz96 (1.6 GB dense) was a 413 after 16 s of detection, and its remedy said only
    "Ask for a smaller input". Now it is refused before the pattern is looked for (none
    is detected, or cached, for it), saying what to ask for instead; the sparse matrix
    itself is served."""
    url, _ = server
    n = 257  # dense: 264 KB of float32, over the 256 KiB limit; a band of 13 a row
    x = np.linspace(0, 1, n).tolist()
    r = httpx.post(f"{url}/v1/functions/lorenz96/jacobian", json={"inputs": [x], "sparsity": "auto",
                                                                  "sparse_format": "dense"}, timeout=60)
    problem = assert_problem(r, 413, "result_too_large")
    assert f"{n * n * 4} bytes" in problem["detail"] and "sparse_format=csr" in problem["detail"], problem
    r = httpx.post(f"{url}/v1/functions/lorenz96/jacobian", json={"inputs": [x], "sparsity": "auto"}, timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["meta"]["cached"] is None, "the refused request had detected (and cached) the pattern"
    assert doc["meta"]["nnz"] == 13 * n and doc["meta"]["shape"] == [n, n]


@pytest.mark.parametrize("target", [b"evil:443", b"/v1/functions"])
def test_a_connect_is_told_this_is_no_proxy(server, target: bytes) -> None:
    """Found by a red team: CONNECT (a tunnel through a proxy) was a 400 saying only
    "Invalid HTTP request received", where TRACE is a 405 naming what is allowed. Now the
    400 says what was asked and why it is not served, and the connection closes."""
    url, _ = server
    with _connect(url) as s:
        s.sendall(b"CONNECT %s HTTP/1.1\r\nHost: evil:443\r\n\r\n" % target)
        raw = _read_to_close(s, 10)
    status, headers, problem = _problem(raw)
    assert status == 400 and headers["content-type"] == wire.PROBLEM and headers["connection"] == "close", raw
    assert problem["code"] == "malformed_request" and "no proxy" in problem["detail"], problem
