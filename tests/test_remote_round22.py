"""Remote functions in a scientist's own programs, round 22: each program run with the
remote function and with the same function in-process, compared value by value.

One in-process app (``ready_app``) serves the module; the SDK reaches it through
``sdk_over`` (no socket), the cheap transport of the parity rounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")
pytest.importorskip("scipy")

from jacobian_client.scipy import remote_objective
from jacobian_client.torch import remote
from jacobian_service import examples as ex

from . import remote22_functions as r22
from ._remote_support import Counted, counting, jx  # noqa: F401 (fixture)
from .conftest import ready_app, sdk_over

f = torch.func
D = torch.float64


@pytest.fixture(scope="module")
def sdk() -> Iterator[Any]:
    with ready_app("jacobian_service.examples,tests.remote22_functions") as app, sdk_over(app) as client:
        yield client


@pytest.fixture
def cc(sdk: Any) -> Iterator[Counted]:
    """The module's client, its requests recorded as ``Counted`` records them."""
    with counting(sdk) as c:
        yield c


def by_columns(fn: Any, *held: Any) -> Any:
    """``fn`` (a torch function of one point) as SciPy's vectorized callable, in-process:
    the columns of an ``(n, k)`` array are the points."""
    def call(y: np.ndarray) -> np.ndarray:
        return f.vmap(lambda v: fn(v, *held), in_dims=1, out_dims=-1)(torch.from_numpy(np.asarray(y, dtype=float))).numpy()
    return call


def jac_by_columns(fn: Any, *held: Any) -> Any:
    def call(y: np.ndarray) -> np.ndarray:
        return f.vmap(f.jacrev(lambda v: fn(v, *held)), in_dims=1, out_dims=-1)(torch.from_numpy(y)).numpy()
    return call


# --------------------------------------------------------------------------- SciPy's vectorized callables


@pytest.mark.parametrize("method", ["BDF", "Radau"])
def test_solve_ivp_vectorized_solves_as_in_process_one_batched_request_per_call(cc, method):
    """``solve_ivp(..., vectorized=True)`` calls ``fun(t, y[:, None])`` for each point and
    ``fun(t, Y)`` with ``n`` columns for its finite-difference Jacobian. The objective sent
    the stack as one point: 422 "input 'y': expected shape (3,), got (3, 1)" at the solve's
    first call. Now ``vectorized=True`` sends the columns as one batched evaluate: the
    same trajectory as in-process, the same evaluations, one request per call."""
    from scipy.integrate import solve_ivp

    obj = remote_objective(cc.client, "r22_robertson", vectorized=True)
    local = by_columns(r22.r22_robertson)
    calls = []
    opts = {"method": method, "vectorized": True, "rtol": 1e-6, "atol": 1e-10}
    got = solve_ivp(lambda t, y: obj.fun(y), (0, 10), [1, 0, 0], **opts)
    want = solve_ivp(lambda t, y: calls.append(y.shape) or local(y), (0, 10), [1, 0, 0], **opts)
    assert got.success and want.success
    assert (got.nfev, got.njev, got.t.size) == (want.nfev, want.njev, want.t.size)
    np.testing.assert_allclose(got.y, want.y, rtol=1e-13, atol=1e-16)
    assert {s[1] for s in calls} == {1, 3}  # single points and the 3-column differences
    assert cc.take() == ["evaluate+batched"] * len(calls)


def test_solve_bvp_with_a_remote_rhs_and_fun_jac_as_in_process(cc):
    """``solve_bvp`` always passes the mesh's ``(n, m)`` and wants ``fun_jac``'s
    ``(n, n, m)``: with ``vectorized=True`` ``fun`` and ``jac`` are one batched request each
    (the held ``g`` sent once), and the solve is the in-process one."""
    from scipy.integrate import solve_bvp

    g = torch.tensor(9.81, dtype=D)
    obj = remote_objective(cc.client, "r22_pendulum", args=(g.numpy(),), vectorized=True)
    local, local_jac = by_columns(r22.r22_pendulum, g), jac_by_columns(r22.r22_pendulum, g)

    def bc(ya, yb):
        return np.array([ya[0], yb[0] - 1.0])

    mesh, y0 = np.linspace(0, 1, 7), np.zeros((2, 7))
    got = solve_bvp(lambda t, y: obj.fun(y), bc, mesh, y0, fun_jac=lambda t, y: obj.jac(y), tol=1e-8)
    want = solve_bvp(lambda t, y: local(y), bc, mesh, y0, fun_jac=lambda t, y: local_jac(y), tol=1e-8)
    assert got.success and want.success and got.niter == want.niter
    np.testing.assert_allclose(got.x, want.x, rtol=1e-14)
    np.testing.assert_allclose(got.y, want.y, rtol=1e-12, atol=1e-14)
    requests = cc.take()
    assert set(requests) == {"evaluate+batched", "jacobian+batched"}, requests

    Y = np.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.5]])
    cc.take()
    np.testing.assert_array_equal(obj.jac(Y), local_jac(Y))  # (2, 2, 3): the columns' Jacobians last
    np.testing.assert_allclose(obj.fun(Y[:, 0]), local(Y[:, :1])[:, 0], rtol=1e-15)  # a 1-D x: one point
    assert cc.take() == ["jacobian+batched", "jacobian+return_output"]


