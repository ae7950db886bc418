"""Defects an outside tester found in the SDK, one test (or a few) per defect.

Against the real server on loopback where the server's answer matters, and against a
small stdlib fake (``Fake`` below, one misbehaviour per function name) for responses the
real server never sends: trickled bodies, headers that lie, malformed documents.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gzip
import io
import json
import multiprocessing
import os
import pickle
import queue
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpcore
import httpx
import numpy as np
import pytest

import jacobian_client as jc
from jacobian_client import _errors
from jacobian_client._arrays import Bfloat16, as_wire_value
from jacobian_client._npystream import FileSink, MemorySink, NpyReceiver
from jacobian_client._protocol import Protocol, is_input_node

from .conftest import npy_bytes

X3 = np.array([0.1, 0.2, 0.3])


def npz_result(**trees: np.ndarray) -> bytes:
    """A result .npz as the server writes one: a member per array and meta.json."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, arr in trees.items():
            zf.writestr(f"{key}.npy", npy_bytes(arr))
        zf.writestr("meta.json", json.dumps({"structure": {k: {"$npy": f"{k}.npy"} for k in trees}}))
    return buf.getvalue()


# --------------------------------------------------------------------------- the fake


FLOODED: queue.Queue[int] = queue.Queue()  # bytes of each flooded body that left the fake


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, ctype: str, body: bytes, *, length: int | None = None, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _trickle(self, body: bytes, piece: int, pause: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-npy")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(0, len(body), piece):
                self.wfile.write(body[i : i + piece])
                self.wfile.flush()
                time.sleep(pause)
        except OSError:  # the client gave up
            self.close_connection = True

    def _flood(self, status: int, ctype: str) -> None:
        """A 64 MiB body as fast as the client takes it; how much of it went is noted in
        ``FLOODED`` (the connection closed under it ends the writing)."""
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(64 << 20))
        self.end_headers()
        sent, piece = 0, b" " * (1 << 16)
        try:
            while sent < 64 << 20:
                self.wfile.write(piece)
                sent += len(piece)
        except OSError:  # the client stopped reading and closed
            self.close_connection = True
        FLOODED.put(sent)

    def _trickle_head(self) -> None:
        """The status line and headers a byte every 50 ms, for 5 s."""
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npy\r\n" + b"X-Pad: " + b"a" * 100
        try:
            for i in range(len(head)):
                self.wfile.write(head[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client gave up
            pass
        self.close_connection = True

    def do_GET(self) -> None:
        if self.path.startswith("/flood/"):  # a client whose base URL ends so: its probes
            self._flood(200, "application/json")
        elif self.path.startswith("/trickled_head/"):  # a client whose base URL ends so: its probes
            self._trickle_head()
        elif self.path.startswith("/v1/functions"):
            self._send("application/json", b'[{"name": "f", "inputs": "garbage"}]')
        elif self.path.startswith("/v1/info"):
            self._send("application/json", b"[1, 2, 3]")
        else:
            self._send("application/json", b"{}")

    def do_POST(self) -> None:
        name = self.path.split("?")[0].split("/")[3]
        if name == "steadyread":  # the request body taken 1 MiB every 50 ms (20 MB/s), then answered
            left = int(self.headers.get("Content-Length", 0))
            while left:
                left -= len(self.rfile.read(min(left, 1 << 20)))
                time.sleep(0.05)
            self._send("application/x-npy", npy_bytes(np.arange(3.0)))
            return
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if name == "trickle":  # 288 bytes, one every 50 ms: 14 s in all
            self._trickle(npy_bytes(np.arange(20.0)), 1, 0.05)
        elif name == "mebibytes":  # 4 MiB in 1 MiB pieces, 0.25 s apart: over 0.75 s in all
            self._trickle(npy_bytes(np.zeros(1 << 19)), 1 << 20, 0.25)
        elif name == "hugeshape":  # a header claiming 8 TB, in a 192-byte body
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
            self._send("application/x-npy", buf.getvalue() + b"\0" * 64)
        elif name == "nooutput":
            self._send("application/x-npz", npz_result(jacobian=np.eye(3)))
        elif name == "stroutput":
            self._send("application/json", b'{"output": "hello"}')
        elif name == "trickled_head":
            self._trickle_head()
        elif name == "redirect":  # a redirect whose body is a readable .npy: it is no answer
            body = npy_bytes(np.full((3, 3), 7.0))
            self.send_response(307)
            self.send_header("Location", "http://elsewhere.invalid/v1/functions/f/jacobian")
            self.send_header("Content-Type", "application/x-npy")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif name == "gzipped":  # a proxy compressing answers: Content-Length is the gzip's
            body = gzip.compress(npy_bytes(np.arange(9.0).reshape(3, 3)))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-npy")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif name == "partial":  # 206 Partial Content (nothing asked for a range)
            self._send("application/x-npy", npy_bytes(np.eye(3)), status=206)
        elif name == "flood":  # an endless (64 MiB) problem document
            self._flood(500, "application/problem+json")
        elif name in ("trickled_framing", "trickled_framing_npy"):  # a chunked body's size line, a digit
            self.send_response(200)                                     # every 50 ms: no body byte ever
            self.send_header("Content-Type", "application/x-npy" if name.endswith("npy") else "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"0")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:  # the client gave up
                pass
            self.close_connection = True
        elif name == "trickled_error":  # an error whose body trickles: its status says enough
            self.send_response(404)
            self.send_header("Content-Type", "application/problem+json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                self.close_connection = True
        else:
            self._send("application/problem+json", b'{"code": "function_not_found"}', status=404)


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    pytest.importorskip("torch")
    pytest.importorskip("jacobian_service.app")
    from ._client_support import real_server

    with real_server() as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[jc.Client]:
    with jc.Client(url) as c:
        yield c


# --------------------------------------------------------------------------- 1. timeout bounds the call

# _LOADED: the bounds below are 3.5 s, not 2 s: a call cut at its 0.5 s timeout, on a
# loaded machine (CI's two cores, two test workers), can take a second or more longer;
# each defect they catch held the call for 5 s or more.


def test_timeout_bounds_a_trickled_response(fake: str) -> None:
    started = time.monotonic()
    with jc.Client(fake, timeout=0.5) as client:
        with pytest.raises(jc.TransportError, match=r"ReadTimeout: less than 1 MiB of the response arrived in timeout=0.5 s"):
            client.jacobian("trickle", X3)
    assert time.monotonic() - started < 3.5  # was 14 s: every byte came within the read timeout (see _LOADED)


def test_timeout_bounds_a_trickled_response_async(fake: str) -> None:
    async def main() -> None:
        async with jc.AsyncClient(fake, timeout=0.5) as client:
            await client.jacobian("trickle", X3)

    started = time.monotonic()
    with pytest.raises(jc.TransportError, match="ReadTimeout"):
        asyncio.run(main())
    assert time.monotonic() - started < 3.5  # (see _LOADED)


@pytest.mark.parametrize("name", ["trickled_framing", "trickled_framing_npy"])  # read whole, streamed
def test_timeout_bounds_a_body_whose_framing_is_trickled(fake: str, name: str) -> None:
    """Bytes of a chunked body's framing (a size line that never ends) make no piece of
    the body, so the deadline, checked per piece, never saw them: a server sending a
    digit every 50 ms held a ``timeout=0.5`` call for the whole 5 s (as long as it
    liked), sync and async, into memory or streamed."""
    def sync() -> None:
        with jc.Client(fake, timeout=0.5, max_retries=0) as client:
            client.jacobian(name, X3)

    async def main() -> None:
        async with jc.AsyncClient(fake, timeout=0.5, max_retries=0) as client:
            await client.jacobian(name, X3)

    for run in (sync, lambda: asyncio.run(main())):
        started = time.monotonic()
        with pytest.raises(jc.TransportError, match=r"ReadTimeout: less than 1 MiB of the response arrived in "
                                                    r"timeout=0.5 s \(0 bytes received\)"):
            run()
        assert time.monotonic() - started < 3.5  # (see _LOADED)


def test_an_endless_error_body_or_probe_body_is_not_read_whole(fake: str) -> None:
    """A problem document (or a health probe's answer) of 64 MiB, sent as fast as it is
    taken, was read whole (each MiB came within the timeout; an endless one grew the
    caller by 4 GB in 30 s): now its first MiB at most, the rest left unread and the
    connection closed, sync and async."""
    from jacobian_client._protocol import MAX_ERROR_BODY

    def check_flood() -> None:  # what left the fake: the MiB read and what the socket buffers held
        assert FLOODED.get(timeout=30) < 32 << 20

    async def main() -> tuple[jc.APIError, bool]:
        async with jc.AsyncClient(fake, timeout=10, max_retries=0) as client:
            with pytest.raises(jc.APIError) as info:
                await client.jacobian("flood", X3)
        async with jc.AsyncClient(f"{fake}/flood", timeout=10) as client:
            return info.value, await client.health()

    with jc.Client(fake, timeout=10, max_retries=0) as client:
        with pytest.raises(jc.APIError, match="^500: ") as info:
            client.jacobian("flood", X3)
    check_flood()
    with jc.Client(f"{fake}/flood", timeout=10) as client:
        assert client.health() is True
    check_flood()
    error, healthy = asyncio.run(main())
    check_flood()
    check_flood()
    assert healthy is True
    for exc in (info.value, error):
        assert exc.status_code == 500 and exc.response is not None and len(exc.response.content) == MAX_ERROR_BODY


def test_timeout_bounds_a_trickled_status_line_and_headers(fake: str) -> None:
    """httpx reads the head inside ``send``, each byte within its per-read timeout: a head
    trickled a byte every 50 ms held a ``timeout=0.5`` call for the whole 5 s (and as
    long as the server liked), sync and async alike."""
    late = r"ReadTimeout: the response's status line and headers did not arrive within the call's timeout"

    def sync() -> None:
        with jc.Client(fake, timeout=0.5) as client:
            client.jacobian("trickled_head", X3)

    async def main() -> None:
        async with jc.AsyncClient(fake, timeout=0.5) as client:
            await client.jacobian("trickled_head", X3)

    for run in (sync, lambda: asyncio.run(main())):
        started = time.monotonic()
        with pytest.raises(jc.TransportError, match=late):
            run()
        assert time.monotonic() - started < 3.5  # (see _LOADED)


class _PacedStream:
    """A network stream whose sends take ``pause`` seconds per piece, as a server reading
    at that pace makes them (the kernel's buffers full)."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.sent = 0

    def write(self, buffer: Any, timeout: float | None = None) -> None:
        time.sleep(min(self.pause, timeout if timeout is not None else self.pause))
        if timeout is not None and self.pause > timeout:
            raise httpcore.WriteTimeout("timed out")
        self.sent += len(buffer)


@pytest.mark.parametrize("pause, ok", [(0.05, False), (0.004, True)])
def test_timeout_bounds_sending_to_a_server_that_reads_slowly(pause: float, ok: bool) -> None:
    """A server that takes the request body a little at a time, each send done within
    httpx's per-write timeout, held a call past its timeout as long as it liked. Sending
    now gets the attempt's timeout for each MiB (as a streamed answer does): 1 MiB per
    0.8 s is cut off under timeout=0.3, while 8 MiB at 1 MiB per 0.07 s (longer in all
    than the timeout) goes through."""
    from jacobian_client import _headwait

    inner = _PacedStream(pause)
    stream = _headwait._Stream(inner)
    started = time.monotonic()
    with _headwait.head_deadline(0.3):
        if ok:
            stream.write(b"\0" * (8 << 20), timeout=30.0)
        else:
            with pytest.raises(httpcore.WriteTimeout, match="less than 1 MiB of the request could be sent"):
                stream.write(b"\0" * (8 << 20), timeout=30.0)
    took = time.monotonic() - started
    assert (inner.sent == 8 << 20 and took > 0.3) if ok else (inner.sent < 1 << 20 and took < 3.0), (inner.sent, took)  # (6.4 s sent whole)


def test_a_body_sent_steadily_goes_on_past_the_timeout(fake: str) -> None:
    """A 32 MiB upload to a server reading 20 MB/s takes 1.6 s, past timeout=1, with each
    MiB in 50 ms: it is sent and answered (a slow link is not a trickle), sync and async."""
    x = np.zeros(4 << 20)

    async def main() -> Any:
        async with jc.AsyncClient(fake, timeout=1.0, max_retries=0) as client:
            return await client.evaluate("steadyread", x)

    with jc.Client(fake, timeout=1.0, max_retries=0) as client:
        np.testing.assert_array_equal(client.evaluate("steadyread", x), np.arange(3.0))
    np.testing.assert_array_equal(asyncio.run(main()), np.arange(3.0))


def test_timeout_bounds_a_trickled_health_probe(fake: str) -> None:
    """health() "never raises" and wait_ready(timeout) gives up at its timeout: a server
    trickling the probe's answer held both for the whole 5 s (or forever)."""
    async def main() -> tuple[bool, float]:
        async with jc.AsyncClient(f"{fake}/trickled_head", timeout=0.5) as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.wait_ready(timeout=0.3)
            return await client.health(), time.monotonic() - started

    with jc.Client(f"{fake}/trickled_head", timeout=0.5) as client:
        started = time.monotonic()
        assert client.health() is False
        with pytest.raises(TimeoutError):
            client.wait_ready(timeout=0.3)
        assert time.monotonic() - started < 3.5  # (see _LOADED)
    healthy, took = asyncio.run(main())
    assert healthy is False and took < 3.5  # (see _LOADED)


def test_timeout_bounds_a_trickled_error_body(fake: str) -> None:
    started = time.monotonic()
    with jc.Client(fake, timeout=0.5, max_retries=0) as client:
        with pytest.raises(jc.FunctionNotFound):
            client.jacobian("trickled_error", X3)
    assert time.monotonic() - started < 3.5  # was 5 s (see _LOADED)


def test_a_result_streams_past_timeout_while_each_mebibyte_comes_in_time(fake: str, tmp_path: Path) -> None:
    """A streamed Jacobian may take longer than one timeout, in memory or into a file
    (a second red team: a steady 5 s stream failed under timeout=5 in memory), and a
    trickle still ends."""
    x = np.array(0.5)  # 0-d: a Jacobian of it is shaped as the output, here 2^19
    with jc.Client(fake, timeout=0.6) as client:
        got = client.jacobian("mebibytes", x)  # 1 s in all, but 1 MiB per 0.25 s
        assert got.shape == (1 << 19,) and not got.any()
        got = client.jacobian("mebibytes", x, out=tmp_path / "J.npy")
        assert got.shape == (1 << 19,) and not got.any()
        with pytest.raises(jc.TransportError, match="less than 1 MiB of the response arrived in timeout=0.6 s"):
            client.jacobian("trickle", X3, out=tmp_path / "T.npy")  # a trickle into a file still ends
    assert sorted(os.listdir(tmp_path)) == ["J.npy"]


# --------------------------------------------------------------------------- 2. errors pickle


def _problem_response(status: int, problem: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.Response(status, json=problem, headers=headers, request=httpx.Request("POST", "http://x/v1/f"))


def test_a_huge_or_malformed_problem_stays_out_of_the_message() -> None:
    """Another server's problem document is not ours to trust: a megabyte of detail (or
    of request id) went whole into the exception's message, and a request id that is no
    string into ``request_id``. The message shows 2,000 characters of the detail; the
    ``detail`` attribute keeps it all."""
    error = _errors.error_from_response(_problem_response(
        422, {"code": "invalid_input", "detail": "x" * 1_000_000, "request_id": "r" * 1_000_000}))
    assert isinstance(error, jc.InvalidInput) and len(error.detail) == 1_000_000
    assert str(error) == (f"422 invalid_input: {'x' * 2000}... (998000 more characters) "
                          f"(request {'r' * 200}... (999800 more characters))")
    error = _errors.error_from_response(_problem_response(422, {"detail": "bad", "request_id": ["a", 1]},
                                                          **{"X-Request-ID": "abc"}))
    assert error.request_id == "abc" and str(error) == "422: bad (request abc)"


@pytest.mark.parametrize("cls", [jc.APIError, *_errors._LEAVES])
def test_every_api_error_pickles(cls: type[jc.APIError]) -> None:
    status = cls.status or 418
    problem = {"code": cls.code_name or "brand_new", "detail": "why", "request_id": "rid", "extra": [1]}
    err = cls(_problem_response(status, problem, **{"Retry-After": "3"}), problem)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err) and back.args == err.args
    assert (back.status_code, back.code, back.problem, back.detail, back.request_id) == (
        status, problem["code"], problem, "why", "rid")
    assert back.response is None
    if cls is jc.Overloaded:
        assert back.retry_after == 3.0


def test_a_quarantined_function_raises_its_own_error_at_once() -> None:
    """503 function_quarantined came out as a plain APIError: no class to catch it by, and
    no retry_after. It is now FunctionQuarantined (an Unavailable too), from the Client and
    from a remote function, after one request when the cooldown outlasts the retry time."""
    problem = {"type": "urn:jacobian-service:problem:function_quarantined", "title": "Function quarantined",
               "status": 503, "code": "function_quarantined", "detail": "sin is quarantined", "request_id": "rid"}
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(503, json=problem, headers={"Retry-After": "590",
                                                          "Content-Type": "application/problem+json"})

    with jc.Client("http://x", http_transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(jc.FunctionQuarantined, match="sin is quarantined") as info:
            client.evaluate("sin", X3)
        assert isinstance(info.value, jc.Unavailable) and info.value.retry_after == 590.0
        assert sent == ["/v1/functions/sin/evaluate"]
        torch = pytest.importorskip("torch")
        from jacobian_client.torch import remote

        with pytest.raises(jc.FunctionQuarantined):
            remote(client, "sin")(torch.ones(3))
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is jc.FunctionQuarantined and back.retry_after == 590.0


def test_other_errors_pickle() -> None:
    for err in (jc.TransportError("t"), jc.IncompleteResponse("i"), jc.JacobianServiceError("j")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)


def _raise_function_not_found() -> None:
    problem = {"code": "function_not_found", "detail": "no such function"}
    raise jc.FunctionNotFound(_problem_response(404, problem), problem)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_api_error_crosses_a_process_pool() -> None:
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        with pytest.raises(jc.FunctionNotFound, match="no such function") as info:
            pool.submit(_raise_function_not_found).result(timeout=30)  # was BrokenProcessPool
    assert info.value.status_code == 404 and info.value.code == "function_not_found"


def test_server_error_pickles(client: jc.Client) -> None:
    with pytest.raises(jc.FunctionNotFound) as info:
        client.jacobian("no_such_function", X3)
    back = pickle.loads(pickle.dumps(info.value))
    assert (back.status_code, back.code, back.problem, str(back)) == (
        404, "function_not_found", info.value.problem, str(info.value))


# --------------------------------------------------------------------------- 3. lists of scalars are one array


def test_lists_of_scalars_are_one_array(client: jc.Client) -> None:
    import torch

    want = client.jacobian("sin", X3.tolist())
    for value in (list(X3), [0.1, np.float64(0.2), 0.3], list(torch.tensor(X3)), [np.array(0.1), 0.2, np.float32(0.3)]):
        for transport in ("binary", "json"):
            np.testing.assert_allclose(client.jacobian("sin", value, transport=transport), want, rtol=1e-6)
    np.testing.assert_allclose(client.vjp("sin", X3, cotangents=list(np.ones(3))), np.cos(X3))


def test_which_lists_are_pytree_nodes() -> None:
    assert not is_input_node(list(np.arange(3.0)))
    assert not is_input_node([[np.float64(1.0), 2.0], [3.0, np.array(4.0)]])  # 2-D, still one array
    assert is_input_node([np.float64(1.0), np.ones(2)])  # holds an array of rank 1
    assert is_input_node([1.0, {"w": 2.0}])
    assert is_input_node((np.float64(1.0), np.float64(2.0)))  # a tuple of 0-d leaves stays a node


# --------------------------------------------------------------------------- 4. out= leaves nothing behind


def test_out_that_cannot_be_renamed_leaves_no_partial(client: jc.Client, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        client.jacobian("sin", X3, out=tmp_path / "d")
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == []


def test_file_sink_cleans_up_a_failed_commit(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    rx = NpyReceiver(FileSink(tmp_path / "d"))
    rx.feed(npy_bytes(X3))
    with pytest.raises(IsADirectoryError):
        rx.close()
    assert os.listdir(tmp_path) == ["d"]


# --------------------------------------------------------------------------- 5. closed clients


def test_closed_client(url: str) -> None:
    client = jc.Client(url)
    assert client.health()
    client.close()
    assert client.health() is False  # "never raises"
    for call in (client.functions, lambda: client.jacobian("sin", X3)):
        with pytest.raises(jc.JacobianServiceError, match="client is closed") as info:
            call()
        assert not isinstance(info.value, RuntimeError)


def test_closed_async_client(url: str) -> None:
    async def main() -> None:
        client = jc.AsyncClient(url)
        await client.aclose()
        assert await client.health() is False
        with pytest.raises(jc.JacobianServiceError, match="client is closed"):
            await client.jacobian("sin", X3)

    asyncio.run(main())


# --------------------------------------------------------------------------- 6. api keys


@pytest.mark.parametrize("key", ["sec\nret", "sécret", "sec\x00ret"])
@pytest.mark.parametrize("cls", [jc.Client, jc.AsyncClient])
def test_unsendable_api_key_is_refused_without_echo(cls: type, key: str) -> None:
    with pytest.raises(ValueError, match="api_key holds a control or non-ASCII character") as info:
        cls("http://127.0.0.1:9", api_key=key)
    assert "sec" not in str(info.value) and "ret" not in str(info.value)


def test_api_key_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="api_key is a string"):
        jc.Client("http://127.0.0.1:9", api_key=b"secret")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 7. malformed responses


def test_malformed_responses_are_transport_errors(fake: str) -> None:
    with jc.Client(fake, timeout=10) as client:
        with pytest.raises(jc.TransportError, match="unreadable functions response: a function's inputs are a list, not a string"):
            client.functions()
        with pytest.raises(jc.TransportError, match="unreadable info response: expected a JSON object"):
            client.info()
        with pytest.raises(jc.TransportError, match="has no 'output', though return_output=True asked for it"):
            client.jacobian("nooutput", X3, return_output=True)
        with pytest.raises(jc.TransportError, match="'output' holds a str where an array belongs"):
            client.evaluate("stroutput", X3)


def test_a_gzipped_npy_answer_is_read(fake: str, tmp_path: Path) -> None:
    """A proxy that gzips answers (httpx asks for gzip and decodes it): the ``.npy``'s
    length was compared with the compressed Content-Length, and every such answer
    failed ("response body ended after 200 of 112 bytes"), sync and async, in memory and into a file."""
    want = np.arange(9.0).reshape(3, 3)

    async def main() -> Any:
        async with jc.AsyncClient(fake, timeout=10) as client:
            return await client.jacobian("gzipped", X3)

    with jc.Client(fake, timeout=10) as client:
        np.testing.assert_array_equal(client.jacobian("gzipped", X3), want)
        np.testing.assert_array_equal(client.jacobian("gzipped", X3, out=tmp_path / "J.npy"), want)
    np.testing.assert_array_equal(asyncio.run(main()), want)


def test_only_a_200_is_an_answer(fake: str) -> None:
    """Any status under 400 was read as the answer: a 307 whose body held an ``.npy`` was
    returned as the Jacobian (a 3x3 of sevens, silently), a 206 as the whole result. A
    redirect says where it points and that it is not followed; others name the status,
    sync and async."""
    redirect = (r"^POST /v1/functions/redirect/jacobian: the server answered 307 Temporary Redirect to "
                r"'http://elsewhere.invalid/v1/functions/f/jacobian'; redirects are not followed \(they could take "
                r"the request and its API key to another host\): give the client the base URL it should use$")
    partial = (r"^POST /v1/functions/partial/jacobian: the server answered 206 Partial Content, not 200 with a "
               r"result; is base_url this service's\?$")

    async def main(name: str) -> Any:
        async with jc.AsyncClient(fake, timeout=10, api_key="k") as client:
            return await client.jacobian(name, X3)

    for name, message in (("redirect", redirect), ("partial", partial)):
        with jc.Client(fake, timeout=10, api_key="k") as client, pytest.raises(jc.TransportError, match=message):
            client.jacobian(name, X3)
        with pytest.raises(jc.TransportError, match=message):
            asyncio.run(main(name))


def test_npy_header_larger_than_the_body_is_not_allocated(fake: str) -> None:
    with jc.Client(fake, timeout=10) as client:
        with pytest.raises(jc.IncompleteResponse, match=r"declares 8000000000128 bytes .* but the response is 192 bytes long"):
            client.jacobian("hugeshape", X3)


def test_unchecked_npy_header_is_not_preallocated() -> None:
    """Without a Content-Length (chunked), a header's size is taken on trust only when small."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    rx = NpyReceiver(MemorySink())
    rx.feed(buf.getvalue() + b"\0" * 64)  # was MemoryError here
    with pytest.raises(jc.IncompleteResponse, match="ended after"):
        rx.close()


def test_unchecked_large_npy_still_arrives_whole() -> None:
    arr = np.arange(3 << 20, dtype=np.float64)  # 24 MiB: over what is preallocated unchecked
    body = npy_bytes(arr)
    rx = NpyReceiver(MemorySink())
    for i in range(0, len(body), 1 << 20):
        rx.feed(body[i : i + (1 << 20)])
    got = rx.close()
    np.testing.assert_array_equal(got, arr)
    assert got.flags.writeable


# --------------------------------------------------------------------------- 8. masked arrays


def test_masked_arrays_are_refused_unless_nothing_is_masked(client: jc.Client) -> None:
    masked = np.ma.masked_array(X3, mask=[False, True, False])
    for transport in ("binary", "json"):
        with pytest.raises(ValueError, match=r"cannot send a masked array with 1 masked element\(s\)"):
            client.jacobian("sin", masked, transport=transport)
    with pytest.raises(ValueError, match="masked array"):
        client.jacobian("sin", [masked[0], masked[1], 0.3])  # np.ma.masked inside a list
    with pytest.raises(ValueError, match="masked array"):
        client.vjp("sin", X3, cotangents=masked)
    unmasked = np.ma.masked_array(X3, mask=False)
    np.testing.assert_array_equal(client.jacobian("sin", unmasked), client.jacobian("sin", X3))


# --------------------------------------------------------------------------- 9. ml_dtypes bfloat16


def test_ml_dtypes_bfloat16_is_sent_as_bfloat16() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = as_wire_value(np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16))
    assert isinstance(bf, Bfloat16) and bf.words.tolist() == [0x3FC0, 0xC000]
    scalar = as_wire_value(np.array(1.5, dtype=ml_dtypes.bfloat16))
    assert isinstance(scalar, Bfloat16) and scalar.shape == ()
    call = Protocol().compute_call("jacobian", "sin", [np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)], {})
    assert json.loads(call.content)["inputs"][0]["dtype"] == "bfloat16"


def test_ml_dtypes_bfloat16_like_torch_bfloat16(client: jc.Client) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import torch

    want = client.jacobian("sin", torch.tensor(X3, dtype=torch.bfloat16))
    for transport in ("binary", "json"):
        got = client.jacobian("sin", X3.astype(ml_dtypes.bfloat16), transport=transport)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- 10. NaN and infinities in a JSON body


def test_non_finite_inputs_and_vectors_reach_the_server_in_a_json_body(client: jc.Client) -> None:
    """``transport="json"`` (and plain numbers on either transport) sent NaN and infinities
    as Python floats, which orjson writes as ``null``: every such request was a 422 ("array
    data holds null"), where the binary transport answered as torch does. An OpInfo sample
    with ``-inf`` (``_safe_softmax``'s masked entries) found it."""
    import torch

    x = np.array([0.5, -np.inf, np.nan, np.inf])
    for value in (x, x.astype(np.float32), x.astype(np.float16), x.tolist(), torch.tensor(x)):
        want = torch.func.jacrev(torch.sin)(torch.as_tensor(np.asarray(value, dtype=np.float64)))
        for transport in ("binary", "json"):
            got = client.jacobian("sin", value, transport=transport)
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, equal_nan=True)
            np.testing.assert_array_equal(np.isnan(got), want.isnan().numpy())
    ones = np.ones(4)
    np.testing.assert_array_equal(client.vjp("sin", ones, cotangents=x, transport="json"), np.cos(1.0) * x)
    np.testing.assert_array_equal(client.jvp("sin", ones, tangents=x.tolist(), transport="json"), np.cos(1.0) * x)
    for value in (float("inf"), np.float64(-np.inf), np.array(np.nan)):  # 0-d: a bare "Infinity" in the body
        for transport in ("binary", "json"):
            out = client.evaluate("scalar_square", value, transport=transport)
            np.testing.assert_array_equal(out, np.float32(value) ** 2)
