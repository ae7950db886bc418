"""PyTorch's own torch.func test cases (test/functorch/test_eager_transforms.py: argnums,
has_aux, chunk_size, pytrees, 0-d and empty tensors, integer and complex dtypes, unrelated
outputs, in-place writes, errors) replayed over HTTP against tests/parity7_functions.py.

Every answer is compared with in-process torch.func: values, shapes, dtypes and the
structure of pytree answers; for errors, the exact status and code, and that torch raises
as well. One in-process app serves the module (no server start)."""

from __future__ import annotations

import collections
import io
from typing import Any

import numpy as np
import pytest
import torch
from torch.func import hessian, jacfwd, jacrev, jvp, vjp, vmap

from jacobian_client import wire

from . import parity7_functions as F
from .conftest import assert_problem, ready_app

FUNCTIONS = "tests.parity7_functions"
X = np.array([0.1, -0.2, 0.3], dtype=np.float32)
Y = np.array([1.0, 2.0, 3.0], dtype=np.float32)
Z = np.array(0.5, dtype=np.float32)


@pytest.fixture(scope="module")
def c():
    """Warmed up, as served: the warm-ups are the first calls the tests would pay anyway,
    and a function none can be made for (no_inputs) must not keep the app from ready."""
    with ready_app(FUNCTIONS, warmup=True) as client:
        yield client


def arr(a: Any) -> dict[str, Any]:
    """An array object with its dtype spelled out, so the service computes in it."""
    a = np.asarray(a)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tolist()}


def wire_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: wire_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [wire_tree(v) for v in tree]
    return arr(tree)


def post(c, name: str, endpoint: str, inputs: list[Any], **options: Any):
    return c.post(f"/v1/functions/{name}/{endpoint}", json={"inputs": [wire_tree(i) for i in inputs], **options})


def answer(response, key: str) -> tuple[Any, dict[str, Any]]:
    assert response.status_code == 200, response.text
    doc = response.json()
    return wire.decode_tree(doc[key]), doc


def t(a: Any) -> Any:
    """numpy (trees) -> fresh torch tensors, as the engine gets them."""
    if isinstance(a, dict):
        return {k: t(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(t(v) for v in a)
    return torch.from_numpy(np.array(a, copy=True))


def same(got: Any, want: Any, path: str = "", rtol: float | None = None) -> None:
    """Values, shapes, dtypes and structure (a dict's keys in order; tuples and lists
    alike, as JSON has only lists)."""
    if isinstance(want, torch.Tensor):
        want = want.detach().numpy()
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{path}: expected an array, got {type(got).__name__}"
        assert got.shape == want.shape, f"{path}: shape {got.shape} != {want.shape}"
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        if want.dtype.kind == "f":
            tol = rtol if rtol is not None else {2: 1e-3, 4: 1e-6, 8: 1e-12}[want.dtype.itemsize]
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=path)
        else:
            np.testing.assert_array_equal(got, want, err_msg=path)
    elif isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), f"{path}: {got!r} against {len(want)} entries"
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{path}[{i}]", rtol)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            same(got[k], want[k], f"{path}.{k}", rtol)
    else:
        assert got == want and type(got) is type(want), f"{path}: {got!r} != {want!r}"


def no_aux(fn):
    return lambda *a: fn(*a)[0]


# --- argnums, chunk_size: test_argnums_tuple, test_negative_argnums, test_chunk_jacrev ---


@pytest.mark.parametrize(
    ("wire_argnums", "torch_argnums"),
    [(0, 0), (-1, -1), ([0, -1], (0, -1)), ([2, 0], (2, 0)), (["y", -3], (1, -3)), ([1], (1,))],
)
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 100])
def test_argnums_and_chunk_size_as_jacrev(c, wire_argnums, torch_argnums, chunk_size):
    got, _ = answer(post(c, "three", "jacobian", [X, Y, Z], argnums=wire_argnums, chunk_size=chunk_size), "jacobian")
    same(got, jacrev(F.three, argnums=torch_argnums, chunk_size=chunk_size)(*t([X, Y, Z])))


@pytest.mark.parametrize(
    ("wire_argnums", "torch_argnums"),
    [([0, 0], (0, 0)), ([0, -3], (0, -3)), (["x", 0], (0, 0)), (3, 3), (-4, -4), ([], ()), (0.5, 0.5),
     ([[0]], ([0],)),
     # a bool is a Python int to torch (argnums=True is 1); JSON's true is no position
     (True, None)],
)
def test_argnums_torch_refuses_is_422(c, wire_argnums, torch_argnums):
    assert_problem(post(c, "three", "jacobian", [X, Y, Z], argnums=wire_argnums), 422, "invalid_input")
    if torch_argnums is not None:
        with pytest.raises(RuntimeError):
            jacrev(F.three, argnums=torch_argnums)(*t([X, Y, Z]))


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True])
def test_chunk_size_torch_refuses_is_422(c, chunk_size):
    assert_problem(post(c, "three", "jacobian", [X, Y, Z], chunk_size=chunk_size), 422, "invalid_input")


# --- outputs: unrelated inputs and outputs, constants, the identity, 0-d, empty ---


