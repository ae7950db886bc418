"""Red team, round fourteen: hostile clients and limits (a request that gives up as its
answer comes; a stream refused for the stream budget; work for a client that left).

Each names what a user saw before. The front end's bookkeeping is tested without
engines where a race decides (a stand-in connection, as test_engine_client.py does);
the rest on one real server for the module.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from jacobian_client import wire
from jacobian_service import ipc

from ._fault_support import _alive
from .conftest import assert_problem, live_server
from .test_connections import _connect
from .test_engine_client import _answer, _call, _state, engines  # noqa: F401 (engines: a fixture)
from .test_hostile_round7 import _softmax_served_whole


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    # A body budget of 32 MiB: the stream budget (its size) holds one 17.6 MB softmax stream
    # (its two chunks, 16 MiB), not two. hostile14_functions count their steps in a file.
    global _steps
    _steps = tmp_path_factory.mktemp("steps") / "steps"
    os.environ["HOSTILE14_STEPS"] = str(_steps)
    try:
        # (HANG_GRACE_S 1: a front end reports an engine holding a cancelled request after
        # 1 s, not 5: the module's last test sees whether any did)
        with live_server(WORKERS=1, ENGINE_STANDBY="false", WARMUP="false", BODY_BUDGET_BYTES=32 << 20, HANG_GRACE_S=1,
                         FUNCTIONS="jacobian_service.examples,tests.hostile14_functions") as served:
            yield served
    finally:
        os.environ.pop("HOSTILE14_STEPS", None)


_steps: Path


def _steps_taken() -> int:
    return _steps.stat().st_size if _steps.exists() else 0


def _batches(url: str) -> float:
    """Batches the engines ran, from /metrics (each job an engine runs is in one)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return float(re.search(r"^jacobian_service_batch_size_count (\S+)$", text, re.M).group(1))


