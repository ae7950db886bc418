"""The OpenAPI document's examples are calls that succeed: Swagger UI pre-fills "Try it
out" with them. Each function's request body is built from its declared inputs (symbolic
sizes bound to 3, pytrees nested as declared), and each the sparsity query's ``shapes``;
they were one generic schema body and "64;3", which 422'd for every function."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from jacobian_service import create_app
from jacobian_service.registry import Registry
from jacobian_service.settings import Settings

KINDS = ("jacobian", "hessian", "evaluate", "jvp")


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, device="cpu", functions="jacobian_service.examples"))) as c:
        yield c


@pytest.fixture(scope="module")
def doc(client):
    return client.get("/openapi.json").json()


@pytest.mark.parametrize("kind", KINDS)
def test_every_functions_example_body_gives_200(client, doc, kind):
    examples = doc["paths"][f"/v1/functions/{{name}}/{kind}"]["post"]["requestBody"]["content"]["application/json"]
    examples = examples["examples"]
    names = [spec.name for spec in Registry.from_modules(["jacobian_service.examples"])]
    assert list(examples) == names  # the first example is the first function Swagger offers
    for name, example in examples.items():
        r = client.post(f"/v1/functions/{name}/{kind}", json=example["value"])
        assert r.status_code == 200, (name, example["value"], r.text)


def test_pytree_inputs_are_nested_as_declared(doc):
    body = doc["paths"]["/v1/functions/{name}/jvp"]["post"]["requestBody"]["content"]["application/json"]
    value = body["examples"]["dense_layer"]["value"]
    assert value["inputs"]["params"] == {"w": [[0.5] * 3] * 3, "b": [0.5] * 3} == value["tangents"]
    assert value["inputs"]["x"] == [0.5] * 3


def test_every_shapes_example_gives_200(client, doc):
    shapes = next(p for p in doc["paths"]["/v1/functions/{name}/sparsity"]["get"]["parameters"] if p["name"] == "shapes")
    assert "example" not in shapes["schema"]
    assert shapes["examples"]["add_square"]["value"] == "3;3"
    assert shapes["examples"]["reaction_diffusion"]["value"] == "3,3"
    for name, example in shapes["examples"].items():
        r = client.get(f"/v1/functions/{name}/sparsity", params={"shapes": example["value"]})
        assert r.status_code == 200, (name, example["value"], r.text)


def test_a_function_declaring_a_large_input_gets_no_example():
    """Its example would carry every number (16M for a 4096 x 4096 input) on every fetch
    of /openapi.json; the others keep theirs."""
    from jacobian_service.openapi import _request_examples

    big = {"name": "big", "inputs": [{"name": "x", "shape": [4096, 4096], "dtype": "float32"}]}
    small = {"name": "small", "inputs": [{"name": "x", "shape": ["n"], "dtype": "floating"}]}
    examples = _request_examples("jacobian", [big, small])
    assert list(examples) == ["small"] and examples["small"]["value"] == {"inputs": {"x": [0.5] * 3}}


def _guarded(doc) -> dict[str, bool]:
    """Each operation: does the document say it wants a key (security and a 401)?"""
    out = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            wants = "security" in op
            assert wants == ("401" in op["responses"]) == ("403" in op["responses"]), (method, path)
            out[f"{method.upper()} {path}"] = wants
    return out


@pytest.mark.parametrize("keys, metrics_auth", [("", False), ("k1", False), ("k1", True)])
def test_the_document_asks_for_a_key_exactly_where_the_server_does(keys, metrics_auth):
    """Without API keys the document demanded a bearer key on every operation and
    promised 401/403: generated clients and fuzzers (schemathesis: "API accepts requests
    without authentication") were told of an auth that was off; with keys, /metrics was
    marked as guarded while METRICS_AUTH (off by default) left it open. Each operation
    now says what the live server does, checked by calling it without a key."""
    settings = Settings(warmup=False, device="cpu", functions="jacobian_service.examples", api_keys=keys,
                        metrics_auth=metrics_auth, docs_auth=False)
    with TestClient(create_app(settings)) as c:
        doc = c.get("/openapi.json").json()
        assert ("securitySchemes" in doc["components"]) == bool(keys)
        for operation, wants in _guarded(doc).items():
            method, path = operation.split(" ", 1)
            r = c.request(method, path.replace("{name}", "sin"), params={"shapes": "3"}, json={"inputs": [[0.5]]})
            assert (r.status_code == 401) == wants, (operation, r.status_code, r.text)
