"""Remote functions in a scientist's programs, round 24: each answer compared with the
same program in-process (``torch.func``, jax, SciPy on the local function).

* A pytree parameter declared with a list, sent as a tuple (or a dict in another key
  order): the plain SDK's derivatives followed the *declared* tree, where ``torch.func``
  follows the caller's.
* ``solve_bvp`` with a time-dependent right-hand side ``fun(x, y)``: the mesh went as one
  shared input, a 422; ``per_column`` maps it with the columns.
* Cotangents past ``MAX_NPZ_MEMBERS`` arrays: one rule in JSON and ``.npz`` (the inputs'
  members no longer eat the vectors' room), a 413 saying it with members, and the
  adapters' backward through such a function contracts its Jacobian instead.
* An integer input sent a float of 2^53 or more (ambiguous: a double stands for several
  integers) is refused, and exact integers beside floats are read exactly.

One in-process app (``ready_app``) serves the module; the SDK reaches it through
``sdk_over`` (no socket).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc
from jacobian_client.torch import remote
from torch.utils import _pytree as pytree

from . import remote24_functions as r24
from ._remote_support import Counted, counting, jx  # noqa: F401 (fixture)
from .conftest import ready_app, sdk_over

f = torch.func
D = torch.float64
X = np.array([0.3, -1.2, 0.7])


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    with ready_app("tests.remote24_functions") as a:
        yield a


@pytest.fixture(scope="module")
def sdk(app: Any) -> Iterator[Any]:
    with sdk_over(app) as client:
        yield client


@pytest.fixture
def cc(sdk: Any) -> Iterator[Counted]:
    """The module's client, its requests recorded as ``Counted`` records them."""
    with counting(sdk) as c:
        yield c


def np_tree(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t), tree)


def t_tree(tree: Any) -> Any:
    return pytree.tree_map(lambda a: torch.tensor(a, dtype=D), tree)


