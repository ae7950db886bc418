"""Red team, round twenty-seven: hostile clients at the edges of a JSON body and of the
conditional requests round 26 added (a body nested past the JSON reader's own limit,
refused in other words than the same limit below it; a docs file's If-None-Match
answered 304 before its false If-Match, and its tag list split inside a quoted tag).

Each names what a user saw before. The cases run on the session's in-process app
(``client``): what is checked is decided before any engine computes.
"""

from __future__ import annotations

import io
import json
import re
import socket
import time

import httpx
import numpy as np
import pytest
from jacobian_client import wire

from ._client_support import real_server
from .conftest import assert_problem
from .test_connections import _read_to_close

# ------------------------------------------------------------ JSON nested past the reader's own limit

_KINDS = ("jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp")


def _nested(depth: int, prefix: bytes = b"") -> bytes:
    """A body whose ``inputs`` holds lists ``depth`` deep (the body's object one more)."""
    return b'{"inputs": [' + prefix + b"[" * (depth - 1) + b"]" * (depth - 1) + b"]}"


@pytest.mark.parametrize("body", [
    _nested(65),  # (found by the service's own walk: always "nested deeper than 64 levels")
    _nested(1100),  # (past orjson's 1,024: was "unreadable JSON: depth limit exceeded: line 1 column 1037")
    _nested(1100, prefix=b"NaN, "),  # (a NaN read again, then refused for the nesting: the same)
    b'{"inputs": [[0.5]], "in_dims": ' + b'{"a": ' * 1100 + b"0" + b"}" * 1100 + b"}",  # (objects)
], ids=["65", "1100", "1100 beside NaN", "1100 objects"])
@pytest.mark.parametrize("function", ["softmax", "scaled_norm"])  # (a float function; one read exactly: int64)
def test_json_nested_past_any_reader_is_one_refusal_on_every_endpoint(client, body: bytes, function: str) -> None:
    """MAX_JSON_DEPTH (64) refuses a body nested deeper: "JSON nested deeper than 64
    levels", a 400. A body nested past 1,024 levels, where orjson itself stops reading,
    was refused for the same limit in the reader's words instead, with a column number:
    "unreadable JSON: depth limit exceeded: line 1 column 1037 (char 1036)". Now every
    endpoint says the limit's words of either, for a function whose body is read exactly
    (int64 inputs) too."""
    for kind in _KINDS:
        problem = assert_problem(client.post(f"/v1/functions/{function}/{kind}", content=body,
                                             headers={"content-type": "application/json"}), 400, "malformed_body")
        assert problem["detail"] == "JSON nested deeper than 64 levels", (kind, problem)


# ------------------------------------------------------------ a docs file's conditions


def test_a_docs_files_false_if_match_is_a_412_before_its_if_none_match(client) -> None:
    """RFC 9110 13.2.2 evaluates If-Match before If-None-Match: a false If-Match is a 412
    whatever else the request says. A docs file (it has an ETag) with an If-Match naming
    no current tag beside an If-None-Match naming its tag was a 304: the client was told
    its copy is current when the condition it guarded the request by is false. And its
    If-None-Match was split at every ',' where the API's is split outside quoted tags
    (a tag may hold one): ``"a,*,b"``, one tag, was read as holding ``*``, a 304 for a
    client that holds none of the file's tags."""
    etag = client.get("/favicon.ico").headers["etag"]
    for method in ("GET", "HEAD"):
        r = client.request(method, "/favicon.ico", headers={"if-match": '"other"', "if-none-match": etag})
        assert r.status_code == 412, (method, r.status_code, r.headers)
        if method == "GET":
            problem = assert_problem(r, 412, "precondition_failed")
            assert problem["detail"] == f"If-Match '\"other\"' names no current ETag of this resource (it is {etag})"
        # a true If-Match leaves the If-None-Match to decide: the 304, with the tag held
        r = client.request(method, "/favicon.ico", headers={"if-match": etag, "if-none-match": etag})
        assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", etag), r.headers
        r = client.request(method, "/favicon.ico", headers={"if-none-match": '"a,*,b"'})
        assert r.status_code == 200 and r.headers["etag"] == etag, r.headers
    full = client.get("/favicon.ico", headers={"if-none-match": f'"a,*,b", W/{etag}'})  # (weak: 304 still)
    assert (full.status_code, full.content) == (304, b""), full.headers


# ------------------------------------------------------------ list headers read item by item


_CHROME_ACCEPT = ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,"
                  "application/signed-exchange;v=b3;q=0.7")


