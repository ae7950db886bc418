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


# --- custom autograd.Functions (test_eager_transforms.py: TestAutogradFunction) ---


class _SinSetup(torch.autograd.Function):
    """setup_context, a jvp rule and generate_vmap_rule: every transform runs it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos()

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t * x.cos()


class _SinNoVmap(torch.autograd.Function):
    """setup_context but neither a vmap staticmethod nor generate_vmap_rule: jacrev's
    vmap over its backward raises in torch; jacrev(chunk_size=1) runs."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos()


class _SinOldStyle(torch.autograd.Function):
    """forward(ctx, x) without setup_context: torch.func refuses it in every transform."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos()


@register(inputs=[Input("x", shape=V)])
def custom_setup(x):
    return _SinSetup.apply(x) * x


@register(inputs=[Input("x", shape=V)])
def custom_no_vmap(x):
    return _SinNoVmap.apply(x) * x


@register(inputs=[Input("x", shape=V)])
def custom_old_style(x):
    return _SinOldStyle.apply(x) * x


# --- what f does to its inputs and its graph ---


@register(inputs=[Input("x", shape=V)])
def inplace_on_input(x):
    """An in-place op on the input itself (x.mul_), then its use."""
    x.mul_(2)
    return x.sin()


@register(inputs=[Input("x", shape=V)])
def detached(x):
    """x.detach() inside f: those terms have no derivative (torch: zero where only they count)."""
    return x.detach().sin() + x.detach() * x


@register(inputs=[Input("x", shape=V)])
def detached_only(x):
    """Nothing reaches x: jacrev answers zeros."""
    return x.detach() ** 2


@register(inputs=[Input("x", shape=V)])
def uses_item(x):
    """.item() inside f: a Python number, no derivative; torch's vmap raises on it."""
    return x * x.sum().item()


@register(inputs=[Input("x", shape=V)])
def no_grad_inside(x):
    """torch.no_grad inside f (test_no_grad_inside / test_no_grad_outside)."""
    with torch.no_grad():
        c = x * 2
    return x * c


@register(inputs=[Input("x", shape=V)])
def seeded_noise(x):
    """Random numbers from a generator seeded at each call: jacrev runs it once; jacfwd's
    vmap over the tangents raises in randomness='error' mode (test_jacfwd_randomness)."""
    g = torch.Generator().manual_seed(0)
    return x * torch.rand(x.shape, generator=g)


@register(inputs=[Input("x", shape=V, dtype="float64"), Input("y", shape=V, dtype="float32")])
def mixed_dtypes(x, y):
    """Several outputs of mixed dtypes (float64, float32, and a float64 of both)."""
    return x.sin(), y.cos(), x * y.double()


@register(inputs=[Input("x", shape=V), Input("p", shape=V)])
def item_scale(x, p):
    """.item() of the batched input: torch's vmap raises; the service loops over the examples."""
    return x.sin() * p * x.sum().item()


@register(inputs=[Input("x", shape=V), Input("k", shape=(), dtype="int64")])
def int_power(x, k):
    """An integer input, shared or batched (test_jac_with_non_tensor_args' kind)."""
    return x ** k


@register(inputs=[Input("x", shape=V)])
def returns_list(x):
    """A list output: jacrev nests lists, and so does the SDK (meta.lists)."""
    return [x.sin(), (x.cos(), x)]


@register(inputs=[Input("x", shape=V), Input("p", shape=V)])
def no_grad_shared(x, p):
    """Grad switched off inside f, a shared p: per-example Hessians take torch's own strategy."""
    with torch.no_grad():
        c = x * p
    return (x * x * c).sum() + (p * x.sin()).sum()
