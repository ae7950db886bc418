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


def test_every_hvp_example_gives_200_where_the_function_has_an_hvp(client, doc):
    """hvp had no examples, so Swagger UI pre-filled a body made from the schema
    (inputs [0, [0, ["string"], ...]]) that no function takes. Each function's example
    now has tangents shaped as its first input: 200 for every scalar function, and the
    others are told why hvp does not apply to them."""
    body = doc["paths"]["/v1/functions/{name}/hvp"]["post"]["requestBody"]["content"]["application/json"]
    examples = body["examples"]
    assert list(examples) == [spec.name for spec in Registry.from_modules(["jacobian_service.examples"])]
    answered = {}
    for name, example in examples.items():
        r = client.post(f"/v1/functions/{name}/hvp", json=example["value"])
        answered[name] = r.status_code
        if r.status_code != 200:
            assert r.status_code == 422 and r.json()["detail"] == (
                "hvp needs a function with one scalar (0-d) output, or 'cotangents' shaped like its output "
                "(c . H t, a vector-Hessian-vector product)"), r.text
    assert answered["rosenbrock"] == answered["sum_sin"] == 200


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


def _sample(name, schema):
    """A value of a query parameter's schema, as a query string spells it."""
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("type") == "boolean":
        return "false"
    if schema.get("pattern") == "^-?[0-9]+,-?[0-9]+$":
        return "0,1"
    if schema.get("type") == "integer":
        return str(schema.get("minimum", 1))
    return {"argnums": "0", "sparsity": "dense", "in_dims": "0", "out_dims": "0"}[name]


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"])
def test_every_option_is_a_documented_query_parameter_the_server_takes(client, doc, kind):
    """SPEC 3.2: with an .npy or .npz body the options go in the query string. The
    document listed no query parameter for the derivative endpoints, so generated
    clients and Swagger UI could send a binary body but never argnums, chunk_size, rows,
    batched, ... Each option is now documented in its query form (and the deadline
    header), and each documented value is one the server takes."""
    import io

    import numpy as np

    from jacobian_service.parsing import Options, options_of

    op = doc["paths"][f"/v1/functions/{{name}}/{kind}"]["post"]
    query = {p["name"]: p["schema"] for p in op["parameters"] if p["in"] == "query"}
    assert set(query) == set(options_of(kind)) and set(query) <= set(Options.model_fields)
    assert any(p["name"] == "X-Request-Timeout" and p["in"] == "header" for p in op["parameters"])
    x = np.array([0.1, 0.2, 0.3])
    files = {"x": x, **({"cotangents": np.array(1.0)} if kind == "vjp" else {"tangents": x} if kind in ("jvp", "hvp") else {})}
    buf = io.BytesIO()
    np.savez(buf, **files)
    for name, schema in query.items():
        if name == "rows" and kind != "jacobian":
            continue  # rows of a Jacobian only
        value = "auto" if name == "sparsity" and kind in ("jacobian", "hessian") else _sample(name, schema)
        beside = {"sparsity": "auto"} if name == "sparse_format" else {}  # (a sparse result's format)
        r = client.post(f"/v1/functions/sum_sin/{kind}", params={name: value, **beside}, content=buf.getvalue(),
                        headers={"content-type": "application/x-npz", "accept": "application/json", "x-request-timeout": "30"})
        assert r.status_code == 200, (name, value, r.text)