def test_vectorized_scalar_objective_as_differential_evolution_takes_it(cc):
    """A scalar function's vectorized value is ``(k,)`` and its gradients ``(n, k)``:
    ``differential_evolution(vectorized=True)`` runs as with the in-process function."""
    from scipy.optimize import differential_evolution

    obj = remote_objective(cc.client, "rosenbrock", vectorized=True)
    local = by_columns(ex.rosenbrock)
    opts = {"bounds": [(-2, 2)] * 3, "vectorized": True, "updating": "deferred", "seed": 1, "maxiter": 15,
            "polish": False}
    got, want = differential_evolution(obj.fun, **opts), differential_evolution(local, **opts)
    np.testing.assert_allclose(got.x, want.x, rtol=1e-15)
    assert got.nfev == want.nfev and set(cc.take()) == {"evaluate+batched"}
    X = np.array([[0.5, 1.0], [-0.3, 1.0], [0.2, 1.0]])
    np.testing.assert_allclose(obj.jac(X), jac_by_columns(ex.rosenbrock)(X), rtol=1e-14)
    assert obj.jac(X).shape == (3, 2)


def test_a_column_stack_without_vectorized_says_to_pass_it(sdk):
    """Without ``vectorized=True`` the stack is still one point, refused: the 422 said only
    "expected shape (3,), got (3, 1)"; it now says what SciPy passed and what to pass."""
    from jacobian_client import InvalidInput
    from scipy.integrate import solve_ivp

    obj = remote_objective(sdk, "r22_robertson")
    with pytest.raises(InvalidInput, match=r"got an \(n, k\) x: SciPy's vectorized .* vectorized=True.*"
                                           r"expected shape \(3,\), got \(3, 1\)") as info:
        solve_ivp(lambda t, y: obj.fun(y), (0, 1), [1, 0, 0], method="BDF", vectorized=True)
    assert info.value.status_code == 422 and info.value.code == "invalid_input"


def test_vectorized_with_sparsity_is_refused_up_front(sdk):
    with pytest.raises(ValueError, match="vectorized=True computes dense Jacobians"):
        remote_objective(sdk, "r22_robertson", vectorized=True, sparsity="auto")


# --------------------------------------------------------------------------- programs that were right (guards)


def test_an_adam_training_loop_through_a_remote_layer_loses_as_in_process(cc):
    """Adam over a dict of weights, a batch through ``vmap(layer, in_dims=(None, 0))``:
    the same losses step by step, the same weights."""
    X = torch.linspace(-1, 1, 32, dtype=D).reshape(8, 4)
    Y = torch.cos(X[:, :3])
    layer = remote(cc.client, "r22_layer")

    def train(fn):
        params = {"w": (torch.arange(12, dtype=D).reshape(3, 4) / 20).requires_grad_(),
                  "b": torch.zeros(3, dtype=D, requires_grad=True)}
        opt = torch.optim.Adam(list(params.values()), lr=0.05)
        losses = []
        for _ in range(6):
            opt.zero_grad()
            loss = ((f.vmap(fn, in_dims=(None, 0))(params, X) - Y) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, params

    (got, p), (want, q) = train(layer), train(r22.r22_layer)
    np.testing.assert_allclose(got, want, rtol=1e-13)
    assert got[-1] < got[0]
    torch.testing.assert_close(p["w"], q["w"], rtol=1e-13, atol=1e-15)
    assert cc.take() == ["evaluate+batched", "jacobian+batched"] * 6


def test_backward_passes_from_a_thread_pool_each_get_their_own_gradient(cc):
    """Reverse mode from 4 threads at once: each gradient is its own input's."""
    arm = remote(cc.client, "planar_arm")
    xs = torch.linspace(-1, 1, 24, dtype=D).reshape(8, 3)

    def grad(v):
        v = v.clone().requires_grad_()
        (arm(v) ** 2).sum().backward()
        return v.grad

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(grad, xs))
    for g, v in zip(got, xs):
        torch.testing.assert_close(g, f.grad(lambda u: (ex.planar_arm(u) ** 2).sum())(v))


def test_jit_grad_through_lax_scan_and_a_function_error_keeps_its_detail(cc, jx):
    """``jax.jit(jax.grad)`` of a 5-step rollout through ``lax.scan`` is the in-process
    gradient; a function's own error under ``jit`` comes out in jax's JaxRuntimeError
    (documented) with the service's class, code and detail."""
    import jax.numpy as jnp
    from jacobian_client.jax import remote as jremote

    arm = jremote(cc.client, "planar_arm")

    def local_arm(a):
        c = jnp.cumsum(a)
        return jnp.stack([jnp.cos(c).sum(), jnp.sin(c).sum()])

    def rollout(fn):
        def loss(a):
            def step(c, _):
                c = c + 0.1 * jnp.concatenate([fn(c), jnp.zeros(1)])
                return c, c.sum()
            return jx.lax.scan(step, a, None, length=5)[1].sum()
        return loss

    a = jnp.array([0.3, -1.2, 0.7])
    np.testing.assert_allclose(jx.jit(jx.grad(rollout(arm)))(a), jx.grad(rollout(local_arm))(a), rtol=1e-13)
    picky = jremote(cc.client, "r22_picky")
    with pytest.raises(jx.errors.JaxRuntimeError, match=r"FunctionError: 500 function_error: ValueError: x\[0\] must"):
        jx.jit(jx.grad(picky))(jnp.array([-1.0, 2.0]))