def same_tree(got: Any, want: Any, tol: float = 1e-12) -> None:
    """Same pytree (list and tuple told apart, dict keys in order, as torch tells them) and values."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    assert got_spec == want_spec, f"\n got: {got_spec}\nwant: {want_spec}"
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- 1. the caller's pytree


def _params(seq: type, order: str = "ab") -> dict[str, Any]:
    a, bc = np.array([0.5, -1.0, 2.0]), seq([np.array(1.5), np.array([0.2, 0.4, -0.3])])
    return {"a": a, "bc": bc} if order == "ab" else {"bc": bc, "a": a}


@pytest.mark.parametrize("transport", ["json", "binary"])
@pytest.mark.parametrize("seq, order", [(tuple, "ab"), (list, "ab"), (tuple, "ba")])
def test_derivatives_nest_as_the_caller_sent_the_parameter(sdk, transport, seq, order):
    """``p["bc"]`` is declared a list. Sent as a tuple, the vjp, Jacobian, Hessian and hvp
    came back holding a list (and a dict in the declared key order, sent in another),
    where ``torch.func`` nests them as the caller's pytree: now as the caller's."""
    p = _params(seq, order)
    pt, xt = t_tree(p), torch.tensor(X, dtype=D)
    fn = r24.r24_listed
    out_t = fn(pt, xt)
    cot = (np.array([1.0, -2.0, 0.5]), np.array(0.7))

    _, pull = f.vjp(fn, pt, xt)
    same_tree(sdk.vjp("r24_listed", p, X, cotangents=cot, transport=transport), np_tree(pull(t_tree(cot))[0]))
    same_tree(sdk.jacobian("r24_listed", p, X, transport=transport), np_tree(f.jacrev(fn)(pt, xt)))
    same_tree(sdk.jacobian("r24_listed", p, X, argnums=(0, 1), transport=transport),
              np_tree(f.jacrev(fn, argnums=(0, 1))(pt, xt)))
    same_tree(sdk.hessian("r24_listed", p, X, transport=transport), np_tree(f.hessian(fn)(pt, xt)))

    def gradient(q: Any) -> Any:
        return f.vjp(lambda q: fn(q, xt), q)[1](t_tree(cot))[0]

    same_tree(sdk.hvp("r24_listed", p, X, tangents=p, cotangents=cot, transport=transport),
              np_tree(f.jvp(gradient, (pt,), (pt,))[1]))
    assert isinstance(out_t, tuple)


def test_derivatives_by_parameter_name_nest_as_the_caller_sent_it(app):
    """``argnums="p"``: the one pytree parameter sent; several names: by the function's
    description, once the client has it (``client.function``), else as declared."""
    p, pt, xt = _params(tuple), t_tree(_params(tuple)), torch.tensor(X, dtype=D)
    with sdk_over(app) as fresh:
        same_tree(fresh.jacobian("r24_listed", p, X, argnums="p"), np_tree(f.jacrev(r24.r24_listed)(pt, xt)))
        assert isinstance(fresh.jacobian("r24_listed", p, X, argnums=("p", "x"))[0][0]["bc"], list)  # not guessed
        fresh.function("r24_listed")
        same_tree(fresh.jacobian("r24_listed", p, X, argnums=("p", "x")),
                  np_tree(f.jacrev(r24.r24_listed, argnums=(0, 1))(pt, xt)))


# --------------------------------------------------------------------------- 2. solve_bvp, fun(x, y)


def _airy_local() -> tuple[Any, Any]:
    def fun(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return f.vmap(r24.r24_airy, in_dims=(0, 1), out_dims=-1)(torch.from_numpy(x), torch.from_numpy(y)).numpy()

    def fun_jac(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        jac = f.vmap(f.jacrev(r24.r24_airy, argnums=1), in_dims=(0, 1), out_dims=-1)
        return jac(torch.from_numpy(x), torch.from_numpy(y)).numpy()

    return fun, fun_jac


def _bc(ya: np.ndarray, yb: np.ndarray) -> np.ndarray:
    return np.array([ya[0] - 1.0, yb[0] + 0.5])


def test_solve_bvp_with_a_time_dependent_rhs_maps_the_mesh_with_the_columns(cc):
    """``solve_bvp(fun(x, y))`` with ``y' = (y1, -(1 + x^2) y0)``: the mesh ``x``, held
    beside ``y``, went as one shared input, and the service refused the ``(m,)`` mesh for
    a per-point ``t`` of shape ``()``. With ``per_column=(0,)`` it is mapped with the
    columns: the in-process solve, one batched request per call."""
    pytest.importorskip("scipy")
    from jacobian_client.scipy import remote_objective
    from scipy.integrate import solve_bvp

    obj = remote_objective(cc.client, "r24_airy", argnum=1, vectorized=True, per_column=(0,))
    fun, fun_jac = _airy_local()
    mesh, y0 = np.linspace(0.0, 2.0, 9), np.zeros((2, 9))
    got = solve_bvp(lambda x, y: obj.fun(y, x), _bc, mesh, y0, fun_jac=lambda x, y: obj.jac(y, x), tol=1e-8)
    want = solve_bvp(fun, _bc, mesh, y0, fun_jac=fun_jac, tol=1e-8)
    assert got.success and want.success and got.niter == want.niter
    np.testing.assert_allclose(got.x, want.x, rtol=1e-14)
    np.testing.assert_allclose(got.y, want.y, rtol=1e-12, atol=1e-14)
    assert set(cc.take()) == {"evaluate+batched", "jacobian+batched"}

    # fun's and jac's values at one mesh, against the local ones
    Y = np.array([[0.1, 0.2, -0.3], [1.0, -1.0, 0.5]])
    x3 = np.array([0.0, 0.5, 1.5])
    np.testing.assert_allclose(obj.fun(Y, x3), fun(x3, Y), rtol=1e-15)
    np.testing.assert_allclose(obj.jac(Y, x3), fun_jac(x3, Y), rtol=1e-15)
    # solve_ivp's t (0-d) is one for every column, as before
    np.testing.assert_allclose(obj.fun(Y, 0.5), fun(np.full(3, 0.5), Y), rtol=1e-15)


def test_solve_bvp_without_per_column_says_to_pass_it(sdk):
    from jacobian_client.scipy import remote_objective

    obj = remote_objective(sdk, "r24_airy", argnum=1, vectorized=True)
    with pytest.raises(jc.InvalidInput, match=r"pass per_column=\(its position,\)") as info:
        obj.fun(np.zeros((2, 5)), np.linspace(0, 1, 5))
    assert info.value.problem["got_shape"] == [5]
    with pytest.raises(ValueError, match="which is x itself"):
        remote_objective(sdk, "r24_airy", argnum=1, vectorized=True, per_column=(1,)).fun(np.zeros((2, 5)), 0.5)
    with pytest.raises(ValueError, match="pass vectorized=True"):
        remote_objective(sdk, "r24_airy", argnum=1, per_column=(0,))


# --------------------------------------------------------------------------- 3. many arrays of vectors


@pytest.mark.parametrize("transport", ["json", "binary"])
def test_a_jvp_of_40_input_arrays_is_served_in_either_format(sdk, transport):
    """40 input arrays and their 40 tangents: JSON took them; an ``.npz`` counted inputs
    and tangents against one ``MAX_NPZ_MEMBERS`` (64), a 413. Each key has its own room now."""
    p = {f"k{i}": np.array(0.1 * i - 1.0) for i in range(40)}
    t = {k: np.array(1.0 + 0.01 * i) for i, k in enumerate(p)}
    want = f.jvp(r24.r24_wide, (t_tree(p),), (t_tree(t),))[1]
    np.testing.assert_allclose(sdk.jvp("r24_wide", p, tangents=t, transport=transport), want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("transport", ["json", "binary"])
def test_cotangents_past_the_limit_are_one_413_in_either_format(sdk, transport):
    """100 cotangents for a function of 100 outputs: the same 413 in JSON and ``.npz``,
    naming the field and its limit as members, and the setting to raise."""
    cot = tuple(np.ones(3) for _ in range(100))
    with pytest.raises(jc.PayloadTooLarge, match="MAX_NPZ_MEMBERS") as info:
        sdk.vjp("r24_many", X, cotangents=cot, transport=transport)
    assert info.value.problem["field"] == "cotangents"
    assert info.value.problem["limit"] == 64
    assert "the limit is 64 arrays" in info.value.detail if transport == "binary" else "the limit is 64 (" in info.value.detail


def test_torch_backward_and_jacrev_through_100_outputs_as_in_process(cc):
    """A backward through a function of 100 outputs sent 100 cotangents: the 413, where
    in-process autograd answers. The adapter now contracts the Jacobian (which needs none),
    after one refusal per function."""
    fn = remote(cc.client, "r24_many")
    w = torch.linspace(-1.0, 1.0, 300, dtype=D).reshape(100, 3)

    def loss(g: Any, x: torch.Tensor) -> torch.Tensor:
        return sum((o * w[i]).sum() for i, o in enumerate(g(x)))

    x = torch.tensor(X, dtype=D, requires_grad=True)
    loss(fn, x).backward()
    want = f.grad(lambda x: loss(r24.r24_many, x))(torch.tensor(X, dtype=D))
    torch.testing.assert_close(x.grad, want, rtol=1e-13, atol=1e-13)
    assert cc.take() == ["evaluate", "vjp", "jacobian+batched"]
    x.grad = None
    loss(fn, x).backward()
    torch.testing.assert_close(x.grad, want, rtol=1e-13, atol=1e-13)
    assert cc.take() == ["evaluate", "jacobian+batched"]
    same_tree(np_tree(f.jacrev(fn)(torch.tensor(X, dtype=D))),
              np_tree(f.jacrev(r24.r24_many)(torch.tensor(X, dtype=D))))


def test_second_derivatives_through_100_outputs_as_in_process(cc):
    """``torch.func.hessian`` and a double backward of a loss of 100 outputs: their
    ``hvp`` with 100 cotangents was the 413 too; the Hessian (no cotangents) answers, and
    once refused neither the vjp nor the hvp is asked again."""
    fn = remote(cc.client, "r24_many")
    w = torch.linspace(-1.0, 1.0, 300, dtype=D).reshape(100, 3)

    def loss(g: Any) -> Any:
        return lambda x: sum((o * w[i]).sin().sum() for i, o in enumerate(g(x)))

    x = torch.tensor(X, dtype=D)
    torch.testing.assert_close(f.hessian(loss(fn))(x), f.hessian(loss(r24.r24_many))(x), rtol=1e-12, atol=1e-12)
    assert cc.take().count("hessian") == 1
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(fn)(xg), xg, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), xg)
    torch.testing.assert_close(gg, f.grad(lambda x: f.grad(loss(r24.r24_many))(x).pow(2).sum())(x), rtol=1e-12,
                               atol=1e-12)
    assert not {"vjp", "hvp"} & set(cc.take())


def test_jax_grad_through_100_outputs_as_in_process(sdk, jx):
    import jax.numpy as jnp
    from jacobian_client.jax import remote as jremote

    fn = jremote(sdk, "r24_many")
    w = np.linspace(-1.0, 1.0, 300).reshape(100, 3)
    got = jx.jit(jx.grad(lambda x: sum((o * w[i]).sum() for i, o in enumerate(fn(x)))))(jnp.asarray(X))
    want = sum(k * w[k] for k in range(100))  # d/dx of sum_k (k x) . w_k
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13)


# --------------------------------------------------------------------------- 4. int64 past 2^53


def _k(app: Any, body: str) -> Any:
    return app.post("/v1/functions/r24_ids/evaluate", content=f'{{"inputs": [{body}, 1.0]}}',
                    headers={"content-type": "application/json"})


@pytest.mark.parametrize("body", ["[9007199254740993.0]", "[9.007199254740993e15]", "[1e17]",
                                  '{"dtype": "int64", "shape": [2], "data": [1, 9007199254740993.0]}'])
def test_an_integer_input_sent_a_float_of_2_53_or_more_is_refused(app, body):
    """``9007199254740993.0`` parses to the double 2^53: the int64 input computed with
    9007199254740992, silently. Such a float stands for several integers: a 422 saying
    how to send the integer exactly."""
    r = _k(app, body)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_input"
    assert "a float of 2^53 or more for int64" in r.json()["detail"] and "base64" in r.json()["detail"]


def test_exact_integers_beside_floats_are_read_exactly(app):
    """``[9007199254740993, 1.0]``: numpy read the list as float64, 2^53 + 1 as 2^53."""
    r = _k(app, "[9007199254740993, 1.0, -9223372036854775808]")
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["data"] == [9007199254740993, 1, -9223372036854775808]
    k = np.array([9007199254740993, 1, -9223372036854775808])
    assert r.json()["output"][1]["data"] == float((k % 7).sum())
    assert _k(app, "[9223372036854775808, 1.0]").json()["detail"] == "input 'k': array data does not fit int64"
    assert "not a whole number" in _k(app, "[9007199254740993, 2.5]").json()["detail"]
    assert _k(app, "[3.0, 4.0]").json()["output"][0]["data"] == [3, 4]
