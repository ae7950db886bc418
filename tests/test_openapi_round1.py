"""The OpenAPI document held to the server's real answers (an outside tester's round:
schemathesis over /openapi.json of a real ``serve``, then each finding checked here
without it): what the document offers as valid the server takes, what it says an answer
carries the answer carries, and every member an answer sends the document names."""

from __future__ import annotations

import jsonschema
import pytest
from referencing import Registry as SchemaRegistry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.testclient import TestClient

from jacobian_service import create_app
from jacobian_service.settings import Settings

FUNCTIONS = "jacobian_service.examples,tests.complex1_functions,tests.schema1_functions"


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, device="cpu", functions=FUNCTIONS))) as c:
        yield c


@pytest.fixture(scope="module")
def doc(client):
    return client.get("/openapi.json").json()


def _valid(doc, schema, value) -> bool:
    """``value`` against ``schema`` (its $refs into the document's components)."""
    registry = SchemaRegistry().with_resource("urn:doc", Resource.from_contents(doc, default_specification=DRAFT202012))

    def rebased(node):
        if isinstance(node, dict):
            return {k: "urn:doc" + v if k == "$ref" else rebased(v) for k, v in node.items()}
        return [rebased(v) for v in node] if isinstance(node, list) else node

    return jsonschema.Draft202012Validator(rebased(schema), registry=registry).is_valid(value)


def _param(doc, path, method, name):
    return next(p for p in doc["paths"][path][method]["parameters"] if p["name"] == name)


def test_every_shapes_example_is_a_query_the_server_answers(client, doc):
    """The sparsity query's ``shapes`` examples were offered for every function of plain
    array inputs: a function with a complex input (torch.func has no Jacobian of it) and
    one whose first input is an integer (argnums 0, as the example leaves it) got one
    that was a 422. The jacobian's body examples already left those out."""
    examples = _param(doc, "/v1/functions/{name}/sparsity", "get", "shapes")["examples"]
    assert {"csquare", "abs2", "mixed", "int_first"}.isdisjoint(examples)
    assert {"sin", "reaction_diffusion", "lorenz96"} <= set(examples)
    for name, example in examples.items():
        r = client.get(f"/v1/functions/{name}/sparsity", params={"shapes": example["value"]})
        assert r.status_code == 200, (name, example["value"], r.text)


def test_argnums_schemas_leave_out_what_the_server_refuses(client, doc):
    """argnums was any integer, any string or any list, in the body and the query string:
    "" , [], [0, 0], 2**70 (body) and "", "," (query) were valid to the document and each
    a 422, which schemathesis reported as valid requests refused. Now each is outside the
    schema, and what is inside it the server takes."""
    body_schema = {"$ref": "#/components/schemas/JacobianRequest"}
    inputs = {"inputs": [[1.0, 2.0], [3.0, 4.0]]}
    for argnums in ("", [], [0, 0], 2**70, ["x", 1, 1]):
        assert not _valid(doc, body_schema, {**inputs, "argnums": argnums}), argnums
        r = client.post("/v1/functions/add_square/jacobian", json={**inputs, "argnums": argnums})
        assert r.status_code == 422, (argnums, r.text)
    for argnums in (0, -1, "y", [0, "y"], [1]):
        assert _valid(doc, body_schema, {**inputs, "argnums": argnums}), argnums
        r = client.post("/v1/functions/add_square/jacobian", json={**inputs, "argnums": argnums})
        assert r.status_code == 200, (argnums, r.text)
    for path, method, call in (
            ("/v1/functions/{name}/jacobian", "post",
             lambda q: client.post("/v1/functions/add_square/jacobian", json=inputs, params={"argnums": q})),
            ("/v1/functions/{name}/sparsity", "get",
             lambda q: client.get("/v1/functions/add_square/sparsity", params={"shapes": "2;2", "argnums": q}))):
        schema = _param(doc, path, method, "argnums")["schema"]
        for q in ("", ",", ",,"):
            assert not _valid(doc, schema, q), (path, q)
            assert call(q).status_code == 422, (path, q)
        for q in ("0", "0,", "x,1", "1"):
            assert _valid(doc, schema, q), (path, q)
            assert call(q).status_code == 200, (path, q, call(q).text)


@pytest.mark.parametrize("kind,body", [
    ("evaluate", {"inputs": [[[1.0, 2.0], [3.0, 4.0]]], "batched": True, "chunk_size": 1, "mode": "fwd"}),
    ("vjp", {"inputs": [[1.0, 2.0]], "cotangents": [[1.0, 0.0], [0.0, 1.0]], "batched_vectors": True,
             "chunk_size": 1, "mode": "fwd"}),
    ("jvp", {"inputs": [[1.0, 2.0]], "tangents": [[1.0, 0.0], [0.0, 1.0]], "batched_vectors": True,
             "chunk_size": 1, "mode": "fwd"}),
    ("hvp", {"inputs": [[1.0, 2.0]], "tangents": [[1.0, 0.0], [0.0, 1.0]], "batched_vectors": True,
             "chunk_size": 1, "mode": "fwd"}),
    ("jacobian", {"inputs": [[1.0, 2.0]], "chunk_size": 1, "mode": "rev"}),
    ("hessian", {"inputs": [[1.0, 2.0, 3.0]], "sparsity": "auto"}),
])
def test_the_meta_headers_documented_are_the_ones_sent(client, doc, kind, body):
    """X-Chunk-Size and X-Mode were documented on every derivative answer, but an
    evaluate, vjp, jvp or hvp has no chunks and no mode (meta says null) and never sent
    them, whatever chunk_size or mode the request gave: a generated client exposed two
    headers that never came. They are documented where a Jacobian or Hessian sends them."""
    function = "rosenbrock" if kind in ("hvp", "hessian") else "sin"
    r = client.post(f"/v1/functions/{function}/{kind}", json=body)
    assert r.status_code == 200, r.text
    documented = doc["paths"][f"/v1/functions/{{name}}/{kind}"]["post"]["responses"]["200"]["headers"]
    for header, key in (("X-Chunk-Size", "chunk_size"), ("X-Mode", "mode")):
        sent = r.json()["meta"][key] is not None
        assert (header in documented) == (kind in ("jacobian", "hessian")), (kind, header)
        assert (header.lower() in r.headers) == sent
        if sent:
            assert header in documented, (kind, header)


def test_answers_send_no_member_their_schema_leaves_out(client, doc):
    """A function declaring sparsity patterns is described with a ``sparsity`` member the
    Function schema did not name (a generated client's model dropped it), and the
    quarantine release answered an object of no schema. Each member sent is now named."""
    schemas = doc["components"]["schemas"]
    described = client.get("/v1/functions/lorenz96").json()
    assert set(described) <= set(schemas["Function"]["properties"])
    assert _valid(doc, {"$ref": "#/components/schemas/Function"}, described)
    assert not _valid(doc, {"$ref": "#/components/schemas/Function"}, {**described, "sparsity": {"band": {}}})
    for listed in client.get("/v1/functions").json():
        assert set(listed) <= set(schemas["Function"]["properties"]), listed["name"]
    released = client.delete("/v1/functions/sin/quarantine")
    assert released.status_code == 200
    ok = doc["paths"]["/v1/functions/{name}/quarantine"]["delete"]["responses"]["200"]["content"]["application/json"]
    assert _valid(doc, ok["schema"], released.json())
    assert set(released.json()) == set(schemas["Released"]["properties"]) == {"function", "released"}
