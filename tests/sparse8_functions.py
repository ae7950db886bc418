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
