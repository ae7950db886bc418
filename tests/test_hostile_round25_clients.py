"""Red team, round twenty-five: hostile clients over raw sockets and odd HTTP (an
``Expect: 100-continue`` on a request with no body; ...).

Each names what a user saw before. The HTTP cases run the real app (no engines started:
nothing here computes) under the server's guarded protocol class on each of uvicorn's
parsers (``test_connections._guarded_uvicorn``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import pytest

from ._client_support import real_app
from .test_connections import _connect, _guarded_uvicorn, _read_to_close

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
