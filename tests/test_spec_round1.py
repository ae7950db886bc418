"""SPEC conformance, round one: SPEC.md read line by line against the service, each case
a statement no test held the service to, or a difference found doing so.

In-process (the session's ``client``): every case here is decided by the app's layers,
not by a socket.
"""

from __future__ import annotations

import pytest

from jacobian_client import wire


@pytest.fixture(scope="module")
def doc(client):
    return client.get("/openapi.json").json()


# One request per operation of the document that its handler answers 2xx, so that what
# a layer in front (or the router's conditions after it) makes of it is the only change.
_PATHS = {"/v1/functions/{name}/sparsity": "/v1/functions/sin/sparsity?shapes=3"}


def _operations(doc):
    for path, ops in doc["paths"].items():
        for method in ops:
            yield method.upper(), path, _PATHS.get(path, path.replace("{name}", "sin"))


def _listed(doc, method, path, response):
    """The answer is one the document lists for this operation, and, a problem, under
    its code's name (the description joins the codes of one status)."""
    listed = doc["paths"][path][method.lower()]["responses"]
    assert str(response.status_code) in listed, (method, path, response.status_code, sorted(listed))
    if response.status_code >= 400:
        assert response.headers["content-type"] == wire.PROBLEM
        code = response.json()["code"]
        assert code in listed[str(response.status_code)]["description"].split(" / "), (method, path, code)
    assert "X-Request-ID" in listed[str(response.status_code)]["headers"]
    assert response.headers["x-request-id"]  # (the document says every answer has one)


def test_every_operation_lists_what_the_layers_in_front_of_it_answer(client, doc):
    """SPEC 3.4's codes that no route's handler raises, which the middleware answers for
    any route: an ``Expect`` other than 100-continue (417 ``expectation_failed``), a
    transfer coding other than chunked (501 ``unsupported_transfer_coding``), a
    ``Content-Type`` given twice (400 ``malformed_request``). The document listed each
    operation's handler codes alone: ``GET /v1/functions`` said 200 and nothing else, and
    no operation named 417, 501 or ``malformed_request``, though the server answers them
    on every path (before: ``"417" not in responses`` for all 14 operations)."""
    seen = set()
    for method, path, url in _operations(doc):
        body = {"json": {"inputs": [[1.0]]}} if method == "POST" else {}
        for headers in ({"expect": "x-fast"}, {"transfer-encoding": "gzip, chunked"}):
            r = client.request(method, url, headers=headers, **body)
            _listed(doc, method, path, r)
            seen.add((r.status_code, r.json()["code"]))
        twice = [("content-type", "application/json"), ("content-type", "application/json")]
        r = client.request(method, url, headers=twice, content=b'{"inputs": [[1.0]]}' if method == "POST" else b"")
        _listed(doc, method, path, r)
        seen.add((r.status_code, r.json()["code"]))
    assert seen == {(417, "expectation_failed"), (501, "unsupported_transfer_coding"), (400, "malformed_request")}


def test_every_get_lists_the_412_and_304_its_conditions_answer(client, doc):
    """README (Endpoints): on a GET an ``If-Match`` naming no ETag of the answer is a 412
    ``precondition_failed``, and ``If-None-Match: *`` on one that would be a 200 a 304.
    The router evaluates both on every GET's answer; the document listed 412 only for
    the POSTs and the DELETE, and 304 nowhere (before: ``GET /healthz`` listed 200 alone)."""
    gets = [(m, p, u) for m, p, u in _operations(doc) if m == "GET"]
    assert len(gets) == 7
    for method, path, url in gets:
        r = client.get(url, headers={"if-match": '"v1"'})
        assert r.status_code == 412, (path, r.text)
        _listed(doc, method, path, r)
        r = client.get(url, headers={"if-none-match": "*"})
        assert (r.status_code, r.content) == (304, b""), path
        _listed(doc, method, path, r)


_KINDS = ("jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp")
# SPEC 3.1's request body, as written there, sent to every endpoint (sum_sin: one input,
# a 0-d output), with the vectors an endpoint requires.
_SPEC_BODY = {"inputs": [[0.1, 0.2]], "argnums": 0, "chunk_size": None, "batched": False, "return_output": False}
_VECTORS = {"vjp": {"cotangents": 1.0}, "jvp": {"tangents": [1.0, 0.0]}, "hvp": {"tangents": [1.0, 0.0]}}
# A value other than its default for every option, each valid where the option applies.
_OTHER = {"argnums": [0], "chunk_size": 2, "batched": True, "in_dims": 1, "out_dims": 1, "return_output": True,
          "rows": [0, 1], "mode": "fwd", "sparsity": "auto", "sparse_format": "coo", "batched_vectors": True}


