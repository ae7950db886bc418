"""Remote functions inside the caller's torch, JAX and SciPy code, round 5: second
derivatives through the torch adapter (double backward, ``torch.func.hessian``,
``gradgradcheck``, ``torch.autograd.functional.hvp``), built on the service's ``hvp`` and
``hessian`` endpoints, and the adapters used as users use them (optimizers, gradcheck,
modules, transforms, JAX scans, SciPy's solvers), every derivative compared with the same
function computed in-process.

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import torch.autograd.forward_ad as fwAD  # noqa: E402

import jacobian_client as jc  # noqa: E402
from jacobian_client.torch import remote  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from ._remote_support import close_trees, cc, url  # noqa: E402,F401 (fixtures)

f = torch.func
X = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
T = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
R = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)


def close(got, want, tol=1e-10):
    close_trees(got, want, tol)


# --------------------------------------------------------------------------- torch: second derivatives


def _double_backward(fn, x):
    """A gradient penalty: the gradient with create_graph, then the gradient of its norm.
    The cotangent (2 y) depends on x, so both halves of the second derivative count."""
    x = x.clone().requires_grad_()
    y = fn(torch.sin(x))
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    return torch.autograd.grad((g**2).sum(), x)[0]


@pytest.mark.parametrize("name, hess_request", [("sum_sin", "hvp+batched_vectors"), ("planar_arm", "hessian")])
def test_second_derivatives_through_a_remote_function_equal_torch_func(cc, name, hess_request):
    """Double backward, torch.func.hessian and the other second-order compositions were
    refused ("second derivatives through the remote function ... are not supported"); they
    are computed from one hvp (a scalar function) or hessian request, as torch.func gives
    them in-process."""
    r, local = remote(cc.client, name), getattr(ex, name)
    cc.take()
    close(f.hessian(r)(X), f.hessian(local)(X))
    assert cc.take() == ["evaluate", "jvp+batched_vectors", "vjp+batched_vectors", hess_request]
    close(f.jacrev(f.jacrev(r))(X), f.jacrev(f.jacrev(local))(X))
    assert cc.take() == ["evaluate", "vjp+batched_vectors", hess_request]
    close(f.jacfwd(f.jacfwd(r))(X), f.jacfwd(f.jacfwd(local))(X))
    assert cc.take() == ["evaluate", "jvp+batched_vectors", "jvp+batched_vectors", "hessian"]
    close(f.jacrev(f.jacfwd(r))(X), f.jacrev(f.jacfwd(local))(X))
    close(_double_backward(r, X), _double_backward(local, X))
    # per example: one batched hessian, whatever the output
    xs = torch.stack([X, 2 * X, -X])
    cc.take()
    close(f.vmap(f.hessian(r))(xs), f.vmap(f.hessian(local))(xs))
    assert cc.take() == ["evaluate+batched", "jacobian+batched", "hessian+batched"]  # one Jacobian for jacrev and jacfwd (round 23)
    # composed with local code before and after, in float32 too
    wrap = lambda fn: lambda q: torch.tanh(fn(q.sin() * 2)).sum() ** 2  # noqa: E731
    close(f.hessian(wrap(r))(X), f.hessian(wrap(local))(X))
    close(f.hessian(wrap(r))(X.float()), f.hessian(wrap(local))(X.float()), tol=1e-5)


def test_second_derivatives_over_several_inputs_and_outputs(cc):
    """Mixed second derivatives (in r, then theta) of a function of two inputs with a tuple
    output, and a penalty on the gradient differentiated in a weight the remote function
    never sees (only first derivatives then: no Hessian asked for)."""
    p = remote(cc.client, "polar")
    close(f.hessian(p, argnums=(0, 1))(R, X), f.hessian(ex.polar, argnums=(0, 1))(R, X))

    def mixed(fn):
        a, b = R.clone().requires_grad_(), X.clone().requires_grad_()
        out = fn(a, b)
        (g,) = torch.autograd.grad(out[0].sum() * out[1].sum(), a, create_graph=True)
        return torch.autograd.grad(g.sum(), b)

    close(mixed(p), mixed(ex.polar))
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)

    def penalty(fn):
        q = X.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(q) * w).sum(), q, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), w)

    arm = remote(cc.client, "planar_arm")
    cc.take()
    close(penalty(arm), penalty(ex.planar_arm))
    assert cc.take() == ["evaluate", "vjp", "jvp"]


def test_gradgradcheck_and_autograd_functional(cc):
    """torch.autograd's own second-derivative checks and helpers, which run double (and
    triple, linear in the vectors) backward passes through the remote function."""
    arm, ss = remote(cc.client, "planar_arm"), remote(cc.client, "sum_sin")
    x = X.clone().requires_grad_()
    assert torch.autograd.gradcheck(arm, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(arm, (x,))
    assert torch.autograd.gradgradcheck(remote(cc.client, "polar"), (R.clone().requires_grad_(), x))
    cc.take()
    close(torch.autograd.functional.hvp(ss, X, T), torch.autograd.functional.hvp(ex.sum_sin, X, T))
    assert cc.take() == ["evaluate", "vjp", "hvp", "hvp"]
    close(torch.autograd.functional.hessian(ss, X), torch.autograd.functional.hessian(ex.sum_sin, X))
    # a first derivative torch takes by double backward: no second derivative asked for
    cc.take()
    close(torch.autograd.functional.jvp(arm, X, T), torch.autograd.functional.jvp(ex.planar_arm, X, T))
    assert cc.take() == ["evaluate", "vjp", "jvp"]


def test_a_backward_pass_inside_a_dual_level_gives_the_gradients_tangent(cc):
    """A gradient taken inside a forward-AD dual level through a call on dual tensors is
    differentiated in forward mode (a second derivative): refused before, now torch's."""

    def run(fn):
        x = X.clone().requires_grad_()
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, T))
            (g,) = torch.autograd.grad(y.sum(), x)
            primal, tangent = fwAD.unpack_dual(g)
            return primal.detach(), tangent.detach()

    close(run(remote(cc.client, "planar_arm")), run(ex.planar_arm))


