"""jacobian_client.jax: remote functions under jax.jit, grad, jvp and vmap equal the same
functions written in JAX and run locally, with the exact requests each transform makes."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_service import Input, register  # noqa: E402

from ._remote_support import Counted, cc, counted, oc, own_url, url  # noqa: E402,F401 (fixtures)

TARGET = np.array([1.2, 1.5])


def planar_arm(q):
    c = jnp.cumsum(q, axis=-1)
    return jnp.stack([jnp.cos(c).sum(-1), jnp.sin(c).sum(-1)], axis=-1)


def polar(r, theta):
    return r * jnp.cos(theta), r * jnp.sin(theta)


def loss_of(arm):
    return lambda q: jnp.sum((arm(q) - TARGET) ** 2)


# jax (and the adapter, which imports it) is imported by the module's first test, not at
# collection: every xdist worker imports every test module, and jax's import cost each of
# them ~3 CPU-s for a module only one of them runs. The names stay module globals.
jax: Any = None
jnp: Any = None
remote: Any = None


@pytest.fixture(scope="module", autouse=True)
def x64() -> Iterator[None]:
    global jax, jnp, remote
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jacobian_client.jax import remote

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


def test_third_derivatives_are_refused_clearly(cc):
    """Second derivatives go through (tests/test_remote_round5.py); a third does not."""
    s = remote(cc.client, "sum_sin")
    q = jnp.array([0.3, -0.2, 0.5])
    s(q)
    with pytest.raises(NotImplementedError, match="third derivatives through the remote function 'sum_sin'"):
        jax.jacfwd(jax.hessian(s))(q)


# --------------------------------------------------------------------------- plain aux, probes, shapes
#
# Functions whose aux holds plain numbers computed from the values (`.item()`), which the
# shared server does not serve: this module registers them and serves itself, in-process.


@register(inputs=[Input("x", shape=("n",))], has_aux=True, description="sin; aux: numbers from the values, a fixed tag")
def numbers_aux(x: torch.Tensor):
    d = x.detach()
    return torch.sin(x), {"norm": float(d.norm()), "count": int((d > 0).sum()), "positive": bool(d.sum() > 0),
                          "tag": "sin", "first": x[0] * 1}


@register(inputs=[Input("x", shape=("n",))], has_aux=True, description="sin; aux: a string that depends on the values")
def signed_aux(x: torch.Tensor):
    return torch.sin(x), {"sign": "+" if float(x.detach().sum()) > 0 else "-"}


def numbers_local(x):
    return jnp.sin(x), {"norm": jnp.linalg.norm(x), "count": (x > 0).sum(), "positive": x.sum() > 0, "first": x[0] * 1}


def numbers(aux: dict[str, Any]) -> dict[str, Any]:
    """The traceable part of numbers_aux's aux (jit and vmap return arrays only, as locally)."""
    return {k: v for k, v in aux.items() if k != "tag"}


def close_numbers(got, want, tol=1e-10):
    """As close(), with the integer and bool aux compared in the dtypes the local sum gives."""
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and jnp.dtype(g.dtype).kind == jnp.dtype(w.dtype).kind, (g, w)
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=tol, atol=tol)