CASES = [
    # (function, inputs, options, torch's answer)
    ("unrelated_input", [X, Y[:2]], {"argnums": [0, 1]}, lambda x, y: jacrev(F.unrelated_input, argnums=(0, 1))(x, y)),
    ("constant", [X], {}, jacrev(F.constant)),
    ("constant", [X], {"mode": "fwd"}, jacfwd(F.constant)),
    ("identity", [X], {}, jacrev(F.identity)),
    ("identity", [X], {"mode": "fwd"}, jacrev(F.identity)),
    ("identity", [X.astype(np.float64)], {"chunk_size": 1}, jacrev(F.identity, chunk_size=1)),
    ("scalar_in", [Z], {}, jacrev(F.scalar_in)),
    ("scalar_to_vector", [Z], {}, jacrev(F.scalar_to_vector)),
    ("vector_to_scalar", [X], {}, jacrev(F.vector_to_scalar)),
    ("sin_any", [np.zeros(0, np.float32)], {}, jacrev(F.sin_any)),
    ("sin_any", [np.zeros((0, 3), np.float64)], {}, jacrev(F.sin_any)),
    ("sin_any", [np.zeros(0, np.float32)], {"mode": "fwd"}, jacrev(F.sin_any)),
    ("sin_any", [X], {"chunk_size": 1, "rows": [1, 3]}, lambda x: jacrev(F.sin_any)(x)[1:3]),
    ("empty_output", [X], {}, jacrev(F.empty_output)),
    ("empty_output", [X], {"chunk_size": 2}, jacrev(F.empty_output, chunk_size=2)),
    ("list_out", [X], {}, jacrev(F.list_out)),
    ("dict_out", [X, Y], {"argnums": [1, 0]}, jacrev(F.dict_out, argnums=(1, 0))),
    ("promote", [X, Y.astype(np.float64)], {"argnums": [0, 1]}, jacrev(F.promote, argnums=(0, 1))),
    ("promote", [X, Y.astype(np.float64)], {"argnums": [0, 1], "mode": "fwd"}, jacrev(F.promote, argnums=(0, 1))),
    ("float64_inside", [X], {}, jacrev(F.float64_inside)),
    ("int_arg", [X, np.array(3)], {}, jacrev(F.int_arg)),
    ("complex_inside", [X], {}, jacrev(F.complex_inside)),
    ("transposed", [np.arange(6, dtype=np.float32)], {}, jacrev(F.transposed)),
    ("expanded", [X], {}, jacrev(F.expanded)),
    ("inplace_view", [X], {}, jacrev(F.inplace_view)),
    ("inplace_nograd", [X], {}, jacrev(F.inplace_nograd)),
    ("tuple_param", [(X, Z), X], {"argnums": [0, 1]}, jacrev(F.tuple_param, argnums=(0, 1))),
]


