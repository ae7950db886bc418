"""Red team, round twelve: hostile clients and every limit (one limit, one status on
every endpoint and method; integers held to the dtype an array names; what the HTTP
parser refuses, said; Accept's ranges; every route's methods; empty bodies).

The API cases run on the session's in-process app (``client``); the cases of the HTTP
connection itself on one real server for the module (a start costs ~3 s). Each names
what a user saw before.
"""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import zipfile
from typing import Iterator

import httpx
import numpy as np
import pytest
from numpy.lib import format as npy_format

from jacobian_client import wire

from .conftest import assert_problem, decode, live_server

JSON = {"content-type": wire.JSON}
X = [0.5, 1.0, 2.0]
BODY = b'{"inputs": [[0.5, 1.0, 2.0]]}'


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    global _other
    with live_server(FUNCTIONS="jacobian_service.examples", WORKERS=1, WARMUP="false", ENGINE_STANDBY="false") as served, \
            httpx.Client(timeout=30) as _other:  # another client (one: each new one costs its set-up)
        yield served


_other: httpx.Client


def _exchange(url: str, data: bytes, wait: float = 10.0) -> tuple[bytes, bool]:
    """``data`` sent as it is on a new connection: (what came back, whether the server
    closed the connection after it). Read until the server closes, or until ``wait``
    passes with nothing more (then it kept the connection)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(1 << 16):
                got += chunk
                if _whole(got):
                    s.settimeout(0.3)  # an answer is in: does the server close now?
        except socket.timeout:
            return got, False
        return got, True


def _whole(got: bytes) -> bool:
    head, sep, body = got.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), None)
    return bool(sep) and length is not None and len(body) >= length


def _answer(got: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _problem(got: bytes, status: int, code: str) -> dict:
    """A problem+json answer written on the wire, checked as assert_problem checks one."""
    got_status, headers, body = _answer(got)
    assert got_status == status, got
    assert headers["content-type"] == wire.PROBLEM
    doc = json.loads(body[:int(headers["content-length"])])
    assert set(doc) == {"type", "title", "status", "detail", "code", "request_id"}
    assert doc["status"] == status and doc["code"] == code and doc["request_id"] == headers["x-request-id"]
    assert "Traceback" not in body.decode("latin-1")
    return doc


def _sin_ok(url: str) -> None:
    """Another client is served as before."""
    r = _other.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [X]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_tree(r.json()["jacobian"]), np.diag(np.cos(np.float32(X))), rtol=1e-6)


# ------------------------------------------------------------ one limit, one status


# violation -> (the shape, status, code, what the detail says), at the default limits
# (2^28 elements, rank 16): each body is its header alone, refused before data is read.
_SHAPES = {
    "elements": ((2**28 + 1,), 413, "payload_too_large", "over the limit of 268435456 elements"),
    "elements, several dims": ((2**14, 2**14 + 1), 413, "payload_too_large", "over the limit of 268435456 elements"),
    "rank": ((1,) * 17, 422, "invalid_input", "rank 17 is over the limit of 16"),
    "sizes around a zero": ((0, 2**28 + 1), 422, "invalid_input", "holds no elements"),
}
_VECTOR = {"vjp": "cotangents", "jvp": "tangents", "hvp": "tangents"}
_POSTS = [("jacobian", "reaction_diffusion", ""), ("hessian", "reaction_diffusion", ""),
          ("evaluate", "reaction_diffusion", ""), ("vjp", "reaction_diffusion", ""),
          ("jvp", "reaction_diffusion", ""), ("jacobian", "reaction_diffusion", "?sparsity=auto")]


def _npy_head(shape: tuple[int, ...]) -> bytes:
    """An .npy body's header alone: what the limits are checked from."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npz(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)
    return buf.getvalue()


def _bodies(kind: str, shape: tuple[int, ...]) -> list[tuple[str, bytes]]:
    """The same array in every format a ``kind`` takes (its vector as it too)."""
    vector = _VECTOR.get(kind)
    array = {"dtype": "float32", "shape": list(shape), "data": []}
    doc = {"inputs": [array], **({vector: array} if vector else {})}
    bodies = [(wire.JSON, wire.dumps(doc)), (wire.NPZ, _npz(u=_npy_head(shape), **({vector: _npy_head(shape)} if vector else {})))]
    if not vector:
        bodies.append((wire.NPY, _npy_head(shape)))
    return bodies


