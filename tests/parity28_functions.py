"""Functions for tests/test_parity_round28.py, round 28 of PyTorch's own torch.func test
cases replayed over HTTP: complex outputs pulled back (torch.func.vjp of a complex
cotangent), and the edge cases of TestGradTransform/TestVmapOfGrad the round replays."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))])
def to_complex(x):
    """A complex output of a real input: x e^{i x}."""
    return x * torch.exp(1j * x)


@register(inputs=[Input("x", shape=("n",))])
def mixed_complex(x):
    """A tuple output, one real leaf and one complex (torch.polar of e^x and x**2)."""
    return x.sin(), torch.polar(x.exp(), x**2)


@register(inputs=[Input("x", shape=("n",))])
def to_complex64(x):
    """A complex64 output of a float64 input: its cotangents are complex64."""
    return (x * torch.exp(1j * x)).to(torch.complex64)


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def complex_with_aux(x):
    """A complex output and an aux beside it."""
    return torch.polar(x.exp(), x), x.sum()


@register(inputs=[Input("x", shape=("n",))])
def int_scalar(x):
    """An integer scalar: torch.func.grad answers zeros, jacrev and hessian refuse it."""
    return (x * 3).long().sum()


@register(inputs=[Input("x", shape=("n",))])
def energy_and_argmax(x):
    """A float scalar beside an integer one (the argmax)."""
    return (x**3).sum(), x.argmax()


@register(inputs=[Input("x", shape=("n",))])
def complex_sum(x):
    """A complex scalar (0-d): its cotangent is one complex number."""
    return (x * torch.exp(1j * x)).sum()


@register(inputs=[Input("x", shape=("n",))])
def complex_empty(x):
    """A complex output with no elements beside a real one."""
    return (x[:0] * 1j), x.sin()
