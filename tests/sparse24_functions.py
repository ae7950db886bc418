"""Functions for tests/test_sparse_round24.py. Loaded by module name."""

from __future__ import annotations

import torch
from jacobian_service import Input, register

# ------------------------------------------------------------------ per-example round-off


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="A float32 ring through large terms that cancel: (x * 1e4 + x) - x * 1e4 times its "
                      "neighbour, every VJP carrying round-off of 1e4 |cotangent|.")
def ring_cancels24(x: torch.Tensor) -> torch.Tensor:
    return ((x * 1e4 + x) - x * 1e4) * x.roll(1)


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="An energy through the same cancelling float32 terms: sum ((x * 1e4 + x) - x * 1e4)^2 "
                      "x[i-1], its Hessian tridiagonal-periodic.")
def energy_cancels24(x: torch.Tensor) -> torch.Tensor:
    y = (x * 1e4 + x) - x * 1e4
    return (y * y * x.roll(1)).sum()