# Each option set away from its default, as a query string spells it.
_SET = {"argnums": "0", "chunk_size": "1", "batched": "true", "return_output": "true", "rows": "0,1",
        "mode": "fwd", "sparsity": "auto", "sparse_format": "coo", "batched_vectors": "true", "in_dims": "-1",
        "out_dims": "-1"}


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"])
def test_an_endpoint_offers_the_query_options_it_takes_and_no_other(client, doc, kind):
    """Every derivative endpoint offered every option, so Swagger UI showed rows,
    sparsity, batched and batched_vectors fields where the server refuses each whatever
    its value (rows on a hessian, sparsity on an evaluate, batched_vectors on a jacobian,
    batched on a vjp): filled in, a 422. Each offered option, set, now answers 200;
    each one left out is refused where it would change the answer (batched on a vjp),
    except given its default (argnums=0), which asks for nothing; one that cannot change
    it there (chunk_size, mode; argnums on an evaluate) is taken, unused."""
    import io

    import numpy as np

    from jacobian_service.parsing import Options

    op = doc["paths"][f"/v1/functions/{{name}}/{kind}"]["post"]
    offered = {p["name"] for p in op["parameters"] if p["in"] == "query"}
    assert set(_SET) == set(Options.model_fields)
    for name in Options.model_fields:
        batch = (1,) if name in ("batched", "batched_vectors") else ()
        # vmap's dims are for per-example requests: batched=true beside them where offered
        dims = {"batched": "true"} if name in ("in_dims", "out_dims") and name in offered else {}
        # (and sparse_format a sparse result: sparsity beside it)
        dims = {"sparsity": "auto"} if name == "sparse_format" and name in offered else dims
        x = np.full((1, 3), 0.5) if name == "batched" or "batched" in dims else np.full(3, 0.5)
        vectors = {"vjp": {"cotangents": np.ones(batch)}, "jvp": {"tangents": np.ones(batch + (3,))},
                   "hvp": {"tangents": np.ones(batch + (3,))}}.get(kind, {})
        buf = io.BytesIO()
        np.savez(buf, x=x, **vectors)
        r = client.post(f"/v1/functions/sum_sin/{kind}", params={name: _SET[name], **dims}, content=buf.getvalue(),
                        headers={"content-type": "application/x-npz", "accept": "application/json"})
        moot = name in ("chunk_size", "mode") or (kind == "evaluate" and name in ("argnums", "return_output"))
        if name in offered or moot or (name, _SET[name]) == ("argnums", "0"):
            assert r.status_code == 200, (name, r.text)
        else:
            assert r.status_code == 422 and r.json()["code"] == "invalid_input", (name, r.text)
            assert r.json()["detail"].startswith(f"{name} does not apply to {kind} ("), r.text
    assert offered == {
        "jacobian": {"argnums", "chunk_size", "batched", "in_dims", "out_dims", "return_output", "rows", "mode", "sparsity",
                     "sparse_format"},
        "hessian": {"argnums", "chunk_size", "batched", "in_dims", "out_dims", "return_output", "sparsity", "sparse_format"},
        "evaluate": {"batched", "in_dims", "out_dims"},
    }.get(kind, {"argnums", "return_output", "batched_vectors"})


def test_query_options_with_a_binary_body_equal_the_json_bodys():
    """argnums as names and rows in their documented query forms give what the JSON
    body's options give."""
    import io

    import numpy as np

    with TestClient(create_app(Settings(warmup=False, device="cpu", functions="jacobian_service.examples"))) as c:
        x, y = [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]
        buf = io.BytesIO()
        np.savez(buf, x=np.array(x, np.float32), y=np.array(y, np.float32))
        query = c.post("/v1/functions/add_square/jacobian", params={"argnums": "x,y", "rows": "1,3"},
                       content=buf.getvalue(), headers={"content-type": "application/x-npz"}).json()
        body = c.post("/v1/functions/add_square/jacobian", json={"inputs": {"x": x, "y": y}, "argnums": ["x", "y"],
                                                                 "rows": [1, 3]}).json()
        assert query["jacobian"] == body["jacobian"]
        assert [j["shape"] for j in body["jacobian"]] == [[2, 3], [2, 3]]


def test_the_document_names_the_response_headers_the_server_sends():
    """SPEC 3: every response carries X-Request-ID; a 401 says WWW-Authenticate, a 429
    Retry-After, a binary answer its Content-Disposition. The document named no response
    header, so generated clients did not expose them and header checks held the server to
    nothing. Every response of every operation now names X-Request-ID, and each header
    the document says is required is in the live answer, matching its schema."""
    import io
    import re

    import numpy as np

    settings = Settings(warmup=False, device="cpu", functions="jacobian_service.examples", api_keys="k1", docs_auth=False)
    with TestClient(create_app(settings)) as c:
        doc = c.get("/openapi.json").json()
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                for status, response in op["responses"].items():
                    assert response["headers"]["X-Request-ID"]["required"], (method, path, status)
        buf = io.BytesIO()
        np.save(buf, np.ones(3, np.float32))
        key = {"authorization": "Bearer k1"}
        answers = [
            ("/v1/functions/{name}/jacobian", c.post("/v1/functions/sin/jacobian", json={"inputs": [[1.0]]}, headers=key)),
            ("/v1/functions/{name}/jacobian", c.post("/v1/functions/sin/jacobian", content=buf.getvalue(),
                                                     headers={**key, "content-type": "application/x-npy", "accept": "application/x-npy"})),
            ("/v1/functions/{name}/jacobian", c.post("/v1/functions/nope/jacobian", json={"inputs": [[1.0]]}, headers=key)),
            ("/v1/functions/{name}/jacobian", c.post("/v1/functions/sin/jacobian", json={"inputs": [[1.0]]})),
            ("/v1/functions/{name}/jacobian", c.post("/v1/functions/sin/jacobian", json={"inputs": [[1.0]], "rows": [5, 9]},
                                                     headers=key)),
            ("/v1/functions/{name}/sparsity", c.get("/v1/functions/sin/sparsity", params={"shapes": "3"}, headers=key)),
            ("/readyz", c.get("/readyz")),
        ]
        for path, r in answers:
            op = doc["paths"][path]["get" if r.request.method == "GET" else "post"]
            for name, header in op["responses"][str(r.status_code)]["headers"].items():
                if header.get("required"):
                    assert name in r.headers, (path, r.status_code, name)
                if name in r.headers and "pattern" in header["schema"]:
                    assert re.fullmatch(header["schema"]["pattern"], r.headers[name]), (name, r.headers[name])
                if name in r.headers and "const" in header["schema"]:
                    assert r.headers[name] == header["schema"]["const"]
        assert [r.status_code for _, r in answers] == [200, 200, 404, 401, 422, 200, 200]
        assert answers[1][1].headers["content-disposition"] == 'attachment; filename="sin-jacobian.npy"'


