"""The option contract and torch.func's errors, endpoint by endpoint, against
tests/parity8_functions.py and the built-ins:

- an option an endpoint does not take (or no endpoint takes) is a 422 naming it and
  the options the endpoint takes, unless given its default; the OpenAPI document
  offers each endpoint its own options only, and the SDK sends no other;
- ``meta.chunk_size`` is the rows one vmap took, never more than there were;
- an error inside nested cotangents / tangents names its path (``cotangents.a[0]``);
- where torch.func raises (argnums out of range or repeated, outputs it cannot
  differentiate or the wire cannot carry), a 4xx or 500 ``function_error`` saying so,
  never a 200 or an ``internal_error``.

Values are compared with in-process torch.func. One in-process app serves the module."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from jacobian_client import Client, wire
from jacobian_service.parsing import OPTION_KINDS, options_of

from torch.func import hessian, jacrev, jvp, vjp

from . import parity8_functions as F
from .conftest import assert_problem, ready_app

FUNCTIONS = "tests.parity8_functions,jacobian_service.examples"
X = [0.1, -0.2, 0.3]
KINDS = ("jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp")
# A value other than the default for each option, valid where it applies.
ASKS = {"argnums": [0], "chunk_size": 2, "batched": True, "return_output": True, "rows": [0, 1], "mode": "fwd",
        "sparsity": "auto", "sparse_format": "coo", "batched_vectors": True, "in_dims": 1, "out_dims": 1}
# Options that cannot change the answer where they do not apply, taken there (parsing._MOOT).
MOOT = {kind: {"chunk_size", "mode"} | ({"argnums", "return_output"} if kind == "evaluate" else set()) for kind in KINDS}
DEFAULTS = {"argnums": 0, "chunk_size": None, "batched": False, "return_output": False, "rows": None, "mode": None,
            "sparsity": "dense", "sparse_format": "csr", "batched_vectors": False, "in_dims": 0, "out_dims": 0}


@pytest.fixture(scope="module")
def c():
    with ready_app(FUNCTIONS) as client:
        yield client


def body(kind: str, **options: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"inputs": [X], **options}
    if kind == "vjp":
        doc["cotangents"] = 1.0
    elif kind in ("jvp", "hvp"):
        doc["tangents"] = [1.0, 1.0, 1.0]
    return doc


# ----------------------------------------------------------------- the option contract


@pytest.mark.parametrize("kind", KINDS)
def test_an_option_an_endpoint_does_not_take_is_refused_naming_it(c, kind):
    """batched on a vjp, sparsity on an evaluate were silently ignored (200), rows on a
    jvp refused: every option an endpoint does not take that would change the answer is
    now a 422 naming it and what the endpoint takes, in the body and in the query string
    alike; its default asks for nothing and passes, and so do the options that cannot
    change the answer there (chunk_size and mode anywhere, argnums and return_output on an
    evaluate: SPEC 3.1's one body shape for every endpoint)."""
    takes = options_of(kind)
    for option in OPTION_KINDS:
        if option in takes:
            continue
        if option in MOOT.get(kind, ()):  # cannot change the answer here: taken, unused
            r = c.post(f"/v1/functions/sum_sin/{kind}", json=body(kind, **{option: ASKS[option]}))
            assert r.status_code == 200, (option, r.text)
            continue
        problem = assert_problem(c.post(f"/v1/functions/sum_sin/{kind}", json=body(kind, **{option: ASKS[option]})),
                                 422, "invalid_input")
        kinds = OPTION_KINDS[option]
        where = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} and {kinds[-1]}"
        assert problem["detail"] == f"{option} does not apply to {kind} ({option} is for {where}); {kind} takes {', '.join(takes)}"
        r = c.post(f"/v1/functions/sum_sin/{kind}", json=body(kind, **{option: DEFAULTS[option]}))
        assert r.status_code == 200, (option, r.text)
    problem = assert_problem(c.post(f"/v1/functions/sum_sin/{kind}", json=body(kind, chunk_sise=2)), 422, "invalid_input")
    assert problem["detail"] == f"unknown option 'chunk_sise'; {kind} takes {', '.join(takes)}"


