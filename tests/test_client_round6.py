"""The SDK against servers that lie or attack (round 6): answers whose size the client
never agreed to (gzip and zip bombs, metadata floods), torch.compile(fullgraph=True).

A small stdlib fake (``_Hostile``) writes raw responses, one misbehaviour per path:
what it sends and with which headers is exactly what the test says, framing included.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import io
import json
import pickle
import struct
import threading
import time
import tracemalloc
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import jacobian_client as jc

X3 = np.array([0.1, 0.2, 0.3])
MiB = 1 << 20


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _gzip_of_zeros(nbytes: int, prefix: bytes = b"", fill: bytes = b"\0", crc: bool = False) -> bytes:
    """gzip of ``prefix`` then ``nbytes`` of ``fill``, cheaply: one MiB of it deflated after
    a full flush (no reference to what came before) and repeated. The CRC is computed only
    when asked for (a bomb is refused long before its trailer)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    plain = fill * MiB
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(plain) + c.flush(zlib.Z_FULL_FLUSH)
    whole, left = divmod(nbytes, MiB)
    rest = c.compress(plain[:left]) + c.flush()
    check = 0
    if crc:
        check = zlib.crc32(prefix)
        for _ in range(whole):
            check = zlib.crc32(plain, check)
        check = zlib.crc32(plain[:left], check)
    size = (len(prefix) + nbytes) & 0xFFFFFFFF
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + head + block * whole + rest
            + struct.pack("<II", check, size))


@functools.cache
def _bomb(name: str) -> bytes:
    """The hostile bodies, made on first use."""
    if name == "zeros256":  # 256 MiB of zeros in ~250 KB (never valid JSON)
        return _gzip_of_zeros(256 * MiB)
    if name == "spaces80":  # JSON whitespace: 80 MiB of it in ~80 KB
        return _gzip_of_zeros(80 * MiB, fill=b" ")
    if name == "twice":
        return _twice_gzipped_npy(512 * MiB)
    if name == "zipbomb":
        return _deflated_npz(24 * MiB)
    raise KeyError(name)


def _twice_gzipped_npy(nbytes: int) -> bytes:
    """A Jacobian .npy of ``nbytes`` of zeros, gzipped twice: a few KB on the wire per
    hundred MiB, and one 64 KiB read of it was a gigabyte-scale expansion in httpx."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (nbytes // 12, 3)})
    return gzip.compress(_gzip_of_zeros(nbytes // 12 * 12, prefix=buf.getvalue()), 9)


def _deflated_npz(member_bytes: int) -> bytes:
    """A result .npz whose one deflated member expands to ``member_bytes`` (a zip bomb
    within deflate's own ratio, so the archive's directory tells the truth)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("jacobian.npy", "w", force_zip64=True) as fp:
            header = io.BytesIO()
            rows = member_bytes // 24
            np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (rows, 3)})
            fp.write(header.getvalue())
            left, block = rows * 24, b"\0" * MiB
            while left:
                fp.write(block[:left])
                left -= min(left, MiB)
        zf.writestr("meta.json", json.dumps({"structure": {"jacobian": {"$npy": "jacobian.npy"}}}))
    return buf.getvalue()


# --------------------------------------------------------------------------- the hostile fake

SEEN: dict[str, dict[str, str]] = {}  # path -> the request's headers, as the fake got them


def _answer(handler: BaseHTTPRequestHandler, body: bytes, headers: list[tuple[str, str]], status: str = "200 OK",
            length: bool = True) -> None:
    head = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
    if length:
        head.append(f"Content-Length: {len(body)}")
    head.append("Connection: close")
    handler.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


