"""Functions for tests/test_parity_round16.py, round 16 of PyTorch's own torch.func test
cases replayed over HTTP: per-example Jacobians whose vmap torch gets wrong at some
values and right at others of the same shapes, and functions with an output that does
not depend on the batched inputs (vmap's out_dims=None)."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


def _self_distances(x):
    """torch.cdist of x's points (on a line) with themselves. torch's vmap of cdist's
    pullback is wrong where two distinct points coincide with others (x = [0, 1]: 1.0
    off), right where all points coincide (x = [0, 0]), at the same shapes."""
    p = x.reshape(-1, 1)
    return torch.cdist(p, p)


# two names for one function: each test sees a function the engine has learned nothing of
for _name in ("self_distances", "self_distances_later", "self_distances_vjp", "self_distances_plain"):
    register(name=_name, inputs=[Input("x", shape=("n",))])(_self_distances)


@register(inputs=[Input("x", shape=("n",)), Input("w", shape=("n",))])
def scaled_and_weight(x, w):
    """(x * w, w ** 2): under vmap(in_dims=(0, None)) the second output depends on the
    shared w alone, so torch's vmap leaves it unbatched (out_dims=None takes it)."""
    return x * w, w ** 2


@register(inputs=[Input("x", shape=("n",)), Input("w", shape=("n",))], has_aux=True)
def scaled_with_weight_aux(x, w):
    """(x * w, aux {"w2": w * 2, "n": x.numel()}): under vmap(in_dims=(0, None)) the aux's
    tensor depends on the shared w alone."""
    return x * w, {"w2": w * 2, "xs": x.sum()}
