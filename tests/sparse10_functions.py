"""Functions for tests/test_sparse_round10.py: what a scientist differentiates, with the
structures round 10 is about. Loaded by module name.

- Arrowhead and bordered Jacobians (a dense row beside a dense column: a constraint
  over every unknown, a parameter every equation reads), which one-sided colouring
  computes with one product per column and bicolouring with a few.
- Forces computed inside the function as ``-torch.func.grad(E)``, through ops whose
  backward sums (convolution, pooling, upsampling, padding, layer norm, embedding).
- A finite-volume residual on an unstructured mesh (``index_add`` over its edges), a
  50-species kinetics network from a sparse stoichiometry matrix (``torch.sparse.mm``),
  a neural ODE's right-hand side with a block-diagonal weight.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="Equilibrium of n - 1 species driven by x[0], and their normalisation: an arrowhead Jacobian.")
def arrowhead(x: torch.Tensor) -> torch.Tensor:
    k = x[0]
    local = x[1:] ** 2 - k * torch.sin(x[1:])
    return torch.cat([(x**2).sum().reshape(1) - 1.0, local])


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="2 x 2 cells coupled through two global unknowns and two global constraints (bordered block-diagonal).")
def bordered(x: torch.Tensor) -> torch.Tensor:
    a, b, cells = x[0], x[1], x[2:].reshape(-1, 2)
    local = (cells * cells.flip(1) + a * cells - b * cells**2).reshape(-1)
    return torch.cat([x.sum().reshape(1), (x**3).sum().reshape(1) - 2.0, local])


_W3 = torch.tensor([[[1.0, -2.0, 1.0]]], dtype=torch.float64)


def _bending(u: torch.Tensor) -> torch.Tensor:
    """A rod's bending energy (its curvature by a 3-tap convolution), a quartic on-site
    potential, and a coarse-grained smoothing term by 2-point average pooling."""
    curvature = F.conv1d(u.reshape(1, 1, -1), _W3)
    coarse = F.avg_pool1d(u.reshape(1, 1, -1), 2)
    return 0.5 * (curvature**2).sum() + 0.25 * (u**4).sum() + (coarse**3).sum()


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="The force -dE/du of a rod's bending energy (conv1d, avg_pool1d): its Jacobian is E's Hessian.")
def rod_force(u: torch.Tensor) -> torch.Tensor:
    return -torch.func.grad(_bending)(u)


def _field_energy(u: torch.Tensor) -> torch.Tensor:
    """A field on an 8-wide periodic grid of rows: layer-normalised rows, a linear
    upsampling, a reflection-padded gradient and a max-pooled penalty."""
    rows = u.reshape(-1, 8)
    normed = F.layer_norm(rows, (8,))
    fine = F.interpolate(rows.unsqueeze(1), scale_factor=2, mode="linear", align_corners=False)
    padded = F.pad(rows.unsqueeze(1), (1, 1), mode="reflect")
    slope = padded[..., 1:] - padded[..., :-1]
    peaks = F.max_pool1d(rows.unsqueeze(1), 2)
    return (normed**3).sum() + (fine**3).sum() + (slope**4).sum() + (peaks**2).sum()


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="The gradient of a field energy through layer_norm, interpolate, reflection pad and max_pool1d.")
def field_gradient(u: torch.Tensor) -> torch.Tensor:
    return torch.func.grad(_field_energy)(u)


def _mesh(nx: int, ny: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An unstructured triangulation of an nx x ny grid of points (diagonals in varying
    directions), as its edge list (each edge once) and the points' coordinates."""
    rng = np.random.default_rng(10)
    idx = np.arange(nx * ny).reshape(ny, nx)
    edges = set()
    for j in range(ny - 1):
        for i in range(nx - 1):
            a, b, c, d = idx[j, i], idx[j, i + 1], idx[j + 1, i], idx[j + 1, i + 1]
            tris = [(a, b, d), (a, d, c)] if rng.random() < 0.5 else [(a, b, c), (b, d, c)]
            for t in tris:
                for p, q in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
                    edges.add((min(p, q), max(p, q)))
    e = torch.tensor(sorted(edges), dtype=torch.int64)
    xy = torch.tensor(np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1).reshape(-1, 2), dtype=torch.float64)
    return e, xy + torch.tensor(rng.uniform(-0.2, 0.2, xy.shape))