@pytest.mark.parametrize("method, path, name, long", [
    ("POST", "/v1/functions/sin/jacobian", "Accept", "*/*;q=0.5," * 3000),  # (24 ms a request on serve, was 200)
    ("POST", "/v1/functions/sin/evaluate", "Accept", "," * 30000 + "application/json"),
    ("GET", "/v1/functions/sin/sparsity?shape=3", "Accept", "*/*;q=0.5," * 3000),
    ("GET", "/openapi.json", "Accept-Encoding", "x;q=0.5," * 3500),  # (10 ms)
    ("POST", "/v1/functions/sin/evaluate", "Content-Type", "application/json" + ";a=b" * 7000),
    ("POST", "/v1/functions/sin/jacobian", "Content-Type", 'application/json;a="' + '\\"' * 14000 + '"'),  # (19 ms)
    ("GET", "/v1/functions/sin", "If-None-Match", ",".join(f'"t{i}"' for i in range(4000))),
    ("GET", "/v1/functions/sin", "If-Match", ",".join(f'"t{i}"' for i in range(4000))),
])
def test_a_list_header_past_its_bounds_is_a_431_before_it_is_read(client, method, path, name, long) -> None:
    """A list or parameter header the service reads item by item, within the 32 KiB head
    limit, held the front end's event loop for each request: an Accept of 3,000
    ``*/*;q=0.5`` 24 ms where the request itself takes 1 ms, and four connections sending
    it took every other client's /healthz from 1.6 to 34 ms median (serve, measured). Now
    a header past MAX_FIELD_SEPARATORS (64 ',' and ';') or MAX_FIELD_CHARS (2,048) is a
    431 naming it, before anything is read; one at the bounds, and browsers' own, are
    read as before."""
    body = b'{"inputs": [[0.5]]}' if method == "POST" else None
    ordinary = {"accept": _CHROME_ACCEPT + ",application/json", "accept-encoding": "gzip, deflate, br, zstd",
                "content-type": "application/json; charset=utf-8", "if-none-match": '"a", W/"b"', "if-match": "*"}
    base = {"content-type": "application/json"} if method == "POST" else {}
    name = name.lower()
    r = client.request(method, path, content=body, headers={**base, name: long})
    problem = assert_problem(r, 431, "headers_too_large")
    assert problem["detail"].lower().startswith(f"the header {name} "), problem
    r = client.request(method, path, content=body, headers={**base, name: ordinary[name]})
    assert r.status_code == (422 if "sparsity" in path else 200), (name, r.status_code, r.text[:300])
    # At the bounds: still read (the separators in a JSON Accept's parameters, the
    # characters in a Content-Type's), one more: the 431.
    if name in ("accept", "content-type"):
        from jacobian_service.header_params import MAX_FIELD_CHARS, MAX_FIELD_SEPARATORS

        at = ["application/json" + ";a=b" * MAX_FIELD_SEPARATORS,
              "application/json;a=" + "b" * (MAX_FIELD_CHARS - len("application/json;a="))]
        for value in at:
            r = client.request(method, path, content=body, headers={**base, name: value})
            assert r.status_code == (422 if "sparsity" in path else 200), (name, len(value), r.text[:300])
            assert_problem(client.request(method, path, content=body, headers={**base, name: value + ";"}),
                           431, "headers_too_large")


@pytest.mark.parametrize("path", [
    "/v1/functions/sin/jacobian?argnums=" + ",".join(["0"] * 15000),  # (41 ms a request on serve)
    "/v1/functions/sin/jacobian?rows=" + ",".join(["0"] * 15000),  # (45 ms)
    "/v1/functions/sin/hessian?batched=true&in_dims=" + ",".join(["0"] * 15000),
    "/v1/functions/sin/evaluate?argnums=" + "0%2C" * 5000,  # (percent-encoded: the same items)
    "/v1/functions/sin/jacobian?" + "&".join(f"k{i}=1" for i in range(3500)),  # (18 ms)
    "/v1/functions/sin/sparsity?shapes=[" + ",".join(["1"] * 15000) + "]",
])
def test_a_query_string_past_its_bounds_is_a_422_before_it_is_read(client, path) -> None:
    """A query string's options and their lists' items were each read in Python on the
    front end's event loop, within the 32 KiB head limit: ?argnums= of 15,000 items took
    41 ms to refuse where another refusal takes 0.4 ms. Now past MAX_QUERY_OPTIONS (64)
    options or MAX_QUERY_ITEMS (256) commas, a 422 before any is read; at the bounds each
    option is read and judged as before."""
    method = "GET" if "sparsity" in path else "POST"
    body = None if method == "GET" else b'{"inputs": [[0.5]]}'
    problem = assert_problem(client.request(method, path, content=body, headers={"content-type": "application/json"}),
                             422, "invalid_input")
    assert problem["detail"].startswith("the query string"), problem
    from jacobian_service.routes import MAX_QUERY_ITEMS, MAX_QUERY_OPTIONS

    base, _, query = path.partition("?")
    at = {"argnums": "argnums=" + ",".join(["0"] * (MAX_QUERY_ITEMS + 1)),
          "options": "&".join(f"k{i}=1" for i in range(MAX_QUERY_OPTIONS))}
    for which, bounded in at.items():
        r = client.request(method, f"{base}?{bounded}", content=body, headers={"content-type": "application/json"})
        detail = assert_problem(r, 422, "invalid_input")["detail"]
        assert not detail.startswith("the query string"), (which, detail)  # (the option itself judged)


