"""Remote functions inside the caller's torch / SciPy code, round 15: the refusals the
adapters act on are read from problem+json members, not from the detail's words; each
case compared with the same computation in-process.

One server: the session's ``jacobian-service serve`` subprocess (``cc``, ``url``), shared
with the other adapter test files.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_client.torch import remote  # noqa: E402

from . import pytree_functions as pf  # noqa: E402
from . import remote15_functions as r15  # noqa: E402
from ._remote_support import cc, url  # noqa: E402,F401 (fixtures)
from .conftest import assert_problem  # noqa: E402

f = torch.func
SHAPE_MEMBERS = ("field", "path", "expected_shape", "got_shape")


def _members(problem):
    return {k: problem.get(k) for k in SHAPE_MEMBERS}


# --------------------------------------------------------------------------- an input refused for its shape: members


def test_an_input_refused_for_its_shape_says_so_in_members(url):
    """An input of the wrong shape is a 422 whose body carries the shapes as members, as a
    cotangent's does (round 14): ``field`` (the body's member, or the query parameter, that
    gave it), ``path`` (the input's name, a tree leaf's as the detail writes it),
    ``expected_shape`` (declared; a symbol bound by an earlier input as its size, one not
    bound as its name, ``"B"`` for a batch's dimension) and ``got_shape``. Before, only the
    detail's words said it."""
    cases = [  # (endpoint, body, members)
        ("evaluate", {"inputs": [[[0.1, 0.2], [0.3, 0.4]]]}, ("inputs", "x", ["n"], [2, 2])),
        ("jacobian", {"inputs": {"cfg": {"w": [1.0, 2.0, 3.0], "k": 3}, "x": [0.5, 0.2]}},
         ("inputs", "x", [3], [2])),
        ("jacobian", {"inputs": [[[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6], [0.7, 0.8]]]], "batched": True,
                      "in_dims": [1]},
         ("inputs", "x", ["n", "B"], [2, 2, 2])),  # batched over dim 1: each example 2-d where 1-d is declared
        ("evaluate", {"inputs": [0.5], "batched": True}, ("inputs", "x", ["B", "n"], [])),
    ]
    for endpoint, body, (field, path, expected, got) in cases:
        name = "tree_int" if "cfg" in str(body) else "sin"
        r = httpx.post(f"{url}/v1/functions/{name}/{endpoint}", json=body, timeout=30)
        problem = assert_problem(r, 422, "invalid_input")
        assert problem["detail"].startswith(f"input {path!r}"), problem
        assert _members(problem) == {"field": field, "path": path, "expected_shape": expected, "got_shape": got}
    # a batched input whose examples are the wrong shape: the whole array's shapes, "B" first
    r = httpx.post(f"{url}/v1/functions/sin/evaluate", json={"inputs": [[[[0.1]]]], "batched": True}, timeout=30)
    assert _members(assert_problem(r, 422, "invalid_input")) == {
        "field": "inputs", "path": "x", "expected_shape": ["B", "n"], "got_shape": [1, 1, 1]}
    # the sparsity endpoint's shapes: the query parameter that gave them
    r = httpx.get(f"{url}/v1/functions/add_square/sparsity", params={"shapes": "3;2"}, timeout=30)
    assert _members(assert_problem(r, 422, "invalid_input")) == {
        "field": "shapes", "path": "y", "expected_shape": [3], "got_shape": [2]}
    # the SDK (binary bodies) keeps them in its error's problem
    with jc.Client(url) as client, pytest.raises(jc.InvalidInput) as info:
        client.evaluate("sin", np.zeros((2, 2)))
    assert _members(info.value.problem) == {"field": "inputs", "path": "x", "expected_shape": ["n"],
                                            "got_shape": [2, 2]}