@pytest.mark.parametrize("violation", list(_SHAPES))
def test_a_shape_over_a_limit_gets_one_status_on_every_endpoint_and_method(client, violation: str) -> None:
    """``GET .../sparsity?shapes=1001`` was a 422 "over the array limits" where the same
    shape posted to any endpoint, in any format, is a 413 ``payload_too_large``: a client
    that branches on the status (the SDK raises ``PayloadTooLarge`` for a 413) took one
    limit for two faults. Now the query's shapes are checked by the rule a body's are
    (``wire.check_shape``): the same status, code and words everywhere."""
    shape, status, code, says = _SHAPES[violation]
    seen = 0
    for kind, name, query in _POSTS:
        for media, body in _bodies(kind, shape):
            r = client.post(f"/v1/functions/{name}/{kind}{query}", content=body, headers={"content-type": media})
            assert says in assert_problem(r, status, code)["detail"], (kind, media, r.text)
            seen += 1
    for kind in ("jacobian", "hessian"):
        r = client.get(f"/v1/functions/reaction_diffusion/sparsity?kind={kind}&shapes={','.join(map(str, shape))}")
        detail = assert_problem(r, status, code)["detail"]
        assert says in detail and "input 'u'" in detail, detail
        seen += 1
    assert seen == 18
    # within the limits, a GET is answered
    assert client.get("/v1/functions/sin/sparsity?shapes=3").json()["pattern"]["shape"] == [3, 3]


# ------------------------------------------------------------ integers below int64, for a float input


@pytest.mark.parametrize("literal", ["-9223372036854775809", "-9223372036854776000", "-9223372036854776832"])
def test_an_explicit_int64_below_its_range_is_refused_for_a_float_input_too(client, literal: str) -> None:
    """Round ten read integer literals exactly for functions that take integers; for a
    float function the body was read as orjson reads it, which rounds every integer
    literal within 1024 below -2**63 to the float -2**63, and that fits int64: ``sin``'s
    evaluate of ``{"dtype": "int64", "data": [-2**63 - 1]}`` (or int64 cotangents of a
    vjp) answered 200, computed with -2**63, while one past the top, 2**63, is a 422.
    Now an array that names an integer dtype is read exactly whatever the function: 422."""
    def post(endpoint: str, doc: str):
        return client.post(f"/v1/functions/sin/{endpoint}", content=doc, headers=JSON)

    for endpoint, doc in (
        ("evaluate", f'{{"inputs": [{{"dtype": "int64", "shape": [2], "data": [1, {literal}]}}]}}'),
        ("evaluate", f'{{"inputs": {{"x": {{"dtype": "int64", "data": [{literal}]}}}}}}'),  # no shape: still an array
        ("vjp", f'{{"inputs": [[0.5]], "cotangents": {{"dtype": "int64", "shape": [1], "data": [{literal}]}}}}'),
    ):
        problem = assert_problem(post(endpoint, doc), 422, "invalid_input")
        assert problem["detail"].endswith("array data does not fit int64"), problem
    # int64's lowest itself is read exactly and served, as is the literal in plain numbers
    # or a float array, which carry no integer dtype (a float, as any JSON reader makes it)
    r = post("evaluate", '{"inputs": [{"dtype": "int64", "shape": [1], "data": [-9223372036854775808]}]}')
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_tree(r.json()["output"]), np.sin(np.float32([-2.0**63])), rtol=1e-6)
    for cotangents in (f"[{literal}]", f'{{"dtype": "float64", "shape": [1], "data": [{literal}]}}'):
        r = post("vjp", f'{{"inputs": [[0.5]], "cotangents": {cotangents}}}')
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(wire.decode_tree(r.json()["vjp"]), [np.cos(np.float32(0.5)) * float(literal)], rtol=1e-6)


# ------------------------------------------------------------ what the HTTP parser refuses, said


def _post(headers: bytes, body: bytes = BODY, path: bytes = b"/v1/functions/sin/jacobian", length: bool = True) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n" + headers
            + (b"Content-Length: %d\r\n" % len(body) if length else b"") + b"\r\n" + body)


