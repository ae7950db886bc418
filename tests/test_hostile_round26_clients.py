"""Red team, round twenty-six: hostile clients over raw sockets and odd HTTP (an HTTP/1.1
request with no Host or two, under either parser; a header parameter with no ``=`` or
an unclosed quote; If-Match and If-None-Match evaluated as RFC 9110 13 asks; a graceful
shutdown with a request still being read; Transfer-Encoding lists read alike by both
parsers).

Each names what a user saw before. The connection cases run the real app (no engines
started: nothing there computes) under the server's guarded protocol class on each of
uvicorn's parsers (``test_connections._guarded_uvicorn``), an honest client on a
keep-alive connection beside them; the header cases run on the session's in-process app
(``client``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import assert_problem, decode
from .test_connections import _connect, _guarded_uvicorn, _problem, _read_to_close, _wait_for
from .test_hostile_round25_clients import _NEXT, _an_honest_client_beside, _answers, urls  # noqa: F401 (a fixture)

IMPLEMENTATIONS = ["h11", "httptools"]


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


# ------------------------------------------------------------ a parameter that is no name=value


def _softmax_jacobian(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.func.jacrev(torch.softmax, argnums=0)(torch.from_numpy(x), 0).numpy()


@pytest.mark.parametrize("content_type, accept, answered", [
    ("application/json; charset", "application/json", "application/json"),  # (was 415 "not as charset=''")
    ("application/json; charset=", "application/json", "application/json"),  # (the same 415)
    ("application/json", "application/json; q", "application/json"),  # (was 406 "allows none of application/json")
    ("application/json", "application/json; q=", "application/json"),
    ("application/json", 'application/json;q=0.9, application/x-npy; q="1', "application/x-npy"),  # (was JSON: q 0)
    ("application/json", 'application/x-npy; ext="a, b', "application/x-npy"),  # (the quote runs to the end)
])
def test_a_parameter_without_a_value_is_no_parameter(client, content_type: str, accept: str, answered: str) -> None:
    """A parameter is ``name=value`` (RFC 9110 5.6.6). ``Content-Type: application/json;
    charset`` was read as charset '' (415 "not as charset=''; send it in UTF-8" for a
    UTF-8 body), ``Accept: application/json; q`` as q=0 (406 "allows none of
    application/json", for an Accept that names only JSON), and a weight quoted without
    its closing quote (``q="1``) as no number, 0: JSON where .npy was preferred. A field
    with no ``=``, or nothing after it, is skipped as WHATWG's MIME parser skips it; an
    unclosed quote runs to the header's end. Each is the Jacobian torch.func.jacrev
    computes, in the format asked for."""
    x = np.linspace(-1, 1, 5, dtype=np.float32)
    r = client.post("/v1/functions/softmax/jacobian", content=json.dumps({"inputs": [x.tolist()]}),
                    headers={"content-type": content_type, "accept": accept})
    assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == answered, r.text
    J, _ = decode(r)
    np.testing.assert_allclose(J, _softmax_jacobian(x), rtol=1e-5, atol=1e-7)


def test_a_charset_or_weight_said_is_still_read(client) -> None:
    """The other side: a charset in an unclosed quote is still the charset said (415
    naming it), a weight of 0 is still a refusal (406), and ``gzip;q`` is gzip wanted
    (it was read as ``gzip;q=0``: the OpenAPI document came uncompressed)."""
    problem = assert_problem(client.post("/v1/functions/softmax/jacobian", content=b'{"inputs": [[0.5]]}',
                                         headers={"content-type": 'application/json; charset="utf-16'}),
                             415, "unsupported_media_type")
    assert "charset='utf-16'" in problem["detail"], problem
    assert_problem(client.post("/v1/functions/softmax/jacobian", content=b'{"inputs": [[0.5]]}',
                               headers={"accept": "application/json; q=0"}), 406, "not_acceptable")
    for accept_encoding, coding in (("gzip;q", "gzip"), ("gzip;q=0", None)):
        r = client.get("/openapi.json", headers={"accept-encoding": accept_encoding})
        assert r.status_code == 200 and r.headers.get("content-encoding") == coding, r.headers
        assert r.json()["openapi"].startswith("3.")


# ------------------------------------------------------------ conditional requests (RFC 9110 13)


@pytest.mark.parametrize("if_match", ["*", '"a5f0"', 'W/"a5f0", "b1"'])
def test_if_match_on_a_derivative_or_a_release_is_a_412_before_anything_runs(client, if_match: str) -> None:
    """RFC 9110 13.1.1: a server must evaluate If-Match and must not perform the method
    where it is false. A derivative's POST (its target has no current representation: a
    GET there is a 405, each answer is computed afresh) was computed and answered 200
    whatever the If-Match; a quarantine's DELETE was performed. Each is now the 412
    ``precondition_failed``, after the request's own checks (a 404 function or a 415 is
    still that: RFC 9110 13.2.1), before the body is read: a body that is no JSON is not
    a 400. ``If-None-Match`` there is true (nothing to match): the Jacobian, as torch.func
    computes it."""
    for method, path, body in (("POST", "/v1/functions/softmax/jacobian", b"{not json"),
                               ("DELETE", "/v1/functions/softmax/quarantine", None)):
        problem = assert_problem(client.request(method, path, content=body, headers={"if-match": if_match}),
                                 412, "precondition_failed")
        assert problem["detail"].startswith(f"If-Match {if_match!r} is false"), problem
    assert_problem(client.post("/v1/functions/nope/jacobian", content=b"{}", headers={"if-match": if_match}),
                   404, "function_not_found")
    assert_problem(client.post("/v1/functions/softmax/jacobian", content=b"{}",
                               headers={"if-match": if_match, "content-type": "text/plain"}), 415, "unsupported_media_type")
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    r = client.post("/v1/functions/softmax/jacobian", content=json.dumps({"inputs": [x.tolist()]}),
                    headers={"if-none-match": "*", "if-unmodified-since": "Mon, 26 Jul 1997 05:00:00 GMT"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(decode(r)[0], _softmax_jacobian(x), rtol=1e-5, atol=1e-7)


def test_conditions_on_a_get_are_evaluated_against_its_answer(client) -> None:
    """A GET that would be a 200 has a current representation. ``If-None-Match: *`` was
    answered in full (RFC 9110 13.1.2: false, so a 304); an ``If-Match`` naming a tag
    the answer does not carry was too (false: a 412). ``If-Match: *`` is true, a 404 stays
    a 404, and a docs file's own ETag is matched strongly (a weak one is not)."""
    for path in ("/v1/functions/softmax", "/openapi.json"):
        r = client.get(path, headers={"if-none-match": "*"})
        assert (r.status_code, r.content, r.headers["cache-control"]) == (304, b"", "no-store"), r.text
        assert r.headers["x-request-id"]
        problem = assert_problem(client.get(path, headers={"if-match": '"a5f0"'}), 412, "precondition_failed")
        assert "names no current ETag of this resource (its answers carry none)" in problem["detail"], problem
    assert client.head("/v1/functions", headers={"if-none-match": "*"}).status_code == 304
    r = client.get("/v1/functions/softmax", headers={"if-match": "*", "if-none-match": '"a5f0"'})
    assert r.status_code == 200 and r.json()["name"] == "softmax"
    assert_problem(client.get("/v1/functions/nope", headers={"if-none-match": "*"}), 404, "function_not_found")
    etag = client.get("/favicon.ico").headers["etag"]
    assert client.get("/favicon.ico", headers={"if-match": f'"other", {etag}'}).status_code == 200
    assert_problem(client.get("/favicon.ico", headers={"if-match": f"W/{etag}"}), 412, "precondition_failed")


