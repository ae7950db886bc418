"""Red team, round twenty-five: hostile clients over raw sockets and odd HTTP (an
``Expect: 100-continue`` on a request with no body; a ``;`` or ``,`` inside a quoted
parameter value of Content-Type or Accept; a control character in a header or trailer
field's value, read by h11 and refused by llhttp; h11's own 16 KiB limit on a head that
comes in pieces, met before the server's 32 KiB).

Each names what a user saw before. The connection cases run the real app (no engines
started: nothing there computes) under the server's guarded protocol class on each of
uvicorn's parsers (``test_connections._guarded_uvicorn``); the header cases run on the
session's in-process app (``client``).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from typing import Iterator

import httpx
import numpy as np
import pytest

from ._client_support import real_app
from .conftest import assert_problem, decode
from .test_connections import _connect, _guarded_uvicorn, _problem, _read_to_close

IMPLEMENTATIONS = ["h11", "httptools"]


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    """The real app (its routes and middleware; lifespan off: no engine), served by each parser."""
    app = real_app(functions="jacobian_service.examples")
    with contextlib.ExitStack() as stack:
        yield {impl: stack.enter_context(_guarded_uvicorn(app, impl, 5.0)) for impl in IMPLEMENTATIONS}


def _answers(raw: bytes) -> list[tuple[int, bytes]]:
    """Each answer's status and head (lower-cased) in what a connection sent back."""
    return [(int(m[1]), m[2].lower()) for m in re.finditer(rb"HTTP/1\.1 (\d{3}) [^\r]*\r\n(.*?)\r\n\r\n", raw, re.S)]


_NEXT = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


@contextlib.contextmanager
def _an_honest_client_beside(url: str) -> Iterator[None]:
    """While the block runs, an honest client asks for a function's description on one
    keep-alive connection, again and again: every answer must be whole and right."""
    honest: list[int] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set() or len(honest) < 3:
                r = c.get("/v1/functions/softmax")
                honest.append(r.status_code if r.json()["name"] == "softmax" else -1)

    thread = threading.Thread(target=keep_asking)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    assert honest and set(honest) == {200}, honest


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("framing", ["no length", "Content-Length: 0\r\n"])
def test_an_expectation_on_a_request_with_no_body_keeps_the_connection(urls: dict[str, str], implementation: str,
                                                                      framing: str) -> None:
    """A client that sends ``Expect: 100-continue`` on every request (.NET's
    ``ExpectContinue`` on an HttpClient's default headers) had each GET answered with
    ``connection: close`` and its connection closed: the request after it on the same
    connection got no answer (nothing but the first 200 came back), and the client had to
    connect again for each request. A request that announces no body leaves nothing in the
    stream to be taken for the next request: its connection is kept, the next request
    answered. One that announces a body the route never reads still closes (the body the
    client may be holding back for a 100 cannot be told from the next request)."""
    head = b"GET /v1/functions/softmax HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
    s = _connect(urls[implementation])
    s.sendall(head + (framing.encode() if framing != "no length" else b"") + b"\r\n" + _NEXT)
    raw = _read_to_close(s, 10)
    s.close()
    answers = _answers(raw)
    assert [status for status, _ in answers] == [200, 200], raw[:400]
    assert b"connection: close" not in answers[0][1] and b"100 continue" not in raw.lower(), raw[:400]
    assert b'"name":"softmax"' in raw and raw.endswith(b'{"status":"ok"}'), raw[-200:]

    s = _connect(urls[implementation])  # (a body announced, never read: closed; "hello" + the next never read)
    s.sendall(head + b"Content-Length: 5\r\n\r\nhello" + _NEXT)
    raw = _read_to_close(s, 10)
    s.close()
    answers = _answers(raw)
    assert [status for status, _ in answers] == [200] and b"connection: close" in answers[0][1], raw[:400]


# ------------------------------------------------------------ header parameters: quoted strings