ROUTES: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {
    # metadata answers that expand past any sane size
    "/v1/functions": lambda h: _answer(h, _bomb('spaces80'), [("Content-Type", "application/json"),
                                                        ("Content-Encoding", "gzip")]),
    "/v1/info": lambda h: _answer(h, _bomb('spaces80'), [("Content-Type", "application/json"),
                                                   ("Content-Encoding", "gzip")]),
    # a compute answer in JSON whose gzip expands to 256 MiB (zeros: never valid JSON)
    "/v1/functions/jsonbomb/jacobian": lambda h: _answer(h, _bomb('zeros256'), [
        ("Content-Type", "application/json"), ("Content-Encoding", "gzip")]),
    # a streamed .npy gzipped twice, no Content-Length (close-delimited)
    "/v1/functions/twice/jacobian": lambda h: _answer(h, _bomb('twice'), [
        ("Content-Type", "application/x-npy"), ("Content-Encoding", "gzip, gzip")], length=False),
    # an .npz whose deflated member expands to 24 MiB
    "/v1/functions/zipbomb/jacobian": lambda h: _answer(h, _bomb('zipbomb'), [("Content-Type", "application/x-npz")]),
    # right answers, coded several ways: the decoding must be exact
    "/v1/functions/gz2/jacobian": lambda h: _answer(h, gzip.compress(gzip.compress(_npy(np.eye(3)))), [
        ("Content-Type", "application/x-npy"), ("Content-Encoding", "gzip, gzip")]),
    "/v1/functions/rawdeflate/jacobian": lambda h: _answer(h, _raw_deflate(_npy(np.eye(3))), [
        ("Content-Type", "application/x-npy"), ("Content-Encoding", "deflate")]),
    "/v1/functions/zlibdeflate/jacobian": lambda h: _answer(h, zlib.compress(_npy(np.eye(3))), [
        ("Content-Type", "application/x-npy"), ("Content-Encoding", "identity, deflate")]),
    # a function whose output the server makes 2**20 elements long (12 MiB of rows for a 3-vector)
    "/v1/functions/wide": lambda h: _answer(h, json.dumps({"name": "wide", "inputs": [{"name": "x", "shape": ["n"]}],
                                                           "has_aux": False}).encode(),
                                            [("Content-Type", "application/json")]),
    "/v1/functions/wide/evaluate": lambda h: _answer(h, _npy(np.zeros(1 << 20, np.float32)),
                                                     [("Content-Type", "application/x-npy")]),
    "/v1/functions/wide/jacobian": lambda h: _answer(h, _npy(np.zeros((1 << 20, 3), np.float32)),
                                                     [("Content-Type", "application/x-npy")]),
    "/v1/functions/identitylong/jacobian": lambda h: _answer(h, _npy(np.eye(3)) + b"\0" * 8, [
        ("Content-Type", "application/x-npy"), ("Content-Encoding", "identity")]),
    # two gzip members, one after the other: one body (RFC 1952)
    "/v1/functions/members/jacobian": lambda h: _answer(h, gzip.compress(_npy(np.eye(3))[:100]) + gzip.compress(
        _npy(np.eye(3))[100:]), [("Content-Type", "application/x-npy"), ("Content-Encoding", "gzip")], length=False),
    "/v1/functions/trickle/jacobian": lambda h: _trickle(h),
    "/v1/functions/eye/jacobian": lambda h: _answer(h, _npy(np.eye(3)), [("Content-Type", "application/x-npy")]),
    "/v1/functions/bigeye/jacobian": lambda h: _answer(h, gzip.compress(_BIGEYE), [
        ("Content-Type", "application/x-npy"), ("Content-Encoding", "gzip")]),
    "/v1/functions/brotli/jacobian": lambda h: _answer(h, b"\x8b\x02\x80hello\x03", [
        ("Content-Type", "application/x-npy"), ("Content-Encoding", "br")]),
}


_PROBLEM_413 = json.dumps({"type": "urn:jacobian-service:problem:payload_too_large", "title": "Payload Too Large",
                           "status": 413, "code": "payload_too_large", "detail": "the body is over the limit",
                           "request_id": "r413"}).encode()
UPLOADED: dict[str, int] = {}  # path -> bytes of the refused body that arrived anyway


def _refuse_and_close(h: BaseHTTPRequestHandler, length: int) -> None:
    """As uvicorn (and nginx) refuse a body over their limit: 413 at once (Connection:
    close), then close; what of the body arrived is counted (``UPLOADED``).

    uvicorn closes with the body unread, and the kernel's reset discards what the client's
    socket holds, the 413 included: a client that watches while it sends reads it first
    if it is woken in time. A fixed wait before the reset (0.2 s, then 1 s) raced the
    client's wake-up, which a loaded machine lost (a ReadError, not the 413). Here the
    rest is read until the client closes, as nginx's lingering close does: a client that
    watches stops sending at the 413 (``UPLOADED`` small), one that does not sends the
    whole body first, whatever the machine's load."""
    _answer(h, _PROBLEM_413, [("Content-Type", "application/problem+json")], status="413 Payload Too Large")
    h.wfile.flush()
    UPLOADED[h.path.split("?")[0]] = _read_rest(h, length)
    h.close_connection = True