# ------------------------------------------------------------ a graceful shutdown


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_shutdown_answers_the_request_being_read_saying_it_closes(implementation: str) -> None:
    """A graceful shutdown (SIGTERM, after the drain delay: uvicorn's shutdown) closes
    each idle keep-alive connection, and lets a request it has taken finish: here one whose
    body is still coming. Under httptools that answer said ``Connection: close``; under
    uvicorn's h11 it said nothing and the connection closed after it, so a client kept it
    for its next request (the middleware now says what the server's cycle will do, under
    either parser). The idle connection is closed cleanly (an end of stream, no reset)."""
    from ._client_support import real_app

    servers: list = []
    body = b'{"inputs": [[1.0, 2.0]]} x'  # (a body read whole, then refused: an answer without an engine)
    with _guarded_uvicorn(real_app(functions="jacobian_service.examples"), implementation, 5.0, servers=servers) as url:
        idle = _connect(url)
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        idle.settimeout(10)
        assert idle.recv(65536).endswith(b'{"status":"ok"}')
        reading = _connect(url)
        reading.sendall(b"POST /v1/functions/softmax/evaluate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        assert _wait_for(lambda: any(getattr(c, "cycle", None) is not None and not c.cycle.response_complete
                                     for c in servers[0].server_state.connections), 10)  # (its head is read)
        servers[0].should_exit = True  # (what SIGTERM does once the drain delay has passed)
        assert idle.recv(65536) == b""  # closed at once, cleanly (a reset raises here)
        idle.close()
        reading.sendall(body[5:])
        raw = _read_to_close(reading, 10)
        reading.close()
    assert [status for status, _ in _answers(raw)] == [400], raw[-300:]
    _, headers, problem = _problem(raw)
    assert problem["code"] == "malformed_body" and headers.get("connection") == "close", raw[:400]


