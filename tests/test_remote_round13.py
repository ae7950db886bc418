"""Remote functions inside the caller's JAX code, round 13: each case compared with the
same computation in-process (or, where in-process cannot run it, with its error).

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from ._remote_support import cc, jx, url  # noqa: E402,F401 (fixtures)


# --------------------------------------------------------------------------- JAX: an output whose shape follows the values


def test_jit_derivatives_say_why_an_output_of_another_shape_is_refused(cc, jx):
    """Under ``jit`` the output shapes are learned at zeros (``r12_turns``: ``3 x 2``); at
    these values the output is ``2 x 3``. ``grad`` of a sum uses no output value, so XLA
    drops the forward and the vjp goes with cotangents shaped as learned: the service's
    bare 422 "cotangents: expected shape [2, 3], got [3, 2]" came back, nothing saying why
    (``jit(hessian)``, ``jit(jacrev)`` and a jitted vjp alike). Now the refusal is followed
    by one evaluate at these inputs, and the caller gets the adapter's own error naming
    the shapes and why (as for an empty output, and as ``jit(jacfwd)`` already said)."""
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    turns = remote(cc.client, "r12_turns")
    x = jnp.linspace(0.1, 0.6, 6)
    for transform in (jax.grad(lambda z: turns(z).sum()), jax.hessian(lambda z: turns(z).sum()), jax.jacrev(turns),
                      lambda z: jax.vjp(turns, z)[1](jnp.ones((3, 2)))):
        cc.take()
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"ValueError: remote function 'r12_turns' returned output "
                                                             r"0 of shape \[2, 3\], expected \[3, 2\].*cannot be traced "
                                                             r"by jax.jit"):
            jax.jit(transform)(x)
        assert cc.take()[-1] == "evaluate"  # the check, after the refused product
    # where the output is as learned (3 x 2 at a negative sum) the answers stand, as torch.func's
    import torch

    from . import remote12_functions as r12

    w = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    local = torch.func.grad(lambda z: (r12.r12_turns(z) * w).sum())(torch.tensor(np.asarray(-x)))
    got = jax.jit(jax.grad(lambda z: (turns(z) * jnp.asarray(w.numpy())).sum()))(-x)
    np.testing.assert_allclose(np.asarray(got), local.numpy(), rtol=1e-12, atol=1e-12)