_EDGES, _POINTS = _mesh(7, 6)


@register(inputs=[Input("u", shape=(42,), dtype="float64")],
          description="A nonlinear diffusion residual on an unstructured mesh: fluxes over its edges, index_add-ed to the nodes.")
def mesh_residual(u: torch.Tensor) -> torch.Tensor:
    i, j = _EDGES[:, 0], _EDGES[:, 1]
    length = (_POINTS[i] - _POINTS[j]).norm(dim=1)
    k = 1.0 + 0.5 * (u[i] + u[j]) ** 2  # conductivity on the edge
    flux = k * (u[j] - u[i]) / length
    r = torch.zeros_like(u).index_add(0, i, flux).index_add(0, j, -flux)
    return r - u**3 + 0.1


def _network(species: int = 50, reactions: int = 80) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random mass-action network: each reaction consumes one or two species and makes
    one or two; the stoichiometry (species x reactions) as a torch.sparse COO matrix."""
    rng = np.random.default_rng(50)
    reactants = np.full((reactions, 2), -1)
    rows, cols, vals = [], [], []
    for r in range(reactions):
        ins = rng.choice(species, size=rng.integers(1, 3), replace=False)
        outs = rng.choice(np.setdiff1d(np.arange(species), ins), size=rng.integers(1, 3), replace=False)
        reactants[r, : ins.size] = ins
        for s in ins:
            rows.append(s), cols.append(r), vals.append(-1.0)
        for s in outs:
            rows.append(s), cols.append(r), vals.append(1.0)
    S = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.tensor(vals, dtype=torch.float64), (species, reactions),
                                check_invariants=True).coalesce()
    rates = torch.tensor(rng.uniform(0.1, 2.0, reactions), dtype=torch.float64)
    return S, torch.tensor(reactants), rates


_S, _REACTANTS, _RATES = _network()


@register(inputs=[Input("c", shape=(50,), dtype="float64")],
          description="dc/dt of a 50-species mass-action network: S @ rates(c), S a torch.sparse stoichiometry.")
def kinetics(c: torch.Tensor) -> torch.Tensor:
    first = c[_REACTANTS[:, 0]]
    second = torch.where(_REACTANTS[:, 1] >= 0, c[_REACTANTS[:, 1].clamp(min=0)], torch.ones_like(first))
    v = _RATES * first * second
    return torch.sparse.mm(_S, v.unsqueeze(1)).squeeze(1)


_BLOCKS = torch.block_diag(*[torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(4, 4) * (b + 1) / 8 for b in range(6)])


@register(inputs=[Input("y", shape=(24,), dtype="float64")],
          description="A neural ODE's right-hand side with a block-diagonal weight (6 independent 4-unit subsystems).")
def neural_rhs(y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(_BLOCKS @ y + 0.1)
    return _BLOCKS.T @ h - 0.5 * y


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A partially separable objective: sum of f_i(x[i-1], x[i], x[i+1]) (a tridiagonal Hessian).")
def separable(x: torch.Tensor) -> torch.Tensor:
    a, b, c = x[:-2], x[1:-1], x[2:]
    return ((b - a * c) ** 2 + 0.1 * (a + b + c) ** 4).sum() + (x**2).sum()


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="Residuals of a decay fit: a shared rate x[0], an amplitude per sample, smoothness and a total.")
def decay_fit(x: torch.Tensor) -> torch.Tensor:
    rate, amp = x[0], x[1:]
    t = torch.linspace(0, 1, amp.numel(), dtype=x.dtype)
    data = amp * torch.exp(-rate * t) - (1.0 + 0.5 * torch.sin(3 * t)) * torch.exp(-0.7 * t)
    smooth = 0.5 * (amp[1:] - amp[:-1])
    total = 0.1 * (amp.sum() - amp.numel()).reshape(1)
    return torch.cat([data, smooth, total])