def test_the_query_string_is_held_to_the_same_contract(c):
    x = np.array(X, np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    npy = buf.getvalue()
    headers = {"content-type": wire.NPY, "accept": wire.JSON}
    for query, option in (("rows=0,1", "rows"), ("sparsity=auto", "sparsity"), ("batched_vectors=true", "batched_vectors")):
        problem = assert_problem(c.post(f"/v1/functions/sin/evaluate?{query}", content=npy, headers=headers),
                                 422, "invalid_input")
        assert problem["detail"].startswith(f"{option} does not apply to evaluate (")
        assert problem["detail"].endswith("); evaluate takes batched, in_dims, out_dims")
    for query in ("batched_vectors=false&argnums=0", "chunk_size=4&mode=fwd&argnums=0,&return_output=true"):
        r = c.post(f"/v1/functions/sin/evaluate?{query}", content=npy, headers=headers)
        assert r.status_code == 200, (query, r.text)
        np.testing.assert_allclose(wire.decode_tree(r.json()["output"]), np.sin(x), rtol=1e-6)


def test_openapi_offers_each_endpoint_its_own_options(c):
    doc = c.get("/openapi.json").json()
    for kind in KINDS:
        op = doc["paths"][f"/v1/functions/{{name}}/{kind}"]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        if "$ref" in schema:
            schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        body_options = set(schema["properties"]) - {"inputs", "cotangents", "tangents"}
        assert body_options == set(options_of(kind)), kind
        query = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        assert query == set(options_of(kind)), kind


def test_the_sdk_sends_each_endpoint_only_what_it_takes(c):
    """Every SDK method with every option it has set: the server takes each request."""

    def forward(request: httpx.Request) -> httpx.Response:
        r = c.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                      content=request.content, headers=dict(request.headers))
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    x = np.array(X, np.float32)
    xs = np.stack([x, 2 * x])
    with Client("http://sdk.test", http_transport=httpx.MockTransport(forward), max_retries=0) as client:
        for transport in ("binary", "json"):
            J, _ = client.jacobian("sin", x, argnums=(0,), chunk_size=2, return_output=True, mode="fwd",
                                     transport=transport)
            np.testing.assert_allclose(J[0], np.diag(np.cos(x)), rtol=1e-6)
            client.jacobian("sin", x, rows=(0, 2), transport=transport)
            client.jacobian("sin", xs, batched=True, transport=transport)
            client.jacobian("sin", x, sparsity="auto", sparse_format="coo", transport=transport)
            H = client.hessian("sum_sin", x, argnums=(0,), chunk_size=2, transport=transport)
            np.testing.assert_allclose(H[0][0], np.diag(-np.sin(x)), rtol=1e-6)
            client.hessian("sum_sin", xs, batched=True, transport=transport)
            client.hessian("sum_sin", x, sparsity="auto", transport=transport)
            client.evaluate("sin", xs, batched=True, transport=transport)
            for method, key in (("vjp", "cotangents"), ("jvp", "tangents"), ("hvp", "tangents")):
                name = "sum_sin" if method == "hvp" else "sin"
                getattr(client, method)(name, x, **{key: np.ones((2, 3), np.float32)}, argnums=(0,),
                                        batched_vectors=True, return_output=True, transport=transport)


# ----------------------------------------------------------------- meta.chunk_size


def test_meta_chunk_size_is_what_was_used(c):
    """chunk_size=100 over 3 rows said 100; it is the rows one vmap took."""
    x = torch.tensor(X)
    want = jacrev(torch.sin)(x).numpy()
    cases = [({"chunk_size": 100}, 3, "rev"), ({"chunk_size": 2}, 2, "rev"), ({"chunk_size": 100, "mode": "fwd"}, 3, "fwd"),
             ({"chunk_size": 1, "mode": "fwd"}, 1, "rev"), ({"chunk_size": 100, "rows": [1, 3]}, 2, "rev"),
             ({"mode": "fwd"}, None, "fwd")]
    for options, used, mode in cases:
        r = c.post("/v1/functions/sin/jacobian", json={"inputs": [X], **options})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["meta"]["chunk_size"], doc["meta"]["mode"]) == (used, mode), options
        rows = slice(*options.get("rows", [0, 3]))
        np.testing.assert_allclose(wire.decode_tree(doc["jacobian"]), want[rows], rtol=1e-6)
    r = c.post("/v1/functions/sin/jacobian", json={"inputs": [[X, X]], "batched": True, "chunk_size": 100})
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["chunk_size"] == 3
    np.testing.assert_allclose(wire.decode_tree(r.json()["jacobian"]), np.stack([want, want]), rtol=1e-6)