def _softmax_jacobian(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.func.jacrev(torch.softmax, argnums=0)(torch.from_numpy(x), 0).numpy()


@pytest.mark.parametrize("content_type, accept", [
    ('application/json; foo="a;charset=utf-16"', "application/json"),
    ('application/json; charset="utf\\-8"', "application/json"),  # (a quoted pair: utf-8)
    ("application/json", 'application/json; ext="a;q=0"'),
    ("application/json", 'application/json;q=0.5; ext="b, application/x-npy;q=1;c="'),  # (no .npy asked for)
])
def test_a_separator_inside_a_quoted_parameter_value_separates_nothing(client, content_type: str, accept: str) -> None:
    """A parameter's value may be a quoted string (RFC 9110 5.6.4, 5.6.6), which may hold
    ``;`` and ``,``. They were split at all the same: ``application/json;
    foo="a;charset=utf-16"`` was a 415 "not as charset='utf-16'" for a UTF-8 body, and
    ``Accept: application/json; ext="a;q=0"`` a 406 (JSON read as refused), and a quoted
    ``, application/x-npy;q=1`` was answered .npy, never asked for. Each is the
    JSON Jacobian, as torch.func.jacrev computes it."""
    x = np.linspace(-1, 1, 5, dtype=np.float32)
    r = client.post("/v1/functions/softmax/jacobian", content=json.dumps({"inputs": [x.tolist()]}),
                    headers={"content-type": content_type, "accept": accept})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    J, _ = decode(r)
    np.testing.assert_allclose(J, _softmax_jacobian(x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("content_type, said", [
    ('application/json; foo="a;b"; charset=utf-16', "utf-16"),
    ('application/json; charset="latin\\"1"', 'latin"1'),
])
def test_a_charset_beside_or_in_quotes_is_still_read(client, content_type: str, said: str) -> None:
    """The other side of the same reading: a charset after a quoted value holding a ``;``,
    or a quoted one, is still the charset said, and refused where it is not UTF-8."""
    problem = assert_problem(client.post("/v1/functions/softmax/jacobian", content=b'{"inputs": [[0.5]]}',
                                         headers={"content-type": content_type}), 415, "unsupported_media_type")
    assert f"charset={said!r}" in problem["detail"], problem


# ------------------------------------------------------------ control characters in field values


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("byte", [0x01, 0x1B, 0x7F])
def test_a_control_character_in_a_field_value_is_a_400_under_either_parser(urls: dict[str, str], implementation: str,
                                                                           byte: int) -> None:
    """RFC 9110 5.5: a field's value is visible characters, spaces and tabs. llhttp refuses
    any other control character; uvicorn's h11 refused only NUL and whitespace, and read
    0x01-0x08, 0x0e-0x1f and DEL into the value: a GET /healthz with ``X-A: a<ESC>b`` was
    a 200 there and a 400 under httptools (a proxy in front reading it either way), and a
    chunked body's trailer field holding one was kept (the JSON's own 400
    malformed_body). Now each is the same 400 malformed_request under both, the
    connection closed and what was pipelined behind it never read; an honest client on a
    keep-alive connection beside them is served throughout."""
    url = urls[implementation]
    control = bytes([byte])
    chunked = b"1\r\n{\r\n0\r\nX-T: a" + control + b"b\r\n\r\n"  # (a body that is no JSON: read, it is a 400 of its own)
    with _an_honest_client_beside(url):
        for request in (b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: a" + control + b"b\r\n\r\n" + _NEXT,
                        b"POST /v1/functions/softmax/evaluate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + chunked + _NEXT):
            s = _connect(url)
            s.sendall(request)
            raw = _read_to_close(s, 10)
            s.close()
            assert [status for status, _ in _answers(raw)] == [400], raw[-300:]  # (and nothing after it)
            _, headers, problem = _problem(raw)
            assert problem["code"] == "malformed_request" and headers["connection"] == "close", raw[-300:]
            assert problem["detail"].startswith("the request is not valid HTTP/1.1 (Invalid header value char)"), problem


# ------------------------------------------------------------ the header limit at its edge, in pieces


def _send_in_pieces(url: str, data: bytes, piece: int = 4096) -> bytes:
    """``data`` written a piece at a time, as a slow client's writes arrive (each its own
    read at the server); what the server sends until it closes."""
    s = _connect(url)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for start in range(0, len(data), piece):
        s.sendall(data[start:start + piece])
        time.sleep(0.005)  # (pacing the client: no event of the server's to wait for)
    raw = _read_to_close(s, 10)
    s.close()
    return raw


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_the_header_limit_holds_at_its_edge_under_either_parser_in_pieces(urls: dict[str, str],
                                                                         implementation: str) -> None:
    """A head of exactly MAX_HEADER_BYTES is served and one byte more is a 431, under
    either parser, however the bytes come. Under uvicorn's h11 its own 16 KiB limit on an
    unfinished head came first when a head arrived in pieces: a 20 KiB head, or one of
    exactly the limit, was a 400 "Invalid HTTP request received" (httptools: 200), and one
    byte over the limit a 400 (httptools: 431)."""
    from jacobian_service.connections import MAX_HEADER_BYTES

    url = urls[implementation]
    start = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Pad: "
    with _an_honest_client_beside(url):
        for size, status in ((MAX_HEADER_BYTES, 200), (MAX_HEADER_BYTES + 1, 431)):
            raw = _send_in_pieces(url, start + b"a" * (size - len(start) - 4) + b"\r\n\r\n")
            assert [s for s, _ in _answers(raw)] == [status], raw[-300:]
            if status == 431:
                _, _, problem = _problem(raw)
                assert problem["code"] == "headers_too_large" and f"limit of {MAX_HEADER_BYTES} bytes" in problem["detail"]
