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


# --------------------------------------------------------------------------- JAX: outputs of shared inputs alone under vmap


def test_jax_vmap_leaves_an_output_of_shared_inputs_alone_unbatched(cc, jx):
    """jax's vmap leaves an output that depends on no mapped input unbatched (``out_axes=
    None`` takes it). The adapter said every output was batched, so ``vmap(remote(f),
    in_axes=(0, None), out_axes=(0, None))`` of ``(x * w, w ** 2)`` raised jax's "vmap has
    mapped output but out_axes is None" where jax answers for the same function
    in-process (torch's adapter was fixed last round); so did an aux array of ``w`` alone.
    Now the batched evaluate's ``meta.unbatched`` says which, learned at the caller's
    values outside jit (no extra request) and under jit by one batched evaluate of one
    example where an input is shared (none where every input is mapped)."""
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    def local(x, w):
        return x * w, w ** 2

    def local_aux(x, w):
        return x * w, {"w2": w * 2, "xs": x.sum()}

    xs, w = jnp.arange(6.0).reshape(3, 2) - 2, jnp.array([0.5, -1.5])
    cases = ((local, "scaled_and_weight", (0, None)), (local_aux, "scaled_with_weight_aux", (0, {"w2": None, "xs": 0})))
    for fn, name, out_axes in cases:
        want = jax.vmap(fn, in_axes=(0, None), out_axes=out_axes)(xs, w)
        for jit, requests in ((False, ["evaluate", "evaluate+batched"]),
                              (True, ["evaluate", "evaluate+batched", "evaluate+batched"])):
            f = remote(cc.client, name)  # learns afresh
            cc.take()
            vm = jax.vmap(f, in_axes=(0, None), out_axes=out_axes)
            got = (jax.jit(vm) if jit else vm)(xs, w)
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
            for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                assert g.shape == e.shape
                np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-12)
            assert cc.take() == requests  # (under jit: the shapes at zeros, the one-example batch, the batch)
    # nested: each level's output of w alone, as jax's
    f = remote(cc.client, "scaled_and_weight")
    nested = lambda g: jax.vmap(jax.vmap(g, in_axes=(0, None), out_axes=(0, None)),  # noqa: E731
                                in_axes=(0, None), out_axes=(0, None))
    for g, e in zip(nested(f)(jnp.stack([xs, xs + 1]), w), nested(local)(jnp.stack([xs, xs + 1]), w)):
        assert g.shape == e.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-12)
    # every input mapped: no probe under jit, every output batched (as jax's, w ** 2 then of a mapped w)
    f = remote(cc.client, "scaled_and_weight")
    cc.take()
    got = jax.jit(jax.vmap(f))(xs, xs + 1)
    want = jax.vmap(local)(xs, xs + 1)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-12)
    assert cc.take() == ["evaluate", "evaluate+batched"]


def test_jax_vmap_leaves_a_derivative_of_shared_inputs_alone_unbatched(cc, jx):
    """The same for derivatives, as torch's adapter has them: the gradient in a shared
    ``w`` of ``sum(w ** 2)`` under ``vmap(grad(..., argnums=1), in_axes=(0, None),
    out_axes=None)`` (its jvp, ``jacrev`` and ``jacfwd`` in ``w`` alike) raised jax's "vmap
    has mapped output" where jax answers in-process; one that a batched output feeds
    (``jacrev`` in ``w`` of both outputs, a gradient of both) stays batched, as jax's; the
    Hessian in ``w`` alike. No request more than before: the forward's batch said which
    outputs are unbatched."""
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    def local(x, w):
        return x * w, w ** 2

    xs, w = jnp.arange(6.0).reshape(3, 2) - 2, jnp.array([0.5, -1.5])
    shared = (0, None)
    cases = (
        (lambda g: jax.vmap(jax.grad(lambda x, w: g(x, w)[1].sum(), argnums=1), shared, None), False),
        (lambda g: jax.vmap(jax.grad(lambda x, w: g(x, w)[1].sum(), argnums=(0, 1)), shared, (0, None)), False),
        (lambda g: jax.vmap(lambda x, w: jax.jvp(lambda v: g(x, v)[1], (w,), (jnp.ones(2),))[1], shared, None), False),
        (lambda g: jax.vmap(jax.jacrev(lambda x, w: g(x, w)[1], argnums=1), shared, None), False),
        (lambda g: jax.vmap(jax.jacfwd(lambda x, w: g(x, w)[1], argnums=1), shared, None), False),
        (lambda g: jax.vmap(jax.hessian(lambda x, w: g(x, w)[1].sum(), argnums=1), shared, None), False),
        (lambda g: jax.vmap(jax.jacrev(g, argnums=1), shared), True),
        (lambda g: jax.vmap(jax.hessian(lambda x, w: sum(o.sum() for o in g(x, w)), argnums=1), shared), True),
        (lambda g: jax.vmap(jax.grad(lambda x, w: sum(o.sum() for o in g(x, w)), argnums=1), shared), True),
    )
    for k, (make, batched) in enumerate(cases):
        want = make(local)(xs, w)
        for jit in (False, True) if k in (0, 5, 6) else (False,):  # jit's rule is the same one (CI time)
            f = remote(cc.client, "scaled_and_weight")
            got = (jax.jit(make(f)) if jit else make(f))(xs, w)
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
            for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                assert g.shape == e.shape
                np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-12, atol=1e-12)
        assert batched == (jax.tree_util.tree_leaves(want)[-1].shape[0] == 3)


def test_jax_what_a_batch_left_unbatched_is_remembered_for_a_bounded_number_of_signatures(jx):
    """The flags learned per per-example signature are kept as the templates are: the
    newest 64, so a caller cycling through shapes does not grow them without end; one
    that comes again moves to the newest."""
    import jacobian_client as jc
    from jacobian_client._remote import MAX_SIGNATURES
    from jacobian_client.jax import _Ops

    with jc.Client("http://127.0.0.1:9") as client:  # nothing is asked
        ops = _Ops(client, "f")
        for n in range(MAX_SIGNATURES + 10):
            ops.note_unbatched(("sig", n), (n % 2 == 0,))
            if n == MAX_SIGNATURES - 4:
                ops.note_unbatched(("sig", 0), (True,))  # again: the newest now
        assert ops.unbatched_of(("sig", 0)) == (True,) and ops.unbatched_of(("sig", 1)) is None
        assert ops.unbatched_of(("sig", MAX_SIGNATURES + 9)) == (False,)
        assert len(vars(ops)["_unbatched"]) == MAX_SIGNATURES
