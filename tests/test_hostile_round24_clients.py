"""Red team, round twenty-four: hostile clients over raw sockets and odd HTTP (request
smuggling forms under either of the server's HTTP parsers; an HTTP/1.0 client's streamed
answer; ...).

The server parses with httptools (llhttp) where it is installed, else with uvicorn's h11;
a request one parser frames one way and another (a proxy in front) another way is how
requests are smuggled, so each form here must get one answer from either. Each names
what a user saw before. The parser cases run a bare app under the server's guarded
protocol class (``test_connections._guarded_uvicorn``); the service cases run the real
service (engines on threads) under it, one app on both parsers, with a small stream
threshold so that a small Jacobian streams.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Iterator

import httpx
import numpy as np
import pytest

from ._client_support import real_app
from .test_connections import _connect, _guarded_uvicorn, _problem, _read_to_close, _wait_for

IMPLEMENTATIONS = ["h11", "httptools"]


# ------------------------------------------------------------ one framing, whichever parser

async def _echo(scope, receive, send) -> None:
    """What the app was given: path, query, body, header names."""
    if scope["type"] != "http":
        return
    body = b""
    while (message := await receive())["type"] == "http.request":
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen = json.dumps({"path": scope["path"], "query": scope["query_string"].decode(), "body": body.decode("latin-1"),
                       "headers": sorted(k.decode() for k, _ in scope["headers"])}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(seen))]})
    await send({"type": "http.response.body", "body": seen})


_HEAD = b"POST /p?q=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
_CHUNKED = _HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
_HELLO = b"5\r\nhello\r\n"

# Each was read by h11 (served, or waited on) and refused (400) by llhttp.
REFUSED = {
    "two Content-Lengths of one value": _HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "a Content-Length list": _HEAD + b"Content-Length: 5, 5\r\n\r\nhello",
    "a folded header (obs-fold)": _HEAD + b"X-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello",
    "a head of bare LF line ends": _HEAD.replace(b"\r\n", b"\n") + b"Content-Length: 5\n\nhello",
    "HTTP/1.2": _HEAD.replace(b"HTTP/1.1", b"HTTP/1.2") + b"Content-Length: 5\r\n\r\nhello",
    "a method llhttp does not know": _HEAD.replace(b"POST", b"post") + b"Content-Length: 5\r\n\r\nhello",
    "whitespace after a chunk size": _CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n",
    "a tab after a chunk size": _CHUNKED + b"5\t\r\nhello\r\n0\r\n\r\n",
    "whitespace in a chunk extension": _CHUNKED + b"5; a = b\r\nhello\r\n0\r\n\r\n",
    "an empty chunk extension": _CHUNKED + b"5;\r\nhello\r\n0\r\n\r\n",
    "a control character in a chunk extension": _CHUNKED + b"5;a=\x01\r\nhello\r\n0\r\n\r\n",
    "an unclosed quoted chunk extension": _CHUNKED + b'5;a="b\r\nhello\r\n0\r\n\r\n',
    "a chunk size past 64 bits": _CHUNKED + b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n",
    "Content-Length in the trailers": _CHUNKED + _HELLO + b"0\r\nContent-Length: 5\r\n\r\n",
    "Transfer-Encoding in the trailers": _CHUNKED + _HELLO + b"0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "a folded trailer field": _CHUNKED + _HELLO + b"0\r\nX-A: a\r\n b\r\n\r\n",
    "a trailer field ending in a bare LF": _CHUNKED + _HELLO + b"0\r\nX-A: a\n\r\n",
    "a chunk size line ending in a bare LF": _CHUNKED + b"5\nhello\r\n0\r\n\r\n",  # (h11: no answer until the body's timeout)
    "an authority-form target": b"GET t:80 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    "an upgrade with a body (h2c smuggling)": _HEAD.replace(b"close", b"Upgrade") + b"Upgrade: h2c\r\nContent-Length: 5"
                                                b"\r\n\r\nhello",
}

# Passed by llhttp to the app, which answers 501 (RFC 9112 6.1); h11 refused it, 400.
REFUSED_BY_THE_APP = {
    "a transfer coding before chunked": _CHUNKED.replace(b"chunked", b"gzip, chunked") + _HELLO + b"0\r\n\r\n",
}

# Each was served by llhttp and refused, or routed elsewhere, by h11; the app is given
# the same under both.
SERVED = {
    "a CRLF before the request line (RFC 9112 2.2)": b"\r\n" + _HEAD + b"Content-Length: 5\r\n\r\nhello",
    "an absolute-form target (RFC 9112 3.2.2)": _HEAD.replace(b"/p?q=1", b"http://t/p?q=1#f") + b"Content-Length: 0\r\n\r\n",
    "a fragment": _HEAD.replace(b"/p?q=1", b"/p?q=1#f") + b"Content-Length: 0\r\n\r\n",
    "two spaces in the request line": _HEAD.replace(b"POST ", b"POST  ") + b"Content-Length: 0\r\n\r\n",
    "a chunk size with leading zeros": _CHUNKED + b"0000000000000000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk extensions": _CHUNKED + b'5;a=b;c="d e";f\r\nhello\r\n0;x=y\r\n\r\n',
    "a trailer field": _CHUNKED + _HELLO + b"0\r\nX-Trailer: v\r\n\r\n",  # (never a header)
}


def test_smuggling_forms_get_one_answer_from_either_parser() -> None:
    """h11 (the server's parser where httptools is not installed) read what llhttp
    refuses: two Content-Lengths of one value, a folded header, bare LF line ends, a
    chunk size followed by whitespace, trailer fields that frame, HTTP/1.2 (each 200,
    and a proxy in front that frames them otherwise takes the rest for another request);
    a chunk size line ending in a bare LF had no answer until the body's timeout. It
    refused (400) a CRLF before a request line, which RFC 9112 2.2 has a server skip
    (a client that sends one after a body had its next request refused), and routed an
    absolute-form target as a path (404). Now each form gets the same answer from either
    parser: the same refusal (a closing 400), or the same request given to the app."""
    given: dict[str, dict[str, object]] = {}
    for implementation in IMPLEMENTATIONS:
        with _guarded_uvicorn(_echo, implementation, 5.0) as url:
            for name, request in REFUSED.items():
                s = _connect(url)
                s.sendall(request)
                raw = _read_to_close(s, 3)
                s.close()
                status, headers, problem = _problem(raw)
                assert (status, problem.get("code"), headers.get("connection")) == (400, "malformed_request", "close"), \
                    (implementation, name, raw[:300])
            for name, request in SERVED.items():
                s = _connect(url)
                s.sendall(request)
                raw = _read_to_close(s, 3)
                s.close()
                assert raw.startswith(b"HTTP/1.1 200 "), (implementation, name, raw[:300])
                given.setdefault(name, {})[implementation] = json.loads(raw.partition(b"\r\n\r\n")[2])
    for name, seen in given.items():
        assert seen["h11"] == seen["httptools"], (name, seen)
        assert (seen["h11"]["path"], seen["h11"]["query"]) == ("/p", "q=1") and "x-trailer" not in seen["h11"]["headers"]
    assert given["a chunk size with leading zeros"]["h11"]["body"] == "hello"


# ------------------------------------------------------------ the real service

STREAM_THRESHOLD = 4 << 10  # a 64 x 64 float32 Jacobian (16 KiB) streams


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    """The real service, one app (its engines on threads) served by each parser."""
    app = real_app(functions="jacobian_service.examples", stream_threshold_bytes=STREAM_THRESHOLD)
    with contextlib.ExitStack() as stack:
        served = {impl: stack.enter_context(_guarded_uvicorn(app, impl, 5.0, start_s=120, lifespan="on"))
                  for impl in IMPLEMENTATIONS}  # (its engines start with the first: torch imported there)
        for url in served.values():
            assert _wait_for(lambda: httpx.get(url + "/readyz", timeout=5).status_code == 200, 60)
        yield served


def _softmax_jacobian(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.func.jacrev(torch.softmax, argnums=0)(torch.from_numpy(x), 0).numpy()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_an_http10_client_reads_a_streamed_json_jacobian(urls: dict[str, str], implementation: str) -> None:
    """HTTP/1.0 knows no transfer coding (RFC 9112 6.1: a server must not send one to
    it). Under httptools a streamed JSON Jacobian (any answer without a Content-Length)
    went to an HTTP/1.0 client chunked ("transfer-encoding: chunked", then "4d\\r\\n
    {"function"..."): the client read the chunk sizes as part of the JSON. Its end is
    now the connection's close, as h11 had it. Nor does a ``100 Continue`` go first (RFC
    9110 15.2: no 1xx to HTTP/1.0, whose clients take it for their answer; RFC 9110
    10.1.1: such a request's expectation is ignored): httptools sent one."""
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    body = json.dumps({"inputs": [x.tolist()]}).encode()
    s = _connect(urls[implementation])
    s.sendall(b"POST /v1/functions/softmax/jacobian HTTP/1.0\r\nContent-Type: application/json\r\n"
              b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    raw = _read_to_close(s, 30)  # (the server closes: the answer's end)
    s.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    head = head.lower()
    # (no Content-Length: it streamed, as to an HTTP/1.1 client, where it is chunked)
    assert head.startswith(b"http/1.1 200 ") and b"transfer-encoding" not in head and b"content-length" not in head, head
    assert b"\r\nconnection: close" in head, head
    document = json.loads(payload)
    J = np.asarray(document["jacobian"]["data"], dtype=np.float32)
    np.testing.assert_allclose(J, _softmax_jacobian(x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_smuggling_forms_on_the_service_leave_an_honest_client_served(urls: dict[str, str], implementation: str) -> None:
    """The forms above at the service's endpoints, a streamed one among them, while an
    honest client keeps asking on a keep-alive connection: each form is refused alike,
    and every honest answer is whole and right. A transfer coding before chunked
    (``gzip, chunked``), which llhttp passes and the app refuses 501, was h11's 400."""
    url = urls[implementation]
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    honest_body = {"inputs": [x.tolist()]}
    expected = _softmax_jacobian(x)
    answers: list[np.ndarray] = []
    stop = threading.Event()

    def honest() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set() or len(answers) < 3:
                r = c.post("/v1/functions/softmax/jacobian", json=honest_body)  # (streamed)
                r.raise_for_status()
                answers.append(np.asarray(r.json()["jacobian"]["data"], dtype=np.float32))

    worker = threading.Thread(target=honest, daemon=True)
    worker.start()
    try:
        for path in (b"/v1/functions/softmax/jacobian", b"/v1/functions/sin/vjp"):
            for name, request in {**REFUSED, **REFUSED_BY_THE_APP}.items():
                request = request.replace(b"/p?q=1", path).replace(b"hello", b"[1,2]")
                with contextlib.closing(_connect(url)) as s:
                    s.sendall(request)
                    status, headers, problem = _problem(_read_to_close(s, 5))
                want = (501, "unsupported_transfer_coding") if name in REFUSED_BY_THE_APP else (400, "malformed_request")
                assert (status, problem.get("code"), headers.get("connection")) == (*want, "close"), \
                    (name, path, status, problem)
    finally:
        stop.set()
        worker.join(60)
    assert not worker.is_alive() and len(answers) >= 3
    for J in answers:
        np.testing.assert_allclose(J, expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------ who a client is

def test_forwarded_entries_of_any_length_keep_the_front_ends_memory() -> None:
    """Who a client is was cached by the text of its X-Forwarded-For entry (4,096 kept):
    a caller inside a trusted network (taken for a proxy, README), or a trusted proxy
    passing what it was sent, that wrote 4,096 entries of 30 KB had a front end keep
    234 MB, for good. No address is that long: such an entry is kept as written, cut to
    80 characters, and its text is not kept; a long entry that is an address padded with
    whitespace is still that address."""
    import tracemalloc

    from jacobian_service.clients import client_of, parse_proxies

    proxies = parse_proxies("10.0.0.0/8")

    def client(entry: bytes) -> str:
        return client_of({"client": ("10.0.0.2", 1), "headers": [(b"x-forwarded-for", entry)]}, proxies)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        names = {client(b"%05d" % i + b"y" * 30000) for i in range(300)}
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1 << 20, grown  # (before: ~18 MB, the 300 entries kept)
    assert len(names) == 300 and all(len(n) <= len("addr:") + 80 for n in names)
    assert client(b" " * 200 + b"203.0.113.7") == "addr:203.0.113.7"


# ------------------------------------------------------------ weights

@pytest.mark.parametrize("weight", ["1e999", "inf", "2", "nan", "-0.5"])
def test_an_absurd_weight_is_read_alike_in_accept_and_accept_encoding(client, weight: str) -> None:
    """A weight outside 0 to 1 left its ``Accept`` entry out, and was read as wanting gzip
    in ``Accept-Encoding`` (``gzip;q=1e999``, ``inf``, ``2``: the OpenAPI document came
    gzipped). Both headers read a weight one way (``responses.qvalue``)."""
    r = client.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5]]},
                    headers={"Accept": f"application/x-npy;q={weight}, application/json;q=0.5"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.headers
    doc = client.get("/openapi.json", headers={"Accept-Encoding": f"gzip;q={weight}, identity;q=0.5"})
    assert doc.status_code == 200 and "content-encoding" not in doc.headers and doc.json()["openapi"], doc.headers


def test_an_http10_answers_connection_can_still_be_cut_off() -> None:
    """The send that makes an HTTP/1.0 answer unchunked (framing.http10) stands in for
    uvicorn's: the connection is found through it (its ``__self__``'s transport) to cut off
    a client that reads too slowly (SendGuard) and to count what it has not read. A plain
    function in its place had none: such a client, over HTTP/1.0, was never cut off."""
    import asyncio

    from jacobian_service.connections import abort_connection, unsent_bytes
    from jacobian_service.framing import http10

    class Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

        def get_write_buffer_size(self) -> int:
            return 7

        def get_extra_info(self, name: str) -> None:
            return None

    class Cycle:  # uvicorn's httptools RequestResponseCycle, as far as http10 and the guard read it
        def __init__(self) -> None:
            self.transport, self.scope, self.sent = Transport(), {"method": "POST"}, []
            self.waiting_for_100_continue, self.keep_alive, self.chunked_encoding = True, True, None
            self.expected_content_length = 0

        async def send(self, message: dict) -> None:
            self.sent.append(message)

    cycle = Cycle()
    http10(cycle)
    asyncio.run(cycle.send({"type": "http.response.start", "status": 200, "headers": []}))
    assert (cycle.keep_alive, cycle.chunked_encoding, cycle.waiting_for_100_continue) == (False, False, False)
    assert unsent_bytes(cycle.send) == 7
    abort_connection(cycle.send)
    assert cycle.transport.aborted and len(cycle.sent) == 1
