"""Red team, round ten: hostile clients and every limit (numbers JSON readers round,
bodies in other encodings, lying headers, the same limit on every endpoint and format).

The API cases run on the session's in-process app (``client``); each names what a user
saw before.
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Iterator

import numpy as np
import pytest
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.settings import Settings

from .conftest import assert_problem, npy_bytes, npz_bytes

JSON = {"content-type": wire.JSON}


# ------------------------------------------------------------ integers JSON readers round


@pytest.mark.parametrize("literal", ["-9223372036854775809", "-9223372036854776000", "-9223372036854776832"])
def test_an_integer_below_int64_is_refused_not_rounded_to_its_lowest(client, literal: str) -> None:
    """orjson reads an integer literal past int64 as a float, and those within 1024 below
    -2**63 round to the float -2**63, which fits int64: scaled_norm's int64 ``power`` of
    -2**63 - 1 (or JavaScript's JSON.stringify of int64's lowest, -9223372036854776000)
    answered 200, computed with -2**63, where 2**63 is a 422. Now a 422 too."""
    body = f'{{"inputs": {{"x": [[3.0, 4.0, 0.0]], "scale": 1.0, "power": {literal}}}}}'
    problem = assert_problem(client.post("/v1/functions/scaled_norm/evaluate", content=body, headers=JSON),
                             422, "invalid_input")
    assert problem["detail"].startswith("input 'power': array data does not fit int64")
    body = f'{{"inputs": {{"x": [[3.0, 4.0, 0.0]], "scale": 1.0, "power": {{"dtype": "int64", "shape": [], "data": {literal}}}}}}}'
    problem = assert_problem(client.post("/v1/functions/scaled_norm/evaluate", content=body, headers=JSON),
                             422, "invalid_input")
    assert problem["detail"].startswith("input 'power': array data does not fit int64")
    # int64's lowest itself, an integer literal, is read exactly and served
    body = '{"inputs": {"x": [[3.0, 4.0, 0.0]], "scale": 1.0, "power": -9223372036854775808}}'
    r = client.post("/v1/functions/scaled_norm/evaluate", content=body, headers=JSON)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_tree(r.json()["output"]), [5.0])  # 1.0 ** anything
    # for a float input (and cotangents, which have no dtype of their own) it is a float,
    # the same whether read exactly or not (a function of float inputs reads it as orjson
    # does: the search for such integers is spared)
    x = [0.5, 1.0, 2.0]
    body = f'{{"inputs": [{x}], "cotangents": [{literal}, 1, 100000000000000000000000000000]}}'
    r = client.post("/v1/functions/sin/vjp", content=body, headers=JSON)
    assert r.status_code == 200, r.text
    want = np.cos(np.float32(x)) * np.float32([float(literal), 1, 1e29])
    np.testing.assert_allclose(wire.decode_tree(r.json()["vjp"]), want, rtol=1e-6)


# ------------------------------------------------------------ numbers past float64's range


def test_a_number_past_float64_is_read_as_the_infinity_it_spells(client) -> None:
    """``1e309`` is valid JSON (RFC 8259 leaves the range to the reader; Python's and
    JavaScript's read it as Infinity) but orjson refuses it: a 400 "unreadable JSON",
    where the spelled ``"Infinity"`` was taken for the same float input. Now both read the
    same, as 1e39 for a float32 input already becomes infinity (numpy's cast)."""
    def evaluate(x: str, y: str) -> dict:
        body = f'{{"inputs": {{"x": {{"dtype": "float64", "shape": [3], "data": {x}}}, "y": {y}}}}}'
        r = client.post("/v1/functions/add_square/evaluate", content=body, headers=JSON)
        assert r.status_code == 200, r.text
        return r.json()["output"]

    spelled = evaluate('["Infinity", "-Infinity", 0.5]', "[1, 2, 3]")
    assert spelled["data"] == ["Infinity", "-Infinity", 9.5]
    assert evaluate("[1e309, -1e400, 0.5]", "[1, 2, 3]") == spelled
    assert evaluate("[1E+309, -" + "9" * 400 + ", 0.5]", "[1, 2, 3]") == spelled
    assert evaluate('["Infinity", "-Infinity", 0.5]', "[1, 2, 1e39]")["data"] == ["Infinity", "-Infinity", "Infinity"]
    # numbers that only look large are read as they are
    assert evaluate("[1e308, 1" + "0" * 400 + "e-300, 1e-400]", "[0, 0, 0]")["data"] == [1e308, 1e100, 0.0]
    # an integer input cannot hold it: 422, as for "Infinity"; an option is no number there
    for power in ("1e309", '"Infinity"'):
        body = f'{{"inputs": {{"x": [[3.0, 4.0, 0.0]], "scale": 1.0, "power": {power}}}}}'
        problem = assert_problem(client.post("/v1/functions/scaled_norm/evaluate", content=body, headers=JSON),
                                 422, "invalid_input")
        assert problem["detail"] == "input 'power': array data does not fit int64: it holds Infinity"
    problem = assert_problem(client.post("/v1/functions/sin/jacobian", content='{"inputs": [[1.0]], "chunk_size": 1e309}',
                                         headers=JSON), 422, "invalid_input")
    assert problem["detail"].startswith("chunk_size")
    # in a string it stays a string; a body still unreadable stays a 400
    problem = assert_problem(client.post("/v1/functions/sin/evaluate", content='{"inputs": {"1e309": [1e309]}}',
                                         headers=JSON), 422, "invalid_input")
    assert "'1e309'" in problem["detail"]
    assert_problem(client.post("/v1/functions/sin/evaluate", content='{"inputs": [[1e309 x]]}', headers=JSON),
                   400, "malformed_body")


# ------------------------------------------------------------ bodies that are not UTF-8


@pytest.mark.parametrize("charset", ["utf-16", "UTF-16LE", '"iso-8859-1"', "latin-1", "cp1252"])
def test_a_json_body_in_another_charset_is_a_415_naming_it(client, charset: str) -> None:
    """A body sent as ``application/json; charset=utf-16`` was read as UTF-8 anyway and
    refused as "str is not valid UTF-8: surrogates not allowed" (a 400 naming neither the
    charset nor what to do); one whose latin-1 bytes happened to be ASCII was served."""
    text = '{"inputs": [[0.5, 1.0]]}'
    encoding = charset.strip('"').replace("latin-1", "latin_1")
    problem = assert_problem(client.post("/v1/functions/sin/evaluate", content=text.encode(encoding),
                                         headers={"content-type": f"application/json; charset={charset}"}),
                             415, "unsupported_media_type")
    assert f"charset='{charset.strip(chr(34)).lower()}'" in problem["detail"] and "UTF-8" in problem["detail"]


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", '"utf-8"', "utf8", "us-ascii"])
def test_a_json_body_that_says_utf8_is_served(client, charset: str) -> None:
    r = client.post("/v1/functions/sin/evaluate", content='{"inputs": [[0.5]]}',
                    headers={"content-type": f"application/json;charset={charset}; foo=bar"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_tree(r.json()["output"]), np.sin([np.float32(0.5)]), rtol=1e-6)


@pytest.mark.parametrize("body, says", [
    ('{"inputs": [[0.5]]}'.encode("utf-16"), "UTF-16"),
    ('{"inputs": [[0.5]]}'.encode("utf-16-le"), "UTF-16"),
    ('{"inputs": [[0.5]]}'.encode("utf-32"), "UTF-16 or UTF-32"),
    (b"\xef\xbb\xbf" + b'{"inputs": [[0.5]]}', "byte order mark (EF BB BF)"),
    ('{"inputs": {"caf\u00e9": [0.5]}}'.encode("latin-1"), "byte 0xe9 at offset 16"),
    (b'{"inputs": [[0.5]], "argnums": "\xff"}', "byte 0xff at offset 32"),
], ids=["utf-16", "utf-16-le", "utf-32", "bom", "latin-1", "0xff"])
def test_a_json_body_not_in_utf8_is_a_400_saying_so(client, body: bytes, says: str) -> None:
    """The same bodies with no charset said: orjson's "str is not valid UTF-8: surrogates
    not allowed: line 1 column 1 (char 0)" for every one, pointing at the first byte."""
    problem = assert_problem(client.post("/v1/functions/sin/evaluate", content=body, headers=JSON),
                             400, "malformed_body")
    assert says in problem["detail"] and "surrogates" not in problem["detail"]


# ------------------------------------------------------------ .npy headers that lie


def _npy_with_length(delta: int) -> bytes:
    good = npy_bytes(np.arange(4, dtype=np.float32))
    length = struct.unpack("<H", good[8:10])[0]
    return good[:8] + struct.pack("<H", length + delta) + good[10:]


@pytest.mark.parametrize("delta, says", [
    (-1, "says the header ends at byte 127, but no newline ends it there"),
    (-10, "says the header ends at byte 118, but no newline ends it there"),
    (1, "says the header ends at byte 129, but its newline is byte 128"),
    (16, "says the header ends at byte 144, but its newline is byte 128"),
    (1000, "says the header ends at byte 1128, past the body's 144 bytes"),
])
def test_an_npy_header_whose_length_lies_is_a_400_saying_so(client, delta: int, says: str) -> None:
    """A length field one short read the header (numpy's reader does not look for the
    newline that ends it) and blamed the data: ".npy data holds 17 bytes; its header
    declares 16"; one longer dumped the data's bytes as an unparsable header
    ("Cannot parse header: ... \\n\\x00\\x00\\x80?")."""
    for path in ("/v1/functions/sin/jacobian", "/v1/functions/sin/evaluate"):
        problem = assert_problem(client.post(path, content=_npy_with_length(delta), headers={"content-type": wire.NPY}),
                                 400, "malformed_body")
        assert says in problem["detail"] and "length field" in problem["detail"], problem["detail"]
    # in an .npz member alike, named
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", _npy_with_length(delta))
    problem = assert_problem(client.post("/v1/functions/sin/jacobian", content=buf.getvalue(),
                                         headers={"content-type": wire.NPZ}), 400, "malformed_body")
    assert problem["detail"].startswith("member 'x.npy'") and "length field" in problem["detail"]


# ------------------------------------------------------------ request ids


@pytest.mark.parametrize("sent", [b"a" * 129, b"caf\xc3\xa9", b"caf\xe9", b"a\tb", b"x\x7f"],
                         ids=["129-chars", "utf-8", "latin-1", "tab", "del"])
def test_a_request_id_that_cannot_be_echoed_as_sent_is_replaced(client, sent: bytes) -> None:
    """An X-Request-ID over 128 characters was cut to 128 (an id neither the client's nor
    unique), and a non-ASCII one was echoed as its bytes but written into the problem's
    ``request_id`` decoded as latin-1: "café" came back as "cafÃ©" beside a header that
    reads "café". Both now get an id of the service's own, in the header and the body."""
    for r in (client.post("/v1/functions/nope/jacobian", content=b"{}", headers={**JSON, "x-request-id": sent}),
              client.get("/v1/functions/sin", headers={"x-request-id": sent})):
        rid = r.headers["x-request-id"]
        assert rid.encode() != sent and len(rid) == 32 and int(rid, 16) >= 0
        if r.status_code >= 400:
            assert assert_problem(r, 404, "function_not_found")["request_id"] == rid
    # what fits is echoed exactly, in the header and the problem alike
    for sent in (b"a" * 128, b"req-1 / \"quoted\" <x>", b"~"):
        r = client.post("/v1/functions/nope/jacobian", content=b"{}", headers={**JSON, "x-request-id": sent})
        assert r.headers["x-request-id"].encode() == sent
        assert assert_problem(r, 404, "function_not_found")["request_id"].encode() == sent


# ------------------------------------------------------------ every limit on every endpoint and format


@pytest.fixture(scope="module")
def limited() -> Iterator[TestClient]:
    """An in-process app with small limits, so that each is cheap to pass."""
    settings = Settings(warmup=False, functions="jacobian_service.examples", max_request_bytes=65536,
                        max_array_elements=1000, max_array_rank=4, max_npz_members=3, max_json_depth=8)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


# (endpoint, function, query): every kind, a sparse Jacobian and Hessian, and a Jacobian
# large enough to stream (softmax's 1000 x 1000 would be, were its input let in)
_ENDPOINTS = [("jacobian", "sin", ""), ("hessian", "sum_sin", ""), ("evaluate", "sin", ""), ("vjp", "sin", ""),
              ("jvp", "sin", ""), ("hvp", "sum_sin", ""), ("jacobian", "lorenz96", "?sparsity=auto"),
              ("hessian", "rosenbrock", "?sparsity=auto"), ("jacobian", "softmax", "?chunk_size=16")]
_VECTOR = {"vjp": "cotangents", "jvp": "tangents", "hvp": "tangents"}
# violation -> (status, code, what the detail says), the same on every endpoint and format
_LIMITS = {
    "elements": (413, "payload_too_large", "1000 elements"),
    "rank": (422, "invalid_input", " 4"),
    "members": (413, "payload_too_large", "the limit is 3"),
    "depth": (400, "malformed_body", "JSON nested deeper than 8 levels"),
    "bytes": (413, "payload_too_large", "the limit is 65536"),
}


def _violating_body(kind: str, violation: str, media: str) -> bytes | None:
    """A body of ``media`` for ``kind`` that passes one limit, or None where that format
    cannot carry the violation (depth is JSON's; members an .npz's) or the call."""
    vector = _VECTOR.get(kind)
    x = {"elements": np.zeros(1001, np.float32), "rank": np.zeros((1, 1, 1, 1, 1), np.float32),
         "bytes": np.zeros(20000, np.float32)}.get(violation, np.zeros(3, np.float32))
    if media == wire.JSON:
        if violation == "members":
            return None
        doc: dict = {"inputs": [[[[[[[[[[0.5]]]]]]]]]] if violation == "depth" else [x.tolist()]}
        if vector:
            doc[vector] = x.tolist()
        return wire.dumps(doc)
    if media == wire.NPY:
        return None if vector or violation in ("members", "depth") else npy_bytes(x)
    if violation == "depth":
        return None
    members = {"x": x, **({vector: x} if vector else {}), **({"a": x, "b": x, "c": x} if violation == "members" else {})}
    return npz_bytes(**members)


@pytest.mark.parametrize("kind, name, query", _ENDPOINTS, ids=[f"{k}-{n}" for k, n, _ in _ENDPOINTS])
def test_every_limit_is_refused_alike_on_every_endpoint_and_format(limited, kind: str, name: str, query: str) -> None:
    """The same oversized, over-ranked, over-deep or over-many input is refused with the
    same status, code and limit named, whichever endpoint and format it comes in (a
    streamed or sparse answer included), and nothing is computed: the engine saw none."""
    before = _engine_calls(limited)
    seen = 0
    for violation, (status, code, says) in _LIMITS.items():
        for media in (wire.JSON, wire.NPY, wire.NPZ):
            body = _violating_body(kind, violation, media)
            if body is None:
                continue
            r = limited.post(f"/v1/functions/{name}/{kind}{query}", content=body,
                             headers={"content-type": media, "accept": wire.NPY if name == "softmax" else wire.JSON})
            detail = assert_problem(r, status, code)["detail"]
            assert says in detail, (violation, media, detail)
            seen += 1
        # query-string options past int64 too (argnums is taken, or moot, everywhere)
        r = limited.post(f"/v1/functions/{name}/{kind}{query}{'&' if query else '?'}argnums=99999999999999999999",
                         content=wire.dumps({"inputs": [[0.5]], **({_VECTOR[kind]: [1.0]} if kind in _VECTOR else {})}),
                         headers=JSON)
        assert "beyond the range of int64" in assert_problem(r, 422, "invalid_input")["detail"]
    assert seen >= 8
    assert _engine_calls(limited) == before
    # (and the app still computes: the count moves for a request within the limits)
    assert limited.post("/v1/functions/sin/evaluate", json={"inputs": [[0.5]]}).status_code == 200
    assert _engine_calls(limited) == before + 1


def _engine_calls(c: TestClient) -> float:
    text = c.get("/metrics").text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("jacobian_service_batch_size_count "))


# ------------------------------------------------------------ X-Request-Timeout on streamed answers


@pytest.mark.parametrize("accept", [wire.NPY, wire.JSON])
def test_a_streamed_answer_keeps_the_clients_request_timeout_for_each_chunk(accept: str) -> None:
    """Each row chunk of a streamed Jacobian gets the request timeout afresh, but it was
    the server's (60 s) whatever the client's X-Request-Timeout said: a client that asked
    for 0.5 s got 3 s of chunks of a second each (and a chunk that hung held the engine
    60 s). Now each chunk gets the client's 0.5 s: the first is cut, the stream aborted
    (a short body, never one that looks whole), the engine asked for nothing more."""
    x = np.ones(3, np.float32)
    with TestClient(create_app(Settings(warmup=False, functions="tests.hostile10_client_functions", stream_threshold_bytes=0)),
                    raise_server_exceptions=False) as c:
        r = c.post("/v1/functions/slow_chunks/jacobian?chunk_size=1", content=npy_bytes(x),
                   headers={"content-type": wire.NPY, "accept": accept, "x-request-timeout": "0.5"})
        assert r.status_code == 200  # the head went out in time
        if accept == wire.NPY:
            assert len(r.content) < len(npy_bytes(np.eye(3, dtype=np.float32)))
        else:
            assert r.content.startswith(b'{"function":"slow_chunks"') and not r.content.endswith(b"}}")
            with pytest.raises(ValueError):
                r.json()
        streamed = next(line for line in c.get("/metrics").text.splitlines()
                        if line.startswith("jacobian_service_streamed_bytes_total"))
        assert float(streamed.split()[1]) == 0.0  # no chunk came: the first was cut


@pytest.mark.parametrize("media, body", [(wire.JSON, b'{"inputs": [[0.5'), (wire.NPY, b"\x93NUMPY junk"),
                                         (wire.NPZ, b"PK junk")], ids=["json", "npy", "npz"])
def test_a_malformed_request_timeout_is_refused_before_the_body_is_read(client, media: str, body: bytes) -> None:
    """X-Request-Timeout was checked once the body had come and been parsed: a client
    with a typo in it ('5s') uploaded its whole body, held the body budget while it was
    parsed, and was told of the body's faults (a 400 here) before the header's. Now the
    header is refused first, as Content-Type and Content-Encoding are."""
    problem = assert_problem(client.post("/v1/functions/sin/jacobian", content=body,
                                         headers={"content-type": media, "x-request-timeout": "5s"}), 422, "invalid_input")
    assert problem["detail"].startswith("X-Request-Timeout must be a positive, finite number of seconds, not '5s'")


# ------------------------------------------------------------ API keys


def test_api_keys_are_compared_at_one_length_whatever_the_guess(make_client, monkeypatch) -> None:
    """Keys were compared with hmac.compare_digest as sent, which is constant-time only
    between equal lengths: it returns at once on a length that differs, so timing a
    guess told whether its length was a key's. Now every comparison is of two 32-byte
    digests, whatever was sent; the right key still passes and the others do not."""
    from jacobian_service import middleware

    c = make_client(api_keys="short-key,a-much-longer-second-key")
    lengths: list[tuple[int, int]] = []
    real = middleware.hmac.compare_digest
    monkeypatch.setattr(middleware.hmac, "compare_digest", lambda a, b: lengths.append((len(a), len(b))) or real(a, b))
    for guess in ("x", "short-ke", "short-key!", "k" * 20000, "a-much-longer-second-kex"):
        assert_problem(c.get("/v1/functions", headers={"authorization": f"Bearer {guess}"}), 403, "forbidden")
    for key in ("short-key", "a-much-longer-second-key"):
        assert c.get("/v1/functions", headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert lengths and set(lengths) == {(32, 32)}


@pytest.mark.parametrize("path, media, status, code, says", [
    ("/v1/functions/sin/jacobian?bogus=1", wire.NPY, 422, "invalid_input", "unknown option 'bogus'"),
    ("/v1/functions/sin/jacobian?chunk_size=lots", wire.NPZ, 422, "invalid_input", "chunk_size"),
    ("/v1/functions/sin/evaluate?rows=0,2", wire.NPY, 422, "invalid_input", "rows does not apply to evaluate"),
    ("/v1/functions/sin/jacobian?rows=2,1", wire.NPY, 422, "invalid_input", "rows must satisfy"),
    ("/v1/functions/sin/jacobian?sparsity=nope", wire.NPY, 422, "sparsity_not_found", "no sparsity pattern named 'nope'"),
    ("/v1/functions/add_square/jacobian", wire.NPY, 422, "invalid_input", "carries one input"),
    ("/v1/functions/sin/vjp", wire.NPY, 422, "invalid_input", "carries one input"),
    ("/v1/functions/sin/jacobian?batched=maybe", wire.JSON, 422, "invalid_input", "batched"),
    ("/v1/functions/sin/jacobian", "text/csv", 415, "unsupported_media_type", "'text/csv' is not supported"),
])
def test_what_the_url_decides_is_refused_before_the_body_is_read(client, path, media, status, code, says) -> None:
    """An option the query string gets wrong, an .npy for a call it cannot carry, a
    Content-Type not served: each was told only once the whole body had come and been
    parsed (here a body that is itself unreadable was answered 400 first), so a client
    uploaded 256 MB for a refusal its URL and headers had decided."""
    body = {wire.NPY: b"\x93NUMPY junk", wire.NPZ: b"PK junk"}.get(media, b'{"inputs": [[0.5')
    problem = assert_problem(client.post(path, content=body, headers={"content-type": media}), status, code)
    assert says in problem["detail"], problem["detail"]


def test_a_body_of_too_many_huge_literals_is_not_rewritten(client) -> None:
    """Each literal that may be past float64 costs a Python call to spell: a body of
    nothing but 1e300s beside one 1e309 would cost a front end several times its parse.
    Past 4,096 of them the body is not rewritten: the 400 orjson gave, naming the number."""
    x = ", ".join(["1e300"] * 4095)
    r = client.post("/v1/functions/sin/evaluate", content=f'{{"inputs": [[{x}, 1e309]]}}', headers=JSON)
    assert r.status_code == 200, r.text
    assert r.json()["output"]["data"][-1] == "NaN"  # sin(inf)
    problem = assert_problem(client.post("/v1/functions/sin/evaluate", content=f'{{"inputs": [[{x}, 1e300, 1e309]]}}',
                                         headers=JSON), 400, "malformed_body")
    assert "number is infinity when parsed as double" in problem["detail"]


@pytest.mark.parametrize("query", ["api_key=short-key", "access_token=short-key", "x=1&KEY=short-key"])
def test_an_api_key_in_the_query_string_is_refused_saying_why(make_client, query: str) -> None:
    """A key sent as ?api_key= is not read (URLs are logged): the 401 asked for the header
    and said nothing of the key it had been given, as if it were wrong."""
    c = make_client(api_keys="short-key")
    for r in (c.get(f"/v1/functions?{query}"), c.post(f"/v1/functions/sin/jacobian?{query}", json={"inputs": [[0.5]]})):
        detail = assert_problem(r, 401, "unauthorized")["detail"]
        assert "a key in the query string is not read" in detail and "short-key" not in detail
    assert "query string" not in assert_problem(c.get("/v1/functions?x=1"), 401, "unauthorized")["detail"]
