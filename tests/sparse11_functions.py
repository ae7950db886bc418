"""Functions for tests/test_sparse_round11.py: symmetric Jacobians (forces of an
energy), and what a scientist differentiates: a direct-collocation optimal-control
problem, a finite-element assembly, a pair force field over a neighbour list, a graph
network layer over an edge list, functions whose pattern follows the input's values.
Loaded by module name.
"""

from __future__ import annotations

import numpy as np
import torch

from jacobian_service import Input, register


def _chain_energy(x: torch.Tensor) -> torch.Tensor:
    """Springs along a chain, a quartic on-site term, and a field x[0] acting on every
    site: the Hessian is an arrowhead with a tridiagonal body."""
    return 0.5 * ((x[1:] - x[:-1]) ** 2).sum() + 0.25 * (x**4).sum() + torch.sin(x[0]) * x.sum()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The force -dE/dx of a chain in a global field: a symmetric Jacobian (arrowhead, tridiagonal body).")
def chain_force(x: torch.Tensor) -> torch.Tensor:
    return -torch.func.grad(_chain_energy)(x)


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="chain_force in float32.")
def chain_force32(x: torch.Tensor) -> torch.Tensor:
    return -torch.func.grad(_chain_energy)(x)


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The arrowhead-and-chain pattern of chain_force, symmetric only where every x[j] equals x[0].")
def nearly_symmetric(x: torch.Tensor) -> torch.Tensor:
    # J[0, j] = x[0] and J[j, 0] = x[j] (j >= 1); the chain's couplings are symmetric
    body = x[1:] ** 3 + x[0] * x[1:]
    body = body + torch.cat([x[2:], x.new_zeros(1)]) + torch.cat([x.new_zeros(1), x[1:-1]])
    return torch.cat([(x[0] * x[1:].sum() + x[0] ** 2).reshape(1), body])