def test_query_options_carry_no_default_for_swagger_to_fill_in(client, doc):
    """Swagger UI's "Try it out" fills each query parameter with its schema's default:
    a JSON body that set argnums (or batched, ...) itself was then refused, the option
    given twice. The defaults are in the descriptions instead, and the pre-filled example
    bodies with the option set in the body answer 200."""
    for kind in ("jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"):
        for p in doc["paths"][f"/v1/functions/{{name}}/{kind}"]["post"]["parameters"]:
            assert "default" not in p["schema"], (kind, p["name"])
    batched = next(p for p in doc["paths"]["/v1/functions/{name}/jacobian"]["post"]["parameters"] if p["name"] == "batched")
    assert "(left out: false)" in batched["description"]
    r = client.post("/v1/functions/add_square/jacobian", json={"inputs": [[1.0], [2.0]], "argnums": [0, 1], "batched": False})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"])
def test_request_schemas_refuse_the_members_the_server_refuses(client, doc, kind):
    """The request schemas allowed any other member, which the server refuses (422):
    fuzzers built "valid" bodies the server then rejected, and generated clients offered
    an additional_properties bag that could only fail. Each schema now closes its members,
    and a member it does not list is a 422 naming it."""
    schema = doc["components"]["schemas"][f"{kind.capitalize()}Request"]
    assert schema["additionalProperties"] is False
    body = {"inputs": [[0.1, 0.2]], **{m: [1.0, 0.0] for m in ("tangents", "cotangents") if m in schema["properties"]}}
    if "cotangents" in body:  # sum_sin's output is 0-d (hvp's are optional: c . H t)
        body["cotangents"] = 1.0
    assert client.post(f"/v1/functions/sum_sin/{kind}", json=body).status_code == 200
    for extra in ("foo", *({"tangents", "cotangents"} - set(schema["properties"]))):
        r = client.post(f"/v1/functions/sum_sin/{kind}", json={**body, extra: [1.0, 0.0]})
        assert r.status_code == 422 and extra in r.json()["detail"], (extra, r.text)


def test_array_forms_require_only_what_the_server_needs(client, doc):
    """SPEC 3.1: without a dtype an array takes the dtype the function declares, and
    nested data carries its own shape. The schemas required dtype for base64 arrays and
    shape for data arrays, so generated clients could not send the forms the server
    takes (below, each one a 200)."""
    import base64

    import numpy as np

    schemas = doc["components"]["schemas"]
    assert schemas["ArrayData"]["required"] == ["data"]
    assert schemas["ArrayBase64"]["required"] == ["shape", "base64"]
    raw = base64.b64encode(np.array([1.0, 2.0], "<f4").tobytes()).decode()
    for array in ({"data": [1.0, 2.0]}, {"shape": [2], "base64": raw}):
        r = client.post("/v1/functions/sin/evaluate", json={"inputs": [array]})
        assert r.status_code == 200, (array, r.text)
        assert r.json()["output"]["dtype"] == "float32"
        np.testing.assert_allclose(r.json()["output"]["data"], np.sin([1.0, 2.0]), rtol=1e-6)
