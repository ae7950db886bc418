"""Remote functions in a scientist's programs, round 25: each answer compared with the
same program in-process (``torch.func``, jax on the local function).

* Nested ``vmap`` where an input is mapped by the outer level only (an ensemble's weights,
  one set per model) beside one mapped by both with the outer axis in front (each model's
  own batch of data, ``(models, batch, n)``): the inner levels' batch shape was read from
  the front of that input, which is the outer level's, and the host reshape failed
  ("cannot reshape array of size 36 into shape (6, 4)"), in torch and jax alike, for
  values and every derivative.

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

from jacobian_client.torch import remote
from jacobian_service import examples
from torch.utils import _pytree as pytree

from ._remote_support import Counted, counting, jx  # noqa: F401 (fixture)
from .conftest import ready_app, sdk_over

f = torch.func
D = torch.float64


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    with ready_app("jacobian_service.examples") as a:
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


def same_tree(got: Any, want: Any, tol: float = 1e-12) -> None:
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    assert got_spec == want_spec, f"\n got: {got_spec}\nwant: {want_spec}"
    for g, w in zip(got_leaves, want_leaves):
        assert np.shape(g) == np.shape(w)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- 1. nested vmap


def _ensemble() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """3 models' dense layers (2 x 4) and each model's own batch of 5 inputs."""
    rng = np.random.default_rng(25)
    return {"w": rng.standard_normal((3, 2, 4)), "b": rng.standard_normal((3, 2))}, rng.standard_normal((3, 5, 4))


def test_torch_nested_vmap_of_an_input_mapped_by_the_outer_level_only(cc):
    """``vmap(vmap(layer, in_dims=(None, 0)))(params, X)``: ``params`` one set per model
    (outer level only), ``X`` each model's batch (both levels, the outer axis in front).
    Values, per-example gradients in ``x`` and in the parameters, backward through it
    and the per-example Hessian, as in-process; the values in one batched request."""
    p, xs = _ensemble()
    pt, xt = pytree.tree_map(lambda a: torch.tensor(a, dtype=D), p), torch.tensor(xs, dtype=D)
    layer = remote(cc.client, "dense_layer")

    def nested(fn: Any, *dims: Any) -> Any:
        return f.vmap(f.vmap(fn, in_dims=dims[0]), in_dims=dims[1])

    cc.take()
    same_tree(nested(layer, (None, 0), (0, 0))(pt, xt), nested(examples.dense_layer, (None, 0), (0, 0))(pt, xt))
    assert cc.take() == ["evaluate+batched"]
    same_tree(nested(lambda q, x: f.jacrev(layer, argnums=(0, 1))(q, x), (None, 0), (0, 0))(pt, xt),
              nested(lambda q, x: f.jacrev(examples.dense_layer, argnums=(0, 1))(q, x), (None, 0), (0, 0))(pt, xt))
    same_tree(nested(f.hessian(lambda q, x: layer(q, x).sum(), argnums=1), (None, 0), (0, 0))(pt, xt),
              nested(f.hessian(lambda q, x: examples.dense_layer(q, x).sum(), argnums=1), (None, 0), (0, 0))(pt, xt))

    def backward(fn: Any) -> Any:
        q = pytree.tree_map(lambda t: t.clone().requires_grad_(), pt)
        x = xt.clone().requires_grad_()
        nested(fn, (None, 0), (0, 0))(q, x).pow(2).sum().backward()
        return {k: v.grad for k, v in q.items()}, x.grad

    same_tree(backward(layer), backward(examples.dense_layer))


@pytest.mark.parametrize("models, batch", [(3, 0), (0, 5)])
def test_torch_nested_vmap_of_the_ensemble_over_an_empty_level(sdk, models, batch):
    """An empty level (no models, or models with no data): the shapes torch gives, values
    and gradients (an empty inner batch was the same reshape error)."""
    p, xs = _ensemble()
    pt = {k: torch.tensor(v[:models], dtype=D) for k, v in p.items()}
    xt = torch.tensor(xs[:models, :batch], dtype=D)
    layer = remote(sdk, "dense_layer")
    for wrap in (lambda g: g, lambda g: f.grad(lambda q, x: g(q, x).sum(), argnums=(0, 1))):
        def nested(fn: Any) -> Any:
            return f.vmap(f.vmap(wrap(fn), in_dims=(None, 0)), in_dims=(0, 0))
        same_tree(nested(layer)(pt, xt), nested(examples.dense_layer)(pt, xt))


def test_jax_nested_vmap_of_an_input_mapped_by_the_outer_level_only(sdk, jx):  # noqa: F811 (fixture)
    """The same ensemble in jax, outside and under ``jit``: values, ``grad`` in the
    parameters and ``x``, and the per-example Hessian in ``x``."""
    import jax.numpy as jnp
    from jacobian_client.jax import remote as jremote

    p, xs = _ensemble()
    layer = jremote(sdk, "dense_layer")

    def local(q: Any, x: Any) -> Any:
        return jnp.tanh(q["w"] @ x + q["b"])

    def nested(fn: Any) -> Any:
        return jx.vmap(jx.vmap(fn, in_axes=(None, 0)), in_axes=(0, 0))

    # values outside and under jit, grad outside, the Hessian under jit (each path once:
    # jax's tracing of nested transforms is most of this test's time)
    cases = [(lambda g: g, False), (lambda g: g, True),
             (lambda g: jx.grad(lambda q, x: g(q, x).sum(), argnums=(0, 1)), False),
             (lambda g: jx.hessian(lambda q, x: g(q, x).sum(), argnums=1), True)]
    for transform, jit in cases:
        got = (jx.jit if jit else (lambda h: h))(nested(transform(layer)))(p, xs)
        same_tree(got, nested(transform(local))(p, xs))
    empty = nested(layer)(p, xs[:, :0])  # models with no data
    assert empty.shape == (3, 0, 2)