@pytest.mark.parametrize(("name", "inputs", "options", "want"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_jacobian_as_torch(c, name, inputs, options, want):
    got, _ = answer(post(c, name, "jacobian", inputs, **options), "jacobian")
    same(got, want(*t(inputs)))


def test_empty_output_per_example_chunk_size_one(c):
    """A size-0 output per example, chunk_size=1: torch's jacrev(chunk_size=1) asserts on
    no rows ("expected t.size(0) to be 1, got 0": a 500 function_error, while every other
    chunk size answered); the answer must not depend on chunk_size."""
    xs = np.stack([X, Y])
    want = vmap(jacrev(F.empty_output))(t(xs))
    for chunk_size in (1, 2, None):
        for mode in ("rev", "fwd"):
            got, _ = answer(post(c, "empty_output", "jacobian", [xs], batched=True, chunk_size=chunk_size, mode=mode),
                            "jacobian")
            same(got, want)


@pytest.mark.parametrize(
    ("name", "inputs", "options", "want"),
    [
        ("constant", [X], {}, hessian(F.constant)),
        ("scalar_in", [Z], {}, hessian(F.scalar_in)),
        ("sin_any", [np.zeros(0, np.float32)], {}, hessian(F.sin_any)),
        ("empty_output", [X], {"chunk_size": 1}, hessian(F.empty_output)),
        ("dict_out", [X, Y], {}, hessian(F.dict_out)),
        ("promote", [X, Y.astype(np.float64)], {"argnums": [0, 1]}, hessian(F.promote, argnums=(0, 1))),
        ("scalar_two", [X, Y], {"argnums": [1, 0]}, hessian(F.scalar_two, argnums=(1, 0))),
        ("scalar_two", [X, Y], {"argnums": -1}, hessian(F.scalar_two, argnums=1)),  # see below: torch's -1
        ("nested_aux", [X], {}, hessian(no_aux(F.nested_aux))),
        ("int_arg", [X, np.array(3)], {}, hessian(F.int_arg)),
    ],
)
def test_hessian_as_torch(c, name, inputs, options, want):
    got, _ = answer(post(c, name, "hessian", inputs, **options), "hessian")
    same(got, want(*t(inputs)), rtol=1e-5)


def test_negative_argnums_forward_mode_as_their_positions(c):
    """torch 2.13's jacfwd (and so torch.func.hessian, jacfwd over jacrev) answers zeros,
    silently, for a negative argnums: ``jacfwd(f, argnums=-1)`` where ``argnums=1`` is
    right. The service counts from the end first, so forward-mode Jacobians and every
    Hessian strategy answer what the position answers, as jacrev does for -1."""
    x, y = t([X, Y])
    assert not jacfwd(F.promote, argnums=-1)(x, y).any()  # torch's own bug: if this fails, torch was fixed
    want = jacrev(F.promote, argnums=1)(x, y)
    assert want.any()
    same(jacrev(F.promote, argnums=-1)(x, y).numpy(), want)
    for mode in ("fwd", "auto", "rev"):
        got, _ = answer(post(c, "promote", "jacobian", [X, Y], argnums=-1, mode=mode), "jacobian")
        same(got, want)
    got, _ = answer(post(c, "scalar_two", "hessian", [X, Y], argnums=[-1, -2]), "hessian")
    same(got, hessian(F.scalar_two, argnums=(1, 0))(x, y), rtol=1e-5)


# --- has_aux: test_aux_tensor, test_aux_pytree, and aux through every endpoint ---


@pytest.mark.parametrize("name", ["nested_aux", "aux_tensor", "aux_none", "identity_aux"])
@pytest.mark.parametrize("endpoint", ["jacobian", "evaluate", "vjp", "jvp", "hessian"])
def test_aux_as_torch(c, name, endpoint):
    fn = getattr(F, name)
    vectors = {"vjp": {"cotangents": Y.tolist()}, "jvp": {"tangents": Y.tolist()}}.get(endpoint, {})
    r = post(c, name, endpoint, [X], **vectors)
    key = {"evaluate": "output"}.get(endpoint, endpoint)
    got, doc = answer(r, key)
    x = t(X)
    g, rebuild = tensor_aux(fn)
    if endpoint == "jacobian":
        want, aux = jacrev(g, has_aux=True)(x)
    elif endpoint == "evaluate":
        want, aux = g(x)
    elif endpoint == "vjp":
        _, pullback, aux = vjp(g, x, has_aux=True)
        (want,) = pullback(t(Y))
    elif endpoint == "jvp":
        _, want, aux = jvp(g, (x,), (t(Y),), has_aux=True)
    else:
        want, aux = hessian(no_aux(fn))(x), g(x)[1]
    same(got, want, rtol=1e-5)
    same(wire.decode_tree(doc["aux"]), rebuild([a.detach() for a in aux]))


def tensor_aux(fn):
    """torch.func takes only tensors in aux ("Expected tensors, got unsupported type
    int"); the service carries numbers, strings and None beside them. So torch gets
    the tensors, and the other leaves ride outside it: ``rebuild`` puts them back."""
    seen: dict[str, Any] = {}

    def g(*args):
        out, aux = fn(*args)
        seen["leaves"], seen["spec"] = torch.utils._pytree.tree_flatten(aux)
        return out, [v for v in seen["leaves"] if isinstance(v, torch.Tensor)]

    def rebuild(tensors):
        it = iter(tensors)
        leaves = [next(it) if isinstance(v, torch.Tensor) else v for v in seen["leaves"]]
        return torch.utils._pytree.tree_unflatten(leaves, seen["spec"])

    return g, rebuild


def test_aux_per_example_as_vmap(c):
    xs = np.stack([X, Y])
    got, doc = answer(post(c, "nested_aux", "jacobian", [xs], batched=True), "jacobian")
    # vmap cannot return aux's strings and Python numbers; example by example instead
    g, rebuild = tensor_aux(F.nested_aux)
    per = [jacrev(g, has_aux=True)(t(x)) for x in xs]
    same(got, torch.stack([p[0] for p in per]))
    aux = wire.decode_tree(doc["aux"])
    same(aux["a"], torch.stack([rebuild(p[1])["a"] for p in per]))
    same(aux["f"], torch.stack([rebuild(p[1])["f"] for p in per]))
    assert aux["b"][1]["e"] == "text" and aux["i"] == 2.5 and aux["j"] is True


@pytest.mark.parametrize(("endpoint", "vectors"), [("jacobian", {}), ("evaluate", {}), ("hessian", {}),
                                                  ("vjp", {"cotangents": [1, 1, 1]}), ("jvp", {"tangents": [1, 1, 1]})])
@pytest.mark.parametrize("name", ["aux_not_tuple", "aux_triple", "aux_list"])
def test_has_aux_without_a_pair_is_the_functions_error(c, endpoint, vectors, name):
    """test_aux_not_tuple: a bare tensor, three entries or a list where (output, aux) is
    due: torch raises; the service answers the function's 500, on every endpoint."""
    body = assert_problem(post(c, name, endpoint, [X], **vectors), 500, "function_error")
    assert "(output, aux)" in body["detail"]
    with pytest.raises(RuntimeError, match=r"\(output, aux\)"):
        jacrev(getattr(F, name), has_aux=True)(t(X))


# --- vjp / jvp / hvp: pytrees, argnums, ragged vectors written as plain lists ---


@pytest.mark.parametrize(
    ("name", "endpoint", "inputs", "options", "want"),
    [
        # tangents of inputs of different shapes, as plain JSON lists: they are no array
        ("unrelated_input", "jvp", [X, Y[:2]], {"argnums": [0, 1], "tangents": [[1, 1, 1], [1, 1]]},
         lambda x, y: jvp(F.unrelated_input, (x, y), (torch.ones(3), torch.ones(2)))[1]),
        ("unrelated_input", "jvp", [X, Y[:2]],
         {"argnums": [0, 1], "tangents": [[[1, 1, 1], [1, 2, 3]], [[1, 1], [2, 2]]], "batched_vectors": True},
         lambda x, y: vmap(lambda a, b: jvp(F.unrelated_input, (x, y), (a, b))[1])(
             torch.tensor([[1.0, 1, 1], [1, 2, 3]]), torch.tensor([[1.0, 1], [2, 2]]))),
        ("three", "jvp", [X, Y, Z], {"argnums": [0, 2], "tangents": [[1, 2, 3], 0.5]},
         lambda x, y, z: jvp(lambda a, b: F.three(a, y, b), (x, z), (torch.tensor([1.0, 2, 3]), torch.tensor(0.5)))[1]),
        ("three", "jvp", [X, Y, Z], {"argnums": [2, 0], "tangents": [0.5, [1, 2, 3]]},
         lambda x, y, z: jvp(lambda b, a: F.three(a, y, b), (z, x), (torch.tensor(0.5), torch.tensor([1.0, 2, 3])))[1]),
        ("scalar_two", "hvp", [X, Y], {"argnums": [1, 0], "tangents": [[1, 0, 0], [0, 1, 0]]},
         lambda x, y: jvp(torch.func.grad(lambda b, a: F.scalar_two(a, b), argnums=(0, 1)), (y, x),
                          (torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])))[1]),
        ("expanded", "vjp", [X], {"cotangents": [[[1, 2, 3], [4, 5, 6]], [1, -1]]},
         lambda x: vjp(F.expanded, x)[1]((torch.tensor([[1.0, 2, 3], [4, 5, 6]]), torch.tensor([1.0, -1])))[0]),
        ("dict_out", "vjp", [X, Y], {"cotangents": {"z": [1, 1, 1], "a": [[1, 2, 3], 2.0]}},
         lambda x, y: vjp(F.dict_out, x, y)[1]({"z": torch.ones(3), "a": (torch.tensor([1.0, 2, 3]), torch.tensor(2.0))})[0]),
        ("tuple_param", "jvp", [(X, Z), X], {"tangents": [[1, 1, 1], 2.0]},
         lambda p, x: jvp(lambda q: F.tuple_param(q, x), (p,), ((torch.ones(3), torch.tensor(2.0)),))[1]),
        ("tuple_param", "vjp", [(X, Z), X], {"argnums": [0, 1], "cotangents": [1, 2, 3]},
         lambda p, x: vjp(F.tuple_param, p, x)[1](torch.tensor([1.0, 2, 3]))),
        ("constant", "vjp", [X], {"cotangents": [1, 1, 1]}, lambda x: vjp(F.constant, x)[1](torch.ones(3))[0]),
        ("constant", "jvp", [X], {"tangents": [1, 1, 1]}, lambda x: jvp(F.constant, (x,), (torch.ones(3),))[1]),
        ("identity", "vjp", [X], {"cotangents": [1, 2, 3]}, lambda x: vjp(F.identity, x)[1](torch.tensor([1.0, 2, 3]))[0]),
        ("scalar_to_vector", "vjp", [Z], {"cotangents": [[1, 1, 1], [0, 1, 0]], "batched_vectors": True},
         lambda z: vmap(vjp(F.scalar_to_vector, z)[1])(torch.tensor([[1.0, 1, 1], [0, 1, 0]]))[0]),
        ("sin_any", "jvp", [np.zeros(0, np.float32)], {"tangents": []},
         lambda x: jvp(F.sin_any, (x,), (torch.zeros(0),))[1]),
        ("promote", "jvp", [X, Y.astype(np.float64)], {"argnums": [0, 1], "tangents": [[1, 1, 1], [1, 2, 3]]},
         lambda x, y: jvp(F.promote, (x, y), (torch.ones(3), torch.tensor([1.0, 2, 3], dtype=torch.float64)))[1]),
        ("promote", "vjp", [X, Y.astype(np.float64)], {"argnums": [0, 1], "cotangents": [1, 2, 3]},
         lambda x, y: vjp(F.promote, x, y)[1](torch.tensor([1.0, 2, 3], dtype=torch.float64))),
        ("int_output", "jvp", [X], {"tangents": [1, 1, 1]}, lambda x: jvp(F.int_output, (x,), (torch.ones(3),))[1]),
        ("inplace_input", "jvp", [X], {"tangents": [1, 2, 3]},
         lambda x: jvp(F.inplace_input, (x,), (torch.tensor([1.0, 2, 3]),))[1]),
    ],
)
def test_products_as_torch(c, name, endpoint, inputs, options, want):
    got, _ = answer(post(c, name, endpoint, inputs, **options), endpoint)
    same(got, want(*t(inputs)), rtol=1e-5)


