"""Pytree parameters (issue 10 item 6): an Input declared as a tuple or dict of arrays,
sent nested in JSON and as path-named .npz members, with every derivative nested as the
same torch.func call nests it in-process (``jacrev(f, argnums)(params, x)``)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

import jacobian_client as jc
from jacobian_client import wire
from jacobian_service import Array, Input
from jacobian_service.examples import dense_layer
from jacobian_service.registry import FunctionSpec

from ._client_support import real_server
from .conftest import assert_problem, assert_tree_close, decode, live_server, npy_bytes, npz_bytes
from .pytree_functions import numeric_key_param, numeric_keys, tree_branchy, tree_fn, tree_int, tree_scalar

FUNCTIONS = "jacobian_service.examples,tests.pytree_functions"
RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3))
B = RNG.standard_normal(4)
X = RNG.standard_normal(3)
PAIR = (RNG.standard_normal(5), {"scale": np.array(1.3), "shift": RNG.standard_normal(5)})
X5 = RNG.standard_normal(5)
SP = {"w": RNG.standard_normal(5), "c": [np.array(0.7), RNG.standard_normal(5)]}


def t(tree: Any) -> Any:
    """numpy tree -> torch tree (float64, as sent)."""
    return pytree.tree_map(lambda a: torch.tensor(a), tree)


def j(tree: Any) -> Any:
    """numpy tree -> JSON tree of array objects (tuples become lists), as plain JSON values."""
    return wire.loads(wire.dumps(wire.encode_tree(tree)))


def _as_torch_argnums(argnums: Any) -> Any:
    """Our argnums (names allowed) as torch.func takes them."""
    names = {"params": 0, "x": 1}
    if isinstance(argnums, list):
        return tuple(names.get(a, a) for a in argnums)
    return names.get(argnums, argnums)


@pytest.fixture(scope="module")
def c():
    from starlette.testclient import TestClient

    from jacobian_service import Settings, create_app

    with TestClient(create_app(Settings(warmup=False, functions=FUNCTIONS)), raise_server_exceptions=False) as client:
        yield client


# ----------------------------------------------------------------------------- declaring


def test_a_tree_input_describes_itself_and_round_trips(c):
    doc = c.get("/v1/functions/dense_layer").json()
    params = doc["inputs"][0]
    assert params == {
        "name": "params", "shape": None, "dtype": "floating",
        "tree": {"type": "dict", "items": {"w": {"type": "array", "shape": ["m", "n"], "dtype": "floating"},
                                           "b": {"type": "array", "shape": ["m"], "dtype": "floating"}}},
    }
    assert doc["inputs"][1] == {"name": "x", "shape": ["n"], "dtype": "floating"}
    pair = c.get("/v1/functions/tree_fn").json()["inputs"][0]["tree"]
    assert pair["type"] == "tuple" and pair["items"][1]["type"] == "dict"
    assert c.get("/v1/functions/tree_scalar").json()["inputs"][1]["tree"]["items"]["c"]["type"] == "list"
    assert c.get("/v1/functions/tree_int").json()["inputs"][0]["dtype"] == "mixed"
    for name in ("dense_layer", "tree_fn", "tree_scalar", "tree_int"):
        described = c.get(f"/v1/functions/{name}").json()
        assert FunctionSpec.from_description(described).describe() == described  # what process-mode front ends learn


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="tree keys"):
        Input("p", tree={"a/b": Array()})
    with pytest.raises(ValueError, match="per Array"):
        Input("p", shape=(3,), tree={"w": Array()})
    with pytest.raises(ValueError, match="holds Array"):
        Input("p", tree={"w": (3, 4)})
    with pytest.raises(ValueError, match="at least one Array"):
        Input("p", tree={})
    with pytest.raises(ValueError, match="unknown dtype"):
        Array((3,), "complex32")  # (complex64 and complex128 are declared: test_complex_inputs)


def test_openapi_describes_tree_inputs(c):
    schemas = c.get("/openapi.json").json()["components"]["schemas"]
    assert "tree" in schemas["Input"]["properties"]
    assert {"$ref": "#/components/schemas/InputTree"} in schemas["Inputs"]["anyOf"][0]["items"]["anyOf"]
    assert schemas["InputTreeSpec"]["properties"]["type"]["enum"] == ["array", "dict", "tuple", "list"]
    import jsonschema

    doc = c.get("/openapi.json").json()

    def valid(kind: str, value: Any) -> bool:
        root = {"$ref": f"#/components/schemas/{kind}", "components": doc["components"]}
        return jsonschema.Draft202012Validator(root).is_valid(value)

    assert valid("JacobianRequest", {"inputs": [j({"w": W, "b": B}), j(X)], "argnums": [0, 1]})
    assert valid("JacobianRequest", {"inputs": {"params": {"w": j(W), "b": [[1.0]]}, "x": [1.0]}})
    assert valid("JvpRequest", {"inputs": [j(PAIR), j(X5)], "tangents": j(PAIR)})
    assert not valid("JacobianRequest", {"inputs": [{"w": "text"}, j(X)]})
    assert valid("Function", c.get("/v1/functions/tree_fn").json())
    assert not valid("Function", {**c.get("/v1/functions/tree_fn").json(), "inputs": [{"name": "p", "shape": None, "dtype": "x", "tree": {"type": "set"}}]})


# ----------------------------------------------------------------------------- JSON and .npz


ARGNUMS = [0, 1, [0, 1], [1, 0], "params", ["x", "params"], [0]]


@pytest.mark.parametrize("argnums", ARGNUMS, ids=str)
def test_json_jacobian_nests_as_jacrev(c, argnums):
    want = torch.func.jacrev(dense_layer, argnums=_as_torch_argnums(argnums))(t({"w": W, "b": B}), t(X))
    body = {"inputs": [j({"w": W, "b": B}), j(X)], "argnums": argnums}
    got, _ = decode(c.post("/v1/functions/dense_layer/jacobian", json=body))
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)
    # by name, the dict's keys in another order: nested by the declaration's order
    body = {"inputs": {"x": j(X), "params": {"b": j(B), "w": j(W)}}, "argnums": argnums}
    got, _ = decode(c.post("/v1/functions/dense_layer/jacobian", json=body))
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)
    if isinstance(got, dict):
        assert list(got) == ["w", "b"]


@pytest.mark.parametrize("argnums", ARGNUMS, ids=str)
@pytest.mark.parametrize("names", [("0", "1"), ("params", "x")])
def test_npz_jacobian_nests_as_jacrev(c, argnums, names):
    want = torch.func.jacrev(dense_layer, argnums=_as_torch_argnums(argnums))(t({"w": W, "b": B}), t(X))
    p, x = names
    body = npz_bytes(**{f"{p}/w": W, f"{p}/b": B, x: X})
    query = {"argnums": ",".join(map(str, argnums)) + ("," if len(argnums) == 1 else "")} if isinstance(argnums, list) else {"argnums": str(argnums)}
    r = c.post("/v1/functions/dense_layer/jacobian", content=body, params=query,
               headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    got, _ = decode(r)
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)


def test_nested_tuple_and_dict_with_tuple_output_aux_and_return_output(c):
    for argnums in (0, [0, 1], [1, 0]):
        (want, aux) = torch.func.jacrev(tree_fn, argnums=_as_torch_argnums(argnums), has_aux=True)(t(PAIR), t(X5))
        out, _ = tree_fn(t(PAIR), t(X5))
        body = {"inputs": [j(PAIR), j(X5)], "argnums": argnums, "return_output": True}
        got, doc = decode(c.post("/v1/functions/tree_fn/jacobian", json=body))
        assert_tree_close(got, want, rtol=1e-10, atol=1e-12)
        assert_tree_close(wire.decode_tree(doc["output"]), out, rtol=1e-12)
        assert_tree_close(wire.decode_tree(doc["aux"]), aux, rtol=1e-12)
        # the same as .npz members 0/0, 0/1/scale, 0/1/shift
        body = npz_bytes(**{"0/0": PAIR[0], "0/1/scale": PAIR[1]["scale"], "0/1/shift": PAIR[1]["shift"], "1": X5})
        query = {"argnums": argnums if isinstance(argnums, int) else ",".join(map(str, argnums))}
        got, _ = decode(c.post("/v1/functions/tree_fn/jacobian", content=body, params=query,
                               headers={"content-type": wire.NPZ, "accept": wire.NPZ}))
        assert_tree_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["fwd", "auto"])
def test_forward_mode_nests_as_jacfwd(c, mode):
    want = torch.func.jacfwd(dense_layer, argnums=(0, 1))(t({"w": W, "b": B}), t(X))
    body = {"inputs": [j({"w": W, "b": B}), j(X)], "argnums": [0, 1], "mode": mode}
    got, doc = decode(c.post("/v1/functions/dense_layer/jacobian", json=body))
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)


def test_rows_of_a_tree_jacobian(c):
    want = torch.func.jacrev(dense_layer)(t({"w": W, "b": B}), t(X))
    body = {"inputs": [j({"w": W, "b": B}), j(X)], "rows": [1, 3]}
    got, _ = decode(c.post("/v1/functions/dense_layer/jacobian", json=body))
    assert_tree_close(got, {k: v[1:3] for k, v in want.items()}, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("argnums", [0, [0, 1], 1])
def test_hessian_nests_as_torch_hessian(c, argnums):
    want = torch.func.hessian(tree_scalar, argnums=_as_torch_argnums(argnums))(t(X5), t(SP))
    got, _ = decode(c.post("/v1/functions/tree_scalar/hessian", json={"inputs": [j(X5), j(SP)], "argnums": argnums}), "hessian")
    assert_tree_close(got, want, rtol=1e-10, atol=1e-12)
    # and a dict of dicts for a dict parameter
    want = torch.func.hessian(lambda p, x: dense_layer(p, x).sum(), argnums=0)(t({"w": W, "b": B}), t(X))
    assert set(want) == {"w", "b"} and set(want["w"]) == {"w", "b"}


def test_evaluate_passes_the_tree(c):
    got, _ = decode(c.post("/v1/functions/dense_layer/evaluate", json={"inputs": [j({"w": W, "b": B}), j(X)]}), "output")
    assert_tree_close(got, dense_layer(t({"w": W, "b": B}), t(X)), rtol=1e-12)
    r = c.post("/v1/functions/dense_layer/evaluate", content=npz_bytes(**{"0/w": W, "0/b": B, "1": X}),
               headers={"content-type": wire.NPZ, "accept": wire.NPY})
    np.testing.assert_allclose(wire.read_npy(r.content), dense_layer(t({"w": W, "b": B}), t(X)).numpy(), rtol=1e-12)


@pytest.mark.parametrize("argnums", [0, [0, 1], [1, 0]])
def test_vjp_gradients_nest_like_the_input(c, argnums):
    v = RNG.standard_normal(4)
    _, pullback = torch.func.vjp(lambda *p: dense_layer(*p), t({"w": W, "b": B}), t(X))
    grads = pullback(torch.tensor(v))
    positions = argnums if isinstance(argnums, list) else [argnums]
    want = tuple(grads[i] for i in positions) if isinstance(argnums, list) else grads[argnums]
    body = {"inputs": [j({"w": W, "b": B}), j(X)], "argnums": argnums, "cotangents": j(v)}
    got, _ = decode(c.post("/v1/functions/dense_layer/vjp", json=body), "vjp")
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)
    # batched cotangents: a leading dimension on every gradient leaf
    vs = RNG.standard_normal((3, 4))
    body = {"inputs": [j({"w": W, "b": B}), j(X)], "argnums": argnums, "cotangents": j(vs), "batched_vectors": True}
    got, _ = decode(c.post("/v1/functions/dense_layer/vjp", json=body), "vjp")
    want = torch.func.vmap(pullback)(torch.tensor(vs))
    want = tuple(want[i] for i in positions) if isinstance(argnums, list) else want[argnums]
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)


def test_jvp_and_hvp_take_tangents_nested_like_the_input(c):
    tw, tb = RNG.standard_normal((4, 3)), RNG.standard_normal(4)
    want = torch.func.jvp(lambda p: dense_layer(p, t(X)), (t({"w": W, "b": B}),), (t({"w": tw, "b": tb}),))[1]
    for tangents in ({"w": j(tw), "b": j(tb)}, {"b": j(tb), "w": j(tw)}, [j(tw), j(tb)]):  # nested, any key order, or flat leaves
        body = {"inputs": [j({"w": W, "b": B}), j(X)], "tangents": tangents}
        got, _ = decode(c.post("/v1/functions/dense_layer/jvp", json=body), "jvp")
        assert_tree_close(got, want, rtol=1e-12, atol=1e-12)
    # .npz tangents members tangents/w, tangents/b
    body = npz_bytes(**{"params/w": W, "params/b": B, "x": X, "tangents/w": tw, "tangents/b": tb})
    got, _ = decode(c.post("/v1/functions/dense_layer/jvp", content=body,
                           headers={"content-type": wire.NPZ, "accept": wire.NPZ}), "jvp")
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)
    # hvp of a scalar w.r.t. (x, params): tangents (x-like, params-like)
    tx = RNG.standard_normal(5)
    tp = {"w": RNG.standard_normal(5), "c": [np.array(0.3), RNG.standard_normal(5)]}
    grad = torch.func.grad(tree_scalar, argnums=(0, 1))
    want = torch.func.jvp(grad, (t(X5), t(SP)), (t(tx), t(tp)))[1]
    body = {"inputs": [j(X5), j(SP)], "argnums": [0, 1], "tangents": [j(tx), j(tp)]}
    got, _ = decode(c.post("/v1/functions/tree_scalar/hvp", json=body), "hvp")
    assert_tree_close(got, want, rtol=1e-10, atol=1e-12)
    # batched tangents for the dict parameter alone: a stack on every leaf
    ts = {"w": RNG.standard_normal((3, 5)), "c": [RNG.standard_normal(3), RNG.standard_normal((3, 5))]}
    grad_p = torch.func.grad(tree_scalar, argnums=1)
    want = torch.func.vmap(lambda v: torch.func.jvp(lambda p: grad_p(t(X5), p), (t(SP),), (v,))[1])(t(ts))
    body = {"inputs": [j(X5), j(SP)], "argnums": "params", "tangents": j(ts), "batched_vectors": True}
    got, _ = decode(c.post("/v1/functions/tree_scalar/hvp", json=body), "hvp")
    assert_tree_close(got, want, rtol=1e-10, atol=1e-12)


def test_npz_vectors_keyed_by_numbers_pair_by_key_not_by_position(c, url):
    """`cotangents/1` is the key "1" of a dict output, whatever position it has: an output
    {"1": x, "0": 2x} took `cotangents/0` for its first entry (key "1") before."""
    x, a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.5])
    want = torch.func.vjp(numeric_keys, t(x))[1]({"1": t(a), "0": t(b)})[0]  # a + 2b
    body = npz_bytes(x=x, **{"cotangents/1": a, "cotangents/0": b})
    got, _ = decode(c.post("/v1/functions/numeric_keys/vjp", content=body,
                           headers={"content-type": wire.NPZ, "accept": wire.NPZ}), "vjp")
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)
    ta, tb = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
    want_jvp = torch.func.jvp(numeric_key_param, (t({"1": x, "0": x}),), (t({"1": ta, "0": tb}),))[1]
    body = npz_bytes(**{"p/1": x, "p/0": x, "tangents/1": ta, "tangents/0": tb})
    got, _ = decode(c.post("/v1/functions/numeric_key_param/jvp", content=body,
                           headers={"content-type": wire.NPZ, "accept": wire.NPZ}), "jvp")
    assert_tree_close(got, want_jvp, rtol=1e-12, atol=1e-12)
    # the SDK's binary transport sends exactly such members; its JSON transport a dict
    for transport in ("binary", "json"):
        with jc.Client(url, transport=transport) as sdk:
            np.testing.assert_allclose(sdk.vjp("numeric_keys", x, cotangents={"1": a, "0": b}), want.numpy())
            np.testing.assert_allclose(sdk.jvp("numeric_key_param", {"1": x, "0": x}, tangents={"1": ta, "0": tb}),
                                       want_jvp.numpy())
    # by key, whatever the archive's order of members
    body = npz_bytes(x=x, **{"cotangents/0": b, "cotangents/1": a})
    got, _ = decode(c.post("/v1/functions/numeric_keys/vjp", content=body,
                           headers={"content-type": wire.NPZ, "accept": wire.NPZ}), "vjp")
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)


def test_batched_examples_vmap_over_every_leaf(c):
    n = 3
    Ws, Bs, Xs = RNG.standard_normal((n, 4, 3)), RNG.standard_normal((n, 4)), RNG.standard_normal((n, 3))
    want = torch.func.vmap(torch.func.jacrev(dense_layer, argnums=(0, 1)))(t({"w": Ws, "b": Bs}), t(Xs))
    body = {"inputs": [j({"w": Ws, "b": Bs}), j(Xs)], "argnums": [0, 1], "batched": True}
    got, _ = decode(c.post("/v1/functions/dense_layer/jacobian", json=body))
    assert_tree_close(got, want, rtol=1e-12, atol=1e-12)
    want = torch.func.vmap(torch.func.hessian(tree_scalar, argnums=1))(t(np.stack([X5] * 2)), t(pytree.tree_map(lambda a: np.stack([a, 2 * a]), SP)))
    body = {"inputs": [j(np.stack([X5] * 2)), j(pytree.tree_map(lambda a: np.stack([a, 2 * a]), SP))], "argnums": 1, "batched": True}
    got, _ = decode(c.post("/v1/functions/tree_scalar/hessian", json=body), "hessian")
    assert_tree_close(got, want, rtol=1e-10, atol=1e-12)
    # a function vmap cannot run loops over the examples
    want = torch.stack([torch.func.jacrev(tree_branchy, argnums=0)({"w": t(Ws[i]), "b": t(Bs[i])}, t(Xs[i]))["w"] for i in range(n)])
    body = {"inputs": [j({"w": Ws, "b": Bs}), j(Xs)], "batched": True}
    got, _ = decode(c.post("/v1/functions/tree_branchy/jacobian", json=body))
    assert_tree_close(got["w"], want, rtol=1e-12, atol=1e-12)


def test_concurrent_requests_are_batched_and_split_back(make_client):
    c = make_client(max_batch_wait_ms=300, max_batch_size=8, functions=FUNCTIONS)
    params = [{"w": RNG.standard_normal((4, 3)), "b": RNG.standard_normal(4)} for _ in range(8)]
    xs = RNG.standard_normal((8, 3))

    def one(i):
        if i % 2:
            body = npz_bytes(**{"0/w": params[i]["w"], "0/b": params[i]["b"], "1": xs[i]})
            return c.post("/v1/functions/dense_layer/jacobian", content=body, params={"argnums": "0,1"},
                          headers={"content-type": wire.NPZ, "accept": wire.NPZ})
        return c.post("/v1/functions/dense_layer/jacobian", json={"inputs": [j(params[i]), j(xs[i])], "argnums": [0, 1]})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    sizes = []
    for i, r in enumerate(responses):
        got, doc = decode(r)
        sizes.append(doc["meta"]["batch_size"])
        want = torch.func.jacrev(dense_layer, argnums=(0, 1))(t(params[i]), t(xs[i]))
        assert_tree_close(got, want, rtol=1e-12, atol=1e-12)
    assert max(sizes) > 1, sizes
    # Hessians w.r.t. a dict holding a list, and forward-mode Jacobians, batched alike
    xs5 = RNG.standard_normal((6, 5))

    def hess(i):
        return c.post("/v1/functions/tree_scalar/hessian", json={"inputs": [j(xs5[i]), j(SP)], "argnums": [0, 1]})

    def fwd(i):
        return c.post("/v1/functions/dense_layer/jacobian", json={"inputs": [j(params[i]), j(xs[i])], "mode": "fwd"})

    with ThreadPoolExecutor(6) as pool:
        hessians = list(pool.map(hess, range(6)))
        forwards = list(pool.map(fwd, range(6)))
    for i, r in enumerate(hessians):
        got, _ = decode(r, "hessian")
        assert_tree_close(got, torch.func.hessian(tree_scalar, argnums=(0, 1))(t(xs5[i]), t(SP)), rtol=1e-10, atol=1e-12)
    for i, r in enumerate(forwards):
        got, doc = decode(r)
        assert_tree_close(got, torch.func.jacfwd(dense_layer)(t(params[i]), t(xs[i])), rtol=1e-12, atol=1e-12)
    assert max(wire.loads(r.content)["meta"]["batch_size"] for r in hessians + forwards) > 1


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "inputs,status,code,words",
    [
        ([{"w": j(W)}, j(X)], 422, "invalid_input", ["'params'", "missing ['b']"]),
        ([{"w": j(W), "b": j(B), "c": j(B)}, j(X)], 422, "invalid_input", ["'params'", "unknown ['c']"]),
        ([{"w": j(W.reshape(-1)), "b": j(B)}, j(X)], 422, "invalid_input", ["'params.w'", "(m, n)", "(12,)"]),
        ([{"w": j(W), "b": j(B[:3])}, j(X)], 422, "invalid_input", ["'params.b'", "m = 4", "'params.w'"]),
        ([{"w": j(W), "b": j(B)}, j(X[:2])], 422, "invalid_input", ["'x'", "n = 3", "'params.w'"]),
        ([j(W), j(X)], 422, "invalid_input", ["'params'", "expected an object with keys ['w', 'b']"]),
        ([[j(W), j(B)], j(X)], 422, "invalid_input", ["'params'", "expected an object"]),
        ([{"w": {"x": 1}, "b": j(B)}, j(X)], 422, "invalid_input", ["'params.w'", "expected an array"]),
        ([{"w": {"dtype": "float32", "shape": [4, 3], "data": [1]}, "b": j(B)}, j(X)], 422, "invalid_input", ["12"]),
        ([{"w": [[1, "a"]], "b": j(B)}, j(X)], 422, "invalid_input", ["string"]),
    ],
)
def test_json_refusals_name_the_leaf(c, inputs, status, code, words):
    body = assert_problem(c.post("/v1/functions/dense_layer/jacobian", json={"inputs": inputs}), status, code)
    for w in words:
        assert w in body["detail"], body["detail"]


def test_tuple_refusals_name_the_path(c):
    bad = [j(PAIR[0]), {"scale": j(PAIR[1]["scale"]), "shift": j(PAIR[1]["shift"][:2])}]
    body = assert_problem(c.post("/v1/functions/tree_fn/jacobian", json={"inputs": [bad, j(X5)]}), 422, "invalid_input")
    assert "'pair[1].shift'" in body["detail"]
    body = assert_problem(c.post("/v1/functions/tree_fn/jacobian", json={"inputs": [[j(PAIR[0])], j(X5)]}), 422, "invalid_input")
    assert "'pair'" in body["detail"] and "a list of 2" in body["detail"]
    body = assert_problem(c.post("/v1/functions/tree_int/jacobian",
                                 json={"inputs": [{"w": j(X), "k": 2}, j(X)]}), 422, "invalid_input")
    assert "'cfg.k' is int64" in body["detail"]
    # the same integer leaf is fine where it is not differentiated
    got, _ = decode(c.post("/v1/functions/tree_int/jacobian", json={"inputs": [{"w": j(X), "k": 2}, j(X)], "argnums": 1}))
    np.testing.assert_allclose(got, torch.func.jacrev(tree_int, argnums=1)({"w": t(X), "k": torch.tensor(2)}, t(X)).numpy())


@pytest.mark.parametrize(
    "members,words",
    [
        ({"0/w": W, "1": X}, ["missing ['0/b']"]),
        ({"0/w": W, "0/b": B, "0/c": B, "1": X}, ["unknown ['0/c']"]),
        ({"0": W, "1": X}, ["tree of 2 arrays", "['0/w', '0/b']"]),
        ({"params/w": W, "params/b": B, "x/0": X}, ["'x' is one array", "'x'"]),
        ({"params/w": W, "params/b": B[:2], "x": X}, ["'params.b'"]),
        ({"params/w": W, "0/b": B, "x": X}, ["given twice"]),
    ],
)
def test_npz_refusals_name_the_member(c, members, words):
    r = c.post("/v1/functions/dense_layer/jacobian", content=npz_bytes(**members), headers={"content-type": wire.NPZ})
    body = assert_problem(r, 422, "invalid_input")
    for w in words:
        assert w in body["detail"], body["detail"]


def test_a_single_npy_body_cannot_carry_a_tree(c):
    body = assert_problem(c.post("/v1/functions/tree_fn/evaluate", content=npy_bytes(X),
                                 headers={"content-type": wire.NPY}), 422, "invalid_input")
    assert "x-npy" in body["detail"] and "application/x-npz" in body["detail"]


def test_a_tree_result_is_not_one_npy(c):
    r = c.post("/v1/functions/dense_layer/jacobian", json={"inputs": [j({"w": W, "b": B}), j(X)]},
               headers={"accept": wire.NPY})
    assert_problem(r, 406, "not_acceptable")
    # x alone is one array: npy (streamed or not) is fine
    r = c.post("/v1/functions/dense_layer/jacobian", json={"inputs": [j({"w": W, "b": B}), j(X)], "argnums": 1},
               headers={"accept": wire.NPY})
    assert r.status_code == 200 and r.headers["content-type"] == wire.NPY


# ----------------------------------------------------------------------------- SDK


@pytest.fixture(scope="module")
def url():
    with real_server(functions=FUNCTIONS) as u:
        yield u


@pytest.mark.parametrize("transport", ["binary", "json"])
def test_sdk_takes_and_returns_nested_trees(url, transport):
    params = {"w": W, "b": B}
    with jc.Client(url, transport=transport) as client:
        got = client.jacobian("dense_layer", params, X)
        assert isinstance(got, dict) and list(got) == ["w", "b"]
        assert_tree_close(got, torch.func.jacrev(dense_layer)(t(params), t(X)), rtol=1e-12, atol=1e-12)
        got = client.jacobian("dense_layer", params, X, argnums=(0, 1))
        assert isinstance(got, tuple) and isinstance(got[0], dict)
        assert_tree_close(got, torch.func.jacrev(dense_layer, argnums=(0, 1))(t(params), t(X)), rtol=1e-12, atol=1e-12)
        got, aux = client.jacobian("tree_fn", PAIR, X5)
        assert_tree_close(got, torch.func.jacrev(tree_fn, has_aux=True)(t(PAIR), t(X5))[0], rtol=1e-10, atol=1e-12)
        got = client.hessian("tree_scalar", X5, SP, argnums=1)
        assert_tree_close(got, torch.func.hessian(tree_scalar, argnums=1)(t(X5), t(SP)), rtol=1e-10, atol=1e-12)
        v = RNG.standard_normal(4)
        got = client.vjp("dense_layer", params, X, cotangents=v)
        assert_tree_close(got, torch.func.vjp(lambda p: dense_layer(p, t(X)), t(params))[1](torch.tensor(v))[0], rtol=1e-12)
        tangents = {"w": np.ones((4, 3)), "b": np.zeros(4)}
        got = client.jvp("dense_layer", params, X, tangents=tangents)
        want = torch.func.jvp(lambda p: dense_layer(p, t(X)), (t(params),), (t(tangents),))[1]
        assert_tree_close(got, want, rtol=1e-12, atol=1e-12)
        # tensors and plain numbers as leaves (plain numbers take the declared dtype: float32 here)
        got = client.evaluate("dense_layer", {"w": torch.tensor(W), "b": B.tolist()}, X)
        assert got.dtype == np.float64
        assert_tree_close(got, dense_layer(t(params), t(X)), rtol=1e-6, atol=1e-7)
        got = client.jacrev("dense_layer", argnums=("params", "x"))(params, X)
        assert_tree_close(got, torch.func.jacrev(dense_layer, argnums=(0, 1))(t(params), t(X)), rtol=1e-12, atol=1e-12)
        info = client.function("dense_layer")
        assert info.inputs[0].tree["type"] == "dict" and info.inputs[1].tree is None


def test_sdk_refusals_keep_their_status(url):
    with jc.Client(url) as client:
        with pytest.raises(jc.InvalidInput, match=r"'params.w'"):
            client.jacobian("dense_layer", {"w": W[:, :2], "b": B}, X)
        with pytest.raises(jc.InvalidInput, match=r"missing \['0/b'\]"):
            client.jacobian("dense_layer", {"w": W}, X)


def test_jacobian_split_takes_one_array_per_parameter_and_says_so(url):
    from jacobian_client.split import jacobian_split
    from jacobian_client.torch import remote

    with jc.Client(url) as client:  # the torch adapter takes the tree (test_remote_round8 differentiates it)
        f = remote(client, "dense_layer")
        got = f({"w": torch.tensor(W), "b": torch.tensor(B)}, torch.tensor(X))
        torch.testing.assert_close(got, dense_layer(t({"w": W, "b": B}), t(X)), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="'params' is a pytree parameter"):
        jacobian_split([url], "dense_layer", {"w": W, "b": B}, X)
    # x is an array: splitting its rows works beside a pytree parameter
    got = jacobian_split([url], "dense_layer", {"w": W, "b": B}, X, argnums=1, chunk_rows=2)
    np.testing.assert_allclose(got, torch.func.jacrev(dense_layer, argnums=1)(t({"w": W, "b": B}), t(X)).numpy(), rtol=1e-12)


@pytest.mark.asyncio
async def test_async_sdk_concurrently(url):
    params = [{"w": RNG.standard_normal((4, 3)), "b": RNG.standard_normal(4)} for _ in range(6)]
    async with jc.AsyncClient(url) as client:
        results = await asyncio.gather(*(client.jacobian("dense_layer", p, X, argnums=(0, 1)) for p in params))
    for p, got in zip(params, results):
        assert_tree_close(got, torch.func.jacrev(dense_layer, argnums=(0, 1))(t(p), t(X)), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- engine processes


def test_a_tree_call_crosses_the_ipc_codec_whole():
    from jacobian_service import ipc
    from jacobian_service.parsing import parse_call

    spec = FunctionSpec.from_description(  # a front end's spec: description only
        {"name": "tree_fn", "description": "", "has_aux": True,
         "inputs": [Input("pair", tree=(Array(("n",)), {"scale": Array(()), "shift": Array(("n",))})).describe(),
                    Input("x", ("n",)).describe()]})
    body = wire.dumps({"inputs": [j(PAIR), j(X5)], "argnums": ["x", "pair"], "tangents": [j(X5), j(PAIR)]})
    call = parse_call(spec, "jvp", wire.JSON, body, {}, wire.Limits())
    assert call.positions == (1, 0) and call.argnums == (3, 0, 1, 2) and call.as_tuple
    assert [a.shape for a in call.args] == [(5,), (), (5,), (5,)]
    frames = ipc.encode_call(7, "jvp", call)
    header, arrays = ipc.parse([bytes(memoryview(f)) for f in frames])
    back = ipc.decode_call(header, arrays, spec)
    assert (back.positions, back.argnums, back.as_tuple) == (call.positions, call.argnums, call.as_tuple)
    for a, b in zip(back.args, call.args):
        np.testing.assert_array_equal(a, b)
    assert_tree_close(back.vectors, call.vectors)


def test_served_with_engine_processes():
    """`serve` (engine processes: trees cross the IPC hand-off as flat leaves)."""
    params = {"w": W, "b": B}
    with live_server(FUNCTIONS=FUNCTIONS, ENGINE_STANDBY="false") as (url, _):
        with jc.Client(url) as client:
            assert client.function("dense_layer").inputs[0].tree["type"] == "dict"
            got = client.jacobian("dense_layer", params, X, argnums=(0, 1))
            assert_tree_close(got, torch.func.jacrev(dense_layer, argnums=(0, 1))(t(params), t(X)), rtol=1e-12, atol=1e-12)
            got = client.hessian("tree_scalar", X5, SP, argnums=(0, 1), transport="json")
            assert_tree_close(got, torch.func.hessian(tree_scalar, argnums=(0, 1))(t(X5), t(SP)), rtol=1e-10, atol=1e-12)
            with pytest.raises(jc.InvalidInput, match=r"'pair\[1\].shift'"):
                client.jacobian("tree_fn", (PAIR[0], {"scale": PAIR[1]["scale"], "shift": X}), X5)
        import httpx

        r = httpx.post(f"{url}/v1/functions/tree_fn/jacobian", json={"inputs": [j(PAIR), j(X5)], "argnums": [0, 1]})
        got, _ = decode(r)
        assert_tree_close(got, torch.func.jacrev(tree_fn, argnums=(0, 1), has_aux=True)(t(PAIR), t(X5))[0], rtol=1e-10, atol=1e-12)


def test_sparsity_is_refused_for_pytree_parameters(client):
    body = {"inputs": [{"w": [[1.0, 0.0], [0.0, 1.0]], "b": [0.0, 0.0]}, [0.5, 0.5]], "sparsity": "auto"}
    r = client.post("/v1/functions/dense_layer/jacobian", json=body)
    assert r.status_code == 422 and r.json()["code"] == "invalid_input"
    assert "pytree parameter" in r.json()["detail"]
