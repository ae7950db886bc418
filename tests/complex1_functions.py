"""Functions for tests/test_complex_inputs.py: inputs declared complex64 / complex128,
with real and complex outputs, a real input beside a complex one, and a pytree of a
complex and a real leaf."""

from __future__ import annotations

import torch

from jacobian_service import Array, Input, register


@register(inputs=[Input("z", shape=("n",), dtype="complex128")])
def abs2(z):
    """sum |z|^2: a real scalar of a complex input (its hvp: torch's jvp of grad)."""
    return (z.abs() ** 2).sum()


@register(inputs=[Input("z", shape=("n",), dtype="complex128")])
def csquare(z):
    """z^2: complex to complex (holomorphic)."""
    return z**2


@register(inputs=[Input("z", shape=("n",), dtype="complex64")])
def real_part_sq(z):
    """Re(z)^2 + Im(z): a real vector of a complex64 input (not holomorphic)."""
    return z.real**2 + z.imag


@register(inputs=[Input("z", shape=("n",), dtype="complex128"), Input("x", shape=("n",), dtype="float64")],
          has_aux=True)
def mixed(z, x):
    """(sum |z| x, aux z * x): a complex input beside a real one."""
    return (z.abs() * x).sum(), z * x


@register(inputs=[Input("p", tree={"z": Array(("n",), "complex128"), "x": Array(("n",), "float64")})])
def tree_fn(p):
    """sum Re(z conj(z) x) over a dict of a complex and a real leaf."""
    return (p["z"] * p["z"].conj() * p["x"]).real.sum()


@register(inputs=[Input("x", shape=("n",))])
def real_sin(x):
    """sin(x) of a floating (real) input: complex arrays are refused for it."""
    return torch.sin(x)


@register(inputs=[Input("x", shape=(), dtype="complex64")])
def conj_abs(x):
    """torch's TestGradTransform.test_conj_bit: |conj(x)| of a 0-d complex input, which
    must not arrive conjugated (its grad is sgn(x))."""
    if x.is_conj():
        raise AssertionError("Expected x to not be conj")
    y = x.conj()
    if not y.is_conj():
        raise AssertionError("Expected y to be conj")
    return y.abs()