def _read_rest(h: BaseHTTPRequestHandler, length: int) -> int:
    """Read what is left of a body, to ``length`` or until the client closes or sends
    nothing for 2 s: the bytes read."""
    got = 0
    h.connection.settimeout(2)
    try:
        while got < length:
            piece = h.rfile.read1(min(1 << 16, length - got))
            if not piece:
                break
            got += len(piece)
    except OSError:
        pass
    return got


def _refuse_and_keep_reading(h: BaseHTTPRequestHandler, length: int) -> None:
    """413 at once with the connection kept (no Connection: close), then the body read
    and counted: whatever the client sends after the answer is taken as that body."""
    head = (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/problem+json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(_PROBLEM_413))
    h.wfile.write(head + _PROBLEM_413)
    h.wfile.flush()
    UPLOADED[h.path.split("?")[0]] = _read_rest(h, length)
    h.close_connection = True


TRICKLE_CLOSED = threading.Event()


def _trickle(h: BaseHTTPRequestHandler) -> None:
    """A 24 KB .npy answer, 100 bytes every 20 ms; notes when the client hung up."""
    body = _npy(np.zeros((1000, 3)))
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npy\r\nContent-Length: %d\r\n\r\n" % len(body)
    try:
        h.wfile.write(head + body[:200])
        h.wfile.flush()
        for at in range(200, len(body), 100):
            time.sleep(0.02)
            h.wfile.write(body[at:at + 100])
            h.wfile.flush()
    except OSError:
        TRICKLE_CLOSED.set()


COUNTS: dict[str, int] = {}  # path -> requests the fake got


def _garbled(h: BaseHTTPRequestHandler, length: int) -> None:
    """A status line h11 cannot read."""
    h.rfile.read(length)
    h.wfile.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n")
    h.close_connection = True


def _hang_up(h: BaseHTTPRequestHandler, length: int) -> None:
    """The body read, then the connection closed with no answer at all."""
    h.rfile.read(length)
    h.close_connection = True


EARLY: dict[str, Callable[[BaseHTTPRequestHandler, int], None]] = {
    "/v1/functions/garbled/jacobian": _garbled,
    "/v1/functions/hangup/jacobian": _hang_up,
    "/v1/functions/early413/jacobian": _refuse_and_close,
    "/v1/functions/keepalive413/jacobian": _refuse_and_keep_reading,
}


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


# 0.5 MiB of eye(256): more than one decoded piece, so the pieces' order and seams count
_BIGEYE_ARR = np.eye(256)
_BIGEYE = _npy(_BIGEYE_ARR)


class _Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _route(self) -> None:
        path = self.path.split("?")[0]
        length = int(self.headers.get("content-length") or 0)
        SEEN[path] = {k.lower(): v for k, v in self.headers.items()}
        COUNTS[path] = COUNTS.get(path, 0) + 1
        if path in EARLY:  # answered before the body is read
            EARLY[path](self, length)
            return
        if length:
            self.rfile.read(length)
        try:
            ROUTES[path](self)
        except OSError:  # the client hung up (it refused the answer): expected
            pass
        self.close_connection = True

    do_GET = do_POST = _route


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _both(url: str, call: Callable[[Any], Any], **kwargs: Any) -> list[Any]:
    """``call(client)`` with a sync and an async client: [sync result, async result];
    an exception of either is raised."""

    async def main() -> Any:
        async with jc.AsyncClient(url, timeout=20, max_retries=0, **kwargs) as client:
            return await call(client)

    with jc.Client(url, timeout=20, max_retries=0, **kwargs) as client:
        first = call(client)
    return [first, asyncio.run(main())]


def _raises_both(url: str, call: Callable[[Any], Any], exc: type[BaseException], match: str,
                 **kwargs: Any) -> None:
    if "retry" not in kwargs:
        kwargs["max_retries"] = 0
    with jc.Client(url, timeout=20, **kwargs) as client, pytest.raises(exc, match=match):
        call(client)

    async def main() -> None:
        async with jc.AsyncClient(url, timeout=20, **kwargs) as client:
            with pytest.raises(exc, match=match):
                await call(client)

    asyncio.run(main())