@pytest.mark.parametrize(
    ("vectors", "detail"),
    [
        ([[1, 2], [3]], "tangents: expected one array of shape [2, 2], got 2 entries of different shapes"),
        ([[1, 2]], "tangents: expected shape [2, 2], got [1, 2]"),
    ],
)
def test_ragged_single_vector_is_422_naming_the_shape(c, vectors, detail):
    body = assert_problem(post(c, "sin_any", "jvp", [np.ones((2, 2), np.float32)], tangents=vectors), 422, "invalid_input")
    assert body["detail"] == detail


def test_cotangents_of_a_tuple_output_of_wrong_length_is_422(c):
    r = post(c, "dict_out", "vjp", [X, Y], cotangents={"z": [1, 1, 1], "a": [[1, 1, 1], 1.0, 2.0]})
    assert "cotangents.a: expected 2 entries" in assert_problem(r, 422, "invalid_input")["detail"]
    with pytest.raises(RuntimeError):  # torch: the cotangents' structure must be the output's
        vjp(F.dict_out, *t([X, Y]))[1]({"z": torch.ones(3), "a": (torch.ones(3), torch.tensor(1.0), torch.tensor(2.0))})


# --- what each endpoint answers when torch raises ---

ENDPOINTS = [("jacobian", {}), ("hessian", {}), ("evaluate", {}), ("vjp", {"cotangents": [1, 1, 1]}),
             ("jvp", {"tangents": [1, 1, 1]}), ("hvp", {"tangents": [1, 1, 1]})]


@pytest.mark.parametrize(("endpoint", "vectors"), ENDPOINTS)
@pytest.mark.parametrize(("name", "detail"), [("raises", "ValueError: parity7 says no"),
                                               ("returns_none", "the output is None: no tensor"),
                                               ("returns_float", "the output is a float, not a tensor")])
def test_function_errors_on_every_endpoint(c, endpoint, vectors, name, detail):
    body = assert_problem(post(c, name, endpoint, [X], **vectors), 500, "function_error")
    assert detail in body["detail"]
    with pytest.raises((ValueError, RuntimeError)):
        jacrev(getattr(F, name))(t(X))


