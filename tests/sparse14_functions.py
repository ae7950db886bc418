"""Functions for tests/test_sparse_round14.py: a ring's energy (a sparse Hessian whose
dense form is large), and functions whose patterns are far smaller than their inputs
(the tracer's entry limit). Loaded by module name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jacobian_service import Input, register
from jacobian_service.sparsity import banded, from_callable


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A periodic chain's energy with a quartic on-site term: a cyclic tridiagonal Hessian.")
def ring_energy(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x - x.roll(1)) ** 2).sum() + 0.25 * (x**4).sum()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The product of the first three inputs: three entries, whatever the input's size.")
def head_product(x: torch.Tensor) -> torch.Tensor:
    return x[:3].prod()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="sin of every input but the first, then the first three of those: an intermediate of n - 1 "
                      "entries, a pattern of three.")
def tail_sines(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x[1:])[:3]


@register(inputs=[Input("u", shape=("m", "n"), dtype="float64"), Input("k", shape=("m", "n"), dtype="float64")],
          description="Heat flow on a grid with a diffusivity per cell (Dirichlet zero edges) and a cubic source: a "
                      "5-point stencil in u, diagonal in k.")
def heat_source(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    p = torch.nn.functional.pad(u, (1, 1, 1, 1))
    return k * (p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * u) + u**3


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="CUTEst's ARWHEAD: sum (-4 x_i + 3) + (x_i^2 + x_n^2)^2 over i < n; an arrowhead Hessian (the "
                      "last variable meets every other).")
def arwhead(x: torch.Tensor) -> torch.Tensor:
    return (-4 * x[:-1] + 3).sum() + ((x[:-1] ** 2 + x[-1] ** 2) ** 2).sum()


def _lower_triangle(in_shapes: Any, m: int) -> tuple[np.ndarray, np.ndarray]:
    """A chain's Hessian structure as Ipopt and CUTEst give it: the diagonal and the
    entries below it."""
    i = np.arange(m)
    return np.r_[i, i[1:]], np.r_[i, i[:-1]]


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          sparsity={"lower": banded(1, 0, hessian=True), "lower_coo": from_callable(_lower_triangle, hessian=True)},
          description="A chain's energy with a quartic on-site term, its Hessian's pattern declared as its lower "
                      "triangle.")
def chain_lower(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x[1:] - x[:-1]) ** 2).sum() + 0.25 * (x**4).sum()