def _peak_mib(fn: Callable[[], None]) -> float:
    """The most memory Python and numpy held at once while ``fn`` ran, MiB above the start."""
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / MiB


# --------------------------------------------------------------------------- bodies are bounded


def test_metadata_answers_are_read_up_to_64_mib(hostile: str) -> None:
    """functions() and info() read their answer whole, any size: a gzip body expanding to
    80 MiB (80 KB on the wire) was read and parsed whole (and a gigabyte one would have
    been); metadata answers are now read to 64 MiB at most, decoded, sync and async."""
    match = r"^GET /v1/(functions|info): the response is larger than that \(\d+ bytes read so far\); " \
            r"the client's max_response_bytes is 67108864"
    with jc.Client(hostile, timeout=20, max_retries=0) as client, pytest.raises(jc.ResponseTooLarge, match=match):
        client.functions()

    async def main() -> None:
        async with jc.AsyncClient(hostile, timeout=20, max_retries=0) as client:
            await client.info()

    with pytest.raises(jc.ResponseTooLarge, match=match):
        asyncio.run(main())


def test_a_gzip_bomb_is_refused_within_max_response_bytes(hostile: str) -> None:
    """A JSON answer whose gzip expands to 256 MiB is refused once max_response_bytes
    (here 1 MiB) of it is decoded: the client never holds more than a few MiB of it."""
    match = r"^POST /v1/functions/jsonbomb/jacobian: the response is larger than that .*max_response_bytes is 1048576"

    def run() -> None:
        _raises_both(hostile, lambda c: c.jacobian("jsonbomb", X3), jc.ResponseTooLarge, match,
                     max_response_bytes=MiB)

    assert _peak_mib(run) < 16


def test_a_twice_gzipped_stream_expands_a_bounded_piece_at_a_time(hostile: str) -> None:
    """Content-Encoding: gzip, gzip of a 512 MiB .npy (30 KB on the wire, no
    Content-Length): httpx's decoder expanded each socket read whole, through both
    layers; now each layer is undone in 64 KiB pieces, and the .npy header's 512 MiB is
    refused before anything is allocated for it."""
    match = r"^POST /v1/functions/twice/jacobian: the response declares 53687103[0-9] bytes; .* is 67108864"

    def run() -> None:
        _raises_both(hostile, lambda c: c.jacobian("twice", X3), jc.ResponseTooLarge, match,
                     max_response_bytes=64 * MiB)

    assert _peak_mib(run) < 16


def test_a_deflated_npz_member_is_held_to_max_response_bytes_before_it_expands(hostile: str) -> None:
    """An .npz of 24 KB whose deflated member expands to 24 MiB: refused by the size its
    directory declares, before any member is expanded."""
    assert len(_bomb('zipbomb')) < MiB
    match = r"^POST /v1/functions/zipbomb/jacobian: the response declares \d+ bytes; the client's max_response_bytes is 8388608"

    def run() -> None:
        _raises_both(hostile, lambda c: c.jacobian("zipbomb", X3), jc.ResponseTooLarge, match,
                     max_response_bytes=8 * MiB)

    assert _peak_mib(run) < 16
    # and under a cap that allows it, the same answer is read (a 24 MiB Jacobian, exact)
    with jc.Client(hostile, timeout=20, max_response_bytes=128 * MiB) as client:
        J = client.jacobian("zipbomb", X3)
    assert J.shape == (MiB, 3) and not J.any()


def test_a_stream_into_a_file_is_not_held_to_the_memory_cap(hostile: str, tmp_path: Path) -> None:
    """out= streams to disk: max_response_bytes bounds memory, not files."""
    with jc.Client(hostile, timeout=20, max_response_bytes=1024) as client:
        with pytest.raises(jc.ResponseTooLarge, match="declares 524416 bytes"):
            client.jacobian("bigeye", np.ones(256))
        J = client.jacobian("bigeye", np.ones(256), out=tmp_path / "J.npy")
    np.testing.assert_array_equal(J, _BIGEYE_ARR)