class _Recording:
    """A stand-in engine connection that records every message sent: (kind, id)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def send(self, frames: list[Any], now: bool = False) -> None:
        header, _ = ipc.parse(frames)
        self.sent.append((header["t"], header["id"]))

    def gone(self, pid: int) -> None:
        pass

    def count(self) -> None:  # (channel.Connection's count of what it sent)
        pass


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["client gone", "deadline already past"])
async def test_an_answer_read_as_its_caller_gives_up_leaves_no_cancel_to_wait_for(engines, how):  # noqa: F811
    """Found by a red team: ``X-Request-Timeout: 1e-308`` (or 0.0001), a few times: each
    request got its 504, and five seconds later the supervisor killed the engine as hung
    ("held a cancelled request of sin for 5.6 s while its status board said it was
    idle"); every request it held got a 503, and its restart took seconds. The engine's
    answer had been read between the request's cancellation (its deadline, or its client
    leaving) and the front end's cancel: the cancel went to an engine that had finished
    the job and so never answered it, and the front end, waiting for that answer, reported
    the engine overdue. Now an answer read first leaves nothing to cancel or wait for."""
    conn = engines._socks[0] = _Recording()
    engines._event(_state(1, 100, ready=True))
    call = _call(engines)
    if how == "deadline already past":
        call.deadline = 0.0  # the timer fires at the loop's next turn, as the answer comes
    request = asyncio.create_task(engines.run("jacobian", call))
    for _ in range(100):
        await asyncio.sleep(0)
        if conn.sent:
            break
    kind, msg_id = conn.sent[0]
    assert kind == "job"
    if how == "client gone":
        request.cancel()  # (routes._cancellable's watcher, on the client's disconnect)
        _answer(engines, msg_id)  # the engine's answer, read before the request's task runs again
    else:
        # The deadline's timer, set as the job went, fires at the loop's next turn; the
        # answer is read in that same turn, before the request's task runs again.
        asyncio.get_running_loop().call_later(0, _answer, engines, msg_id)
    with pytest.raises((asyncio.CancelledError, Exception)):
        await request
    assert ("cancel", msg_id) not in conn.sent, conn.sent
    assert engines._cancelled == {}, "a cancel nobody will answer: the engine would be reported hung"


def _engine_pids(url: str) -> list[int]:
    return httpx.get(f"{url}/v1/info", timeout=30).json()["engine_pids"]


_first_pids: list[int] = []


@pytest.mark.parametrize("timeout", ["1e-308", "1e-9", "0.0001", "0.001"])
def test_a_request_timeout_shorter_than_any_answer_is_a_504(server, timeout: str) -> None:
    """Each of these is answered 504 ``timeout``; before, some of them (the engine's answer
    read as the request gave up) had the engine killed as hung about five seconds later
    (the unit test above says how). Whether any did is checked by the module's last test,
    once the time a front end waits before reporting has passed."""
    url, _ = server
    _first_pids[:] = _first_pids or _engine_pids(url)
    for _ in range(5):
        r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]},
                       headers={"X-Request-Timeout": timeout}, timeout=30)
        assert_problem(r, 504, "timeout")


# ------------------------------------------------------------ the stream budget


def test_a_stream_refused_for_the_stream_budget_costs_the_engine_nothing(server) -> None:
    """A stream is refused (503, Retry-After) when the row chunks of the streams being
    sent hold the front end's stream budget. It was refused only once the engine had run
    the function's forward pass (the stream's size is known from the output's shape): a
    client retrying it, as told, had the engine run that pass at every retry, for
    nothing. Now a request equal to one that streamed before (function, input shapes and
    dtypes, the options that shape the stream) is refused before it reaches an engine."""
    url, _ = server
    n = 2100  # 17.6 MB: streamed (over STREAM_THRESHOLD_BYTES) in two chunks, 16 MiB held; as much again does not fit
    x = np.linspace(0, 1, n, dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    body = buf.getvalue()
    npy = {"content-type": wire.NPY, "accept": wire.NPY}
    reader = _connect(url, rcvbuf=4096)  # asks for the stream and reads none of it
    try:
        reader.sendall(b"POST /v1/functions/softmax/jacobian HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-npy\r\n"
                       b"Accept: application/x-npy\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reader.settimeout(30)
        assert reader.recv(12) == b"HTTP/1.1 200"
        before = _batches(url)
        for _ in range(3):  # a client retrying
            problem = assert_problem(httpx.post(f"{url}/v1/functions/softmax/jacobian", content=body, headers=npy,
                                                timeout=30), 503, "unavailable")
            assert "BODY_BUDGET_BYTES" in problem["detail"]
        # what does not stream is served meanwhile
        r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]}, timeout=30)
        np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos([0.5, 1.0])), rtol=1e-6)
        assert _batches(url) == before + 1, "the refused streams ran in the engine"
    finally:
        reader.close()
    # the reader gone, its reservation is given back: the stream is served, whole
    _softmax_served_whole(url, body, x, npy)


# ------------------------------------------------------------ work for a client that left


@pytest.mark.parametrize("endpoint", ["jvp"])  # (vjp and hvp loop in the same place: products.over_vectors)
def test_a_stack_of_vectors_stops_at_the_next_product_once_its_client_has_gone(server, endpoint: str) -> None:
    """Found by a red team, measured on a real server: a client that times out or hangs
    up stops the engine's work at its next chunk, for a Jacobian's rows, per-example
    Jacobians and sparse ones; but a stack of vectors (``batched_vectors``) that runs one
    product at a time (torch's vmap cannot run them: here a custom autograd.Function
    without a vmap rule) ran every product: 40 jvp tangents ran 31 more products after the
    client had gone, 40 hvp tangents 72 more (two steps each), holding the engine from
    everyone else. Now each product of the loop first checks that its request is alive."""
    url, _ = server
    n = 30  # 50 ms a step: 1.5 s of jvp products (3 s of hvp), left after 0.5
    x = np.linspace(0.1, 1, n).tolist()
    fn = "slow_steps" if endpoint == "jvp" else "slow_scalar"
    body = {"inputs": [x], "tangents": np.eye(n).tolist(), "batched_vectors": True}
    # (a small stack first: the engine learns that vmap cannot run them, and the request
    # left below spends its time on products)
    small = {"inputs": [x[:3]], "tangents": np.eye(3).tolist(), "batched_vectors": True}
    r = httpx.post(f"{url}/v1/functions/{fn}/{endpoint}", json=small, timeout=30)
    assert r.status_code == 200, r.text
    before = _steps_taken()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/functions/{fn}/{endpoint}", json=body, timeout=0.5)
    left_at = _steps_taken()
    time.sleep(0.8)  # 16 more steps, had it run on
    assert _steps_taken() - left_at <= 3, f"{_steps_taken() - left_at} steps after the client left (of {n})"
    assert left_at > before, "no product had started: the test measured nothing"
    # the engine is free: the next request is answered, and right (sin's Jacobian-vector products)
    r = httpx.post(f"{url}/v1/functions/slow_steps/jvp", json=small, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jvp"]["data"], np.diag(np.cos(x[:3])), rtol=1e-6)


# ------------------------------------------------------------ pipelining behind a refusal

_J = b'{"inputs": [[0.5, 1.0]]}'
_BIG = b'{"inputs": [[' + b",".join([b"0.5"] * 100_000) + b"]]}"  # 400 KB: several pieces


def _post(path: bytes, body: bytes, content_type: bytes = b"application/json", extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: %s\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path, content_type, extra, len(body), body))


_REFUSED = {
    "404 function": (_post(b"/v1/functions/nope/jacobian", _BIG), 404),
    "422 query option, before the body": (_post(b"/v1/functions/sin/jacobian?nope=1", _BIG), 422),
    "422 X-Request-Timeout": (_post(b"/v1/functions/sin/jacobian", _J, extra=b"X-Request-Timeout: 0\r\n"), 422),
    "415": (_post(b"/v1/functions/sin/jacobian", _BIG, b"text/plain"), 415),
    "405 with a body": (b"PUT /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(_BIG), _BIG), 405),
    "406": (_post(b"/v1/functions/sin_aux/jacobian", _J, extra=b"Accept: application/x-npy\r\n"), 406),
    "400 JSON": (_post(b"/v1/functions/sin/jacobian", b"{nope}"), 400),
    "400 no Host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    "404 chunked": (b"POST /v1/functions/nope/jacobian HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_BIG), _BIG), 404),
    "413 declared": (b"POST /v1/functions/sin/jacobian HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99999999999\r\n\r\n", 413),
}


@pytest.mark.parametrize("case", list(_REFUSED))
def test_a_request_pipelined_behind_a_refused_one_is_answered_or_told_the_connection_closes(server, case: str) -> None:
    """Left open by round eleven: after a 4xx on a keep-alive connection, the request
    pipelined behind it (sent in the same write) must be answered, or the refusal must say
    ``Connection: close`` and the connection close: never an answer silently dropped with
    the connection left open. Checked for refusals before the body is read (404, 422 of
    the query or a header, 415, 405), after it (400, 406), of the framing (chunked) and
    of the head (no Host), and one that leaves the body unread (413)."""
    url, _ = server
    refusal, status = _REFUSED[case]
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(refusal + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        got, closed = b"", False
        while len(re.findall(rb"HTTP/1\.1 \d{3} ", got)) < 2 or not got.endswith(b'{"status":"ok"}'):
            try:
                piece = s.recv(1 << 16)
            except socket.timeout:
                break
            if not piece:
                closed = True
                break
            got += piece
    statuses = [int(x) for x in re.findall(rb"HTTP/1\.1 (\d{3}) ", got)]
    assert statuses[:1] == [status], got[:400]
    first = got.split(b"\r\n\r\n", 1)[0].lower()
    assert b"content-type: application/problem+json" in first, got[:400]
    if statuses == [status]:  # not answered: only where the refusal said the connection closes, and it did
        assert b"connection: close" in first and closed, got[:400]
    else:
        assert statuses == [status, 200] and got.endswith(b'{"status":"ok"}'), got[-400:]


def test_no_client_of_this_module_had_an_engine_killed(server) -> None:
    """Last in the module (more than HANG_GRACE_S and a report's second after the short
    timeouts above): the engine is the one that served the first request."""
    url, proc = server
    assert _first_pids, "the short timeouts' test did not run first"
    # Alive: a kill is a fact at once, where the state that names the next engine and
    # the "died" line that says why come at the supervisor's ticks.
    assert all(_alive(pid) for pid in _first_pids), proc.read_log()[-3000:]
    assert _engine_pids(url) == _first_pids, proc.read_log()[-3000:]
    assert "overdue" not in proc.read_log(), proc.read_log()[-3000:]


# ------------------------------------------------------------ scrapes


class _Engines:
    """What /metrics asks of the engines."""

    def depth(self) -> int:
        return 0

    def engine_stats(self) -> dict[str, Any]:
        return {"restarts": {}, "quarantines": 0, "memory": {}}


@pytest.mark.asyncio
async def test_concurrent_scrapes_of_metrics_share_renders_off_the_event_loop(monkeypatch) -> None:
    """Found by a red team: 1,000 concurrent scrapes of /metrics (half of them /v1/info)
    on a served front end took 65 s, and a Jacobian asked for meanwhile 58 s (0.1 s
    alone): each scrape read and merged every process's metrics file on the event loop.
    Now one render runs at a time, in a thread, and the scrapes that arrive while it runs
    share the next: 50 concurrent scrapes make at most 2 renders, and the loop serves
    other work while they run."""
    from starlette.requests import Request

    from jacobian_service import routes
    from jacobian_service.connections import BodyBudget
    from jacobian_service.metrics import Metrics
    from jacobian_service.responses import EncodeBudget
    from jacobian_service.settings import Settings
    from jacobian_service.state import ServiceState

    metrics = Metrics()
    renders, ticks_during = [], []
    ticks = 0
    real = metrics.render

    def slow_render() -> bytes:  # a render of many processes' files: blocking work
        before = ticks
        time.sleep(0.1)
        renders.append(1)
        ticks_during.append(ticks - before)
        return real()

    monkeypatch.setattr(metrics, "render", slow_render)
    state = ServiceState(Settings(), _Engines(), metrics, EncodeBudget(1 << 20), BodyBudget(1 << 20))

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    tick = asyncio.ensure_future(ticker())
    try:
        answers = await asyncio.gather(*[routes.metrics(Request({"type": "http", "service": state})) for _ in range(50)])
    finally:
        tick.cancel()
    assert all(b"jacobian_service_queue_depth" in a.body for a in answers)
    assert len(renders) <= 2, f"{len(renders)} renders for 50 concurrent scrapes"
    assert max(ticks_during) > 0, "the event loop stood still while /metrics rendered"


# ------------------------------------------------------------ X-Request-Timeout's spelling


@pytest.mark.parametrize("value", ["1_0", "1_000", "+5", "1,5", "5s", "0x10", "Infinity", "1e309"])
def test_x_request_timeout_is_a_plain_decimal_number(client, value: str) -> None:
    """``X-Request-Timeout: 1_0`` was read as 10 seconds (Python's float() takes digit
    separators), as ``+5`` as 5: spellings no other reader of the header (a proxy, a
    client library) takes for those numbers. Now a 422 naming the value, as ``0x10``
    and ``Infinity`` were."""
    r = client.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5]]}, headers={"X-Request-Timeout": value})
    problem = assert_problem(r, 422, "invalid_input")
    assert f"not '{value}'" in problem["detail"], problem["detail"]


@pytest.mark.parametrize("value", ["5", "5.", ".5e1", "2.5e1", "2e1", "2E+1", "300e-1"])
def test_x_request_timeout_takes_every_decimal_spelling(client, value: str) -> None:
    r = client.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5]]}, headers={"X-Request-Timeout": value})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], [[np.cos(0.5)]], rtol=1e-6)


# ------------------------------------------------------------ bodies a byte at a time


def _pieces(sizes: list[int]) -> Any:
    class Request:
        def __init__(self) -> None:
            self.scope: dict[str, Any] = {"headers": []}  # (read_body reads Content-Length there)
            self.at = 0

        async def receive(self) -> dict[str, Any]:
            self.at += 1
            return {"type": "http.request", "body": b"x" * sizes[self.at - 1], "more_body": self.at < len(sizes)}

    return Request()


def test_a_body_sent_a_byte_at_a_time_is_refused_past_a_thousand_pieces() -> None:
    """Found by a red team: a body sent one byte per TCP segment (1-byte chunks, or a
    Content-Length body trickled) cost a front end ~90 us a byte, measured on a served
    front end (3,000 one-byte chunks: 0.26 s of CPU): one client kept a core busy at
    11 KB/s, for as long as READ_TIMEOUT_S allows. Past 1,024 pieces a body's pieces must
    now average 64 bytes: 408 and the connection closed, its budget given back."""
    from jacobian_service.connections import BodyBudget, read_body
    from jacobian_service.errors import RequestTimeout

    budget = BodyBudget(64 << 20)

    async def read(sizes: list[int]) -> int:
        async with read_body(_pieces(sizes), budget, 32 << 20, 30, 300) as body:
            return len(body)

    with pytest.raises(RequestTimeout, match="the body trickled: 1025 bytes in 1025 pieces") as refused:
        asyncio.run(read([1] * 5000))
    assert refused.value.headers.get("Connection") == "close" and budget.used == 0
    # a short body of small pieces, or small pieces behind large ones: read whole
    assert asyncio.run(read([1] * 1024)) == 1024
    assert asyncio.run(read([200_000] + [1] * 3000)) == 203_000
    assert asyncio.run(read([64] * 5000)) == 320_000 and budget.used == 0
