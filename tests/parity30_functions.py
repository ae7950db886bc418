"""Functions for tests/test_parity_round30.py, round 30 of PyTorch's own torch.func test
cases replayed over HTTP: second derivatives of complex outputs (R -> C) through the SDK's
adapters, integer inputs beside floating ones, and pytree / dtype / empty-dimension cases
of TestJac and TestHessian."""

from __future__ import annotations

import torch
from jacobian_service import Array, Input, register


@register(inputs=[Input("x", shape=("n",))])
def to_complex(x):
    """A complex vector of a real input: x e^{i x}."""
    return x * torch.exp(1j * x)


@register(inputs=[Input("x", shape=("n",))])
def complex_sum(x):
    """A complex scalar (0-d): torch.func.grad refuses it, its vjp answers."""
    return (x * torch.exp(1j * x)).sum()


@register(inputs=[Input("x", shape=("n",))])
def real_and_complex64(x):
    """A real leaf beside a complex64 one (of a float64 input)."""
    return x.sin() * x, torch.polar(x.exp(), x**2).to(torch.complex64)


@register(inputs=[Input("w", shape=("n",)), Input("x", shape=("n",))])
def weighted_complex(w, x):
    """Weights every example shares (vmap's in_dims None) in a complex output."""
    return w * x * torch.exp(1j * w * x)


@register(inputs=[Input("x", shape=("n",)), Input("idx", shape=("k",), dtype="int64")])
def gather_at(x, idx):
    """x's entries at integer indices (an integer input beside a floating one)."""
    return x[idx] ** 2 * x.sum()


@register(inputs=[Input("x", shape=("n",)), Input("k", shape=(), dtype="int64")])
def power_k(x, k):
    """A 0-d integer exponent beside the floating input: a scalar output."""
    return (x**k).sum()


@register(inputs=[Input("p", tree={"a": Array(("n",)), "bc": (Array(()), [Array(("n",)), Array((2, "n"))])}),
                  Input("x", shape=("n",))])
def nested_tree(p, x):
    """A dict-of-tuple-of-list parameter beside a plain one; a dict-of-tuple output."""
    return {"u": p["a"] * x + p["bc"][0], "v": (p["bc"][1][0] * p["bc"][1][1].sum(0), x.sum() * p["bc"][0])}


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def nested_aux(x):
    """Aux nested dict / tuple / list, an integer leaf and an empty one in it."""
    return x.sin(), {"a": (x.sum(), [x.max(), {"b": x * 2}]), "c": (x > 0).long(), "d": x[:0]}


@register(inputs=[Input("x", shape=("n",))])
def mixed_dtypes(x):
    """A tuple output of three floating dtypes: the input's, float32 (exp of x in float32:
    rounded to a half precision, other numbers), float16."""
    return x.sin(), x.float().exp(), x.cos().to(torch.float16)


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def precisions(x):
    """Outputs in float32, the input's dtype and bfloat16 whatever the input's; a float32
    aux beside one in the input's dtype."""
    return (x.float().exp(), x * 2, x.float().bfloat16() * 3), {"mean": x.float().mean(), "max": x.max()}


@register(inputs=[Input("x", shape=("m", "n")), Input("y", shape=("n",))])
def empty_rows(x, y):
    """x @ y beside sin(y): empty whenever m or n is 0."""
    return x @ y, y.sin()
