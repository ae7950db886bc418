"""PyTorch's own torch.func test cases, round 29, replayed over HTTP against
tests/parity29_functions.py through the SDK's torch and JAX adapters, compared with
in-process torch.func / JAX.

1. Per-example (vmapped) first derivatives of a remote function with an integer output
   beside a floating one (test_eager_transforms.py's ``vmap(jacfwd)``, ``vmap(jvp)``,
   ``vmap(vjp)``, TestGradTransform's has_aux over ``vmap``; an index or a count returned
   beside the loss): the adapters contract per-example products from the service's batched
   Jacobian, which refuses an integer output (jacrev's refusal), so every one of them was
   the service's 422 ``InvalidInput`` ("has an integer output beside a floating one") where
   torch and JAX answer. Now they go example by example as the unbatched products are
   answered (a jvp with integer zero tangents; a vjp of the floating outputs by forward
   mode): torch's values, dtypes (int64 zero tangents) and shapes, a shared input's
   gradient summed over the examples.

2. The same through a complex output (round 28's R -> C functions under ``vmap``): the
   batched Jacobian refuses a complex output as jacrev does, so a vmapped ``vjp`` of a
   complex cotangent, ``jax.vmap(jax.jacfwd(f))`` and ``jax.vmap(jax.grad(|f|^2))`` were
   its 422 where torch and JAX answer, and ``vmap(jacfwd(f))`` that 422 where torch raises
   its own RuntimeError. The refusal now carries ``"unsupported": "complex_output"`` (as
   the integer one carries ``integer_output``) and the adapters go example by example.

One in-process app serves the module (no server start), as rounds 7-28.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from . import parity29_functions as F
from ._remote_support import jx  # noqa: F401  (a fixture: jax with float64 on)
from .conftest import ready_app, sdk_over

f = torch.func
RNG = np.random.default_rng(29)
X = torch.tensor(RNG.standard_normal(4))
XS = torch.tensor(RNG.standard_normal((3, 4)))
V = torch.tensor(RNG.standard_normal(4))
W = torch.tensor(RNG.standard_normal(4))


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity29_functions") as client:
        yield client


@pytest.fixture(scope="module")
def sdk(c) -> Iterator[Any]:
    with sdk_over(c) as client:
        yield client


def same(got: Any, want: Any) -> None:
    """Pytree structure, dtypes, shapes and values."""
    g, g_spec = torch.utils._pytree.tree_flatten(got)
    w, w_spec = torch.utils._pytree.tree_flatten(want)
    assert g_spec == w_spec, (g_spec, w_spec)
    for i, (a, b) in enumerate(zip(g, w)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def first(g: Any) -> Any:
    return lambda *xs: g(*xs)[0]


CASES = {
    "vmap(jacfwd)": lambda g: f.vmap(f.jacfwd(g))(XS),
    "vmap(jacrev(f()[0]))": lambda g: f.vmap(f.jacrev(first(g)))(XS),
    "vmap(jvp)": lambda g: f.vmap(lambda x: f.jvp(g, (x,), (V,)))(XS),
    "vmap(vjp(f()[0]))": lambda g: f.vmap(lambda x: f.vjp(first(g), x)[1](torch.ones_like(first(g)(x))))(XS),
    "vmap(grad, has_aux)": lambda g: f.vmap(f.grad(lambda x: (g(x)[0].sum(), g(x)[1]), has_aux=True))(XS),
}


@pytest.mark.parametrize("name", ["float_and_int", "vec_and_int"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_per_example_derivatives_beside_an_integer_output_are_torchs(sdk, name, case):
    from jacobian_client.torch import remote

    run = CASES[case]
    same(run(remote(sdk, name)), run(getattr(F, name)))


def test_a_shared_weights_gradient_beside_a_count_is_summed_over_examples(sdk):
    from jacobian_client.torch import remote

    def run(g: Any) -> Any:
        per_example = f.vmap(f.grad(lambda w, x: (g(w, x)[0], g(w, x)[1]), has_aux=True), in_dims=(None, 0))(W, XS)
        total = f.grad(lambda w: f.vmap(first(g), in_dims=(None, 0))(w, XS).sum())(W)
        return per_example, total, f.vmap(f.jacfwd(g, argnums=(0, 1)), in_dims=(None, 0))(W, XS)

    same(run(remote(sdk, "weighted_and_int")), run(F.weighted_and_int))


def test_a_jax_per_example_derivatives_beside_an_integer_output_are_jaxs(sdk, jx):
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    def local(x: Any) -> Any:
        return x * jnp.sin(x), (x * 3).astype(jnp.int64)

    fr = remote(sdk, "vec_and_int")
    xs = jnp.asarray(XS.numpy())
    for label, tr in (("vmap(jacfwd)", lambda g: jax.vmap(jax.jacfwd(lambda x: g(x)[0]))),
                      ("vmap(jacrev([0]))", lambda g: jax.vmap(jax.jacrev(lambda x: g(x)[0]))),
                      ("vmap(grad, has_aux)",
                       lambda g: jax.vmap(jax.grad(lambda x: (g(x)[0].sum(), g(x)[1]), has_aux=True)))):
        got, want = tr(fr)(xs), tr(local)(xs)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), label
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert a.dtype == b.dtype and a.shape == b.shape, (label, a.dtype, b.dtype)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12, err_msg=label)


# --------------------------------------------------------------------------- 2. complex outputs per example

def test_b_the_batched_jacobians_complex_refusal_says_so_in_a_member(c):
    """What the adapters go by: the member, in JSON and .npz requests alike."""
    body = {"inputs": [XS.tolist()], "batched": True}
    for r in (c.post("/v1/functions/real_and_complex/jacobian", json=body),
              c.post("/v1/functions/real_and_complex/jacobian?batched=true", content=npz(x=XS.numpy()),
                     headers={"content-type": "application/x-npz"})):
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
        problem = r.json()
        assert problem["code"] == "invalid_input" and problem["unsupported"] == "complex_output", problem
        assert problem["detail"].startswith("the output[1] is complex"), problem


def npz(**arrays: Any) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_b_per_example_pullbacks_of_a_complex_output_are_torchs(sdk):
    from jacobian_client.torch import remote

    cot = (torch.ones(4, dtype=torch.float64), torch.full((4,), 0.5 - 2j, dtype=torch.complex128))

    def run(g: Any) -> Any:
        return f.vmap(lambda x: f.vjp(g, x)[1](cot))(XS)

    same(run(remote(sdk, "real_and_complex")), run(F.real_and_complex))
    # torch's jacfwd refuses a complex output itself: its RuntimeError, not the service's 422
    with pytest.raises(RuntimeError, match="Expected all outputs to be real") as want:
        f.vmap(f.jacfwd(F.real_and_complex))(XS)
    with pytest.raises(RuntimeError) as got:
        f.vmap(f.jacfwd(remote(sdk, "real_and_complex")))(XS)
    assert str(got.value) == str(want.value)


def test_b_jax_per_example_derivatives_of_a_complex_output_are_jaxs(sdk, jx):
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    def local(x: Any) -> Any:
        return x * jnp.sin(x), jnp.exp(x) * jnp.exp(1j * x**2)

    fr = remote(sdk, "real_and_complex")
    xs = jnp.asarray(XS.numpy())
    norm = lambda g: (lambda x: jnp.sum(jnp.abs(g(x)[1]) ** 2 + jnp.real(g(x)[1]) * g(x)[0]))
    for label, tr in (("vmap(jacfwd)", lambda g: jax.vmap(jax.jacfwd(g))),
                      ("vmap(grad(|f|^2))", lambda g: jax.vmap(jax.grad(norm(g))))):
        got, want = tr(fr)(xs), tr(local)(xs)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), label
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert a.dtype == b.dtype and a.shape == b.shape, (label, a.dtype, b.dtype)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12, err_msg=label)
