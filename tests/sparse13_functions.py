"""Functions for tests/test_sparse_round13.py: a scientist's implicit step (whose
Jacobian scipy's sparse LU takes as CSC), a scalar energy (a sparse Hessian), and a
function of many inputs and one output (a wide Jacobian, whose CSC holds a column
pointer per input); functions jacrev cannot differentiate whose patterns are empty, and
Hessians through a backward that switches grad off. Loaded by module name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from jacobian_service import Input, register

#: The implicit step's time step and diffusion coefficient.
DT, NU = 0.1, 0.5


@register(inputs=[Input("u", shape=("n",), dtype="float64"), Input("u0", shape=("n",), dtype="float64")],
          description="The residual of one backward-Euler step of 1-D reaction-diffusion (Fisher-KPP, Dirichlet "
                      "ends): u - u0 - dt (nu u'' + u (1 - u)). Its Jacobian in u is tridiagonal.")
def implicit_step(u: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(u, (1, 1))
    lap = padded[2:] - 2 * u + padded[:-2]
    return u - u0 - DT * (NU * lap + u * (1 - u))


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A chain's energy with a quartic on-site term: a tridiagonal Hessian.")
def chain_energy(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x[1:] - x[:-1]) ** 2).sum() + 0.25 * (x**4).sum()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="One output, the sum of the first half of the inputs: a 1 x n Jacobian with n / 2 entries.")
def head_sum(x: torch.Tensor) -> torch.Tensor:
    return x[: x.numel() // 2].sum().reshape(1)


# ------------------------------------------------------------------ empty patterns that jacrev cannot differentiate


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="x * roll(x) written through out= into a buffer it made: autograd refuses out= on values that "
                      "need a gradient, and the trace never sees the write (an empty pattern).")
def out_write(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    torch.mul(x, x.roll(1), out=y)
    return y


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The distinct rounded values: zero derivative (round), through unique, which has none.")
def rounded_unique(x: torch.Tensor) -> torch.Tensor:
    return torch.unique(x.round())


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The sum of squares of rounded_unique: an empty Hessian pattern that torch.func.hessian refuses.")
def rounded_unique_energy(x: torch.Tensor) -> torch.Tensor:
    return (torch.unique(x.round()) ** 2).sum()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="2 round(x): a zero Jacobian that jacrev answers.")
def rounded(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.round()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The sum of the means of x's even and odd elements by index_reduce (no forward AD): a zero "
                      "Hessian, which reverse over reverse answers.")
def mean_pairs(x: torch.Tensor) -> torch.Tensor:
    means = x.new_zeros(2).index_reduce(0, torch.arange(x.numel()) % 2, x, "mean", include_self=False)
    return means.sum()


# ------------------------------------------------------------------ backwards that switch grad off


class _CubeOnce(torch.autograd.Function):
    """a ** 3 whose backward is @once_differentiable (run under no_grad), vmappable, no
    jvp: torch.func.hessian cannot run it, reverse over reverse answers 0 for its part."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor) -> torch.Tensor:
        return a**3

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return 3 * a**2 * g


class _CubeOnceJvp(_CubeOnce):
    """The same with a jvp and no vmap rule: torch.func.hessian cannot vmap it."""

    generate_vmap_rule = False

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        _CubeOnce.setup_context(ctx, inputs, output)
        ctx.a = inputs[0]

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return 3 * ctx.a**2 * t


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="sum(x^3 roll(x)) through a Function with a @once_differentiable backward and no jvp.")
def once_energy(x: torch.Tensor) -> torch.Tensor:
    return (_CubeOnce.apply(x) * x.roll(1)).sum()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="sum(x^3 roll(x) c), c the values of x read as a list (which the tracer cannot), through a "
                      "Function with a @once_differentiable backward, a jvp and no vmap rule: probed.")
def once_energy_probed(x: torch.Tensor) -> torch.Tensor:
    c = torch.tensor(x.detach().tolist(), dtype=x.dtype)
    return (_CubeOnceJvp.apply(x) * x.roll(1) * c).sum()


# ------------------------------------------------------------------ Hessians computed inside the function


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A Hessian-vector product of chain_energy computed inside (jvp of grad, v = ones): "
                      "H(x) 1, a tridiagonal Jacobian.")
def chain_hvp(x: torch.Tensor) -> torch.Tensor:
    return torch.func.jvp(torch.func.grad(chain_energy), (x,), (torch.ones_like(x),))[1]


def _cell_energy(u: torch.Tensor) -> torch.Tensor:
    return (u**3).sum() * u[0]


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="Each 3-element cell's Hessian row sums (torch.func.hessian under vmap inside): block diagonal.")
def cell_hessians(x: torch.Tensor) -> torch.Tensor:
    return torch.func.vmap(torch.func.hessian(_cell_energy))(x.reshape(-1, 3)).sum(-1).reshape(-1)


@register(inputs=[Input("u", shape=("ny", "nx"), dtype="float64")],
          description="Each row's spectrum, conjugated, read by parts (.conj().real, .conj().imag): each output on "
                      "its row.")
def row_spectra(u: torch.Tensor) -> torch.Tensor:
    s = torch.fft.rfft(u, dim=1).conj()
    return torch.cat([s.real, 2 * s.imag], dim=1)