def test_third_derivatives_are_refused_clearly(cc):
    ss = remote(cc.client, "sum_sin")
    with pytest.raises(RuntimeError, match="third derivatives through the remote function 'sum_sin' are not supported"):
        f.jacrev(f.hessian(ss))(X)
    with pytest.raises(RuntimeError, match="third derivatives"):
        f.jacfwd(f.jacrev(f.jacrev(ss)))(X)


# --------------------------------------------------------------------------- torch: as users use it


def test_lbfgs_and_adam_over_a_remote_function_equal_local(cc):
    target = torch.tensor([1.2, 1.5], dtype=torch.float64)

    def lbfgs(fn):
        q = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([q], line_search_fn="strong_wolfe", max_iter=10)

        def closure():
            opt.zero_grad()
            loss = ((fn(q) - target) ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return q.detach()

    close(lbfgs(remote(cc.client, "planar_arm")), lbfgs(ex.planar_arm), tol=1e-9)

    def adam(fn):  # float32 parameters, float32 gradients, through a module
        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.r = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))

            def forward(self, theta):
                return fn(self.r, theta)[0].sum()

        m = Model()
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            m(X.float()).backward()
            assert m.r.grad.dtype == torch.float32
            opt.step()
        return m.r.detach()

    close(adam(remote(cc.client, "polar")), adam(ex.polar), tol=1e-6)


def test_non_contiguous_inputs_and_devices(cc):
    arm = remote(cc.client, "planar_arm")
    xt = torch.rand(3, 4, dtype=torch.float64).T  # 4 examples, none contiguous
    assert not xt[0].is_contiguous()
    close(f.vmap(f.jacrev(arm))(xt), f.vmap(f.jacrev(ex.planar_arm))(xt))
    close(f.jacfwd(arm)(xt[1]), f.jacfwd(ex.planar_arm)(xt[1]))
    with pytest.raises(ValueError, match="'meta' device"):
        arm(torch.zeros(3, device="meta"))


def test_service_errors_surface_as_the_sdks_exceptions(cc):
    arm = remote(cc.client, "planar_arm")
    with pytest.raises(jc.InvalidInput) as err:
        arm(torch.zeros(2, 2, dtype=torch.float64))
    assert err.value.status == 422 and "expected shape" in str(err.value)
    with pytest.raises(jc.FunctionError) as err:
        remote(cc.client, "broken")(X)
    assert "Traceback" not in str(err.value) and 'File "' not in str(err.value)
    # the service gone mid-optimisation: a TransportError (a JacobianServiceError) from the step
    down = jc.Client("http://127.0.0.1:9", max_retries=0, timeout=2)
    q = X.clone().requires_grad_()
    opt = torch.optim.SGD([q], lr=0.1)
    with pytest.raises(jc.TransportError, match="planar_arm/evaluate"):
        remote(down, "planar_arm")(q).sum().backward()
        opt.step()
    down.close()


# --------------------------------------------------------------------------- JAX