# ------------------------------------------------------------ gathered answers read slowly


def _head(s: socket.socket) -> tuple[int, bytes]:
    """The status and head of the answer on ``s``, reading no further than its end."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = s.recv(1)
        assert piece, head
        head += piece
    return int(head.split(b" ", 2)[1]), head.lower()


def _softmax_jacobian(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.func.jacrev(torch.softmax, argnums=0)(torch.from_numpy(x), 0).numpy()


def test_gathered_answers_read_slowly_are_held_to_the_clients_share() -> None:
    """A large answer under the stream threshold is gathered, then held in the front end
    (its result: JSON is written piece by piece from it, .npy sent from it) until its
    client has taken the last piece, at the client's pace: nothing bounded how many a
    client held. 20 connections asking a 1,400-input softmax Jacobian (7.8 MB) as JSON
    and reading nothing grew the front end by 340 MB, for SEND_TIMEOUT_S, and again
    for as long as the client kept asking (a Hessian or a vjp is never streamed: up to
    MAX_RESULT_BYTES each; a sparsity pattern's indices may run to MBs too). Each is now
    held on the stream budget in its client's share (half of it), as a stream is: past
    the share a 429 ``overloaded``, before any of it is sent; another client (its own API key) is served beside, its Jacobian as
    torch.func computes it; and the room comes back when the connections go."""
    x = np.linspace(-1, 1, 1400, dtype=np.float32)  # (7.84 MB Jacobian: under the 8 MiB stream threshold)
    body = json.dumps({"inputs": [x.tolist()]}).encode()
    request = (b"POST /v1/functions/softmax/jacobian HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer hostile-key\r\nContent-Length: %d\r\nAccept: %s\r\n\r\n")
    with real_server(functions="jacobian_service.examples", api_keys="hostile-key,honest-key",
                     body_budget_bytes=32 << 20) as url:  # (a share: 16 MiB, two answers of 7.84 MB)
        port = int(url.rsplit(":", 1)[1])

        def ask(accept: bytes) -> tuple[socket.socket, int, bytes]:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (a reader that takes next to nothing)
            s.connect(("127.0.0.1", port))
            s.sendall(request % (len(body), accept) + body)
            return (s, *_head(s))

        slow = [ask(wire.JSON.encode()), ask(wire.NPZ.encode())]
        try:
            assert [status for _, status, _ in slow] == [200, 200], [head for _, _, head in slow]
            s, status, head = ask(wire.NPY.encode())
            slow.append((s, status, head))
            assert status == 429, head
            problem = json.loads(_read_to_close(s, 10).split(b"\r\n\r\n", 1)[-1])
            held = re.match(r"this client holds 2 large answers \((\d+) bytes\) being sent; ", problem["detail"])
            assert problem["code"] == "overloaded" and held and int(held[1]) >= 2 * x.size**2 * 4, problem
            # a sparsity pattern's answer (2.2 MB of JSON indices) is held to the same share
            pattern = httpx.get(url + "/v1/functions/sin/sparsity?shapes=150000", timeout=60,
                                headers={"authorization": "Bearer hostile-key"})
            assert pattern.status_code == 429, pattern.text[:300]
            assert_problem(pattern, 429, "overloaded")
            with httpx.Client(base_url=url, timeout=60, headers={"authorization": "Bearer honest-key"}) as honest:
                r = honest.post("/v1/functions/softmax/jacobian", content=body,
                                headers={"content-type": "application/json", "accept": wire.NPY})
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(np.load(io.BytesIO(r.content)), _softmax_jacobian(x), rtol=1e-5, atol=1e-7)
        finally:
            for s, _, _ in slow:
                s.close()
        # the connections gone (each send fails), their room is given back: served again
        deadline = time.monotonic() + 20
        while (status := ask(wire.NPY.encode()))[1] != 200:
            status[0].close()
            assert time.monotonic() < deadline, status[2]
            time.sleep(0.1)
        status[0].close()
        pattern = httpx.get(url + "/v1/functions/sin/sparsity?shapes=150000", timeout=60,
                            headers={"authorization": "Bearer hostile-key"})
        assert pattern.status_code == 200 and pattern.json()["pattern"]["nnz"] == 150000, pattern.text[:300]
