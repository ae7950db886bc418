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


# ------------------------------------------------------------------ a scientist's functions


@register(inputs=[Input("z", shape=("n",), dtype="float64")],
          description="Trapezoidal direct collocation of a damped pendulum: 21 knots of (angle, rate, torque), the final time last.")
def collocation(z: torch.Tensor) -> torch.Tensor:
    """Defects of x[k+1] - x[k] - h/2 (f(x[k], u[k]) + f(x[k+1], u[k+1])) with h = T / N:
    each block of rows reads two knots (block-banded) and every row reads T (a dense
    column); the boundary rows read one knot each."""
    T, knots = z[-1], z[:-1].reshape(-1, 3)
    x, u = knots[:, :2], knots[:, 2]
    f = torch.stack([x[:, 1], -torch.sin(x[:, 0]) - 0.1 * x[:, 1] + u], dim=1)
    h = T / (knots.shape[0] - 1)
    defects = x[1:] - x[:-1] - 0.5 * h * (f[1:] + f[:-1])
    return torch.cat([defects.reshape(-1), x[0] - torch.tensor([0.0, 0.0], dtype=z.dtype), x[-1, :1] - np.pi])


_TRIS = torch.tensor([[i + j * 5, i + 1 + j * 5, i + 5 + j * 5] for j in range(4) for i in range(4)]
                     + [[i + 1 + j * 5, i + 6 + j * 5, i + 5 + j * 5] for j in range(4) for i in range(4)])
_XY = torch.stack(torch.meshgrid(torch.linspace(0, 1, 5, dtype=torch.float64), torch.linspace(0, 1, 5, dtype=torch.float64),
                                 indexing="xy"), -1).reshape(-1, 2)


def _fe_energy(u: torch.Tensor) -> torch.Tensor:
    """A nonlinear membrane on 32 linear triangles: sum over elements of area * (1 + |grad u|^2)^(1/2)
    plus a quartic reaction under a load, the element gradients gathered from the connectivity."""
    p = _XY[_TRIS]  # (E, 3, 2)
    d1, d2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    area = 0.5 * (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]).abs()
    ue = u[_TRIS]  # gather
    du1, du2 = ue[:, 1] - ue[:, 0], ue[:, 2] - ue[:, 0]
    det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    gx = (du1 * d2[:, 1] - du2 * d1[:, 1]) / det
    gy = (du2 * d1[:, 0] - du1 * d2[:, 0]) / det
    return (area * torch.sqrt(1 + gx**2 + gy**2)).sum() + (u**4).sum() / 4 - u.sum()


@register(inputs=[Input("u", shape=(25,), dtype="float64")],
          description="The residual of a nonlinear membrane on a 5 x 5 triangle mesh, assembled by index_add over the elements.")
def fe_residual(u: torch.Tensor) -> torch.Tensor:
    p = _XY[_TRIS]
    d1, d2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    ue = u[_TRIS]
    gx = ((ue[:, 1] - ue[:, 0]) * d2[:, 1] - (ue[:, 2] - ue[:, 0]) * d1[:, 1]) / det
    gy = ((ue[:, 2] - ue[:, 0]) * d1[:, 0] - (ue[:, 1] - ue[:, 0]) * d2[:, 0]) / det
    k = 1 + gx**2 + gy**2  # a solution-dependent conductivity per element
    local = torch.stack([-(gx * (d2[:, 1] - d1[:, 1]) - gy * (d2[:, 0] - d1[:, 0])),
                         gx * d2[:, 1] - gy * d2[:, 0], -gx * d1[:, 1] + gy * d1[:, 0]], 1) * (0.5 * k).unsqueeze(1)
    return torch.zeros_like(u).index_add(0, _TRIS.reshape(-1), local.reshape(-1)) + u**3


@register(inputs=[Input("u", shape=(25,), dtype="float64")], description="The membrane's energy (its Hessian: the FE stiffness pattern).")
def fe_energy(u: torch.Tensor) -> torch.Tensor:
    return _fe_energy(u)


_PAIRS = torch.tensor([[i, j] for i in range(12) for j in range(i + 1, 12) if (j - i) in (1, 2, 5)])


@register(inputs=[Input("r", shape=(12, 3), dtype="float64")],
          description="Lennard-Jones-like pair forces over a fixed neighbour list (gather + index_add).")
def pair_forces(r: torch.Tensor) -> torch.Tensor:
    i, j = _PAIRS[:, 0], _PAIRS[:, 1]
    d = r[i] - r[j]
    r2 = (d * d).sum(1, keepdim=True)
    fmag = 24 * (2 / r2**7 - 1 / r2**4)
    f = d * fmag
    return torch.zeros_like(r).index_add(0, i, f).index_add(0, j, -f)


_EDGES = torch.tensor([[0, 1, 1, 2, 3, 4, 5, 6, 7, 2], [1, 0, 2, 3, 4, 5, 6, 7, 0, 6]])


@register(inputs=[Input("h", shape=(8, 4), dtype="float64"), Input("w", shape=(4, 4), dtype="float64")],
          description="A message-passing layer over a fixed edge list: h' = tanh(h W + sum over in-edges of h[src] W).")
def gnn_layer(h: torch.Tensor, w: torch.Tensor) -> dict:
    src, dst = _EDGES
    msg = (h[src] @ w).tanh()
    agg = torch.zeros_like(h).index_add(0, dst, msg)
    return {"h": torch.tanh(h @ w) + agg, "energy": (agg**2).sum(1)}


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A Python branch on the data: if x[0] > 0 a ring coupling, else a diagonal.")
def branch_on_data(x: torch.Tensor) -> torch.Tensor:
    if x[0] > 0:
        return x * x.roll(1)
    return 2.0 * x**2


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="torch.where on the data: x * x.roll(1) where x > 0, x.roll(-1) elsewhere.")
def where_on_data(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * x.roll(1), x.roll(-1))


@register(inputs=[Input("x", shape=("n",), dtype="float64")], description="A periodic 3-point coupling (a band of 3 diagonals).")
def ring(x: torch.Tensor) -> torch.Tensor:
    return x * x.roll(1) - x.roll(-1) ** 2