@pytest.mark.parametrize(
    ("name", "endpoint", "options", "torch_call"),
    [
        # test_inplace_on_inputs: jacrev's inputs are leaves that require grad
        ("inplace_input", "jacobian", {}, lambda x: jacrev(F.inplace_input)(x)),
        ("inplace_input", "jacobian", {"mode": "fwd"}, lambda x: jacrev(F.inplace_input)(x)),
        ("inplace_input", "vjp", {"cotangents": [1, 1, 1]}, lambda x: vjp(F.inplace_input, x)),
        ("int_output", "jacobian", {}, lambda x: jacrev(F.int_output)(x)),
        ("int_output", "vjp", {"cotangents": [1, 1, 1]}, lambda x: vjp(F.int_output, x)),
        ("complex_output", "jacobian", {}, lambda x: jacrev(F.complex_output)(x)),
    ],
)
def test_where_torch_raises_the_function_fails(c, name, endpoint, options, torch_call):
    # (an integer or complex output did not fail: no derivative was there to ask for, the request's 422)
    status, code = (422, "invalid_input") if name in ("int_output", "complex_output") else (500, "function_error")
    assert_problem(post(c, name, endpoint, [X], **options), status, code)
    with pytest.raises(RuntimeError):
        torch_call(t(X))


@pytest.mark.parametrize("endpoint", ["jacobian", "hessian"])
@pytest.mark.parametrize("argnums", [1, [0, 1]])
def test_integer_input_to_differentiate_is_422(c, endpoint, argnums):
    body = assert_problem(post(c, "int_arg", endpoint, [X, np.array(3)], argnums=argnums), 422, "invalid_input")
    assert "'k' is int64" in body["detail"]
    with pytest.raises(RuntimeError):
        jacrev(F.int_arg, argnums=1)(*t([X, np.array(3)]))


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_integer_array_to_differentiate_is_422_and_evaluates(c, dtype):
    x = np.array([1, 0, 1]).astype(dtype)
    assert_problem(post(c, "sin_any", "jacobian", [x]), 422, "invalid_input")
    with pytest.raises(RuntimeError):
        jacrev(F.sin_any)(t(x))
    got, _ = answer(post(c, "sin_any", "evaluate", [x]), "output")
    same(got, F.sin_any(t(x)))


# --- per-example (batched) Jacobians and Hessians ---


def test_per_example_argnums_and_chunk_size(c):
    xs, ys, zs = np.stack([X, Y]), np.stack([Y, X]), np.array([0.5, 0.7], np.float32)
    got, _ = answer(post(c, "three", "jacobian", [xs, ys, zs], argnums=[0, -1], batched=True, chunk_size=1), "jacobian")
    same(got, vmap(jacrev(F.three, argnums=(0, -1)))(*t([xs, ys, zs])))
    got, _ = answer(post(c, "three", "hessian", [xs, ys, zs], argnums=[-1, 0], batched=True), "hessian")
    same(got, vmap(hessian(F.three, argnums=(2, 0)))(*t([xs, ys, zs])), rtol=1e-5)  # see below: torch's -1
    got, _ = answer(post(c, "scalar_in", "jacobian", [zs], batched=True), "jacobian")
    same(got, vmap(jacrev(F.scalar_in))(t(zs)))


# --- precision on the wire: JSON's digits and .npz, float16 to float64 ---


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_values_exact_on_both_transports(c, dtype):
    """The wire adds no rounding: the same bits torch computes, JSON and .npz alike."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(6) * 10.0 ** rng.integers(-3, 4, 6)).astype(dtype)
    if dtype == "float64":
        x[0], x[1] = 5e-324, 0.1 + 2**-55
    want_j = jacrev(F.sin_any)(t(x)).numpy()
    want_o = F.sin_any(t(x)).numpy()
    got, doc = answer(post(c, "sin_any", "jacobian", [x], return_output=True), "jacobian")
    assert got.dtype == want_j.dtype and np.array_equal(got, want_j)
    out = wire.decode_tree(doc["output"])
    assert out.dtype == want_o.dtype and np.array_equal(out, want_o)
    buf = io.BytesIO()
    np.savez(buf, x=x)
    r = c.post("/v1/functions/sin_any/jacobian?return_output=true", content=buf.getvalue(),
               headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    assert r.status_code == 200, r.text
    trees, _ = wire.read_result_npz(r.content)
    assert trees["jacobian"].dtype == want_j.dtype and np.array_equal(trees["jacobian"], want_j)
    assert np.array_equal(trees["output"], want_o)


@pytest.mark.parametrize(("query", "want_argnums"), [("argnums=-1", -1), ("argnums=0,", (0,)), ("argnums=0,-1", (0, -1))])
def test_npz_query_argnums_as_jacrev(c, query, want_argnums):
    buf = io.BytesIO()
    np.savez(buf, x=X, y=Y, z=Z)
    r = c.post(f"/v1/functions/three/jacobian?{query}&chunk_size=1", content=buf.getvalue(),
               headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    assert r.status_code == 200, r.text
    trees, _ = wire.read_result_npz(r.content)
    same(trees["jacobian"], jacrev(F.three, argnums=want_argnums)(*t([X, Y, Z])))


def test_stacked_tangents_of_a_function_writing_into_its_input(c):
    """test_inplace_on_inputs, forward mode: ``x.mul_(2)`` under torch.func.jvp doubles
    the primal and the tangent in place. A stack of tangents ran under vmap, then its
    check and the one-at-a-time loop ran on what that left: 2x torch's answer, with a
    200. Each product must see the request's values, as torch's one call does."""
    x, vs = X, np.stack([X, Y])
    want = vmap(lambda v: jvp(F.inplace_input, (t(x),), (v,))[1])(t(vs))
    for _ in range(2):  # the first runs vmap's check; the second takes its verdict
        got, _ = answer(post(c, "inplace_input", "jvp", [x], tangents=vs.tolist(), batched_vectors=True), "jvp")
        same(got, want)
    got, _ = answer(post(c, "inplace_input", "jvp", [x], tangents=vs[1].tolist()), "jvp")
    same(got, want[1])


# --- more of torch's TestJac / TestHessian / TestJvp cases ---

RNG = np.random.default_rng(1)
XC, YC = RNG.standard_normal((10, 2)).astype(np.float32), RNG.standard_normal((1, 2)).astype(np.float32)
XD = RNG.standard_normal((3, 3)).astype(np.float32)
X3, Y2, Z2 = (RNG.standard_normal(s).astype(np.float32) for s in ((3,), (2,), (2,)))


def looped(fn):
    """Example by example: the reference where torch's own vmap cannot run."""
    return lambda *xs: torch.stack([fn(*(x[i] for x in xs)) for i in range(xs[0].shape[0])])