def test_plain_number_aux_is_live_under_jit_grad_and_vmap(oc):
    """Numbers in aux are computed at every call, traced as 0-d arrays: not the values of
    the call that taught the shapes (at zeros under jit), baked into the trace."""
    y = jnp.array([3.0, 4.0, 0.0])
    f = remote(oc.client, "numbers_aux")
    jitted = jax.jit(lambda z: numbers(f(z)[1]))
    close_numbers(jitted(y), numbers_local(y)[1])  # was norm 0.0, count 0: the probe's, at zeros
    assert oc.take() == ["evaluate", "evaluate"]  # the probe (abstract inputs), then the call
    close_numbers(jitted(-2 * y), numbers_local(-2 * y)[1])
    assert oc.take() == ["evaluate"]
    _, aux = f(y)  # concrete: 0-d arrays too, and the fixed values as they are
    assert aux["tag"] == "sin" and isinstance(aux["norm"], jax.Array) and aux["norm"].shape == ()
    assert float(aux["norm"]) == 5.0 and aux["count"].dtype == jnp.int64 and aux["positive"].dtype == jnp.bool_
    oc.take()

    g = remote(oc.client, "numbers_aux")  # learned under grad: at the caller's values
    loss = lambda fn: lambda z: (fn(z)[0].sum(), numbers(fn(z)[1]))  # noqa: E731
    close_numbers(jax.grad(loss(g), has_aux=True)(y), jax.grad(loss(numbers_local), has_aux=True)(y))
    close_numbers(jax.jit(jax.grad(loss(g), has_aux=True))(3 * y), jax.grad(loss(numbers_local), has_aux=True)(3 * y))
    oc.take()

    ys = jnp.stack([y, 2 * y, -y])
    for transform in (jax.vmap, lambda fn: jax.jit(jax.vmap(fn))):
        h = remote(oc.client, "numbers_aux")
        close_numbers(transform(lambda z, h=h: numbers(h(z)[1]))(ys), jax.vmap(lambda z: numbers_local(z)[1])(ys))
        close_numbers(transform(lambda z, h=h: h(z)[0])(ys), jnp.sin(ys))
    oc.take()


def test_non_numeric_aux_is_fixed_and_checked(oc):
    """A string cannot be traced: it is the one learned, and a call that returns another
    raises instead of handing back the stale one."""
    f = remote(oc.client, "signed_aux")
    pos = jnp.array([1.0, 2.0])
    assert f(pos)[1] == {"sign": "+"}  # concrete: learned at the caller's values
    close(jax.jit(lambda z: f(z)[0])(pos), jnp.sin(pos))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"aux leaf 0 is '-', but was '\+'.*fixed per input signature"):
        jax.jit(lambda z: f(z)[0])(-pos)
    with pytest.raises(ValueError, match=r"aux leaf 0 is '-', but was '\+'"):
        jax.grad(lambda z: f(z)[0].sum())(-pos)


def test_shapes_are_learned_at_the_callers_values_where_known(cc):
    """A function that refuses zeros (Cholesky of a zero matrix): grad, jvp and vmap
    outside jit learn the output shapes at the caller's own values, and grad reuses that
    answer as its forward; under jit the probe at zeros fails with its own error class
    and says what to do."""
    A = jnp.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]])
    T = jnp.array([[1.0, 0.3, 0.0], [0.3, -1.0, 0.2], [0.0, 0.2, 0.5]])  # symmetric tangent
    loss = lambda chol: lambda a: chol(a).sum()  # noqa: E731
    close(jax.grad(loss(remote(cc.client, "cholesky")))(A), jax.grad(loss(jnp.linalg.cholesky))(A))
    assert cc.take() == ["evaluate", "vjp"]  # was: a probe at zeros, 500 function_error
    close(jax.jvp(remote(cc.client, "cholesky"), (A,), (T,)), jax.jvp(jnp.linalg.cholesky, (A,), (T,)))
    assert cc.take() == ["evaluate", "jvp"]
    As = jnp.stack([A, 2 * A])
    close(jax.vmap(remote(cc.client, "cholesky"))(As), jax.vmap(jnp.linalg.cholesky)(As))
    assert cc.take() == ["evaluate", "evaluate+batched"]  # the first example teaches the shapes

    chol = remote(cc.client, "cholesky")
    with pytest.raises(jc.FunctionError, match=r"'cholesky' failed in the shape probe, an evaluate at zeros "
                                                r"\(float64\[3, 3\]\).*pass out_shape=.*or call it once outside jit"):
        jax.jit(jax.grad(loss(chol)))(A)
    assert cc.take() == ["evaluate"]
    given = remote(cc.client, "cholesky", out_shape=jax.ShapeDtypeStruct((3, 3), jnp.float64))
    close(jax.jit(jax.grad(loss(given)))(A), jax.grad(loss(jnp.linalg.cholesky))(A))
    assert cc.take() == ["vjp"]  # XLA drops the evaluate: a sum's gradient does not use the value
    chol(A)  # one concrete call and jit needs no probe
    cc.take()
    close(jax.jit(jax.grad(loss(chol)))(A), jax.grad(loss(jnp.linalg.cholesky))(A))
    assert cc.take() == ["vjp"]