_CHUNKED = b"Transfer-Encoding: chunked\r\n"
# request -> what the detail says (the parser's reason, and the header at fault)
_UNPARSABLE = {
    "obs-fold": (_post(b"X-Trace: a\r\n b\r\n"), "(Unexpected whitespace after header value): the header 'X-Trace' "
                 "is folded onto a next line that starts with whitespace (obs-fold, RFC 9112 5.2)"),
    "NUL in a value": (_post(b"X-Trace: a\x00b\r\n"), "(Invalid header value char): the header 'X-Trace' holds the byte "
                       "0x00, a control character"),
    "CR in a value": (_post(b"X-Trace: a\rb\r\n"), "the header 'X-Trace' holds the byte 0x0d"),
    "space before the colon": (_post(b"Content-Length : 5\r\n"),
                               "the header line 'Content-Length : 5' has no valid name"),
    "two Content-Lengths": (_post(b"Content-Length: 29\r\n"), "(Duplicate Content-Length)"),
    "Content-Length and Transfer-Encoding": (_post(_CHUNKED, b"1d\r\n" + BODY + b"\r\n0\r\n\r\n"),
                                             "(Content-Length can't be present with Transfer-Encoding)"),
    "chunk size overflow": (_post(_CHUNKED, b"1" + b"0" * 16 + b"\r\n", length=False), "(Chunk size overflow)"),
    "a coding not chunked, last": (_post(b"Transfer-Encoding: gzip\r\n", length=False),
                                   "(Request has invalid `Transfer-Encoding`)"),
    # a head pipelined behind a body begins on the body's last line
    "pipelined behind a body": (_post(b"") + b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Trace: a\x00b\r\n\r\n",
                                "(Invalid header value char): the header 'X-Trace' holds the byte 0x00"),
    # llhttp reads these as HTTP/1 and uvicorn served them (no Host check: that is 1.1's)
    "HTTP/2.0 in the request line": (_post(b"").replace(b"HTTP/1.1\r\nHost: t\r\n", b"HTTP/2.0\r\n", 1),
                                     "(HTTP/2.0 in a request line framed as HTTP/1: this server speaks HTTP/1.1 and HTTP/1.0)"),
    "HTTP/0.9 with headers": (_post(b"").replace(b"HTTP/1.1", b"HTTP/0.9", 1), "(HTTP/0.9 in a request line framed as HTTP/1"),
}


@pytest.mark.parametrize("case", list(_UNPARSABLE))
def test_what_the_parser_refuses_is_named_in_the_problem(server, case: str) -> None:
    """A header folded onto the next line (obs-fold), a NUL or a CR in a header's value,
    two Content-Lengths, a chunk size past 64 bits: each was a 400 saying only "the
    request is not valid HTTP/1.1 (Invalid HTTP request received)", uvicorn's words for
    every fault of the parser, which a client (or a proxy's operator) could not act on.
    Now the detail gives the parser's reason and, where a header line is at fault, names
    it. Still a 400 malformed_request that closes the connection; other clients served.
    A request line naming HTTP/2.0 (or 0.9) over HTTP/1 framing was served (200, its
    missing Host unchecked): now refused the same way."""
    url, _ = server
    data, says = _UNPARSABLE[case]
    got, closed = _exchange(url, data)
    last = [m.start() for m in re.finditer(rb"HTTP/1\.1 \d{3} ", got)][-1]  # (the last answer)
    detail = _problem(got[last:], 400, "malformed_request")["detail"]
    assert detail.startswith("the request is not valid HTTP/1.1 (") and says in detail, detail
    assert closed
    _sin_ok(url)


# ------------------------------------------------------------ Accept: a type named outranks a range


@pytest.mark.parametrize("accept, function, chosen", [
    ("application/json;q=0, */*", "sin", wire.NPY),  # anything but JSON
    ("application/json;q=0, */*", "polar", wire.NPZ),  # ... that can carry a tuple
    ("application/json;q=0, application/x-npy;q=0, application/*", "sin", wire.NPZ),
    ("application/json;q=0.1, */*;q=0.5", "sin", wire.NPY),  # JSON named, least wanted
    ("*/*", "sin", wire.JSON),  # (curl's: JSON, as before)
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "polar", wire.JSON),  # a browser's
])
def test_a_media_type_refused_by_name_is_not_served_through_a_range(client, accept: str, function: str, chosen: str) -> None:
    """RFC 9110 12.5.1: a media type named outranks a range that covers it. ``Accept:
    application/json;q=0, */*`` (anything but JSON) was answered JSON: ``*/*`` stood for
    JSON alone, whatever was refused by name. Now a range covers the types not named
    (JSON first, so ``*/*`` alone is JSON as before), and a type named keeps its own
    weight, zero included."""
    x = np.float32([0.5, 1.0, 2.0])
    inputs = [x.tolist()] * (2 if function == "polar" else 1)
    r = client.post(f"/v1/functions/{function}/jacobian", json={"inputs": inputs}, headers={"accept": accept})
    assert r.status_code == 200 and r.headers["content-type"] == chosen, (r.headers, r.text[:300])
    J, _ = decode(r)
    if function == "sin":
        np.testing.assert_allclose(J, np.diag(np.cos(x)), rtol=1e-6)
    else:  # polar(r, theta) = (r cos t, r sin t): d/dr of its first output
        np.testing.assert_allclose(J[0], np.diag(np.cos(x)), rtol=1e-6)
    # refusing every type by name, or the range itself, leaves nothing: 406 as before
    r = client.post("/v1/functions/sin/jacobian", json={"inputs": [x.tolist()]},
                    headers={"accept": "application/json;q=0, application/x-npy;q=0, application/x-npz;q=0, */*"})
    assert_problem(r, 406, "not_acceptable")


