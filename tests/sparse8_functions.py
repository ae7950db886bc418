"""Functions for tests/test_sparse_round8.py: Hessians whose acyclic colouring saves
products (a 13-point torus energy, a chain), fixed-matrix triangular / LU / Cholesky
solves, and what a scientist registers: finite-element assembly, an upwinded
shallow-water step, a neural ODE step with a sparse MLP, batched per-cell Newton
systems, functions of several inputs. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


def _torus_laplacian(u: torch.Tensor) -> torch.Tensor:
    return torch.roll(u, 1, 0) + torch.roll(u, -1, 0) + torch.roll(u, 1, 1) + torch.roll(u, -1, 1) - 4 * u


@register(inputs=[Input("u", shape=("n", "m"))], description="Energy of a torus Laplacian: a 13-point Hessian.")
def torus_energy13(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * (_torus_laplacian(u) ** 2).sum() + 0.25 * (u**4).sum()


@register(inputs=[Input("x", shape=("n",))], description="Chained Rosenbrock: a tridiagonal Hessian (a path).")
def chain(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A chain whose sqrt of a product is NaN where the product is negative.")
def chain_sqrt(x: torch.Tensor) -> torch.Tensor:
    return (x[1:] * x[:-1]).pow(2).sum() + (x[1:] * x[:-1]).sqrt().sum() + (x**4).sum()


# ------------------------------------------------------------------ solves with fixed matrices

_N = 12


def _bidiagonal() -> torch.Tensor:
    return 4 * torch.eye(_N, dtype=torch.float64) - torch.diag(torch.ones(_N - 1, dtype=torch.float64), -1)


def _blocks() -> torch.Tensor:  # three independent 4 x 4 SPD blocks
    b = torch.tensor([[4.0, 1, 0, 0], [1, 4, 1, 0], [0, 1, 4, 1], [0, 0, 1, 4]], dtype=torch.float64)
    return torch.block_diag(b, b, b)


_LU, _PIVOTS = torch.linalg.lu_factor(_blocks())
_CHOL = torch.linalg.cholesky(_blocks())


@register(inputs=[Input("x", shape=(_N,), dtype="float64")], description="Implicit step with a lower bidiagonal matrix.")
def triangular_step(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(_bidiagonal(), torch.sin(x)[:, None], upper=False)[:, 0]


@register(inputs=[Input("x", shape=(_N,), dtype="float64")], description="lu_solve with a fixed block-diagonal LU.")
def lu_step(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lu_solve(_LU, _PIVOTS, (x**2)[:, None])[:, 0]


@register(inputs=[Input("x", shape=(_N,), dtype="float64")], description="cholesky_solve with a fixed block-diagonal factor.")
def cholesky_step(x: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_solve(torch.tanh(x)[:, None], _CHOL)[:, 0]


@register(inputs=[Input("u", shape=("cells", 3), dtype="float64")],
          description="One Newton step per cell: a batch of 3 x 3 systems whose matrices depend on the state.")
def cell_newton(u: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(3, dtype=u.dtype)
    coupling = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=u.dtype)
    a = 4 * eye + torch.diag_embed(u**2) + 0.5 * coupling  # per-cell Jacobian of u^3/3 + ...: depends on u
    residual = u**3 / 3 + u - 1
    return u - torch.linalg.solve(a, residual)


# ------------------------------------------------------------------ choices

@register(inputs=[Input("u", shape=("n",), dtype="float64")], description="A clamped flux limiter (a choice per element).")
def limited(u: torch.Tensor) -> torch.Tensor:
    slope = torch.roll(u, -1) - u
    return u + torch.clamp(slope, -0.1, 0.1) * torch.roll(u, 1)


@register(inputs=[Input("u", shape=("n",), dtype="float64")], description="A plain 3-point stencil: no choices.")
def stencil(u: torch.Tensor) -> torch.Tensor:
    return torch.roll(u, 1) - 2 * u + torch.roll(u, -1) + u**3
