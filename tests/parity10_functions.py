"""Functions modelled on PyTorch's own torch.func tests (test/functorch/test_eager_transforms.py
and test_vmap.py), round 10: vmap's in_dims / out_dims over per-example Jacobians, custom
autograd.Functions, in-place ops, detach, item, randomness, mixed dtypes. Each is compared
with in-process torch.func by tests/test_parity_round10.py."""

from __future__ import annotations

import torch
from jacobian_service import Array, Input, register

V = ("n",)


@register(inputs=[Input("x", shape=V), Input("p", shape=V)])
def shared_scale(x, p):
    """vmap(jacrev(f), in_dims=(0, None)): a parameter every example shares."""
    return (x * p).sin() + p


@register(inputs=[Input("x", shape=V), Input("p", shape=("m",))])
def separable(x, p):
    """d/dp does not depend on x, but the output does: jacrev's d/dp is batched under
    in_dims=(0, None) all the same (its cotangents follow the output), and torch's vmap
    refuses out_dims=None for it."""
    return x.sin().sum() + (p ** 2).sum()


@register(inputs=[Input("x", shape=V), Input("p", shape=("m",))])
def ignores_x(x, p):
    """Nothing depends on the batched x: unbatched under in_dims=(0, None), so out_dims=None
    answers it once (test_vmap.py's test_out_dims_none)."""
    return (p ** 2).sum()


@register(inputs=[Input("params", tree={"w": Array((2, 3)), "b": Array((2,))}), Input("x", shape=(3,)),
                  Input("y", shape=(2,))])
def linear_loss(params, x, y):
    """Per-sample gradients (test_per_sample_grads_*): vmap(grad(loss), in_dims=(None, 0, 0))."""
    return ((params["w"] @ x + params["b"] - y) ** 2).sum()


@register(inputs=[Input("x", shape=V), Input("p", shape=V)], has_aux=True)
def scaled_with_aux(x, p):
    """has_aux: an int out_dims moves the aux's batch too, as vmap(jacrev(f, has_aux=True), out_dims=k)."""
    return (x * p).cos(), {"x2": x ** 2}


@register(inputs=[Input("x", shape=("m", "n"))])
def row_norms(x):
    """A 2-D input batched over either dim (in_dims=1, -1)."""
    return (x ** 2).sum(-1).sqrt()
