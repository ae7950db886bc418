"""Functions for tests/test_parity_round27.py, round 27 of PyTorch's own torch.func test
cases replayed over HTTP: functions of real inputs whose outputs are complex (what
torch.func.jvp and a plain call answer, and jacrev refuses), and TestHessian's cases."""

from __future__ import annotations

import warnings

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))])
def to_complex(x):
    """A complex output of a real input: x e^{i x}, as test_jvp's complex cases build one."""
    return x * torch.exp(1j * x)


@register(inputs=[Input("x", shape=("n",))])
def mixed_complex(x):
    """A tuple output, one real leaf and one complex (torch.polar of x and x**2)."""
    return x.sin(), torch.polar(x.exp(), x**2)


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def complex_aux(x):
    """A real output with a complex aux (an FFT of x)."""
    return x.sin().sum(), torch.fft.fft(x)


@register(inputs=[Input("x", shape=("n",))])
def complex_half(x):
    """A complex32 (chalf) output, which numpy has no dtype for."""
    with warnings.catch_warnings():  # (torch: "ComplexHalf support is experimental")
        warnings.simplefilter("ignore")
        return torch.complex(x, x * 2).to(torch.complex32)


@register(inputs=[Input("x", shape=("n",))])
def complex_nonfinite(x):
    """A complex output holding an infinity and a NaN at x[1] (x / 0 and 0 / 0)."""
    return torch.complex(x / (x - x[1]), (x - x[1]) / (x - x[1]))


@register(inputs=[Input("x", shape=("n",))])
def complex_sum(x):
    """A complex scalar: torch.func.grad (and so hvp's jvp(grad(f))) refuses it."""
    return (x * torch.exp(1j * x)).sum()


@register(inputs=[Input("x", shape=("n",))])
def cube_sum(x):
    """TestHessian's f: (x ** 3).sum(), a real scalar whose Hessian is diag(6 x)."""
    return (x**3).sum()
