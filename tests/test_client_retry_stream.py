"""Retries and streamed downloads against a scripted server on loopback.

The server is a small raw-ASGI app under uvicorn (tests/_client_support.serve): each
request takes the next step of a script, so a test can say "429 with Retry-After, then
200", or "send half of the .npy, then drop the connection".
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import numpy as np
import pytest
import uvicorn

import jacobian_client as jc
from jacobian_client import wire
from jacobian_client._protocol import RetryPolicy

from ._client_support import free_port, serve
from ._ports import dead_port

Send = Callable[[dict[str, Any]], Awaitable[None]]
Step = Callable[[Send], Awaitable[None]]


class Scripted:
    """An ASGI app answering each request with the next scripted step (the last repeats)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.hits: list[float] = []
        self.request_headers: list[dict[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        while (await receive()).get("more_body"):
            pass
        self.hits.append(time.monotonic())
        self.request_headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        step = self.steps[min(len(self.hits) - 1, len(self.steps) - 1)]
        await step(send)


def problem(status: int, code: str, **headers: str) -> Step:
    async def step(send: Send) -> None:
        body = wire.dumps({"type": "x", "title": code, "status": status, "detail": code, "code": code,
                           "request_id": "r"})
        hdrs = [(b"content-type", wire.PROBLEM.encode()), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    return step


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npy_body(arr: np.ndarray, *, piece: int = 4096, stop_after: int | None = None, content_length: int | None = -1,
             truncate_to: int | None = None) -> Step:
    """Stream ``arr`` as .npy in pieces. ``stop_after``: raise after that many bytes (the
    server aborts the connection); ``content_length``: -1 for the true length, None for
    chunked; ``truncate_to``: send a complete HTTP body that is a short .npy."""
    body = npy_bytes(arr)
    if truncate_to is not None:
        body = body[:truncate_to]

    async def step(send: Send) -> None:
        hdrs = [(b"content-type", wire.NPY.encode())]
        if content_length is not None:
            hdrs.append((b"content-length", str(len(body) if content_length == -1 else content_length).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": hdrs})
        sent = 0
        for i in range(0, len(body), piece):
            if stop_after is not None and sent >= stop_after:
                raise RuntimeError("simulated failure mid-stream")
            await send({"type": "http.response.body", "body": body[i : i + piece], "more_body": True})
            sent += piece
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})

    return step


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Scripted, str]]:
    app = Scripted()
    with serve(app) as url:
        yield app, url


@pytest.fixture
def scripted(server: tuple[Scripted, str]) -> Iterator[tuple[Scripted, str]]:
    app, url = server
    app.steps, app.hits, app.request_headers = [], [], []
    yield app, url


FAST = RetryPolicy(max_retries=3, backoff_base=0.01, backoff_max=0.05, max_retry_time=10.0)
X = np.linspace(0.0, 1.0, 5, dtype=np.float32)
J = np.diag(np.cos(X))


# --------------------------------------------------------------------------- retries


def test_429_with_retry_after_then_200(scripted: tuple[Scripted, str]) -> None:
    app, url = scripted
    app.steps = [problem(429, "overloaded", **{"retry-after": "1"}), npy_body(J)]
    with jc.Client(url, retry=FAST) as client:
        got = client.jacobian("sin", X)
    np.testing.assert_array_equal(got, J)
    assert len(app.hits) == 2
    assert app.hits[1] - app.hits[0] >= 1.0  # Retry-After honoured over the short backoff
    ids = {h["x-request-id"] for h in app.request_headers}
    assert len(ids) == 1  # one logical call, one id across its retries


def test_503_twice_then_200(scripted: tuple[Scripted, str]) -> None:
    app, url = scripted
    app.steps = [problem(503, "unavailable"), problem(503, "unavailable"), npy_body(J)]
    with jc.Client(url, retry=FAST) as client:
        np.testing.assert_array_equal(client.jacobian("sin", X), J)
    assert len(app.hits) == 3


def test_retries_are_bounded_in_count(scripted: tuple[Scripted, str]) -> None:
    # Retry-After: 0 asks for no wait: one that does is retried past the count, within
    # the retry time (test_remote_round19)
    app, url = scripted
    app.steps = [problem(429, "overloaded", **{"retry-after": "0"})]
    with jc.Client(url, retry=RetryPolicy(max_retries=2, backoff_base=0.01)) as client:
        with pytest.raises(jc.Overloaded) as info:
            client.jacobian("sin", X)
    assert len(app.hits) == 3 and info.value.retry_after == 0.0


def test_retries_are_bounded_in_time(scripted: tuple[Scripted, str]) -> None:
    app, url = scripted
    app.steps = [problem(503, "unavailable", **{"retry-after": "30"})]
    started = time.monotonic()
    with jc.Client(url, retry=RetryPolicy(max_retries=5, max_retry_time=5.0)) as client:
        with pytest.raises(jc.Unavailable):
            client.jacobian("sin", X)
    assert len(app.hits) == 1 and time.monotonic() - started < 5.0


@pytest.mark.parametrize(("status", "code", "cls"), [(422, "invalid_input", jc.InvalidInput),
                                                     (500, "function_error", jc.FunctionError),
                                                     (504, "timeout", jc.Timeout)])
def test_other_errors_are_not_retried(scripted: tuple[Scripted, str], status: int, code: str, cls: type) -> None:
    app, url = scripted
    app.steps = [problem(status, code), npy_body(J)]
    with jc.Client(url, retry=FAST) as client:
        with pytest.raises(cls) as info:
            client.jacobian("sin", X)
    assert len(app.hits) == 1 and info.value.status_code == status


def test_connection_refused_is_retried_then_raised() -> None:
    with dead_port() as port:  # (nothing answers there, for the test's whole time)
        url = f"http://127.0.0.1:{port}"
        with jc.Client(url, retry=FAST) as client:
            with pytest.raises(jc.TransportError) as info:
                client.jacobian("sin", X)
        assert "ConnectError" in str(info.value)
        assert not isinstance(info.value, jc.IncompleteResponse)
        # Which server refused: "POST /v1/...: Connection refused" left a wrong URL or port to guess.
        assert str(info.value).startswith(f"POST {url}/v1/functions/sin/jacobian: ConnectError")
        with jc.Client(url.replace("http://", "http://user:secret@") + "/prefix", retry=FAST) as client:
            with pytest.raises(jc.TransportError) as info:
                client.jacobian("sin", X)
    assert str(info.value).startswith(f"POST {url}/prefix/v1/functions/sin/jacobian: ") and "secret" not in str(info.value)


def test_connection_error_then_server_comes_up() -> None:
    app = Scripted()
    app.steps = [npy_body(J)]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    starter = threading.Timer(0.3, server.run)
    starter.daemon = True
    starter.start()
    try:
        policy = RetryPolicy(max_retries=20, backoff_base=0.1, backoff_max=0.2, max_retry_time=20.0)
        with jc.Client(f"http://127.0.0.1:{port}", retry=policy) as client:
            np.testing.assert_array_equal(client.jacobian("sin", X), J)
    finally:
        server.should_exit = True
        starter.join(timeout=10)
    assert len(app.hits) == 1


@pytest.mark.asyncio
async def test_async_429_then_200(scripted: tuple[Scripted, str]) -> None:
    app, url = scripted
    app.steps = [problem(429, "overloaded", **{"retry-after": "0.3"}), npy_body(J)]
    async with jc.AsyncClient(url, retry=FAST) as client:
        got = await client.jacobian("sin", X)
    np.testing.assert_array_equal(got, J)
    assert len(app.hits) == 2 and app.hits[1] - app.hits[0] >= 0.3


@pytest.mark.asyncio
async def test_async_connection_refused() -> None:
    with dead_port() as port:
        async with jc.AsyncClient(f"http://127.0.0.1:{port}", retry=FAST) as client:
            with pytest.raises(jc.TransportError):
                await client.jacobian("sin", X)
            assert not await client.health()


# --------------------------------------------------------------------------- streaming

BIG = np.arange(12000 * 5, dtype=np.float32).reshape(12000, 5)  # a Jacobian of X: ends with its shape


def _only(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_out_streams_into_a_file(scripted: tuple[Scripted, str], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    app, url = scripted
    app.steps = [npy_body(BIG, piece=1000)]
    out = tmp_path / "J.npy"
    with jc.Client(url) as client:
        got = client.jacobian("softmax", X, out=out, progress=True)
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, BIG)
    assert _only(tmp_path) == ["J.npy"]
    assert app.request_headers[0]["accept"] == wire.NPY
    assert "MiB" in capsys.readouterr().err  # the plain progress line (tqdm absent or not)


@pytest.mark.parametrize("content_length", [-1, None], ids=["content-length", "chunked"])
def test_aborted_stream_raises_and_leaves_no_file(scripted: tuple[Scripted, str], tmp_path: Path,
                                                  content_length: int | None) -> None:
    app, url = scripted
    app.steps = [npy_body(BIG, piece=1000, stop_after=50_000, content_length=content_length)]
    out = tmp_path / "J.npy"
    out.write_bytes(b"an older result")
    with jc.Client(url, retry=FAST) as client:
        with pytest.raises(jc.IncompleteResponse):
            client.jacobian("softmax", X, out=out)
        with pytest.raises(jc.IncompleteResponse):
            client.jacobian("softmax", X)  # in memory too
    assert out.read_bytes() == b"an older result"
    assert _only(tmp_path) == ["J.npy"]
    assert len(app.hits) == 2  # a broken stream is reported, not silently redone


def test_whole_http_body_but_short_npy_raises(scripted: tuple[Scripted, str], tmp_path: Path) -> None:
    app, url = scripted
    full = len(npy_bytes(BIG))
    app.steps = [npy_body(BIG, truncate_to=full - 4)]
    with jc.Client(url) as client:
        with pytest.raises(jc.IncompleteResponse):
            client.jacobian("softmax", X, out=tmp_path / "J.npy")
    assert _only(tmp_path) == []


@pytest.mark.asyncio
async def test_async_out_and_abort(scripted: tuple[Scripted, str], tmp_path: Path) -> None:
    app, url = scripted
    app.steps = [npy_body(BIG, piece=5000), npy_body(BIG, piece=1000, stop_after=20_000)]
    async with jc.AsyncClient(url) as client:
        got = await client.jacobian("softmax", X, out=tmp_path / "a.npy")
        np.testing.assert_array_equal(got, BIG)
        with pytest.raises(jc.IncompleteResponse):
            await client.jacobian("softmax", X, out=tmp_path / "b.npy")
    assert _only(tmp_path) == ["a.npy"]


def slow_step(seconds: float, then: Step) -> Step:
    async def step(send: Send) -> None:
        await asyncio.sleep(seconds)
        await then(send)

    return step


def test_client_timeout_is_a_transport_error_and_not_retried(scripted: tuple[Scripted, str]) -> None:
    app, url = scripted
    app.steps = [slow_step(1.0, npy_body(J))]
    with jc.Client(url, timeout=0.2, retry=FAST) as client:
        with pytest.raises(jc.TransportError) as info:
            client.jacobian("sin", X)
    assert "ReadTimeout" in str(info.value) and len(app.hits) == 1


def test_out_file_gets_ordinary_permissions(scripted: tuple[Scripted, str], tmp_path: Path) -> None:
    app, url = scripted
    app.steps = [npy_body(J)]
    umask = os.umask(0o022)
    os.umask(umask)
    with jc.Client(url) as client:
        client.jacobian("sin", X, out=tmp_path / "J.npy")
    assert (tmp_path / "J.npy").stat().st_mode & 0o777 == 0o666 & ~umask
