"""Remote functions inside the caller's torch / JAX / SciPy code, round 21: each case
compared with the same computation in-process.

One server: the session's ``jacobian-service serve`` subprocess (``cc``, ``url``), shared
with the other adapter test files.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from jacobian_client.torch import remote  # noqa: E402

from . import remote21_functions as r21  # noqa: E402
from ._remote_support import cc, jx, url  # noqa: E402,F401 (fixtures)

f = torch.func
D = torch.float64
# a time as ODE solvers hand it: a Python float that float32 rounds (by 1.6e-9 here)
T = 0.028701514598366316
Y = np.array([0.5, -0.3, 1.0])


def exact(got, want, tol=1e-15):
    """Equal as float64 computations of the same ops are (float32's rounding of ``T``
    was 6e-10 off)."""
    got, want = (w.detach() if isinstance(w, torch.Tensor) else torch.from_numpy(np.array(w)) for w in (got, want))
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- a Python float beside float64 arrays


def test_a_python_float_beside_float64_arrays_computes_exact_as_in_process(cc, jx):
    """A Python float input (an ODE's ``t``, a step size, a weight) beside float64 arrays
    was sent as a plain JSON number, which the service takes as float32 for a
    ``floating`` input: ``r21_rhs(t, y) = -t y + sin y`` at ``t = 0.0287...`` was 6e-10
    off what torch computes in-process (``-t * y`` of a float64 ``y`` uses the double
    ``t``), in ``client.evaluate``, the torch adapter (value and derivatives) and SciPy
    (``fun(y, t)``, ``jac(y, t)``; ``solve_ivp(method="LSODA")``, which hands ``t`` as a
    float, ended 1.2e-8 away from the same solve in-process), silently; the JAX adapter,
    which sends a weakly typed float64 array, was exact. Now such a float goes as float64."""
    from scipy.integrate import solve_ivp

    from jacobian_client.jax import remote as jremote
    from jacobian_client.scipy import remote_objective

    y = torch.tensor(Y, dtype=D)
    want = r21.r21_rhs(T, y)
    exact(cc.client.evaluate("r21_rhs", T, Y), want)

    rhs = remote(cc.client, "r21_rhs")
    exact(rhs(T, y), want)
    exact(f.jacrev(rhs, argnums=1)(T, y), f.jacrev(r21.r21_rhs, argnums=1)(T, y))
    exact(f.jvp(lambda v: rhs(T, v), (y,), (torch.ones(3, dtype=D),))[1],
          f.jvp(lambda v: r21.r21_rhs(T, v), (y,), (torch.ones(3, dtype=D),))[1])
    q, q_local = y.clone().requires_grad_(), y.clone().requires_grad_()
    rhs(T, q).pow(2).sum().backward()
    r21.r21_rhs(T, q_local).pow(2).sum().backward()
    exact(q.grad, q_local.grad)
    ys = torch.stack([y, 2 * y])  # vmap: T shared (in_dims None), sent once
    exact(f.vmap(rhs, in_dims=(None, 0))(T, ys), f.vmap(r21.r21_rhs, in_dims=(None, 0))(T, ys))
    assert cc.take() == ["evaluate", "evaluate", "evaluate", "vjp+batched_vectors", "evaluate", "jvp",
                         "evaluate", "vjp", "evaluate+batched"]

    obj = remote_objective(cc.client, "r21_rhs", argnum=1)
    exact(obj.fun(Y, T), want)
    exact(obj.jac(Y, T), f.jacrev(r21.r21_rhs, argnums=1)(T, y))
    exact(remote_objective(cc.client, "r21_rhs", argnum=1, args=(T,)).fun(Y), want)

    def rhs_local(t, v):
        return r21.r21_rhs(t, torch.tensor(v)).numpy()

    solved = solve_ivp(lambda t, v: obj.fun(v, t), (0, 2), Y, method="LSODA")
    solved_local = solve_ivp(rhs_local, (0, 2), Y, method="LSODA")
    assert solved.nfev == solved_local.nfev
    exact(solved.y, solved_local.y, tol=1e-13)

    # the JAX adapter was exact already, and stays so (x64 on: a Python float is a weak float64)
    jnp = jx.numpy
    exact(jremote(cc.client, "r21_rhs")(T, jnp.asarray(Y)), want)


def test_a_python_float_that_float32_holds_or_beside_float32_arrays_is_sent_as_before(cc):
    """What the SDK sent right stays: beside float32 arrays a Python float computes in
    float32, as torch's own ``-t * y`` does; a whole number (``3.0``) stays a plain
    number, which an integer input takes (a float64 array is a 422 there); a list of
    floats stays one array of the declared dtype."""
    y32 = torch.tensor(Y, dtype=torch.float32)
    exact(remote(cc.client, "r21_rhs")(T, y32), r21.r21_rhs(T, y32), tol=0)
    x = np.array([0.3, -1.2, 0.7])
    exact(cc.client.evaluate("r21_pow", x, 3.0), x**3)
    exact(cc.client.evaluate("r21_pow", x, 3), x**3)
    exact(remote(cc.client, "r21_pow")(torch.tensor(x), 3.0), torch.tensor(x) ** 3)
    exact(cc.client.evaluate("r21_rhs", 0.5, Y), r21.r21_rhs(0.5, torch.tensor(Y, dtype=D)))


# --------------------------------------------------------------------------- SciPy: a scalar x's second derivative


def test_scipy_hess_of_a_scalar_x_is_a_scalar_as_newtons_fprime2_takes_it(cc):
    """``newton`` / ``root_scalar(method="halley")`` hand a scalar ``x`` to ``fprime`` and
    ``fprime2``: ``jac(x)`` gave a scalar (x-shaped), but ``hess(x)`` a ``(1, 1)`` matrix,
    so ``newton(f.fun, 3.0, fprime=f.jac, fprime2=f.hess)`` returned its root as a
    ``(1, 1)`` array where the same solve on local callables returns a float. Now a
    scalar ``x``'s Hessian is a scalar; a vector ``x``'s stays ``(x.size, x.size)``."""
    from scipy.optimize import newton, root_scalar

    from jacobian_client.scipy import remote_objective

    obj = remote_objective(cc.client, "sum_sin")  # x (n,): the scalar goes as (1,), learned once
    root, info = newton(obj.fun, 3.0, fprime=obj.jac, fprime2=obj.hess, full_output=True)
    root_local, info_local = newton(np.sin, 3.0, fprime=np.cos, fprime2=lambda x: -np.sin(x), full_output=True)
    assert np.shape(root) == np.shape(root_local) == ()
    assert root == pytest.approx(root_local, abs=1e-12) and info.function_calls == info_local.function_calls
    halley = root_scalar(obj.fun, x0=3.0, fprime=obj.jac, fprime2=obj.hess, method="halley")
    assert np.shape(halley.root) == () and halley.root == pytest.approx(np.pi, abs=1e-12)
    assert np.shape(obj.hess(3.0)) == () and float(obj.hess(3.0)) == pytest.approx(-np.sin(3.0), abs=1e-12)
    np.testing.assert_allclose(obj.hess(np.array([3.0, 1.0])), np.diag(-np.sin([3.0, 1.0])), atol=1e-12)
