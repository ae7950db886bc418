"""Red team, round twenty-five: hostile clients over raw sockets and odd HTTP (an
``Expect: 100-continue`` on a request with no body; a ``;`` or ``,`` inside a quoted
parameter value of Content-Type or Accept; ...).

Each names what a user saw before. The connection cases run the real app (no engines
started: nothing there computes) under the server's guarded protocol class on each of
uvicorn's parsers (``test_connections._guarded_uvicorn``); the header cases run on the
session's in-process app (``client``).
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Iterator

import numpy as np
import pytest

from ._client_support import real_app
from .conftest import assert_problem, decode
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