TORCH_CASES = [
    # (function, endpoint, inputs, options, torch's answer)
    # test_inplace: y.copy_(x) then y; x[:2] = y into an input not differentiated
    ("copy_into_other", "jacobian", [X[:2], Y[:2]], {}, jacrev(F.copy_into_other)),
    ("copy_into_other", "jacobian", [X[:2], Y[:2]], {"mode": "fwd"}, jacfwd(F.copy_into_other)),
    ("copy_into_other", "hessian", [X[:2], Y[:2]], {}, hessian(F.copy_into_other)),
    ("copy_into_other", "jvp", [X[:2], Y[:2]], {"tangents": [1, 2]},
     lambda x, y: jvp(F.copy_into_other, (x, y), (torch.tensor([1.0, 2]), torch.zeros(2)))[1]),
    ("copy_into_other", "jacobian", [np.stack([X[:2], Y[:2]]), np.stack([Y[:2], X[:2]])], {"batched": True},
     vmap(jacrev(F.copy_into_other))),
    ("slice_assign", "jacobian", [X3, Y2, Z2], {"argnums": [1, 2]}, jacrev(F.slice_assign, argnums=(1, 2))),
    ("slice_assign", "jacobian", [X3, Y2, Z2], {"argnums": [1, 2], "mode": "fwd"}, jacfwd(F.slice_assign, argnums=(1, 2))),
    ("slice_assign", "hessian", [X3, Y2, Z2], {"argnums": [1, 2]}, hessian(F.slice_assign, argnums=(1, 2))),
    ("slice_assign", "jacobian", [np.stack([X3, X3]), np.stack([Y2, Z2]), np.stack([Z2, Y2])],
     {"argnums": [1, 2], "batched": True}, vmap(jacrev(F.slice_assign, argnums=(1, 2)))),
    # test_chunk_jacrev: nested tuple outputs at every chunk size, and forward mode
    *[("chunk_tree", "jacobian", [XC, YC], {"argnums": [0, 1], "chunk_size": cs}, jacrev(F.chunk_tree, argnums=(0, 1)))
      for cs in (1, 3, 7, 10, 1000)],
    ("chunk_tree", "jacobian", [XC, YC], {"argnums": [0, 1], "mode": "fwd"}, jacrev(F.chunk_tree, argnums=(0, 1))),
    ("chunk_tree", "hessian", [XC, YC], {"argnums": [0, 1]}, hessian(F.chunk_tree, argnums=(0, 1))),
    # test_chunk_jacrev_chunksize_one: torch's jacrev needs chunk_size=1; the service
    # answers every chunk size (rows one by one where vmap cannot run), a stack of
    # cotangents and per-example Jacobians too
    *[("dynamic_backward", "jacobian", [XD], {"chunk_size": cs}, jacrev(F.dynamic_backward, chunk_size=1))
      for cs in (None, 1, 2)],
    ("dynamic_backward", "jacobian", [XD], {"mode": "fwd"}, jacrev(F.dynamic_backward, chunk_size=1)),
    ("dynamic_backward", "jacobian", [np.stack([XD, -XD])], {"batched": True},
     looped(jacrev(F.dynamic_backward, chunk_size=1))),
    ("dynamic_backward", "vjp", [XD], {"cotangents": np.stack([XD, XD**2]).tolist(), "batched_vectors": True},
     lambda x: looped(lambda v: vjp(F.dynamic_backward, x)[1](v)[0])(t(np.stack([XD, XD**2])))),
    # test_against_reference_unrelated_outputs / _zero_dim; TestHessian's unrelated outputs
    ("returns_inputs", "jacobian", [X[:2], Y], {"argnums": [0, 1]}, jacrev(F.returns_inputs, argnums=(0, 1))),
    ("returns_inputs", "jacobian", [X[:2], Y], {"argnums": [0, 1], "mode": "fwd"}, jacrev(F.returns_inputs, argnums=(0, 1))),
    ("returns_inputs", "hessian", [X[:2], Y], {"argnums": [0, 1]}, hessian(F.returns_inputs, argnums=(0, 1))),
    ("returns_inputs", "vjp", [X[:2], Y], {"argnums": [0, 1], "cotangents": [[1, 1], [1, 1, 1], [2, 2], [2, 2, 2]]},
     lambda x, y: vjp(F.returns_inputs, x, y)[1]((torch.ones(2), torch.ones(3), 2 * torch.ones(2), 2 * torch.ones(3)))),
    ("zero_dim_mixed", "jacobian", [Z, Y[:1]], {"argnums": [0, 1]}, jacrev(F.zero_dim_mixed, argnums=(0, 1))),
    ("zero_dim_mixed", "jacobian", [Z, Y[:1]], {"argnums": [0, 1], "mode": "fwd"}, jacrev(F.zero_dim_mixed, argnums=(0, 1))),
    ("zero_dim_mixed", "hessian", [Z, Y[:1]], {"argnums": [0, 1]}, hessian(F.zero_dim_mixed, argnums=(0, 1))),
    ("ones_scalar", "hessian", [X[:2], Y], {"argnums": [0, 1]}, hessian(F.ones_scalar, argnums=(0, 1))),
    ("ones_scalar", "hvp", [X[:2], Y], {"argnums": [0, 1], "tangents": [[1, 1], [1, 1, 1]]},
     lambda x, y: jvp(torch.func.grad(F.ones_scalar, argnums=(0, 1)), (x, y), (torch.ones(2), torch.ones(3)))[1]),
    # aliased outputs; outputs of two float dtypes
    ("aliased_outputs", "jacobian", [X], {}, jacrev(F.aliased_outputs)),
    ("aliased_outputs", "vjp", [X], {"cotangents": [[1, 1, 1], {"again": [1, 2, 3], "input": [1, 1, 1]}]},
     lambda x: vjp(F.aliased_outputs, x)[1]((torch.ones(3), {"again": torch.tensor([1.0, 2, 3]), "input": torch.ones(3)}))[0]),
    *[("mixed_dtypes", endpoint, [X.astype(dtype)], options, want)
      for dtype in ("float16", "float64")
      for endpoint, options, want in [("jacobian", {}, jacrev(F.mixed_dtypes)), ("jacobian", {"mode": "fwd"}, jacrev(F.mixed_dtypes)),
                                      ("hessian", {}, hessian(F.mixed_dtypes))]],
    # an output wider than its input (float16 in, float32 out): blocks in the input's dtype
    *[("upcast", endpoint, [X.astype(np.float16)], options, want)
      for endpoint, options, want in [("jacobian", {}, jacrev(F.upcast)), ("jacobian", {"mode": "fwd"}, jacrev(F.upcast)),
                                      ("hessian", {}, hessian(F.upcast)),
                                      ("jvp", {"tangents": [1, 2, 3]},
                                       lambda x: jvp(F.upcast, (x,), (torch.tensor([1.0, 2, 3], dtype=torch.float16),))[1])]],
    # a model's parameters: outputs and aux that require grad outside the transform
    ("with_parameters", "jacobian", [X], {}, lambda x: jacrev(F.with_parameters, has_aux=True)(x)[0]),
    ("with_parameters", "hessian", [X], {}, hessian(no_aux(F.with_parameters))),
    # a backward that writes into the cotangent it is given
    *[("backward_writes_grad", "jacobian", [X], {"chunk_size": cs}, jacrev(F.backward_writes_grad)) for cs in (None, 1, 2)],
    ("backward_writes_grad", "vjp", [X], {"cotangents": [[1, 2, 3], [4, 5, 6]], "batched_vectors": True},
     lambda x: looped(lambda v: vjp(F.backward_writes_grad, x)[1](v.clone())[0])(torch.tensor([[1.0, 2, 3], [4, 5, 6]]))),
    # namedtuple and OrderedDict outputs: a JSON list and an object in the output's order
    ("namedtuple_out", "jacobian", [X], {}, jacrev(F.namedtuple_out)),
    ("namedtuple_out", "hessian", [X], {}, hessian(F.namedtuple_out)),
    ("namedtuple_out", "vjp", [X], {"cotangents": [[1, 2, 3], 2.0]},
     lambda x: vjp(F.namedtuple_out, x)[1](F._Pair(torch.tensor([1.0, 2, 3]), torch.tensor(2.0)))[0]),
    ("ordered_dict_out", "jacobian", [X], {"mode": "fwd"}, jacrev(F.ordered_dict_out)),
    ("ordered_dict_out", "vjp", [X], {"cotangents": {"a": [1, 1, 1], "b": [1, 2, 3]}},
     lambda x: vjp(F.ordered_dict_out, x)[1](
         collections.OrderedDict(b=torch.tensor([1.0, 2, 3]), a=torch.ones(3)))[0]),
    # hvp of a scalar with aux over a vector and a 0-d input: tangents as a plain ragged list
    ("scalar_aux", "hvp", [X, Z], {"argnums": [0, 1], "tangents": [[1, 2, 3], 1.0]},
     lambda x, y: jvp(torch.func.grad(no_aux(F.scalar_aux), argnums=(0, 1)), (x, y),
                      (torch.tensor([1.0, 2, 3]), torch.tensor(1.0)))[1]),
    ("scalar_aux", "hvp", [X, Z], {"argnums": [0, 1], "tangents": [[[1, 2, 3], [0, 1, 0]], [1.0, 0.0]],
                                   "batched_vectors": True},
     lambda x, y: vmap(lambda a, b: jvp(torch.func.grad(no_aux(F.scalar_aux), argnums=(0, 1)), (x, y), (a, b))[1])(
         torch.tensor([[1.0, 2, 3], [0, 1, 0]]), torch.tensor([1.0, 0.0]))),
    ("scalar_aux", "hessian", [X, Z], {"argnums": [1, 0]}, hessian(no_aux(F.scalar_aux), argnums=(1, 0))),
    # all under no_grad: reverse mode's constant (zeros, whatever mode asks), forward's 2 I in jvp
    ("all_no_grad", "jacobian", [X], {"mode": "fwd"}, jacrev(F.all_no_grad)),
    ("all_no_grad", "hessian", [X], {}, hessian(F.all_no_grad)),
    ("all_no_grad", "jvp", [X], {"tangents": [1, 2, 3]}, lambda x: jvp(F.all_no_grad, (x,), (torch.tensor([1.0, 2, 3]),))[1]),
    ("writes_other", "jvp", [X, Y], {"tangents": [1, 1, 1]},
     lambda x, y: jvp(F.writes_other, (x, y), (torch.ones(3), torch.zeros(3)))[1]),
    ("writes_other", "jacobian", [X, Y], {"mode": "fwd", "return_output": True}, jacrev(F.writes_other)),
]