# ------------------------------------------------------------ transfer codings, read alike


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("codings, said", [
    (b",chunked", None), (b", , chunked", None),  # (empty elements: none, RFC 9110 5.6.1)
    (b"chunked, identity", "Invalid `Transfer-Encoding` header value"),
    (b"chunked, chunked", "Invalid `Transfer-Encoding` header value"),
    (b"chunked,", "Invalid `Transfer-Encoding` header value"),
    (b"gzip", "Request has invalid `Transfer-Encoding`"),
])
def test_transfer_codings_are_framed_and_refused_alike_under_either_parser(urls: dict[str, str], implementation: str,
                                                                           codings: bytes, said: str | None) -> None:
    """``Transfer-Encoding: ,chunked`` (an empty list element, which a recipient must
    ignore) was read as chunked under httptools and refused 501 "the only transfer coding
    served is chunked" under h11 (or its 400), one request framed two ways by the
    server's two parsers; the codings llhttp refuses (chunked not last, twice, a trailing
    comma, none chunked: RFC 9112 6.3's 400) were h11's bare "Invalid HTTP request
    received". Now each is framed alike (the chunked body read, the request after it
    served) or refused in the same words, the connection closed; an honest client beside
    is served."""
    with _an_honest_client_beside(urls[implementation]):
        raw = _exchange(urls[implementation], b"POST /v1/functions/softmax/evaluate HTTP/1.1\r\nHost: t\r\n"
                        b"Content-Type: application/json\r\nTransfer-Encoding: " + codings + b"\r\n\r\n"
                        b"2\r\n{}\r\n0\r\n\r\n" + _NEXT)
    _, headers, problem = _problem(raw.split(b"HTTP/1.1 200")[0])  # (the first answer's)
    if said is None:  # (the body, {}, read whole: the app's 422, then the next request)
        assert [status for status, _ in _answers(raw)] == [422, 200], raw[-300:]
        assert problem["code"] == "invalid_input" and raw.endswith(b'{"status":"ok"}'), raw[-300:]
    else:
        assert [status for status, _ in _answers(raw)] == [400] and headers["connection"] == "close", raw[-300:]
        assert problem["detail"] == f"the request is not valid HTTP/1.1 ({said})", problem