def test_a_row_split_assembled_in_memory_is_held_to_max_response_bytes(hostile: str, tmp_path: Path) -> None:
    """jacobian_split assembles its blocks in one array, allocated from the output the
    server's evaluate claims: each block went to that array uncounted, so the result was
    bounded by nothing the caller set. It is held to the clients' max_response_bytes
    (into a file with out=, it is not)."""
    from jacobian_client.split import jacobian_split

    with pytest.raises(jc.ResponseTooLarge, match=r"^jacobian_split 'wide': the response declares 12582912 bytes; "
                                                   r"the client's max_response_bytes is 8388608"):
        jacobian_split([hostile], "wide", X3, max_response_bytes=8 * MiB)
    J = jacobian_split([hostile], "wide", X3, max_response_bytes=8 * MiB, out=tmp_path / "J.npy")
    assert J.shape == (1 << 20, 3) and not J.any()


def test_an_identity_coded_npy_is_still_held_to_its_content_length(hostile: str) -> None:
    """Content-Encoding: identity is no coding: the .npy's length is checked against the
    Content-Length as for a body without the header (it was skipped, as for gzip)."""
    _raises_both(hostile, lambda c: c.jacobian("identitylong", X3), jc.TransportError,
                 r"the response is \d+ bytes long but its .npy header declares only \d+")


def test_max_response_bytes_travels_with_a_pickled_client() -> None:
    for cls in (jc.Client, jc.AsyncClient):
        copy = pickle.loads(pickle.dumps(cls("http://127.0.0.1:9", max_response_bytes=12345)))
        assert copy._proto.max_response_bytes == 12345


@pytest.mark.parametrize("name", ["gz2", "rawdeflate", "zlibdeflate", "bigeye", "members"])
def test_coded_answers_are_decoded_exactly(hostile: str, name: str) -> None:
    """The client undoes codings itself now: stacked gzip, deflate raw or zlib-wrapped,
    identity listed, a body of many pieces all come back exact, sync and async; and a
    gzip body of two members, which httpx read the first of only ("response body ended
    after 100 bytes"), whole."""
    want = _BIGEYE_ARR if name == "bigeye" else np.eye(3)
    x = np.ones(256) if name == "bigeye" else X3
    for J in _both(hostile, lambda c: c.jacobian(name, x)):
        np.testing.assert_array_equal(J, want)


def test_a_coding_the_client_did_not_ask_for_is_refused(hostile: str) -> None:
    """Content-Encoding: br (not asked for): httpx passed the brotli bytes through as the
    body ("response is not a readable .npy body"); now said for what it is. The client
    asks for gzip and deflate only, whatever decoders happen to be installed."""
    match = r"Content-Encoding 'br' holds 'br', which the client did not ask for \(Accept-Encoding: gzip, deflate\)"
    _raises_both(hostile, lambda c: c.jacobian("brotli", X3), jc.TransportError, match)
    assert SEEN["/v1/functions/brotli/jacobian"]["accept-encoding"] == "gzip, deflate"


def test_the_decoder_keeps_every_piece_small() -> None:
    """In process: 64 MiB of zeros gzipped twice decode in pieces of at most 64 KiB."""
    from jacobian_client._decoding import PIECE, BodyDecoder

    body = gzip.compress(_gzip_of_zeros(64 * MiB, crc=True))
    decoder = BodyDecoder("gzip, gzip")
    total = 0
    for at in range(0, len(body), 4096):
        for piece in decoder.decode(body[at:at + 4096]):
            assert len(piece) <= PIECE
            total += len(piece)
    total += sum(len(p) for p in decoder.flush())
    assert total == 64 * MiB


def test_response_too_large_is_a_transport_error_not_the_servers_413() -> None:
    assert issubclass(jc.ResponseTooLarge, jc.TransportError)
    assert not issubclass(jc.ResponseTooLarge, jc.APIError)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "1"])
def test_max_response_bytes_is_checked(value: Any) -> None:
    with pytest.raises(ValueError, match="max_response_bytes is None or a positive int"):
        jc.Client("http://127.0.0.1:9", max_response_bytes=value)


def test_an_async_call_cancelled_mid_stream_leaves_no_connection(hostile: str) -> None:
    """The async client reads bodies through its own decoder (an async generator): a call
    cancelled while its answer streams in closes that generator and the connection, and
    the pool keeps nothing."""

    async def main() -> list[Any]:
        async with jc.AsyncClient(hostile, timeout=20, max_retries=0) as client:
            task = asyncio.create_task(client.jacobian("trickle", X3))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return list(client._http._transport._pool.connections)

    TRICKLE_CLOSED.clear()
    assert asyncio.run(main()) == []
    assert TRICKLE_CLOSED.wait(5)


