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


# ------------------------------------------------------------------ solves with fixed matrices

_N = 12


def _bidiagonal() -> torch.Tensor:
    return 4 * torch.eye(_N, dtype=torch.float64) - torch.diag(torch.ones(_N - 1, dtype=torch.float64), -1)


def _blocks() -> torch.Tensor:  # three independent 4 x 4 SPD blocks
    b = torch.tensor([[4.0, 1, 0, 0], [1, 4, 1, 0], [0, 1, 4, 1], [0, 0, 1, 4]], dtype=torch.float64)
    return torch.block_diag(b, b, b)


_LU, _PIVOTS = torch.linalg.lu_factor(_blocks())
_CHOL = torch.linalg.cholesky(_blocks())


@register(inputs=[Input("x", shape=(_N,), dtype="float64")], description="Implicit step with a lower bidiagonal matrix.")
def triangular_step(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(_bidiagonal(), torch.sin(x)[:, None], upper=False)[:, 0]


@register(inputs=[Input("x", shape=(_N,), dtype="float64")], description="lu_solve with a fixed block-diagonal LU.")
def lu_step(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lu_solve(_LU, _PIVOTS, (x**2)[:, None])[:, 0]


@register(inputs=[Input("x", shape=(_N,), dtype="float64")], description="cholesky_solve with a fixed block-diagonal factor.")
def cholesky_step(x: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_solve(torch.tanh(x)[:, None], _CHOL)[:, 0]


@register(inputs=[Input("u", shape=("cells", 3), dtype="float64")],
          description="One Newton step per cell: a batch of 3 x 3 systems whose matrices depend on the state.")
def cell_newton(u: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(3, dtype=u.dtype)
    coupling = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=u.dtype)
    a = 4 * eye + torch.diag_embed(u**2) + 0.5 * coupling  # per-cell Jacobian of u^3/3 + ...: depends on u
    residual = u**3 / 3 + u - 1
    return u - torch.linalg.solve(a, residual)


# ------------------------------------------------------------------ choices

@register(inputs=[Input("u", shape=("n",), dtype="float64")], description="A clamped flux limiter (a choice per element).")
def limited(u: torch.Tensor) -> torch.Tensor:
    slope = torch.roll(u, -1) - u
    return u + torch.clamp(slope, -0.1, 0.1) * torch.roll(u, 1)


@register(inputs=[Input("u", shape=("n",), dtype="float64")], description="A plain 3-point stencil: no choices.")
def stencil(u: torch.Tensor) -> torch.Tensor:
    return torch.roll(u, 1) - 2 * u + torch.roll(u, -1) + u**3


# ------------------------------------------------------------------ a scientist's functions

def _mesh(nx: int, ny: int) -> torch.Tensor:
    """Triangles of a structured nx x ny grid of nodes (two per square)."""
    tris = []
    for j in range(ny - 1):
        for i in range(nx - 1):
            a, b, c, d = j * nx + i, j * nx + i + 1, (j + 1) * nx + i, (j + 1) * nx + i + 1
            tris += [[a, b, d], [a, d, c]]
    return torch.tensor(tris)


_NX, _NY = 7, 6
_TRIS = _mesh(_NX, _NY)


@register(inputs=[Input("u", shape=(_NX * _NY,), dtype="float64")],
          description="P1 finite elements: a nonlinear diffusion residual assembled element by element (index_add).")
def fem_residual(u: torch.Tensor) -> torch.Tensor:
    # Each triangle's stiffness (unit right triangles: the same 3 x 3 matrix), scaled by
    # its mean conductivity k(u) = 1 + u^2, applied to its nodes, scattered back.
    k_local = torch.tensor([[1.0, -1, 0], [-1, 2, -1], [0, -1, 1]], dtype=u.dtype) * 0.5
    ue = u[_TRIS]  # (elements, 3)
    kappa = 1 + (ue**2).mean(dim=1, keepdim=True)
    contrib = kappa * (ue @ k_local.T) + ue**3 / 12
    r = torch.zeros(_NX * _NY, dtype=u.dtype)
    return r.index_add(0, _TRIS.reshape(-1), contrib.reshape(-1))


@register(inputs=[Input("u", shape=(_NX * _NY,), dtype="float64")],
          description="The energy whose gradient is fem_residual's kind of assembly (a Hessian test).")
def fem_energy(u: torch.Tensor) -> torch.Tensor:
    return (fem_residual(u) * u).sum() + (u**4).sum()


@register(inputs=[Input("h", shape=("n", "m"), dtype="float64"), Input("vel", shape=(2, "n", "m"), dtype="float64")],
          description="An upwinded shallow-water step on a periodic grid: the stencil side follows the velocity's sign.")
def shallow_water(h: torch.Tensor, vel: torch.Tensor) -> torch.Tensor:
    dt, g = 0.05, 9.81
    u, v = vel[0], vel[1]
    dhdx = torch.where(u > 0, h - torch.roll(h, 1, 1), torch.roll(h, -1, 1) - h)
    dhdy = torch.where(v > 0, h - torch.roll(h, 1, 0), torch.roll(h, -1, 0) - h)
    div = (torch.roll(u, -1, 1) - torch.roll(u, 1, 1) + torch.roll(v, -1, 0) - torch.roll(v, 1, 0)) / 2
    h_new = h - dt * (u * dhdx + v * dhdy + h * div)
    u_new = u - dt * g * (torch.roll(h, -1, 1) - torch.roll(h, 1, 1)) / 2
    v_new = v - dt * g * (torch.roll(h, -1, 0) - torch.roll(h, 1, 0)) / 2
    return torch.cat([h_new.reshape(-1), u_new.reshape(-1), v_new.reshape(-1)])


_G = torch.Generator().manual_seed(8)
_D, _HIDDEN = 16, 32
_W1 = torch.randn(_HIDDEN, _D, generator=_G, dtype=torch.float64) / 4
_W2 = torch.randn(_D, _HIDDEN, generator=_G, dtype=torch.float64) / 6
# Locally connected: hidden unit j sees inputs near j / 2, output i reads hidden units near 2 i.
_M1 = (torch.arange(_HIDDEN)[:, None] // 2 - torch.arange(_D)[None, :]).abs() <= 1
_M2 = (torch.arange(_D)[:, None] * 2 - torch.arange(_HIDDEN)[None, :]).abs() <= 2


@register(inputs=[Input("x", shape=(_D,), dtype="float64")], description="A neural ODE step (RK2) with a sparse (masked) MLP.")
def neural_ode_step(x: torch.Tensor) -> torch.Tensor:
    def f(z: torch.Tensor) -> torch.Tensor:
        return (_W2 * _M2) @ torch.tanh((_W1 * _M1) @ z)

    dt = 0.1
    mid = x + 0.5 * dt * f(x)
    return x + dt * f(mid)


@register(inputs=[Input("u", shape=("n",), dtype="float64"), Input("k", shape=("n",), dtype="float64")],
          description="A reaction-diffusion residual of two inputs: the state and a per-node rate.")
def two_inputs(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    lap = torch.roll(u, 1) + torch.roll(u, -1) - 2 * u
    return lap + k * u**2 + torch.roll(k, 1) * u


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A stencil whose width follows the input's size: 3 points below 10 elements, 5 from 10.")
def shape_stencil(u: torch.Tensor) -> torch.Tensor:
    out = u**2 + torch.roll(u, 1) + torch.roll(u, -1)
    if u.numel() >= 10:
        out = out + torch.roll(u, 2) * torch.roll(u, -2)
    return out