class Reshaped:
    """A client whose answers to ``kinds`` come back in another shape of the same size,
    as a faulty server or proxy might send them."""

    def __init__(self, client: jc.Client, kinds: set[str], shape: tuple[int, ...]) -> None:
        self.client, self.kinds, self.shape = client, kinds, shape

    def _parts(self, kind: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        parts = self.client._parts(kind, *args, **kwargs)
        if kind in self.kinds:
            parts["value"] = np.asarray(parts["value"]).reshape(self.shape)
        return parts


def test_a_wrongly_shaped_result_raises_under_jit(cc):
    """Same size, other shape: under jit it used to be reshaped into place silently."""
    x = jnp.linspace(0.1, 0.6, 6)
    out = jax.ShapeDtypeStruct((6,), jnp.float64)
    f = remote(Reshaped(cc.client, {"evaluate"}, (2, 3)), "sin", out_shape=out)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"'sin' returned output 0 of shape \[2, 3\], expected \[6\]"):
        jax.jit(f)(x)
    with pytest.raises(ValueError, match=r"output 0 of shape \[2, 3\], expected \[6\]"):
        jax.jvp(f, (x,), (x,))
    g = remote(Reshaped(cc.client, {"vjp"}, (3, 2)), "sin", out_shape=out)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"vjp result of shape \[3, 2\], expected \[6\]"):
        jax.jit(jax.grad(lambda z: g(z).sum()))(x)
    close(jax.jit(g)(x), jnp.sin(x))  # the evaluate is untouched


def test_errors_under_jit_keep_the_sdk_errors_text(cc):
    """Outside jit the SDK's own classes; under jit XLA wraps whatever a callback raises
    in JaxRuntimeError (documented), whose message keeps the class and the text."""
    x = jnp.array([0.1, 0.2])
    broken = remote(cc.client, "broken", out_shape=jax.ShapeDtypeStruct((2,), jnp.float64))
    with pytest.raises(jc.FunctionError, match="diverged"):
        broken(x)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"FunctionError: 500 function_error: .*diverged"):
        jax.jit(broken)(x)


def test_an_empty_batch_is_answered_without_a_request(cc):
    """vmap over 0 examples: the service refuses an empty batch (422); JAX gives (0, ...)."""
    arm = remote(cc.client, "planar_arm")
    empty = jnp.zeros((0, 3))
    close(jax.vmap(arm)(empty), jax.vmap(planar_arm)(empty))
    assert cc.take() == ["evaluate"]  # nothing known yet: one evaluate at zeros of one example
    close(jax.vmap(arm)(empty), jax.vmap(planar_arm)(empty))
    close(jax.jit(jax.vmap(arm))(empty), jax.vmap(planar_arm)(empty))
    close(jax.vmap(jax.grad(loss_of(arm)))(empty), jax.vmap(jax.grad(loss_of(planar_arm)))(empty))
    close(jax.vmap(jax.jacfwd(arm))(empty), jax.vmap(jax.jacfwd(planar_arm))(empty))
    assert cc.take() == []
    sa = remote(cc.client, "scaled_norm")  # aux: an array, a string, and numbers
    xs, scale, power = jnp.ones((0, 4, 3)), jnp.array(2.0), jnp.array(1)
    norms = jax.vmap(lambda a: sa(a, scale, power)[0], in_axes=0)(xs)
    assert norms.shape == (0, 4)


def test_out_shape_may_list_a_dicts_keys_in_another_order(cc):
    """out_shape's dicts come in JAX's order (sorted keys), the function's in its own
    ({"b", "a"}): outputs and tangents are matched by key (they used to be zipped in
    order: a reshape error, or for equal shapes, swapped outputs)."""
    local = lambda x: (jnp.sin(x), {"b": 2 * x, "a": (x**3, x.sum())})  # noqa: E731
    vec, scalar = jax.ShapeDtypeStruct((3,), jnp.float64), jax.ShapeDtypeStruct((), jnp.float64)
    d = remote(cc.client, "nested_dict_out", out_shape=(vec, {"b": vec, "a": (vec, scalar)}))
    x, t = jnp.array([0.5, -2.0, 4.0]), jnp.array([1.0, 0.5, -1.0])
    close(jax.jit(d)(x), local(x))
    close(jax.jvp(d, (x,), (t,)), jax.jvp(local, (x,), (t,)))
    close(jax.jit(jax.jacfwd(d))(x), jax.jacfwd(local)(x))
    X = jnp.stack([x, 2 * x])
    close(jax.vmap(jax.jacfwd(d))(X), jax.vmap(jax.jacfwd(local))(X))
    close(jax.vmap(jax.jacrev(d))(X), jax.vmap(jax.jacrev(local))(X))


