"""The built-in example functions (SPEC 2): names and meanings are part of the contract."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .registry import Array, Input, register
from .sparsity.patterns import banded, from_callable

# These lists are written by @register; Registry.from_modules reads them.
__jacobian_functions__: list = []


@register(inputs=[Input("x", shape=("n",))], description="Elementwise sin; Jacobian diag(cos x).")
def sin(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@register(
    inputs=[Input("x", shape=("n",))],
    has_aux=True,
    description="sin(x) with the output repeated as aux.",
)
def sin_aux(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.sin(x)
    return y, y


@register(inputs=[Input("x", shape=("n",))], description="sum(sin x): a scalar; Hessian diag(-sin x).")
def sum_sin(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x).sum()


@register(
    inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))],
    description="x + y**2, for argnums examples.",
)
def add_square(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y**2


@register(
    inputs=[Input("x", shape=("n",))],
    description="x - c with c = x**2 computed under no_grad: the Jacobian is the identity.",
)
def no_grad_square(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        c = x**2
    return x - c


@register(
    inputs=[Input("r", shape=("n",)), Input("theta", shape=("n",))],
    description="(r cos theta, r sin theta): a tuple output with a nested Jacobian.",
)
def polar(r: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return r * torch.cos(theta), r * torch.sin(theta)


@register(inputs=[Input("x", shape=("n",))], description="softmax(x); dense Jacobian diag(s) - s s^T.")
def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


@register(
    inputs=[Input("angles", shape=("k",))],
    description="End-effector (x, y) of a planar arm with unit links and joint angles `angles`.",
)
def planar_arm(angles: torch.Tensor) -> torch.Tensor:
    cumulative = torch.cumsum(angles, dim=-1)
    return torch.stack([torch.cos(cumulative).sum(-1), torch.sin(cumulative).sum(-1)], dim=-1)


def _mlp_weights() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(256, 128, generator=gen) / math.sqrt(128)
    w2 = torch.randn(64, 256, generator=gen) / 16
    return w1, w2


_W1, _W2 = _mlp_weights()
_MLP_WEIGHTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


@register(
    inputs=[Input("x", shape=(128,), dtype="float32")],
    description="A 128 -> 256 -> 64 tanh MLP, W2 tanh(W1 x), weights seeded with 0.",
)
def mlp(x: torch.Tensor) -> torch.Tensor:
    # One copy of the weights per device, made on first use there.
    w1, w2 = _MLP_WEIGHTS.get(x.device) or _MLP_WEIGHTS.setdefault(x.device, (_W1.to(x.device), _W2.to(x.device)))
    return w2 @ torch.tanh(w1 @ x)


# A pytree parameter (torch.func.functional_call style): the Jacobian w.r.t. ``params``
# comes back as {"w": ..., "b": ...}, as jacrev nests it.
@register(
    inputs=[Input("params", tree={"w": Array(("m", "n")), "b": Array(("m",))}), Input("x", shape=("n",))],
    description="A dense layer tanh(params['w'] @ x + params['b']) with a parameter dict: Jacobians nest over it.",
)
def dense_layer(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(params["w"] @ x + params["b"])


def _lorenz96_rhs(x: torch.Tensor, forcing: float = 8.0) -> torch.Tensor:
    return (torch.roll(x, -1, -1) - torch.roll(x, 2, -1)) * torch.roll(x, 1, -1) - x + forcing


# The right-hand side couples x[i-2], x[i-1], x[i], x[i+1] (offsets -2..+1, cyclic);
# each of RK4's four stages composes it once more, so one step reaches offsets -8..+4:
# a periodic band with 8 sub- and 4 super-diagonals (13 entries a row once n >= 13).
@register(
    inputs=[Input("x", shape=("n",))],
    description="One RK4 step (dt = 0.01, F = 8) of Lorenz-96: a banded Jacobian.",
    sparsity={"band": banded(8, 4, periodic=True)},
)
def lorenz96(x: torch.Tensor) -> torch.Tensor:
    dt = 0.01
    k1 = _lorenz96_rhs(x)
    k2 = _lorenz96_rhs(x + dt / 2 * k1)
    k3 = _lorenz96_rhs(x + dt / 2 * k2)
    k4 = _lorenz96_rhs(x + dt * k3)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _five_point(in_shapes: list[tuple[int, ...]], out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5-point stencil on an ``h x w`` grid with zero (Dirichlet) boundaries."""
    h, w = in_shapes[0]
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows, cols = [], []
    for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
        ii, jj = i + di, j + dj
        inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
        rows.append((i * w + j)[inside])
        cols.append((ii * w + jj)[inside])
    return np.concatenate(rows), np.concatenate(cols)


@register(
    inputs=[Input("u", shape=("h", "w"))],
    description=(
        "One explicit Euler step (dt = 0.1) of Fisher-KPP reaction-diffusion, u_t = lap(u) + u(1 - u), "
        "on a grid with zero boundaries: a 5-point-stencil Jacobian."
    ),
    sparsity={"stencil": from_callable(_five_point)},
)
def reaction_diffusion(u: torch.Tensor) -> torch.Tensor:
    dt = 0.1
    padded = F.pad(u.unsqueeze(0), (1, 1, 1, 1)).squeeze(0)  # zeros outside the grid
    lap = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] - 4 * u
    return u + dt * (lap + u * (1 - u))


# Left to detection on purpose (no sparsity= declared): a separable-plus-banded
# objective whose Hessian is tridiagonal, for sparse Hessians.
@register(
    inputs=[Input("x", shape=("n",))],
    description="Chained Rosenbrock, sum 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2: a scalar with a tridiagonal Hessian.",
)
def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