def test_a_shape_refusal_beside_an_integer_leaf_is_not_called_an_integer_leafs(cc):
    """``grad`` over ``cfg["w"]`` of ``tree_int`` with an ``x`` of another length than ``w``:
    in-process, torch's broadcasting error; through the service, its 422 on ``x``'s shape.
    The adapter put its integer-leaf hint ("a derivative in some leaves of input 0 asks the
    service for the whole parameter ... leaf 0['k'] is int64") before any 422 of a
    request whose parameter held an integer leaf, this one too, which has nothing to do
    with it: a shape refusal (its members say so) now stands alone, and the integer
    leaf's own refusal still gets the hint."""
    w, k = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor(3)
    x = torch.tensor([0.5, 0.2], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must match the size"):
        f.grad(lambda w: pf.tree_int({"w": w, "k": k}, x).sum())(w)
    fn = remote(cc.client, "tree_int")
    with pytest.raises(jc.InvalidInput) as info:
        f.grad(lambda w: fn({"w": w, "k": k}, x).sum())(w)
    assert info.value.detail.startswith("input 'x': expected shape (n,) with n = 3"), info.value.detail
    assert _members(info.value.problem)["got_shape"] == [2]
    jax = pytest.importorskip("jax")
    from jacobian_client.jax import remote as jremote

    # under jit with out_shape= the vjp goes first (XLA drops the forward): its 422 it was
    jfn = jremote(cc.client, "tree_int", out_shape=jax.ShapeDtypeStruct((3,), np.float32))
    with pytest.raises(jax.errors.JaxRuntimeError) as info:  # jit's, ending with the SDK's error
        jax.jit(jax.grad(lambda w: jfn({"w": w, "k": k.numpy()}, x.numpy().astype(np.float32)).sum()))(
            w.numpy().astype(np.float32))
    assert "InvalidInput: 422 invalid_input: input 'x': expected shape (n,) with n = 3" in str(info.value), str(info.value)[-900:]
    assert "whole parameter" not in str(info.value)  # the hint of an integer leaf's refusal
    x3 = torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64)
    with pytest.raises(jc.InvalidInput, match=r"leaf 0\['k'\] is int64"):
        f.grad(lambda w: fn({"w": w, "k": k}, x3).sum())(w)
    torch.testing.assert_close(f.grad(lambda x: fn({"w": w, "k": k}, x).sum())(x3),
                               f.grad(lambda x: pf.tree_int({"w": w, "k": k}, x).sum())(x3))


# --------------------------------------------------------------------------- no forward-mode rule: a member


def test_a_missing_forward_mode_rule_is_a_member_of_the_problem(url):
    """A jvp or hvp of a function with an op without a forward-mode rule (torch raises
    ``NotImplementedError``) is the function's 500 with ``"unsupported": "forward_mode"``
    (one vector, a stack); a function's own error in a jvp, whatever its words, is not."""
    x = [0.1, 0.2, 0.3]
    for name, endpoint, body in [
        ("square_no_jvp", "jvp", {"inputs": [x], "tangents": x}),
        ("square_no_jvp", "jvp", {"inputs": [x], "tangents": [x, x], "batched_vectors": True}),
        ("energy_no_jvp", "hvp", {"inputs": [x], "tangents": x}),
        ("energy_no_jvp", "hvp", {"inputs": [x], "tangents": [x, x], "batched_vectors": True}),
    ]:
        r = httpx.post(f"{url}/v1/functions/{name}/{endpoint}", json=body, timeout=30)
        problem = assert_problem(r, 500, "function_error")
        assert problem["unsupported"] == "forward_mode" and "NotImplementedError" in problem["detail"], (name, body)
    r = httpx.post(f"{url}/v1/functions/r15_says_forward/jvp", json={"inputs": [x], "tangents": x},
                   timeout=30)
    problem = assert_problem(r, 500, "function_error")
    assert "unsupported" not in problem and "forward" in problem["detail"] and "jvp" in problem["detail"]


def test_a_functions_own_error_saying_forward_asks_no_reverse_mode(cc):
    """A function whose own error under a transform says "forward" and "jvp" (a
    ``ValueError``, in-process too; its plain value answers): the adapters took it for a
    missing forward-mode rule and asked the reverse-mode request as well (the Jacobian for
    torch's jvp, the Hessian for SciPy's hessp), which failed the same way, before raising
    the first error. They now read the problem's member: the function's error, with no
    request more."""
    from jacobian_client.scipy import remote_objective

    x, t = torch.tensor([0.3, 0.5], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    words = "the forward solver takes plain tensors: no jvp or vjp of it"
    with pytest.raises(ValueError, match=words):
        f.jvp(r15.r15_says_forward, (x,), (t,))
    fn = remote(cc.client, "r15_says_forward")
    torch.testing.assert_close(fn(x), r15.r15_says_forward(x))
    cc.take()
    with pytest.raises(jc.FunctionError, match=words) as info:
        f.jvp(fn, (x,), (t,))
    assert "unsupported" not in info.value.problem
    assert cc.take() == ["evaluate", "jvp"]

    energy = remote_objective(cc.client, "r15_energy_says_forward")
    assert energy.fun(x.numpy()) == r15.r15_energy_says_forward(x).item()
    with pytest.raises(ValueError, match=words):
        f.jvp(f.grad(r15.r15_energy_says_forward), (x,), (t,))
    cc.take()
    with pytest.raises(jc.FunctionError, match=words):
        energy.hessp(x.numpy(), t.numpy())
    assert cc.take() == ["hvp"]