def test_an_unknown_function_under_jit_is_said_plainly(cc):
    """The shape probe's hint (pass out_shape=...) cannot help a function that does not
    exist: the error is FunctionNotFound, its detail the server's alone."""
    missing = remote(cc.client, "no_such_function")
    with pytest.raises(jc.FunctionNotFound) as raised:
        jax.jit(missing)(jnp.array([0.3, -0.2, 0.5]))
    assert "shape probe" not in str(raised.value) and "no_such_function" in str(raised.value)


def test_a_remote_function_pickles_with_its_client(cc):
    """It was a closure: a process pool or a pickled model could not take it."""
    import pickle

    sin = remote(cc.client, "sin", out_shape=jax.ShapeDtypeStruct((3,), jnp.float32))
    again, client = pickle.loads(pickle.dumps((sin, cc.client)))  # pickled once: `again` holds `client`
    x = jnp.array([0.3, -0.2, 0.5], jnp.float32)
    np.testing.assert_allclose(jax.jit(jax.jacrev(again))(x), jnp.diag(jnp.cos(x)), rtol=1e-6)
    client.close()


def test_low_precision_inputs_get_their_dtype_back_as_in_jax(cc):
    """bfloat16 inputs came back float32 (the service computes them so) under every
    transform, where jax gives bfloat16, unlike the torch adapter; mixed with float32,
    jax's promotion (float32) stands."""
    sin, add = remote(cc.client, "sin"), remote(cc.client, "add_square")
    for dtype in (jnp.bfloat16, jnp.float16):
        x = jnp.array([0.3, -0.2, 0.5], dtype)
        for got, want in ((sin(x), jnp.sin(x)), (jax.jit(sin)(x), jnp.sin(x)),
                          (jax.jacfwd(sin)(x), jax.jacfwd(jnp.sin)(x)), (jax.vmap(sin)(x[None]), jnp.sin(x)[None]),
                          (jax.grad(lambda z: sin(z).sum())(x), jnp.cos(x))):
            assert got.dtype == want.dtype and got.shape == want.shape, (dtype, got.dtype, want.dtype)
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2)
        y = jnp.array([1.1, 2.3, -3.7], jnp.float32)
        assert add(x, y).dtype == (x + y**2).dtype == jnp.float32


@register(inputs=[Input("x", shape=("n",))], description="sin(x), and how many entries so far are positive (int64)")
def sin_and_positives(x: torch.Tensor):
    return torch.sin(x), (x > 0).to(torch.int64).cumsum(0)


def test_forward_mode_gives_an_integer_output_jaxs_float0_tangent(oc):
    """jax.jvp and linearize give an integer output (indices, counts) a float0 tangent
    in-process; the remote function gave int64 zeros, an array JAX never makes for it."""
    g = remote(oc.client, "sin_and_positives")

    def local(x):
        return jnp.sin(x), jnp.cumsum(x > 0)

    x, t = jnp.array([0.3, -0.2, 0.5]), jnp.array([1.0, 2.0, -1.0])
    want_out, (want_t, want_count_t) = jax.jvp(local, (x,), (t,))
    assert want_count_t.dtype == jax.dtypes.float0  # the premise
    for got_out, (got_t, got_count_t) in (jax.jvp(g, (x,), (t,)), jax.jit(lambda a, b: jax.jvp(g, (a,), (b,)))(x, t),
                                          (None, jax.linearize(g, x)[1](t))):
        if got_out is not None:
            close(got_out, want_out)
        close(got_t, want_t)
        assert (got_count_t.shape, got_count_t.dtype) == (want_count_t.shape, jax.dtypes.float0)
    assert oc.take() == ["evaluate", "jvp", "evaluate", "jvp", "evaluate", "jvp"]  # jit: shapes known, no probe
