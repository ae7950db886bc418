"""Remote functions inside the caller's torch, JAX and SciPy code, round 12: each case
compared with the same computation in-process (or, where in-process cannot run it, with
its error).

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files; it also serves tests/remote12_functions.py.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from ._remote_support import cc, url  # noqa: E402,F401 (fixtures)


@pytest.fixture
def jx() -> Iterator[object]:
    """jax with x64 on (float64 values compared with torch's), as it was after."""
    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", before)


# --------------------------------------------------------------------------- JAX: an output whose shape follows the values


def test_jit_never_answers_an_output_whose_shape_follows_the_values(cc, jx):
    """Under ``jit`` the output shapes are learned before anything runs (an evaluate at
    zeros), and each answer is checked against them. But XLA runs no callback for a
    result without elements, nor JAX one whose results are unused (``jacrev`` needs no
    output value), and a per-example Jacobian or Hessian was reshaped into the learned
    layout: ``keeps_positives`` (``x[x > 0] * 3``, empty at zeros) answered ``jit(f)`` with
    ``[]``, ``jit(vmap(f))`` with ``(2, 0)`` and ``jit(jacrev(f))`` with ``(0, 3)``, no request
    made; ``r12_turns`` (``3 x 2`` at zeros, ``2 x 3`` here) answered ``jit(vmap(grad))`` and
    ``jit(vmap(hessian))`` with the service's Jacobian and Hessian read in the wrong order,
    with a 200. In-process ``jit`` cannot trace either function; each now raises, naming
    the shapes and why, and outside ``jit`` the same transforms equal torch.func."""
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    from . import remote12_functions as r12
    from . import user_functions as uf

    kp = remote(cc.client, "keeps_positives")
    x = jnp.array([1.0, -2.0, 3.0])
    for transform, arg in ((jax.jit(kp), x), (jax.jit(jax.vmap(kp)), jnp.stack([x, x])),
                           (jax.jit(jax.jacrev(kp)), x), (jax.jit(jax.jacfwd(kp)), x)):
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"'keeps_positives' returned output 0 of shape \[(2, )?2\], "
                                                             r"expected \[(2, )?0\].*cannot be traced by jax.jit"):
            transform(arg)
    negative = jnp.array([-1.0, -2.0, -3.0])  # empty here too: the answer stands, as torch.func's
    want = torch.func.jacrev(uf.keeps_positives)(torch.tensor(np.asarray(negative)))
    got = jax.jit(jax.jacrev(kp))(negative)
    assert got.shape == tuple(want.shape) == (0, 3)
    assert cc.take().count("evaluate") == 5  # the probe, then one per call: none answered unasked

    w = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    xs = torch.stack([torch.linspace(0.1, 0.6, 6, dtype=torch.float64), torch.linspace(-0.2, 0.5, 6, dtype=torch.float64)])
    turns = remote(cc.client, "r12_turns")
    loss = lambda z: (turns(z) * jnp.asarray(w.numpy().T)).sum()  # noqa: E731 (3 x 2, as learned at zeros)
    for transform in (jax.vmap(jax.grad(loss)), jax.vmap(jax.hessian(loss))):
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"'r12_turns' returned a block of the (Jacobian|Hessian) "
                                                             r"of shape \[2, 2, 3, 6.*expected \[2, 3, 2, 6"):
            jax.jit(transform)(jnp.asarray(xs.numpy()))
    eager = remote(cc.client, "r12_turns")  # outside jit the shapes are the caller's: (2, 3) here
    local_loss = lambda z: (r12.r12_turns(z) * w).sum()  # noqa: E731
    loss = lambda z: (eager(z) * jnp.asarray(w.numpy())).sum()  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(loss))(jnp.asarray(xs.numpy()))),
                               torch.stack([torch.func.grad(local_loss)(z) for z in xs]).numpy(), rtol=1e-12,
                               atol=1e-12)  # (torch's vmap cannot run its data-dependent branch in-process)