# ------------------------------------------------------------ every route, every method; empty bodies


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "TRACE", "OPTIONS")


def test_every_route_answers_a_method_it_does_not_take_405_naming_those_it_does(client) -> None:
    """TRACE, PUT, PATCH and the wrong one of GET / POST / DELETE / HEAD on every route of
    the table: a 405 problem naming the methods the path takes in ``Allow`` (HEAD wherever
    GET is, OPTIONS everywhere: a plain OPTIONS is answered 204 with that ``Allow``), never
    a 404 or a body echoing the request (TRACE); a HEAD's answer has no body."""
    routes = client.app.routes
    by_path: dict[str, set[str]] = {}
    for route in routes:
        by_path.setdefault(route.path, set()).add(route.method)
    assert len(by_path) >= 15
    for path, methods in by_path.items():
        allowed = methods | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
        url = path.replace("{name}", "sin").replace("{file}", "swagger-ui.css")
        r = client.options(url)
        assert (r.status_code, r.headers["allow"]) == (204, ", ".join(sorted(allowed))), (url, r.status_code)
        for method in _METHODS:
            if method in allowed:
                continue
            r = client.request(method, url)
            assert r.status_code == 405, (method, url, r.status_code)
            assert r.headers["allow"] == ", ".join(sorted(allowed)), (method, url, r.headers)
            if method == "HEAD":
                assert r.content == b""
            else:
                assert f"{method} is not allowed here" in assert_problem(r, 405, "method_not_allowed")["detail"]


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"])
def test_an_empty_body_is_refused_on_every_endpoint_and_format(client, kind: str) -> None:
    """A body of no bytes, in each format (and with no Content-Type, read as JSON): a 400
    saying the body cannot be read; an .npy for an endpoint that needs vectors is refused
    by its head (422) before a byte of it is read."""
    url = f"/v1/functions/{'sum_sin' if kind in ('hessian', 'hvp') else 'sin'}/{kind}"
    for media, status, code, says in (
        (None, 400, "malformed_body", "unreadable JSON"),
        (wire.JSON, 400, "malformed_body", "unreadable JSON"),
        (wire.NPZ, 400, "malformed_body", "unreadable .npz"),
        (wire.NPY, *((422, "invalid_input", "carries one input") if kind in _VECTOR else
                     (400, "malformed_body", "the body is cut short (0 bytes"))),
    ):
        r = client.post(url, content=b"", headers={"content-type": media} if media else {})
        assert says in assert_problem(r, status, code)["detail"], (media, r.text)


def test_a_body_over_the_limit_announced_with_100_continue_is_refused_before_it_is_sent(server) -> None:
    """``Expect: 100-continue`` with a Content-Length over MAX_REQUEST_BYTES: the 413 comes
    at once, with no ``100 Continue`` before it (the client never uploads the terabyte),
    and the connection closes; other clients are served."""
    url, _ = server
    head = _post(b"Expect: 100-continue\r\n", body=b"").replace(b"Content-Length: 0", b"Content-Length: 1000000000000")
    got, closed = _exchange(url, head)
    assert b"100 Continue" not in got and closed
    assert "the body has 1000000000000 bytes; the limit is" in _problem(got, 413, "payload_too_large")["detail"]
    _sin_ok(url)


# ------------------------------------------------------------ .npy headers: one fault, one answer


def _npy_with_header(header: str, data: bytes) -> bytes:
    text = header.encode()
    pad = (64 - (10 + len(text) + 1) % 64) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


@pytest.mark.parametrize("size", ["True", "2.0"])
def test_an_npy_header_whose_shape_holds_no_integer_is_a_400_in_either_body(client, size: str) -> None:
    """numpy's header reader takes ``True`` for a size (a bool is an int to it): such a
    header was a 422 "'shape' must be a list of integers" (words for a JSON array) where
    a size of 2.0 is a 400 "unreadable .npy header". Now both are that 400, in an .npy
    body and as an .npz member alike."""
    body = _npy_with_header(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({size}, 2), }}",
                            np.float32([0.5, 1.0]).tobytes())
    for media, content in ((wire.NPY, body), (wire.NPZ, _npz(x=body))):
        r = client.post("/v1/functions/sin/evaluate", content=content, headers={"content-type": media})
        assert "unreadable .npy header: shape is not valid" in assert_problem(r, 400, "malformed_body")["detail"]