@pytest.mark.parametrize(("name", "endpoint", "inputs", "options", "want"), TORCH_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(TORCH_CASES)])
def test_torch_eager_transform_cases(c, name, endpoint, inputs, options, want):
    got, doc = answer(post(c, name, endpoint, inputs, **options), endpoint)
    same(got, want(*t(inputs)), rtol=1e-3 if inputs[0].dtype == np.float16 else 1e-5)
    if name == "with_parameters":  # aux's tensors, the layer's weight among them
        _, aux = F.with_parameters(t(X))
        same(wire.decode_tree(doc["aux"]), {k: v.detach() for k, v in aux.items()})
    if options.get("return_output"):
        same(wire.decode_tree(doc["output"]), getattr(F, name)(*t(inputs)))


@pytest.mark.parametrize(
    ("name", "endpoint", "inputs", "options", "torch_call"),
    [
        # x is differentiated and written into: jacrev's leaf refuses the write
        ("slice_assign", "jacobian", [X3, Y2, Z2], {"argnums": 0}, lambda x, y, z: jacrev(F.slice_assign)(x, y, z)),
        # torch.func.hessian vmaps the backward, whose nonzero vmap cannot batch
        ("dynamic_backward", "hessian", [XD], {}, lambda x: hessian(F.dynamic_backward)(x)),
    ],
)
def test_torch_eager_transform_errors(c, name, endpoint, inputs, options, torch_call):
    assert_problem(post(c, name, endpoint, inputs, **options), 500, "function_error")
    with pytest.raises(RuntimeError):
        torch_call(*t(inputs))


