"""Red team, round twenty-six: hostile clients over raw sockets and odd HTTP (an HTTP/1.1
request with no Host or two, under either parser; ...).

Each names what a user saw before. The connection cases run the real app (no engines
started: nothing there computes) under the server's guarded protocol class on each of
uvicorn's parsers (``test_connections._guarded_uvicorn``), an honest client on a
keep-alive connection beside them; the header cases run on the session's in-process app
(``client``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from ._client_support import real_app
from .test_connections import _connect, _guarded_uvicorn, _problem, _read_to_close
from .test_hostile_round25_clients import _NEXT, _an_honest_client_beside, _answers

IMPLEMENTATIONS = ["h11", "httptools"]


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    """The real app (its routes and middleware; lifespan off: no engine), served by each parser."""
    app = real_app(functions="jacobian_service.examples")
    with contextlib.ExitStack() as stack:
        yield {impl: stack.enter_context(_guarded_uvicorn(app, impl, 5.0)) for impl in IMPLEMENTATIONS}


def _exchange(url: str, data: bytes) -> bytes:
    s = _connect(url)
    s.sendall(data)
    raw = _read_to_close(s, 10)
    s.close()
    return raw


# ------------------------------------------------------------ Host: none, or two


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("hosts", [b"", b"Host: a\r\nHost: b\r\n", b"Host: a\r\nHOST: a\r\n"])
def test_a_request_without_one_host_is_the_same_closing_400_under_either_parser(urls: dict[str, str], implementation: str,
                                                                                 hosts: bytes) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request with no Host, or two, is a 400. Under httptools
    the app said so ("needs one Host header; it has 0") and kept the connection, serving
    the request pipelined behind it (which host was that one routed for, by a proxy in
    front that read the fields otherwise?); under h11 it was a bare "Invalid HTTP request
    received" and the connection closed. Now both answer the app's words, close the
    connection and leave what followed unread; an honest client beside is served."""
    with _an_honest_client_beside(urls[implementation]):
        raw = _exchange(urls[implementation], b"GET /healthz HTTP/1.1\r\n" + hosts + b"\r\n" + _NEXT)
    assert [status for status, _ in _answers(raw)] == [400], raw[-300:]  # (and nothing after it)
    _, headers, problem = _problem(raw)
    assert problem["code"] == "malformed_request" and headers["connection"] == "close", raw[-300:]
    assert problem["detail"] == f"an HTTP/1.1 request needs one Host header; it has {hosts.count(b':')}", problem
    assert headers["x-request-id"] == problem["request_id"]
    # HTTP/1.0 has no Host to require: served, under either parser
    assert [status for status, _ in _answers(_exchange(urls[implementation], b"GET /healthz HTTP/1.0\r\n\r\n"))] == [200]

