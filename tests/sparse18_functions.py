"""Functions for tests/test_sparse_round18.py. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register

# ------------------------------------------------------------------ stencil energies


@register(inputs=[Input("u", shape=("ny", "nx"), dtype="float64")],
          description="A membrane's energy on a 2-D grid: each bond's (u_i - u_j)^4 between 5-point neighbours "
                      "and an on-site u^4 (its Hessian: the 5-point stencil).")
def grid_energy(u: torch.Tensor) -> torch.Tensor:
    return ((u[1:] - u[:-1]) ** 4).sum() + ((u[:, 1:] - u[:, :-1]) ** 4).sum() + (u**4).sum()


@register(inputs=[Input("u", shape=("nz", "ny", "nx"), dtype="float64")],
          description="The same on a 3-D grid (its Hessian: the 7-point stencil).")
def cube_energy(u: torch.Tensor) -> torch.Tensor:
    bonds = sum(((u.narrow(d, 1, u.shape[d] - 1) - u.narrow(d, 0, u.shape[d] - 1)) ** 4).sum() for d in range(3))
    return bonds + (u**4).sum()


# ------------------------------------------------------------------ Householder reflectors

_FACTORS = torch.geqrf(torch.linspace(-1.0, 1.0, 3 * 5 * 3, dtype=torch.float64).reshape(3, 5, 3).cos())


@register(inputs=[Input("c", shape=(3, 5, "k"), dtype="float64")],
          description="Q^T C of three fixed QR factorizations (ormqr, as a least-squares solver applies Q): "
                      "each column of each C its own column of the answer.")
def reflected(c: torch.Tensor) -> torch.Tensor:
    return torch.ormqr(_FACTORS.a, _FACTORS.tau, c, left=True, transpose=True)


@register(inputs=[Input("a", shape=(2, 4, 2), dtype="float64"), Input("tau", shape=(2, 2), dtype="float64")],
          description="Q of two stored QR factorizations (householder_product): each batch's Q on its own "
                      "reflectors only, below the diagonal.")
def orthogonal(a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return torch.linalg.householder_product(a, tau) * 2.0


# ------------------------------------------------------------------ segment reductions


@register(inputs=[Input("x", shape=(7, 2), dtype="float64"), Input("lengths", shape=(4,), dtype="int64")],
          description="Per-molecule energies of atoms in segments (torch.segment_reduce): a sum of each "
                      "segment's x^2 and its largest x (one segment empty).")
def segment_energy(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.segment_reduce(x**2, "sum", lengths=lengths) + torch.segment_reduce(x, "max", lengths=lengths, initial=0.0)