# --------------------------------------------------------------------------- retries


def test_a_malformed_answer_is_not_retried_but_a_hang_up_is(hostile: str) -> None:
    """An answer h11 cannot read (a garbled status line) was retried as a dropped
    connection is: the request, and its computation, four times, then "TransportError:
    ... RemoteProtocolError: illegal status line". It is raised at once now; a server
    that hangs up without answering is still retried, sync and async."""
    policy = jc.RetryPolicy(max_retries=3, backoff_base=0.01)
    for name, tries in (("garbled", 1), ("hangup", 4)):
        path = f"/v1/functions/{name}/jacobian"
        COUNTS.pop(path, None)
        _raises_both(hostile, lambda c, name=name: c.jacobian(name, X3), jc.TransportError,
                     rf"^POST http://127\.0\.0\.1:\d+{path}: RemoteProtocolError: ", retry=policy)
        assert COUNTS.pop(path) == 2 * tries, name


# --------------------------------------------------------------------------- a body refused early


def test_a_body_the_server_refuses_at_once_gets_its_413_sync_and_async(hostile: str) -> None:
    """A server (uvicorn, nginx) refuses a body over its limit with a 413 as soon as it
    reads the headers, and closes. The sync client read that 413 after its write failed;
    the async one raised "TransportError: ... ReadError:" (asyncio drops what the socket
    holds once a write fails), after three retries each sending the whole body again.
    The clients now watch for an error answer while they send (RFC 9112 9.5), stop
    sending, and raise the server's error."""
    x = np.ones(2_000_000)  # 16 MB: far more than the socket buffers hold
    path = "/v1/functions/early413/jacobian"
    said = r"^413 payload_too_large: the body is over the limit \(request r413\)$"

    async def main() -> None:
        async with jc.AsyncClient(hostile, timeout=20, max_retries=0) as client:
            with pytest.raises(jc.PayloadTooLarge, match=said):
                await client.jacobian("early413", x)

    with jc.Client(hostile, timeout=20, max_retries=0) as client, pytest.raises(jc.PayloadTooLarge, match=said):
        client.jacobian("early413", x)
    sent_sync = _uploaded(path)
    asyncio.run(main())
    for sent in (sent_sync, _uploaded(path)):
        assert sent < 8 << 20, sent  # stopped at the answer, not after the whole body


def test_a_body_cut_short_never_leaves_its_connection_for_the_next_call(hostile: str) -> None:
    """Once the server has refused the body (keeping the connection) and the client
    stopped sending it, that connection is not reused (the server would read the next
    request as the rest of the body): the next call on the same client gets its own
    answer, sync and async, and most of the refused body is never sent."""
    x = np.ones(2_000_000)  # 16 MB
    path = "/v1/functions/keepalive413/jacobian"

    async def main() -> Any:
        async with jc.AsyncClient(hostile, timeout=20, max_retries=0) as client:
            with pytest.raises(jc.PayloadTooLarge):
                await client.jacobian("keepalive413", x)
            return await client.jacobian("eye", X3)

    with jc.Client(hostile, timeout=20, max_retries=0) as client:
        with pytest.raises(jc.PayloadTooLarge):
            client.jacobian("keepalive413", x)
        np.testing.assert_array_equal(client.jacobian("eye", X3), np.eye(3))
    sent_sync = _uploaded(path)
    np.testing.assert_array_equal(asyncio.run(main()), np.eye(3))
    for sent in (sent_sync, _uploaded(path)):
        assert sent < 8 << 20, sent


def _uploaded(path: str) -> int:
    """What the fake read of a refused body (it counts until the client closes)."""
    deadline = time.monotonic() + 5
    while path not in UPLOADED and time.monotonic() < deadline:
        time.sleep(0.01)
    return UPLOADED.pop(path)