def test_jax_scan_over_a_remote_gradient_equals_local_jax(cc):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from jacobian_client.jax import remote as jremote

    def local_arm(q):
        c = jnp.cumsum(q)
        return jnp.stack([jnp.cos(c).sum(), jnp.sin(c).sum()])

    arm = jremote(cc.client, "planar_arm")
    x = jnp.asarray(X.numpy(), jnp.float32)  # x64 off: float32 in, float32 out
    assert arm(x).dtype == jax.jit(arm)(x).dtype == jax.jacrev(arm)(x).dtype == jnp.float32
    target = jnp.array([1.2, 1.5], jnp.float32)

    def descend(fn):
        def step(q, _):
            q = q - 0.1 * jax.grad(lambda p: jnp.sum((fn(p) - target) ** 2))(q)
            return q, fn(q).sum()

        return jax.lax.scan(step, x, None, length=3)  # scan traces its body: callbacks, as under jit

    (q, trace), (q_local, trace_local) = descend(arm), descend(local_arm)
    np.testing.assert_allclose(q, q_local, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trace, trace_local, rtol=1e-5, atol=1e-6)


def test_jax_second_derivatives_through_a_remote_function_equal_local_jax(cc):
    """jax.hessian, grad of grad (also under jit) and vmap(hessian) raised
    NotImplementedError ("second derivatives through the remote function ... are not
    supported"); they come from one hvp or hessian request (a ``remote_second``
    primitive: the jvp of the remote vjp / jvp in the inputs, whose transpose is itself),
    as jax gives them in-process."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from jacobian_client.jax import remote as jremote

    def local_arm(q):
        c = jnp.cumsum(q)
        return jnp.stack([jnp.cos(c).sum(), jnp.sin(c).sum()])

    x = jnp.asarray(X.numpy(), jnp.float32)

    def same(got, want):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype == jnp.float32, (g, w)
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    def penalty(fn):  # the cotangent depends on x: both halves of the second derivative
        return jax.grad(lambda q: jnp.sum(jax.grad(lambda p: jnp.sum(fn(jnp.sin(p)) ** 2))(q) ** 2))

    ss, arm = jremote(cc.client, "sum_sin"), jremote(cc.client, "planar_arm")
    ss(x), arm(x)
    cc.take()
    same(jax.hessian(ss)(x), jax.hessian(lambda q: jnp.sin(q).sum())(x))
    assert cc.take() == ["evaluate", "jvp+batched_vectors", "vjp+batched_vectors", "hvp+batched_vectors"]
    same(jax.hessian(arm)(x), jax.hessian(local_arm)(x))
    assert cc.take() == ["evaluate", "jvp+batched_vectors", "vjp+batched_vectors", "hessian"]
    same(jax.jit(penalty(arm))(x), penalty(local_arm)(x))
    xs = jnp.stack([x, 2 * x])
    same(jax.vmap(jax.hessian(arm))(xs), jax.vmap(jax.hessian(local_arm))(xs))
    with pytest.raises(NotImplementedError, match="third derivatives through the remote function 'sum_sin'"):
        jax.jacfwd(jax.hessian(ss))(x)


# --------------------------------------------------------------------------- SciPy


def test_scipy_solvers_with_remote_derivatives_equal_local(cc):
    pytest.importorskip("scipy")
    import scipy.integrate as si
    import scipy.optimize as so
    import scipy.sparse as sp

    from jacobian_client.scipy import remote_objective

    rosen = remote_objective(cc.client, "rosenbrock")
    x0 = np.array([-1.2, 1.0, 0.5])
    res = so.minimize(rosen.fun, x0, jac=rosen.jac, hess=rosen.hess, method="trust-constr")
    np.testing.assert_allclose(res.x, np.ones(3), atol=1e-4)
    l96 = remote_objective(cc.client, "lorenz96")
    y0 = np.linspace(0.0, 1.0, 8) + 8.0

    def lf(y):
        return ex.lorenz96(torch.tensor(y)).numpy()

    def lj(y):
        return f.jacrev(ex.lorenz96)(torch.tensor(y)).numpy()

    # a stiff solver with the remote Jacobian: the same steps as with the local one
    got = si.solve_ivp(lambda t, y: l96.fun(y), (0, 0.1), y0, method="BDF", jac=lambda t, y: l96.jac(y))
    want = si.solve_ivp(lambda t, y: lf(y), (0, 0.1), y0, method="BDF", jac=lambda t, y: lj(y))
    assert (got.status, got.nfev, got.njev) == (want.status, want.nfev, want.njev)
    np.testing.assert_allclose(got.y, want.y, rtol=1e-12)
    got = so.least_squares(l96.fun, y0, jac=lambda y: sp.csr_matrix(l96.jac(y)))
    want = so.least_squares(lf, y0, jac=lambda y: sp.csr_matrix(lj(y)))
    np.testing.assert_allclose(got.x, want.x, rtol=1e-10)
