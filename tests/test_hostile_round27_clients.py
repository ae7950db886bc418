"""Red team, round twenty-seven: hostile clients at the edges of a JSON body and of the
conditional requests round 26 added (a body nested past the JSON reader's own limit,
refused in other words than the same limit below it; a docs file's If-None-Match
answered 304 before its false If-Match, and its tag list split inside a quoted tag).

Each names what a user saw before. The cases run on the session's in-process app
(``client``): what is checked is decided before any engine computes.
"""

from __future__ import annotations

import pytest

from .conftest import assert_problem

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