@pytest.mark.parametrize("k", [3.5, {"dtype": "int64", "shape": [], "data": 2.5}, [0.5]])
def test_fractional_number_for_an_integer_input_is_422(c, k):
    """A plain JSON 3.5 for an int64 input computed with 3, silently (numpy's cast
    truncates), where a float32 array is refused as no same_kind cast: whole numbers only."""
    r = c.post("/v1/functions/int_arg/evaluate", json={"inputs": [X.tolist(), k]})
    assert "not a whole number" in assert_problem(r, 422, "invalid_input")["detail"]


@pytest.mark.parametrize("k", [3, 3.0, 1e3, {"dtype": "int32", "shape": [], "data": 3}])
def test_whole_numbers_for_an_integer_input(c, k):
    got, _ = answer(c.post("/v1/functions/int_arg/jacobian", json={"inputs": [X.tolist(), k], "return_output": True}),
                    "jacobian")
    whole = int(k["data"] if isinstance(k, dict) else k)
    same(got, jacrev(F.int_arg)(t(X), torch.tensor(whole)))


@pytest.mark.parametrize("transport", ["json", "npz"])
@pytest.mark.parametrize(("k", "dtype"), [(2**40 + 3, "int64"), (2**63, "uint64"), (-(2**31) - 1, "int64")])
def test_integer_too_wide_for_an_integer_input_is_422(c, transport, k, dtype):
    """An int64 2**40 + 3 for an int32 input was cast (same_kind) with wrap-around and
    computed with k = 3 (200), where the same number sent plain is a 422."""
    x = X.tolist()
    if transport == "json":
        r = c.post("/v1/functions/int32_arg/evaluate", json={"inputs": [x, {"dtype": dtype, "shape": [], "data": k}]})
    else:
        buf = io.BytesIO()
        np.savez(buf, x=X, k=np.array(k, dtype=dtype))
        r = c.post("/v1/functions/int32_arg/evaluate", content=buf.getvalue(), headers={"content-type": wire.NPZ})
    assert assert_problem(r, 422, "invalid_input")["detail"] == f"input 'k': {k} does not fit int32"
    got, _ = answer(c.post("/v1/functions/int32_arg/jacobian", json={"inputs": [x, {"dtype": dtype, "shape": [], "data": 7}]}),
                    "jacobian")  # a value that fits still casts
    same(got, jacrev(F.int32_arg)(t(X), torch.tensor(7, dtype=torch.int32)))


def test_a_function_of_no_inputs(c):
    """A function taking nothing: its warm-up, which had no Jacobian to take, ended every
    engine at start-up (the service was never ready; the fixture waits for ready), and
    evaluate said 'argnums: 0 is out of range'. Evaluate answers f(); derivatives are
    torch's error (jacrev(f)() has no input), a 422."""
    got, _ = answer(c.post("/v1/functions/no_inputs/evaluate", json={"inputs": []}), "output")
    same(got, F.no_inputs())
    got, _ = answer(c.post("/v1/functions/no_inputs/evaluate", json={"inputs": {}}), "output")
    same(got, F.no_inputs())
    for endpoint in ("jacobian", "hessian"):
        assert_problem(c.post(f"/v1/functions/no_inputs/{endpoint}", json={"inputs": []}), 422, "invalid_input")
    with pytest.raises(RuntimeError, match="positional inputs"):
        jacrev(F.no_inputs)()
    body = assert_problem(c.post("/v1/functions/no_inputs/evaluate", json={"inputs": [], "batched": True}), 422,
                          "invalid_input")
    assert "batch" in body["detail"]