# --------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph_says_why_it_cannot_hold_a_remote_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile(fullgraph=True) over a remote function failed with dynamo's
    "Attempted to call function marked as skipped ... the function `disable` ... Hint:
    Avoid calling the function `disable`" (the first compiled call in a process), or
    "Skip calling `torch.compiler.disable()`d function ... (reason: None)" (later ones):
    nothing said that the remote call cannot be compiled, or what to do. Both now say
    it (dynamo refuses at trace time: no request is made, so no server is needed)."""
    torch = pytest.importorskip("torch")
    import jacobian_client.torch as jtorch

    why = (r"(?s)remote function's value \(and its derivatives'\) comes from a request to the service, which "
           r"cannot be part of a compiled graph.*Compile with fullgraph=False")
    with jc.Client("http://127.0.0.1:9", timeout=5, max_retries=0) as client:
        f = jtorch.remote(client, "sin")
        for made in (False, True):  # the first compiled call in a process, then any later one
            disabled = [torch.compiler.disable(jtorch.remote_call_runs_eagerly, reason=jtorch._NO_FULLGRAPH)] if made else []
            monkeypatch.setattr(jtorch, "_disabled", disabled)
            compiled = torch.compile(lambda x: f(x * 2).sum(), fullgraph=True, backend="eager")
            with pytest.raises(RuntimeError, match=why) as info:
                compiled(torch.ones(3))
            assert "Avoid calling the function `disable`" not in str(info.value)


def test_a_meta_tensor_is_refused_saying_why() -> None:
    """remote(client, "sin")(torch.ones(3, device="meta")) raised torch's "Cannot copy
    out of meta tensor; no data!" (NotImplementedError) from inside the SDK; now a
    ValueError naming the function and the input, before any request."""
    torch = pytest.importorskip("torch")
    from jacobian_client.torch import remote

    with jc.Client("http://127.0.0.1:9", timeout=5, max_retries=0) as client:
        f = remote(client, "add_square")
        with pytest.raises(ValueError, match=r"^the remote function 'add_square' got a tensor on the 'meta' device "
                                             r"\(input 1, shape \(3,\)\): it has no values to send"):
            f(torch.ones(3), torch.ones(3, device="meta", requires_grad=True))


# --------------------------------------------------------------------------- credentials in messages


def test_wait_ready_does_not_put_the_base_urls_password_in_its_error() -> None:
    """Client("http://user:s3cret@host:port").wait_ready() raised "TimeoutError:
    http://user:s3cret@host:port not ready after ..." (the password in every log of it;
    a failed call's TransportError already left it out); now the URL without it, sync
    and async."""
    url = "http://user:s3cret@127.0.0.1:9"
    with jc.Client(url, max_retries=0) as client, pytest.raises(TimeoutError) as info:
        client.wait_ready(timeout=0.2, interval=0.05)
    assert str(info.value) == "http://127.0.0.1:9/ not ready after 0.2 s"

    async def main() -> None:
        async with jc.AsyncClient(url, max_retries=0) as client:
            await client.wait_ready(timeout=0.2, interval=0.05)

    with pytest.raises(TimeoutError) as info:
        asyncio.run(main())
    assert "s3cret" not in str(info.value) and "user" not in str(info.value)


@pytest.mark.parametrize("cls", [jc.Client, jc.AsyncClient])
def test_a_base_url_with_credentials_and_an_api_key_is_refused(cls: type, hostile: str) -> None:
    """Client("http://user:pw@host", api_key="KEY"): httpx sent the URL's credentials as
    Basic auth in place of the key's Bearer token (the server saw "Basic dXNlcjpwdw==",
    every call a 401); the two cannot both travel, so the constructor says so, echoing
    neither. Credentials alone (a proxy's Basic auth) go as before."""
    url = hostile.replace("http://", "http://user:pw@")
    with pytest.raises(ValueError, match=r"^base_url carries credentials .* give one of them") as info:
        cls(url, api_key="KEY")
    assert "pw" not in str(info.value) and "KEY" not in str(info.value)
    with jc.Client(url, max_retries=0) as client:
        client.jacobian("eye", X3)
    assert SEEN["/v1/functions/eye/jacobian"]["authorization"] == "Basic dXNlcjpwdw=="


def test_the_cli_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """jacobian-service call with credentials in --url and --api-key (or a key no header
    can carry) ended in the constructor's ValueError traceback; one line now, exit 2."""
    from jacobian_client._cli_call import call_main

    np.save(tmp_path / "x.npy", X3)
    for url, key in (("http://user:pw@127.0.0.1:9", "KEY"), ("http://127.0.0.1:9", "k\ney")):
        assert call_main(["sin", "--url", url, "--api-key", key, "-i", str(tmp_path / "x.npy")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
