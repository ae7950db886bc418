"""jacobian_client.jax: remote functions under jax.jit, grad, jvp and vmap equal the same
functions written in JAX and run locally, with the exact requests each transform makes."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jacobian_service.app")

import jax.numpy as jnp  # noqa: E402

from jacobian_client.jax import remote  # noqa: E402

from ._remote_support import Counted, cc, url  # noqa: E402,F401 (fixtures)

TARGET = np.array([1.2, 1.5])


def planar_arm(q):
    c = jnp.cumsum(q, axis=-1)
    return jnp.stack([jnp.cos(c).sum(-1), jnp.sin(c).sum(-1)], axis=-1)


def polar(r, theta):
    return r * jnp.cos(theta), r * jnp.sin(theta)


def loss_of(arm):
    return lambda q: jnp.sum((arm(q) - TARGET) ** 2)


@pytest.fixture(scope="module", autouse=True)
def x64() -> Iterator[None]:
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def close(got, want, tol=1e-10):
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def test_jit_grad_equals_local_jax(cc):
    arm = remote(cc.client, "planar_arm")
    q = jnp.array([0.3, -0.2, 0.5])
    g = jax.jit(jax.grad(loss_of(arm)))
    close(g(q), jax.grad(loss_of(planar_arm))(q))
    # a fresh remote under jit learns its output shape first: one probe evaluate
    assert cc.take() == ["evaluate", "evaluate", "vjp"]
    for shift in (0.5, 1.0):  # compiled once; each call is one evaluate and one vjp
        close(g(q + shift), jax.grad(loss_of(planar_arm))(q + shift))
        assert cc.take() == ["evaluate", "vjp"]
    close(jax.value_and_grad(loss_of(arm))(q), jax.value_and_grad(loss_of(planar_arm))(q))
    assert cc.take() == ["evaluate", "vjp"]


def test_out_shape_skips_the_probe_and_concrete_calls_teach_it(cc):
    arm = remote(cc.client, "planar_arm", out_shape=jax.ShapeDtypeStruct((2,), jnp.float64))
    q = jnp.array([0.3, -0.2, 0.5])
    close(jax.jit(jax.grad(loss_of(arm)))(q), jax.grad(loss_of(planar_arm))(q))
    assert cc.take() == ["evaluate", "vjp"]
    arm = remote(cc.client, "planar_arm")
    close(arm(q), planar_arm(q))  # concrete inputs: the answer, and the shapes, in one request
    assert cc.take() == ["evaluate"]
    close(jax.jit(arm)(q), planar_arm(q))
    assert cc.take() == ["evaluate"]


def test_jvp_and_forward_mode(cc):
    arm = remote(cc.client, "planar_arm")
    q, t = jnp.array([0.3, -0.2, 0.5]), jnp.array([1.0, -2.0, 0.5])
    arm(q)
    cc.take()
    close(jax.jvp(arm, (q,), (t,)), jax.jvp(planar_arm, (q,), (t,)))
    assert cc.take() == ["evaluate", "jvp"]
    close(jax.jit(lambda a, b: jax.jvp(arm, (a,), (b,)))(q, t), jax.jvp(planar_arm, (q,), (t,)))
    assert cc.take() == ["evaluate", "jvp"]
    close(jax.jacfwd(arm)(q), jax.jacfwd(planar_arm)(q))
    assert cc.take() == ["evaluate", "jvp+batched_vectors"]
    close(jax.jacrev(arm)(q), jax.jacrev(planar_arm)(q))
    assert cc.take() == ["evaluate", "vjp+batched_vectors"]


def test_vmap_uses_the_batched_endpoints(cc):
    arm = remote(cc.client, "planar_arm")
    qs = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)))
    arm(qs[0])
    cc.take()
    close(jax.vmap(arm)(qs), jax.vmap(planar_arm)(qs))
    assert cc.take() == ["evaluate+batched"]
    close(jax.jit(jax.vmap(arm))(qs), jax.vmap(planar_arm)(qs))
    assert cc.take() == ["evaluate+batched"]
    close(jax.vmap(arm, in_axes=1)(qs.T), jax.vmap(planar_arm, in_axes=1)(qs.T))
    assert cc.take() == ["evaluate+batched"]
    # per-example gradients: one batched evaluate and one batched Jacobian
    close(jax.vmap(jax.grad(loss_of(arm)))(qs), jax.vmap(jax.grad(loss_of(planar_arm)))(qs))
    assert cc.take() == ["evaluate+batched", "jacobian+batched"]
    close(jax.jit(jax.vmap(jax.grad(loss_of(arm))))(qs), jax.vmap(jax.grad(loss_of(planar_arm)))(qs))
    assert cc.take() == ["evaluate+batched", "jacobian+batched"]
    # vmap of jvp over tangents only: one jvp request with batched_vectors
    ts = qs * 2
    close(jax.vmap(lambda t: jax.jvp(arm, (qs[0],), (t,))[1])(ts),
          jax.vmap(lambda t: jax.jvp(planar_arm, (qs[0],), (t,))[1])(ts))
    assert cc.take() == ["evaluate", "jvp+batched_vectors"]


def test_tuple_outputs_and_several_inputs(cc):
    p = remote(cc.client, "polar")
    r, th = jnp.array([1.0, 1.5, 2.0]), jnp.array([0.1, 0.7, -0.4])
    close(p(r, th), polar(r, th))
    cc.take()
    def obj(fn):
        def scalar(a, b):
            x, y = fn(a, b)
            return jnp.sum(x * 2 + y**2)
        return scalar

    close(jax.jit(jax.grad(obj(p), argnums=(0, 1)))(r, th), jax.grad(obj(polar), argnums=(0, 1))(r, th))
    assert cc.take() == ["evaluate", "vjp"]  # both outputs' cotangents in one vjp
    close(jax.jacrev(p, argnums=(0, 1))(r, th), jax.jacrev(polar, argnums=(0, 1))(r, th))
    assert cc.take() == ["evaluate", "vjp+batched_vectors"]
    close(jax.jacfwd(p, argnums=1)(r, th), jax.jacfwd(polar, argnums=1)(r, th))
    assert cc.take() == ["evaluate", "jvp+batched_vectors"]


def test_aux_comes_back_as_with_has_aux(cc):
    sa = remote(cc.client, "sin_aux")
    q = jnp.array([0.3, -0.2, 0.5])
    close(sa(q), (jnp.sin(q), jnp.sin(q)))
    cc.take()
    close(jax.jacrev(sa, has_aux=True)(q), (jnp.diag(jnp.cos(q)), jnp.sin(q)))
    assert cc.take() == ["evaluate", "vjp+batched_vectors"]
    def both(x):
        out, aux = sa(x)
        return out.sum() + aux.sum()

    close(jax.grad(both)(q), jnp.cos(q))  # aux is not differentiated
    assert cc.take() == ["evaluate", "vjp"]


def test_second_derivatives_are_refused_clearly(cc):
    s = remote(cc.client, "sum_sin")
    q = jnp.array([0.3, -0.2, 0.5])
    s(q)
    with pytest.raises(NotImplementedError, match="second derivatives through the remote function 'sum_sin'"):
        jax.hessian(s)(q)
