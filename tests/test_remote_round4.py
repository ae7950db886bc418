"""Remote functions inside the caller's torch (and JAX): forward mode and transforms,
each compared with the same function computed in-process by torch.func (jax).

Two servers: the session's ``jacobian-service serve`` subprocess (``cc``, shared with
test_remote_torch/jax/scipy) and this module's in-process one (``oc``: the engine is a
thread of this process, sharing torch's process-wide forward-AD state with the caller).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import torch.autograd.forward_ad as fwAD  # noqa: E402

from jacobian_client.torch import remote  # noqa: E402
from jacobian_service import Input, register  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from ._remote_support import close_trees, Counted, cc, counted, oc, own_url, url  # noqa: E402,F401 (fixtures)

f = torch.func
X = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
T = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)


def close(got, want, tol=1e-12):
    close_trees(got, want, tol)


# This module's own functions, served in-process by `oc` (own_url).


@register(inputs=[Input("x", shape=("n",))], description="sin(x) * x")
def sin_times_x(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * x


@register(inputs=[Input("x", shape=("n",))], description="a scalar: sum of cos(x) x^2")
def cos_energy(x: torch.Tensor) -> torch.Tensor:
    return (torch.cos(x) * x**2).sum()


def _tangent_through(fn, x, t):
    """The tangent of fn at a forward-AD dual tensor (the caller's own dual level)."""
    with fwAD.dual_level():
        y = fn(fwAD.make_dual(x, t))
        primal, tangent = fwAD.unpack_dual(y)
        assert fwAD._current_level == 0  # the caller's level is still its own
        return primal, tangent


# --------------------------------------------------------------------------- forward mode in-process


def test_the_in_process_engine_computes_forward_mode_beside_a_dual_level_the_caller_holds(client):
    """The in-process layout: the engine's thread shares torch's dual levels (one list
    for the process) with the caller's. A jvp (an hvp) asked while the caller's thread held
    a level was answered 500 "Nested forward mode AD is not supported at the moment"."""
    arr = lambda a: {"dtype": "float64", "shape": list(a.shape), "data": a.tolist()}  # noqa: E731
    body = {"inputs": [arr(X)], "tangents": arr(T)}
    want_jvp = f.jvp(ex.sin, (X,), (T,))[1]
    with fwAD.dual_level():
        dual = fwAD.make_dual(X, T)
        r = client.post("/v1/functions/sin/jvp", json=body)
        assert r.status_code == 200, r.text
        assert np.allclose(r.json()["jvp"]["data"], want_jvp.numpy(), rtol=1e-12)
        # the caller's level and its tangents are untouched
        assert fwAD._current_level == 0
        close(fwAD.unpack_dual(dual * 2).tangent, 2 * T)
    assert fwAD._current_level == -1


def test_a_remote_function_on_a_dual_tensor_in_process(oc):
    """torch.autograd.forward_ad through a remote function, and gradcheck's forward-AD
    check, against the in-process server: both failed with FunctionError 500 'Nested
    forward mode AD'."""
    g = remote(oc.client, "sin_times_x")
    close(_tangent_through(g, X, T), f.jvp(sin_times_x, (X,), (T,)))
    assert oc.take() == ["evaluate", "jvp"]
    assert torch.autograd.gradcheck(g, (X.clone().requires_grad_(),), check_forward_ad=True)
    # a scalar function's Hessian-vector product asked inside a dual level
    want = f.jvp(f.grad(cos_energy), (X,), (T,))[1]
    with fwAD.dual_level():
        hv = oc.client.hvp("cos_energy", X.numpy(), tangents=T.numpy())
    close(torch.as_tensor(np.asarray(hv)), want)


# --------------------------------------------------------------------------- the process layout


class _Around(torch.nn.Module):
    """A local layer (identity at start) feeding a remote function."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(3, dtype=torch.float64) + 0.1)
            self.lin.bias.fill_(0.2)
        self.fn = fn

    def forward(self, a):
        return self.fn(self.lin(a))


def test_first_derivative_transforms_over_a_remote_function_equal_torch_func(cc):
    """Against `jacobian-service serve` (the engine in its own process): forward-AD dual
    tensors, torch.func's transforms and torch.autograd.functional's first derivatives,
    functional_call with a module around the remote call."""
    sin, add, polar = remote(cc.client, "sin"), remote(cc.client, "add_square"), remote(cc.client, "polar")
    close(_tangent_through(sin, X, T), f.jvp(ex.sin, (X,), (T,)))
    # one input dual, the other a plain tensor: its tangent is zero
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(add(fwAD.make_dual(X, T), 2 * X)).tangent
    close(tangent, f.jvp(lambda a: ex.add_square(a, 2 * X), (X,), (T,))[1])
    r, th = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.3, 0.4], dtype=torch.float64)
    with fwAD.dual_level():
        out = polar(fwAD.make_dual(r, th), fwAD.make_dual(th, r))
        tangents = tuple(fwAD.unpack_dual(o).tangent for o in out)
    close(tangents, f.jvp(ex.polar, (r, th), (th, r))[1])
    cc.take()
    close(f.jvp(sin, (X,), (T,)), f.jvp(ex.sin, (X,), (T,)))
    close(f.jacfwd(sin)(X), f.jacfwd(ex.sin)(X))
    close(f.jacrev(sin, chunk_size=2)(X), f.jacrev(ex.sin)(X))
    close(f.jacfwd(add, argnums=(0, 1))(X, T), f.jacfwd(ex.add_square, argnums=(0, 1))(X, T))
    XS = torch.stack([X, T, X * T])
    close(f.vmap(sin)(XS), f.vmap(ex.sin)(XS))
    close(f.vmap(f.jacfwd(sin))(XS), f.vmap(f.jacfwd(ex.sin))(XS))
    close(f.vmap(lambda a: f.jvp(sin, (a,), (T,)))(XS), f.vmap(lambda a: f.jvp(ex.sin, (a,), (T,)))(XS))
    got = cc.take()
    # jacrev's chunk_size=2 over 3 rows: two batched vjps
    assert got == ["evaluate", "jvp", "evaluate", "jvp+batched_vectors",
                   "evaluate", "vjp+batched_vectors", "vjp+batched_vectors", "evaluate", "jvp+batched_vectors",
                   "evaluate+batched", "evaluate+batched", "jacobian+batched", "evaluate+batched", "jacobian+batched"], got
    A = torch.autograd.functional
    close(A.jacobian(sin, X), A.jacobian(ex.sin, X))
    close(A.vjp(sin, X, T), A.vjp(ex.sin, X, T))
    m, local = _Around(sin), _Around(ex.sin)
    params = {k: v.detach() for k, v in m.named_parameters()}
    for transform in (f.jacrev, f.jacfwd):
        close(transform(lambda p: f.functional_call(m, p, (X,)))(params),
              transform(lambda p: f.functional_call(local, p, (X,)))(params))


def test_a_backward_pass_inside_a_dual_level_gives_torchs_numbers(oc):
    """A gradient taken inside a forward-AD dual level, through a call on dual tensors,
    has torch differentiate the gradient in forward mode (a second derivative): refused
    until round 5, now computed (an hvp on the in-process engine, beside the caller's
    dual level), as torch gives it in-process; the way out the refusal named still works."""
    g = remote(oc.client, "sin_times_x")

    def inside(fn):
        x = X.clone().requires_grad_()
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, T))
            (grad,) = torch.autograd.grad(y.sum(), x)
            primal, tangent = fwAD.unpack_dual(grad)
            return primal.detach(), tangent.detach()

    close(inside(g), inside(sin_times_x))
    x = X.clone().requires_grad_()
    with fwAD.dual_level():
        y = g(fwAD.make_dual(x, T))
        primal, tangent = fwAD.unpack_dual(y)
    (grad,) = torch.autograd.grad(primal.sum(), x)
    close((primal.detach(), tangent.detach()), f.jvp(sin_times_x, (X,), (T,)))
    close(grad, f.grad(lambda a: sin_times_x(a).sum())(X))
    close(f.jacfwd(f.grad(remote(oc.client, "cos_energy")))(X), f.jacfwd(f.grad(cos_energy))(X))


# --------------------------------------------------------------------------- JAX


def test_jax_forward_mode_and_transforms_over_a_remote_function_equal_local_jax(cc):
    """jax.linearize (also under jit) and its transpose, jvp under vmap, grad through
    jax.checkpoint, against the same function written in JAX; second derivatives
    (hessian, jacfwd(grad), jvp(grad)) too."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from jacobian_client.jax import remote as jax_remote

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        sin, rb = jax_remote(cc.client, "sin"), jax_remote(cc.client, "rosenbrock")
        x, t = jnp.asarray(X.numpy()), jnp.asarray(T.numpy())

        def rb_local(a):
            return jnp.sum(100.0 * (a[1:] - a[:-1] ** 2) ** 2 + (1 - a[:-1]) ** 2)

        def same(got, want):
            got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
            assert len(got_leaves) == len(want_leaves)
            for g, w in zip(got_leaves, want_leaves):
                assert g.shape == w.shape and g.dtype == w.dtype, (g, w)
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12)

        y, lin = jax.linearize(sin, x)
        y_local, lin_local = jax.linearize(jnp.sin, x)
        same((y, lin(t), lin(2 * t)), (y_local, lin_local(t), lin_local(2 * t)))
        same(jax.linear_transpose(lin, t)(t), jax.linear_transpose(lin_local, t)(t))
        same(jax.jit(lambda a, b: jax.linearize(sin, a)[1](b))(x, t), lin_local(t))
        xs = jnp.stack([x, t, x * t])
        same(jax.vmap(lambda a: jax.jvp(sin, (a,), (t,)))(xs), jax.vmap(lambda a: jax.jvp(jnp.sin, (a,), (t,)))(xs))
        same(jax.grad(jax.checkpoint(lambda a: sin(a).sum()))(x), jnp.cos(x))

        same(jax.grad(rb)(x), jax.grad(rb_local)(x))
        # second derivatives (refused until round 5): from the service's hvp
        same(jax.hessian(rb)(x), jax.hessian(rb_local)(x))
        same(jax.jacfwd(jax.grad(rb))(x), jax.jacfwd(jax.grad(rb_local))(x))
        same(jax.jvp(jax.grad(rb), (x,), (t,)), jax.jvp(jax.grad(rb_local), (x,), (t,)))
    finally:
        jax.config.update("jax_enable_x64", before)