# ----------------------------------------------------------------- paths inside vectors


def test_nested_cotangent_errors_name_their_path(c):
    x = torch.tensor(X)
    _, pullback = vjp(F.nested_out, x)
    cot = {"a": (torch.ones(3), torch.tensor(2.0)), "b": torch.full((3,), 0.5)}
    (want,) = pullback(cot)
    good = {"a": [[1.0, 1.0, 1.0], 2.0], "b": [0.5, 0.5, 0.5]}
    r = c.post("/v1/functions/nested_out/vjp", json={"inputs": [X], "cotangents": good})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_tree(r.json()["vjp"]), want.numpy(), rtol=1e-6)
    cases = [
        ({"a": [[1.0, 1.0], 2.0], "b": [0.5, 0.5, 0.5]}, "cotangents.a[0]: expected shape [3], got [2]"),
        ({"a": [[1.0, 1.0, 1.0], [2.0]], "b": [0.5, 0.5, 0.5]}, "cotangents.a[1]: expected shape [], got [1]"),
        ({"a": [[1.0, 1.0, 1.0], 2.0], "b": [0.5]}, "cotangents.b: expected shape [3], got [1]"),
        ({"a": [[1.0, 1.0, 1.0], 2.0], "b": {"dtype": "bool", "shape": [3], "data": [1, 0, 1]}},
         None),  # booleans are numbers here (cast as torch casts them)
    ]
    for cot_json, detail in cases:
        r = c.post("/v1/functions/nested_out/vjp", json={"inputs": [X], "cotangents": cot_json})
        if detail is None:
            assert r.status_code == 200, r.text
            continue
        assert assert_problem(r, 422, "invalid_input")["detail"] == detail
    # an unreadable leaf: its path, from the front end
    r = c.post("/v1/functions/nested_out/vjp", json={"inputs": [X], "cotangents": {
        "a": [[1.0, 1.0, 1.0], {"dtype": "float32", "shape": [2], "data": [1.0]}], "b": [0.5, 0.5, 0.5]}})
    assert assert_problem(r, 422, "invalid_input")["detail"].startswith("cotangents.a[1]: ")
    # stacked: the leaf whose shape is wrong, and the leaves whose batch sizes differ
    stacked = {"a": [[[1.0, 1.0, 1.0]] * 2, [2.0, 2.0]], "b": [[0.5, 0.5]] * 2}
    r = c.post("/v1/functions/nested_out/vjp", json={"inputs": [X], "cotangents": stacked, "batched_vectors": True})
    assert assert_problem(r, 422, "invalid_input")["detail"] == "cotangents.b: expected shape ['B', 3], got [2, 2]"
    stacked = {"a": [[[1.0, 1.0, 1.0]] * 2, [2.0, 2.0, 2.0]], "b": [[0.5, 0.5, 0.5]] * 2}
    r = c.post("/v1/functions/nested_out/vjp", json={"inputs": [X], "cotangents": stacked, "batched_vectors": True})
    assert assert_problem(r, 422, "invalid_input")["detail"] == (
        "cotangents: batched vectors disagree on the batch size (cotangents.a[0]: 2, cotangents.a[1]: 3, cotangents.b: 2)")
    # a flat list of the leaves: named by position in it
    r = c.post("/v1/functions/nested_out/vjp", json={"inputs": [X], "cotangents": [[1.0, 1.0, 1.0], 2.0, [0.5, 0.5]]})
    assert assert_problem(r, 422, "invalid_input")["detail"] == "cotangents[2]: expected shape [3], got [2]"


