"""Functions for tests/test_sparse_round24.py. Loaded by module name."""

from __future__ import annotations

import numpy as np
import torch
from jacobian_service import Input, register
from jacobian_service.sparsity import banded, from_callable, from_matrix

# ------------------------------------------------------------------ per-example round-off


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="A float32 ring through large terms that cancel: (x * 1e4 + x) - x * 1e4 times its "
                      "neighbour, every VJP carrying round-off of 1e4 |cotangent|.")
def ring_cancels24(x: torch.Tensor) -> torch.Tensor:
    return ((x * 1e4 + x) - x * 1e4) * x.roll(1)


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="The same ring, its pattern declared: 'ring', x[i] and x[i-1], periodic (right); "
                      "'diag' (wrong: it misses x[i-1]).",
          sparsity={"ring": banded(1, 0, periodic=True), "diag": banded(0, 0)})
def ring_declared24(x: torch.Tensor) -> torch.Tensor:
    return ((x * 1e4 + x) - x * 1e4) * x.roll(1)


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="An energy through the same cancelling float32 terms: sum ((x * 1e4 + x) - x * 1e4)^2 "
                      "x[i-1], its Hessian tridiagonal-periodic.")
def energy_cancels24(x: torch.Tensor) -> torch.Tensor:
    y = (x * 1e4 + x) - x * 1e4
    return (y * y * x.roll(1)).sum()


# ------------------------------------------------------------------ NaN entries the pattern misses


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A tridiagonal step whose first output also reads where(x[-1] > 0, sqrt(x[-1]), 0) (a "
                      "periodic wrap the declared band forgot): its derivative NaN where x[-1] < 0 (torch's "
                      "where passes 0 * inf).",
          sparsity={"band": banded(1, 1)})
def wrap_where24(x: torch.Tensor) -> torch.Tensor:
    y = x + 0.1 * (torch.nn.functional.pad(x[1:], (0, 1)) + torch.nn.functional.pad(x[:-1], (1, 0)))
    last = x[-1]
    return torch.cat([(y[0] + torch.where(last > 0, torch.sqrt(last), 0.0)).reshape(1), y[1:]])


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The same step, its first output reading sqrt(x[-1]) itself: where x[-1] < 0 that output "
                      "and its derivative are NaN.",
          sparsity={"band": banded(1, 1)})
def wrap_sqrt24(x: torch.Tensor) -> torch.Tensor:
    y = x + 0.1 * (torch.nn.functional.pad(x[1:], (0, 1)) + torch.nn.functional.pad(x[:-1], (1, 0)))
    return torch.cat([(y[0] + torch.sqrt(x[-1])).reshape(1), y[1:]])


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="x^2, its first output also reading sqrt(x[1]), declared diagonal: one VJP colours every "
                      "row, so the missing entry's column is covered by (1, 1).",
          sparsity={"diag": banded(0, 0)})
def diag_sqrt24(x: torch.Tensor) -> torch.Tensor:
    y = x**2
    return torch.cat([(y[0] + torch.sqrt(x[1])).reshape(1), y[1:]])


# ------------------------------------------------------------------ a force from autograd inside the function


def _chain_energy(x: torch.Tensor) -> torch.Tensor:
    d = x[1:] - x[:-1]
    return (d**4 / 4 + torch.cos(x)[1:] * d**2).sum() + (x**2).sum()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A chain's force, -dE/dx by torch.autograd.grad(create_graph=True) inside the function "
                      "(as molecular dynamics codes write it): its Jacobian, the negative Hessian, tridiagonal.")
def chain_force24(x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x if x.requires_grad else x.detach().requires_grad_()
        (force,) = torch.autograd.grad(-_chain_energy(x), x, create_graph=True)
    return force


# ------------------------------------------------------------------ declared patterns as scipy matrices


def _mesh24(n: int):
    """A ring's adjacency plus the diagonal as a scipy CSR matrix, as a mesh library gives it."""
    import scipy.sparse as sp

    i = np.arange(n)
    rows = np.concatenate([i, i, i])
    cols = np.concatenate([i, (i + 1) % n, (i - 1) % n])
    return sp.csr_array((np.ones(rows.size), (rows, cols)), shape=(n, n))


@register(inputs=[Input("x", shape=(12,), dtype="float64")],
          description="A periodic diffusion step on a ring of 12, its pattern declared as scipy matrices: the "
                      "mesh's CSR array ('mesh'), a callable returning one ('mesh_fn'), a COO array ('mesh_coo').",
          sparsity={"mesh": _mesh24(12), "mesh_fn": from_callable(lambda shapes, m: _mesh24(m)),
                    "mesh_coo": _mesh24(12).tocoo()})
def ring_diffusion24(x: torch.Tensor) -> torch.Tensor:
    return x + 0.1 * (x.roll(1) - 2 * x + x.roll(-1)) + 0.01 * x**3


@register(inputs=[Input("x", shape=(12,), dtype="float64")],
          description="The ring's energy, sum x^4 / 4 + (x[i+1] - x[i])^2 / 2: its Hessian the mesh's pattern "
                      "(declared by from_matrix(..., hessian=True)).",
          sparsity={"mesh_h": from_matrix(_mesh24(12), hessian=True)})
def ring_energy24(x: torch.Tensor) -> torch.Tensor:
    return (x**4).sum() / 4 + ((x.roll(-1) - x) ** 2).sum() / 2
