"""Functions for tests/test_sparse_round7.py: what a scientist with mostly-zero Jacobians
registers (PDE stencils, reaction networks, graph Laplacians, a fixed sparse operator,
data-dependent branches), loaded by module name."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jacobian_service import Input, register


def _torus_laplacian(u: torch.Tensor) -> torch.Tensor:
    return torch.roll(u, 1, 0) + torch.roll(u, -1, 0) + torch.roll(u, 1, 1) + torch.roll(u, -1, 1) - 4 * u


@register(inputs=[Input("u", shape=("n", "m"))], description="Allen-Cahn step on a periodic grid (5-point torus stencil).")
def allen_cahn_torus(u: torch.Tensor) -> torch.Tensor:
    return u + 0.1 * _torus_laplacian(u) + 0.1 * (u - u**3)


@register(inputs=[Input("u", shape=("n",)), Input("k", shape=("n+1",), dtype="float64")],
          description="1-D diffusion with variable coefficients k (Dirichlet zero boundaries).")
def variable_diffusion(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    up = F.pad(u, (1, 1))
    flux = k.to(u.dtype) * (up[1:] - up[:-1])
    return flux[1:] - flux[:-1]


@register(inputs=[Input("u", shape=("n", "m", "l"))], description="3-D periodic Laplacian (7-point stencil).")
def laplace3d_periodic(u: torch.Tensor) -> torch.Tensor:
    return sum(torch.roll(u, s, d) for d in range(3) for s in (1, -1)) - 6 * u


#: A reaction network of 30 species: reaction r is A_r + B_r -> C_r, mass action.
_S = 30
_REACTIONS = torch.tensor([[i, (i + 1) % _S, (i + 7) % _S] for i in range(_S)])


@register(inputs=[Input("c", shape=(_S,))], description="Mass-action kinetics: dc/dt assembled with index_add.")
def kinetics(c: torch.Tensor) -> torch.Tensor:
    rate = 0.7 * c[_REACTIONS[:, 0]] * c[_REACTIONS[:, 1]]
    dc = torch.zeros(_S, dtype=c.dtype)
    return dc.index_add(0, _REACTIONS[:, 0], -rate).index_add(0, _REACTIONS[:, 1], -rate).index_add(0, _REACTIONS[:, 2], rate)


_EDGES = torch.tensor([[i, (i * 7 + 3) % 40] for i in range(40)] + [[i, (i + 1) % 40] for i in range(40)])


@register(inputs=[Input("x", shape=(40,))], description="Nonlinear graph Laplacian from an edge list (gather + scatter_add).")
def graph_laplacian(x: torch.Tensor) -> torch.Tensor:
    d = torch.tanh(torch.gather(x, 0, _EDGES[:, 0]) - torch.index_select(x, 0, _EDGES[:, 1]))
    out = torch.zeros(40, dtype=x.dtype)
    return out.scatter_add(0, _EDGES[:, 0], d).scatter_add(0, _EDGES[:, 1], -d)


def _sparse_operator() -> torch.Tensor:
    n = 50
    i = torch.arange(n)
    rows = torch.cat([i, i, i])
    cols = torch.cat([i, (i + 1) % n, (i * 3) % n])
    vals = torch.cat([torch.full((n,), -2.0), torch.ones(n), torch.linspace(0.1, 1, n)]).double()
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=True).coalesce()


_A = _sparse_operator()


@register(inputs=[Input("x", shape=(50, "k"), dtype="float64")],
          description="sin(A @ X) with A a fixed torch.sparse COO operator (torch's vmap cannot run it).")
def sparse_operator(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(torch.sparse.mm(_A, x))


@register(inputs=[Input("x", shape=("n",))], description="Upwinding: the stencil side follows the sign of x.")
def upwind(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x - torch.roll(x, 1), torch.roll(x, -1) - x) * x


@register(inputs=[Input("x", shape=("n",))], description="A Python branch on the values: the pattern follows the point.")
def branching(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:
        return x[1:] * x[:-1]
    return torch.cat([x[:1] ** 2, x[2:] - x[:1]])


@register(inputs=[Input("x", shape=("n",))], description="Tridiagonal 1-D heat step, for very large n.")
def heat1d(x: torch.Tensor) -> torch.Tensor:
    p = F.pad(x, (1, 1))
    return p[:-2] - 2 * p[1:-1] + p[2:] + 0.01 * x**2


@register(inputs=[Input("x", shape=("n",))], description="Chained Rosenbrock plus a periodic coupling (Hessian tests).")
def rosen_periodic(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum() + (x[0] * x[-1]) ** 2


@register(inputs=[Input("u", shape=("n", "m"))], description="Energy of a torus Laplacian (Hessian tests).")
def torus_energy(u: torch.Tensor) -> torch.Tensor:
    return (_torus_laplacian(u) ** 2).sum() + (u**4).sum()


def _rod_operator(rods: int, cells: int) -> torch.Tensor:
    """I - dt L for ``rods`` independent 1-D rods of ``cells`` cells (a block-diagonal
    matrix: the rods do not touch)."""
    lap = torch.diag(torch.full((cells,), -2.0)) + torch.diag(torch.ones(cells - 1), 1) + torch.diag(torch.ones(cells - 1), -1)
    return torch.block_diag(*[torch.eye(cells) - 0.1 * lap] * rods).double()


_RODS = _rod_operator(3, 8)


@register(inputs=[Input("u", shape=(24,), dtype="float64")],
          description="Implicit Euler step of three separate rods: solve((I - dt L), u + dt u^2).")
def implicit_rods(u: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(_RODS, u + 0.1 * u**2)


@register(inputs=[Input("u", shape=(4, "n"), dtype="float64")],
          description="Four independent implicit heat steps, the operator built inside and batched.")
def implicit_batched(u: torch.Tensor) -> torch.Tensor:
    n = u.shape[-1]
    lap = torch.diag(torch.full((n,), -2.0, dtype=u.dtype)) + torch.diag(torch.ones(n - 1, dtype=u.dtype), 1)
    a = torch.eye(n, dtype=u.dtype) - 0.05 * lap  # upper bidiagonal: its inverse is upper triangular
    return torch.linalg.solve(a.expand(4, n, n), torch.sin(u))


@register(inputs=[Input("u", shape=(16, 16), dtype="float64")],
          description="Semi-Lagrangian advection: u sampled (grid_sample) at the departure points of a fixed swirl.")
def semi_lagrangian(u: torch.Tensor) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, 16, dtype=u.dtype), torch.linspace(-1, 1, 16, dtype=u.dtype), indexing="ij")
    departure = torch.stack([x + 0.15 * y, y - 0.15 * x], dim=-1)  # one step back along the swirl
    return F.grid_sample(u[None, None], departure[None], mode="bilinear", padding_mode="border", align_corners=True)[0, 0]


@register(inputs=[Input("u", shape=(2, 24, 24), dtype="float64")],
          description="A coarse view of two fields: antialiased bilinear downsampling to 8 x 8.")
def coarsen(u: torch.Tensor) -> torch.Tensor:
    return F.interpolate(u[None], size=(8, 8), mode="bilinear", antialias=True)[0]