def test_tangent_errors_name_their_path(c):
    x, y = torch.tensor(X), torch.tensor([1.0, 2.0, 3.0])
    _, want = jvp(F.pair_in, (x, y), (torch.ones(3), torch.full((3,), 2.0)))
    r = c.post("/v1/functions/pair_in/jvp", json={"inputs": [X, [1, 2, 3]], "argnums": [0, 1],
                                                  "tangents": [[1.0] * 3, [2.0] * 3]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_tree(r.json()["jvp"]), want.numpy(), rtol=1e-6)
    for kind in ("jvp", "hvp"):
        r = c.post(f"/v1/functions/pair_in/{kind}", json={"inputs": [X, [1, 2, 3]], "argnums": [0, 1],
                                                          "tangents": [[1.0] * 3, [2.0] * 4]})
        assert assert_problem(r, 422, "invalid_input")["detail"] == "tangents[1]: expected shape [3], got [4]"


# ----------------------------------------------------------------- where torch.func raises


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "vjp", "jvp", "hvp"])
def test_argnums_torch_refuses_are_422_on_every_endpoint(c, kind):
    x, y = torch.tensor(X), torch.ones(3)
    for argnums in (2, -3, [0, 0], [1, -1]):
        nums = tuple(argnums) if isinstance(argnums, list) else argnums
        with pytest.raises(RuntimeError):  # torch.func refuses each
            (jacrev if kind != "hessian" else hessian)(F.pair_in, argnums=nums)(x, y)
        doc = body(kind, argnums=argnums)
        doc["inputs"] = [X, [1.0, 1.0, 1.0]]
        if kind in ("jvp", "hvp"):
            doc["tangents"] = [[1.0] * 3, [1.0] * 3]
        problem = assert_problem(c.post(f"/v1/functions/pair_in/{kind}", json=doc), 422, "invalid_input")
        assert "argnums" in problem["detail"], problem


TORCH_RAISES = {"string_out", "tuple_with_int", "aux_triple"}
CANNOT = {
    # name: what the service's detail ends with
    "string_out": "the output is a str, not a tensor: return a tensor, or a tuple, list or dict of tensors "
                  "(torch.func: expected f(*primals) to return only tensors, got unsupported type <class 'str'>)",
    "tuple_with_int": "the output[1] is an int, not a tensor: return a tensor, or a tuple, list or dict of tensors; "
                      "if output[1] is aux, register tuple_with_int with has_aux=True "
                      "(torch.func: expected f(*primals) to return only tensors, got unsupported type <class 'int'>)",
    "meta_out": "the output holds a tensor on the meta device, which has no values",
    "aux_triple": "aux_triple has has_aux=True but did not return (output, aux): it returned a tuple of 3; "
                  "return both, or register it without has_aux",
}


@pytest.mark.parametrize("name", sorted(CANNOT))
def test_outputs_torch_or_the_wire_cannot_take_are_the_functions_error_everywhere(c, name):
    """Never a 200, never internal_error: a 500 function_error saying what was wrong,
    on every endpoint; where torch.func's jacrev / jvp raise in-process, so does it.
    (A complex output's derivative, which torch refuses, is the request's 422 since
    round 21: test_parity_round13::test_a_complex_output_is_the_wires_refusal; its
    evaluate and jvp are answered since round 27: test_parity_round27.)"""
    fn = getattr(F, name)
    if name in TORCH_RAISES:  # jacrev in-process raises too (meta_out's it computes: the wire cannot)
        with pytest.raises(RuntimeError):
            jacrev(fn, has_aux=name == "aux_triple")(torch.tensor(X))
    for kind in KINDS:
        problem = assert_problem(c.post(f"/v1/functions/{name}/{kind}", json=body(kind)), 500, "function_error")
        assert problem["detail"].endswith(CANNOT[name]), (kind, problem["detail"])


def test_the_readme_table_of_options_is_the_parsers():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| (`.+) \|$", text, re.M)
    table = {}
    for kinds, options in rows:
        for kind in re.findall(r"`(\w+)`", kinds):
            table[kind] = re.findall(r"`(\w+)`", options.split(" (and")[0])
    assert {k: table.get(k) for k in KINDS} == {k: options_of(k) for k in KINDS}
