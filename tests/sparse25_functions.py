"""Functions for tests/test_sparse_round25.py. Loaded by module name."""

from __future__ import annotations

import torch
from jacobian_service import Input, register
from jacobian_service.sparsity import banded

# ------------------------------------------------------------------ non-finite Hessian entries a declared pattern misses


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A chain's energy plus x[0] sqrt(x[-1]) (a periodic coupling): its Hessian entry (0, n-1) is "
                      "0.5 / sqrt(x[-1]), inf at x[-1] = 0. Declared 'band' (tridiagonal: it forgets the coupling) "
                      "and 'ring' (periodic: right).",
          sparsity={"band": banded(1, 1, hessian=True), "ring": banded(1, 1, periodic=True, hessian=True)})
def chain_sqrt25(x: torch.Tensor) -> torch.Tensor:
    return (x**4).sum() / 4 + ((x[1:] - x[:-1]) ** 2).sum() / 2 + x[0] * torch.sqrt(x[-1])


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The same chain with x^1.5 terms (x >= 0): its Hessian's diagonal is inf wherever x[i] = 0. "
                      "Declared 'band' (it forgets x[0] sqrt(x[-1])) and 'ring' (right).",
          sparsity={"band": banded(1, 1, hessian=True), "ring": banded(1, 1, periodic=True, hessian=True)})
def chain_pow25(x: torch.Tensor) -> torch.Tensor:
    return (x**1.5).sum() + ((x[1:] - x[:-1]) ** 2).sum() / 2 + x[0] * torch.sqrt(x[-1])

