"""Functions for tests/test_parity_round30.py (probe)."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",)), Input("idx", shape=("k",), dtype="int64")])
def gather_at(x, idx):
    """x's entries at integer indices, squared."""
    return x[idx] ** 2 * x.sum()


@register(inputs=[Input("x", shape=("n",)), Input("k", shape=(), dtype="int64")])
def power_k(x, k):
    return (x ** k).sum()


@register(inputs=[Input("x", shape=("n",))])
def to_complex(x):
    return x * torch.exp(1j * x)


@register(inputs=[Input("x", shape=("n",))])
def complex_sum(x):
    return (x * torch.exp(1j * x)).sum()


@register(inputs=[Input("x", shape=("n",))])
def mixed_dtypes(x):
    """A tuple of different floating dtypes."""
    return x.sin(), (x * 2).to(torch.float32), x.cos().to(torch.float16)


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def nested_aux(x):
    return x.sin(), {"a": (x.sum(), [x.max(), {"b": x * 2}]), "c": "s", "d": 3}


@register(inputs=[Input("x", shape=("m", "n"))])
def matsq(x):
    return x @ x.T


@register(inputs=[Input("x", shape=("n",))])
def half(x):
    return (x.sin() * x).sum()


@register(inputs=[Input("x", shape=("n",))])
def real_and_complex64(x):
    return x.sin() * x, torch.polar(x.exp(), x**2).to(torch.complex64)