def _validator(doc, kind):
    import jsonschema

    schema = {**doc["components"]["schemas"][f"{kind.capitalize()}Request"], "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("kind", _KINDS)
def test_each_request_schema_takes_the_bodies_the_server_takes(client, doc, kind):
    """SPEC 3.1 gives one request body for every endpoint, and the server takes it on
    each (README: an option an endpoint does not take is accepted at its default, and
    chunk_size and mode anywhere, where they cannot change the answer). The document's
    request schemas were closed on each endpoint's own options: SPEC's body with a vjp's
    cotangents answered 200, and the vjp schema called it invalid (``'batched',
    'chunk_size' were unexpected``), so a gateway or client validating requests against
    /openapi.json refused what the server serves. Now the schema and the server agree on
    every option an endpoint does not take: at its default, and at another value (taken
    where moot, else a 422 naming it)."""
    from jacobian_service.parsing import OPTION_KINDS, Options, options_of

    validator = _validator(doc, kind)
    url = f"/v1/functions/sum_sin/{kind}"
    body = {**_SPEC_BODY, **_VECTORS.get(kind, {})}
    assert list(validator.iter_errors(body)) == []
    assert client.post(url, json=body).status_code == 200
    for name in OPTION_KINDS:
        if name in options_of(kind):
            continue
        for value in (Options.model_fields[name].default, _OTHER[name]):
            sent = {**_VECTORS.get(kind, {}), "inputs": [[0.1, 0.2]], name: value}
            r = client.post(url, json=sent)
            assert r.status_code in (200, 422), (name, value, r.text)
            errors = [e.message for e in validator.iter_errors(sent)]
            assert (r.status_code == 200) == (errors == []), (kind, name, value, r.status_code, errors)
            if r.status_code == 422:
                assert name in r.json()["detail"]


def test_the_array_schemas_hold_every_array_form_the_server_reads_and_writes(client, doc):
    """SPEC 3.1: an array is a number, a nested list or an object; README: NaN and the
    infinities travel spelled ("NaN", "Infinity", "-Infinity"), a bare 0-d one alike.
    The document's ArrayTree (a vjp's cotangents, a jvp's tangents, every result) held
    {dtype, shape, data} alone and its numbers no spelled one: a 0-d output's cotangent
    ``1.0`` or ``"NaN"``, which the server answers 200, was invalid against the vjp
    schema, and evaluate's 0-d NaN answer (``"data": "NaN"``) matched no array form."""
    import jsonschema

    def valid(name, instance):
        schema = {**doc["components"]["schemas"][name], "components": doc["components"]}
        return not list(jsonschema.Draft202012Validator(schema).iter_errors(instance))

    for cotangent in (1.0, "NaN", "-Infinity", {"dtype": "float32", "shape": [], "data": "Infinity"}):
        body = {"inputs": [[0.1, 0.2]], "cotangents": cotangent}
        assert client.post("/v1/functions/sum_sin/vjp", json=body).status_code == 200, cotangent
        assert valid("VjpRequest", body), cotangent
    r = client.post("/v1/functions/sum_sin/evaluate", json={"inputs": [["Infinity", 0.0]]})
    assert r.json()["output"] == {"dtype": "float32", "shape": [], "data": "NaN"}
    assert valid("ArrayData", r.json()["output"]) and valid("EvaluateResponse", r.json())
    wrong = {"inputs": [[0.1, 0.2]], "cotangents": "inf"}  # (not how JSON's readers spell it)
    assert client.post("/v1/functions/sum_sin/vjp", json=wrong).status_code == 422
    assert not valid("VjpRequest", wrong) and not valid("Array", "nan")


def test_meta_holds_what_spec_says_on_every_endpoint_and_the_schema_requires_it(client, doc):
    """SPEC 3.3: ``meta`` holds at least the device, the chunk size used, the batch size
    it ran in, and queue and compute milliseconds. Every endpoint's answers hold them
    (plain, per-example, stacked vectors, sparse); the Meta schema required none, so a
    generated client typed each as optional. Each answer below validates against its
    endpoint's response schema, which now requires the five."""
    import jsonschema

    spec = ["device", "chunk_size", "batch_size", "queue_ms", "compute_ms"]
    assert doc["components"]["schemas"]["Meta"]["required"] == spec
    x = [0.1, 0.2, 0.3]
    calls = [("jacobian", "lorenz96", {"inputs": [[0.1] * 8], "sparsity": "auto"}),
             ("jacobian", "sin", {"inputs": [[x, x]], "batched": True, "return_output": True}),
             ("hessian", "sum_sin", {"inputs": [x], "sparsity": "auto"}),
             ("hessian", "sum_sin", {"inputs": [[x, x]], "batched": True}),
             ("evaluate", "sin_aux", {"inputs": [x]}),
             ("vjp", "sin", {"inputs": [x], "cotangents": [[1, 0, 0], [0, 1, 0]], "batched_vectors": True}),
             ("jvp", "polar", {"inputs": [x, x], "argnums": [0, 1], "tangents": [x, x]}),
             ("hvp", "sum_sin", {"inputs": [x], "tangents": x})]
    for kind, name, body in calls:
        r = client.post(f"/v1/functions/{name}/{kind}", json=body)
        assert r.status_code == 200, (kind, name, r.text)
        assert set(spec) <= set(r.json()["meta"]), (kind, name, r.json()["meta"])
        schema = {**doc["components"]["schemas"][f"{kind.capitalize()}Response"], "components": doc["components"]}
        assert not [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(r.json())], (kind, name)


def test_406_is_for_the_answers_whose_format_accept_picks(client):
    """SPEC 3.4's 406 (an Accept that cannot carry this result) on the endpoints whose
    answer Accept chooses; the GETs of one format answer it whatever Accept says, a
    difference from a strict reading of SPEC that README's error table states."""
    npy = {"accept": "application/x-npy"}
    for url in ("/v1/functions", "/v1/functions/sin", "/v1/info", "/healthz", "/readyz"):
        r = client.get(url, headers=npy)
        assert (r.status_code, r.headers["content-type"]) == (200, "application/json"), url
    assert client.get("/metrics", headers=npy).headers["content-type"].startswith("text/plain")
    r = client.get("/v1/functions/sin/sparsity?shapes=3", headers=npy)
    assert (r.status_code, r.json()["code"]) == (406, "not_acceptable")
    r = client.post("/v1/functions/sin_aux/jacobian", json={"inputs": [[0.1, 0.2]]}, headers=npy)
    assert (r.status_code, r.json()["code"]) == (406, "not_acceptable")
    assert "application/x-npz" in r.json()["detail"]  # (SPEC 3.3: 406 pointing at application/x-npz)
