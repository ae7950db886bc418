"""Every built-in through HTTP equals in-process torch.func, in every wire format."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from jacobian_client import wire

from .conftest import DEFAULT_DEVICES, assert_tree_close, decode, npy_bytes, npz_bytes

RNG = np.random.default_rng(42)
N = 5


def example_inputs(name: str, batch: int | None = None) -> list[np.ndarray]:
    lead = () if batch is None else (batch,)
    if name == "mlp":
        return [RNG.standard_normal((*lead, 128)).astype(np.float32)]
    if name in ("add_square", "polar"):
        return [RNG.standard_normal((*lead, N)) + 1.5, RNG.standard_normal((*lead, N))]
    if name == "lorenz96":
        return [RNG.standard_normal((*lead, 12)) + 8]
    return [RNG.standard_normal((*lead, N))]


BUILTINS = ["sin", "sin_aux", "sum_sin", "add_square", "no_grad_square", "polar", "softmax", "planar_arm", "mlp", "lorenz96"]


def reference(builtins: Any, name: str, inputs: list[np.ndarray], argnums: Any = 0, batched: bool = False) -> Any:
    spec = builtins.get(name)
    tensors = [torch.from_numpy(a.copy()) for a in inputs]
    jac = torch.func.jacrev(spec.fn, argnums=argnums, has_aux=spec.has_aux)
    if batched:
        jac = torch.func.vmap(jac)
    return jac(*tensors)


def post(client: Any, name: str, inputs: list[np.ndarray], transport: str, endpoint: str = "jacobian", accept: str | None = None, **options: Any) -> Any:
    url = f"/v1/functions/{name}/{endpoint}"
    if transport == "json":
        body = {"inputs": [wire.encode_tree(a) for a in inputs], **options}
        return client.post(url, content=wire.dumps(body), headers={"content-type": wire.JSON, "accept": accept or wire.JSON})
    params = {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v).lower() if isinstance(v, bool) else str(v)) for k, v in options.items() if v is not None}
    if transport == "npy":
        return client.post(url, content=npy_bytes(inputs[0]), params=params, headers={"content-type": wire.NPY, "accept": accept or wire.NPY})
    body = npz_bytes(**{str(i): a for i, a in enumerate(inputs)})
    return client.post(url, content=body, params=params, headers={"content-type": wire.NPZ, "accept": accept or wire.NPZ})


def check(got: Any, want: Any, name: str, has_aux: bool) -> None:
    tol = dict(rtol=1e-4, atol=1e-5) if name == "mlp" else dict(rtol=1e-7, atol=1e-9)
    if has_aux:
        want = want[0]
    assert_tree_close(got, want, **tol)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_json(client, builtins, name, chunk_size):
    inputs = example_inputs(name)
    got, doc = decode(post(client, name, inputs, "json", chunk_size=chunk_size))
    want = reference(builtins, name, inputs)
    check(got, want, name, builtins.get(name).has_aux)
    if builtins.get(name).has_aux:
        assert_tree_close(wire.decode_tree(doc["aux"]), want[1])
    if chunk_size:  # the rows one vmap took: never more than the output has (sum_sin: 1, not 3)
        rows = sum(np.size(leaf) for leaf in _leaves(wire.decode_tree(doc["jacobian"]))) // inputs[0].size
        assert doc["meta"]["chunk_size"] == min(chunk_size, rows)
    assert doc["meta"]["device"] == DEFAULT_DEVICES[0] and doc["function"] == name
    assert {"queue_ms", "compute_ms", "batch_size"} <= set(doc["meta"])


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


@pytest.mark.parametrize("transport", ["npy", "npz"])
@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_binary(client, builtins, name, transport):
    inputs = example_inputs(name)
    if transport == "npy" and len(inputs) > 1:
        pytest.skip("an .npy body carries one input")
    has_aux = builtins.get(name).has_aux
    single = not has_aux and name != "polar"
    accept = wire.NPY if transport == "npy" and single else wire.NPZ
    response = post(client, name, inputs, transport, accept=accept, chunk_size=2)
    assert response.headers["content-type"] == accept
    got, doc = decode(response)
    want = reference(builtins, name, inputs)
    check(got, want, name, has_aux)
    if has_aux:
        assert_tree_close(doc["aux"], want[1])


@pytest.mark.parametrize(
    "argnums, wire_argnums",
    [(0, 0), (1, 1), (1, "y"), ((0, 1), [0, 1]), ((1, 0), ["y", "x"]), ((0, 1), [0, "y"]), (-1, -1)],
)
@pytest.mark.parametrize("transport", ["json", "npz"])
def test_argnums_forms(client, builtins, argnums, wire_argnums, transport):
    inputs = example_inputs("add_square")
    got, _ = decode(post(client, "add_square", inputs, transport, argnums=wire_argnums))
    want = reference(builtins, "add_square", inputs, argnums)
    assert_tree_close(got, want)
    assert isinstance(got, tuple) == isinstance(argnums, tuple)


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_tuple_output_nests_outputs_outer_inputs_inner(client, builtins, chunk_size):
    inputs = example_inputs("polar")
    got, _ = decode(post(client, "polar", inputs, "json", argnums=["r", "theta"], chunk_size=chunk_size))
    want = reference(builtins, "polar", inputs, (0, 1))
    assert_tree_close(got, want)
    assert len(got) == 2 and all(len(row) == 2 for row in got)


def test_inputs_by_name_and_base64(client, builtins):
    x, y = example_inputs("add_square")
    body = {
        "inputs": {
            "y": {"dtype": "float64", "shape": [N], "base64": __import__("base64").b64encode(y.astype("<f8").tobytes()).decode()},
            "x": {"dtype": "float64", "shape": [N], "data": x.tolist()},
        },
        "argnums": "y",
    }
    got, _ = decode(client.post("/v1/functions/add_square/jacobian", content=wire.dumps(body)))
    assert_tree_close(got, reference(builtins, "add_square", [x, y], 1))


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("transport", ["json", "npz"])
def test_batched_equals_vmap_jacrev(client, builtins, name, transport):
    inputs = example_inputs(name, batch=4)
    response = post(client, name, inputs, transport, batched=True)
    got, doc = decode(response)
    want = reference(builtins, name, inputs, batched=True)
    check(got, want, name, builtins.get(name).has_aux)


def test_rows_are_slices_of_the_full_jacobian(client, builtins):
    x = example_inputs("softmax")[0]
    full = reference(builtins, "softmax", [x]).numpy()
    for start, stop in [(0, 2), (1, 4), (3, 5), (2, 2)]:
        got, _ = decode(post(client, "softmax", [x], "npy", accept=wire.NPY, rows=[start, stop], chunk_size=2))
        np.testing.assert_allclose(got, full[start:stop], rtol=1e-7)


@pytest.mark.parametrize("mode", ["rev", "fwd", "auto"])
@pytest.mark.parametrize("name", ["softmax", "planar_arm", "polar", "lorenz96"])
def test_mode_never_changes_the_result(client, builtins, name, mode):
    inputs = example_inputs(name)
    got, doc = decode(post(client, name, inputs, "json", mode=mode, argnums=[0]))
    assert_tree_close(got, reference(builtins, name, inputs, (0,)))


def test_return_output(client, builtins):
    inputs = example_inputs("polar")
    got, doc = decode(post(client, "polar", inputs, "json", return_output=True))
    want_out = builtins.get("polar").fn(*map(torch.from_numpy, inputs))
    assert_tree_close(wire.decode_tree(doc["output"]), want_out)
    got, doc = decode(post(client, "polar", inputs, "npz", return_output=True))
    assert_tree_close(doc["output"], want_out)


def test_finite_differences_float64(client):
    """Independent of torch.func: central differences on lorenz96 and planar_arm."""
    for name in ("lorenz96", "planar_arm"):
        x = example_inputs(name)[0].astype(np.float64)
        got, _ = decode(post(client, name, [x], "json"))
        out = lambda v: np.asarray(client.post(f"/v1/functions/{name}/evaluate", json={"inputs": [{"dtype": "float64", "shape": list(v.shape), "data": v.tolist()}]}).json()["output"]["data"])
        eps = 1e-6
        fd = np.stack([(out(x + eps * e) - out(x - eps * e)) / (2 * eps) for e in np.eye(x.size)], axis=-1)
        np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-6)


def test_float64_in_float64_out_and_plain_numbers_float32(client):
    x = example_inputs("sin")[0]
    got, doc = decode(post(client, "sin", [x], "json"))
    assert doc["jacobian"]["dtype"] == "float64"
    doc = client.post("/v1/functions/sin/jacobian", json={"inputs": [[0.1, 0.2]]}).json()
    assert doc["jacobian"]["dtype"] == "float32"
    doc = client.post("/v1/functions/sin/jacobian", json={"inputs": [{"dtype": "float16", "shape": [2], "data": [0.1, 0.2]}]}).json()
    assert doc["jacobian"]["dtype"] == "float16"
    doc = client.post("/v1/functions/sin/jacobian", json={"inputs": [{"dtype": "bfloat16", "shape": [2], "data": [0.5, 1.0]}]}).json()
    np.testing.assert_allclose(np.diag(doc["jacobian"]["data"]), np.cos([0.5, 1.0]), rtol=1e-2)


def test_a_null_dtype_is_no_dtype(client):
    """SPEC 3.1: without a dtype an array takes the dtype the function declares.
    ``"dtype": null`` (as clients built from models send an unset field) took the data's
    own instead: integers were refused as int64 (422), floats answered in float64."""
    for data in ([1, 2], [0.5, 2.0]):
        for array in ({"dtype": None, "data": data}, {"dtype": None, "shape": [2], "data": data}):
            r = client.post("/v1/functions/sin/jacobian", json={"inputs": [array]})
            assert r.status_code == 200, (array, r.text)
            want = client.post("/v1/functions/sin/jacobian", json={"inputs": [data]}).json()["jacobian"]
            assert r.json()["jacobian"] == want and want["dtype"] == "float32"


def test_no_grad_is_respected(client):
    x = example_inputs("no_grad_square")[0]
    got, _ = decode(post(client, "no_grad_square", [x], "json"))
    np.testing.assert_allclose(got, np.eye(N))


def test_empty_and_scalar_inputs(client):
    got, _ = decode(client.post("/v1/functions/sin/jacobian", json={"inputs": [[]]}))
    assert got.shape == (0, 0)
    got, _ = decode(client.post("/v1/functions/sum_sin/jacobian", json={"inputs": [[0.0, 1.0]]}))
    np.testing.assert_allclose(got, np.cos([0.0, 1.0]), rtol=1e-6)
