"""Functions for tests/test_sparse_round26.py. Loaded by module name."""

from __future__ import annotations

import torch
from jacobian_service import Input, register
from jacobian_service.sparsity import banded


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A ring's energy (periodic neighbours): its Hessian is the periodic tridiagonal band, "
                      "declared 'ring'.",
          sparsity={"ring": banded(1, 1, periodic=True, hessian=True)})
def ring_energy26(x: torch.Tensor) -> torch.Tensor:
    return (x**4).sum() / 4 + ((torch.roll(x, 1) - x) ** 2 * torch.cosh(x)).sum() / 2


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="lorenz96's right-hand side (forcing 8): a periodic band 2 below and 1 above, declared 'band'.",
          sparsity={"band": banded(2, 1, periodic=True)})
def lorenz26(x: torch.Tensor) -> torch.Tensor:
    return (torch.roll(x, -1) - torch.roll(x, 2)) * torch.roll(x, 1) - x + 8.0
