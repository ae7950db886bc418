"""Functions for tests/test_sparse_round12.py: limits of detection and colouring (a
periodic band past the colouring graph's limit, a pattern matrix past the result
limit), a float32 force symmetric at one point only, and what a scientist
differentiates: periodic finite-difference stencils in 2-D and 3-D, a chemical
kinetics network, a bundle-adjustment residual, a graph network's message pass over a
given edge list, and functions whose pattern follows the input's values. Loaded by
module name.
"""

from __future__ import annotations

import torch

from jacobian_service import Input, register

# ------------------------------------------------------------------ limits


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="Periodic Burgers with hyperdiffusion: a 5-wide periodic band (offsets -2..2).")
def hyperburgers(u: torch.Tensor) -> torch.Tensor:
    hyper = u.roll(2) - 4 * u.roll(1) + 6 * u - 4 * u.roll(-1) + u.roll(-2)
    return -u * (u.roll(-1) - u.roll(1)) / 2 - 0.1 * hyper


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A ring coupling followed by 300,000 constant outputs (rows with no entry).")
def padded(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x * x.roll(1), x.new_zeros(300_000)])


# ------------------------------------------------------------------ symmetric at one point only

#: The asymmetric term's weight: J[0, j] gains ASYM * (x[j] - 1), zero at x = 1.
ASYM = 1e-3


def _chain_energy(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x[1:] - x[:-1]) ** 2).sum() + 0.25 * (x**4).sum() + torch.sin(x[0]) * x.sum()


@register(inputs=[Input("x", shape=("n",), dtype="floating")],
          description="The force of a chain in a global field, plus a term in row 0 whose Jacobian is zero at x = 1: "
                      "symmetric there, slightly asymmetric elsewhere.")
def drifting_force(x: torch.Tensor) -> torch.Tensor:
    force = -torch.func.grad(_chain_energy)(x)
    drift = ASYM * 0.5 * ((x[1:] - 1) ** 2).sum()
    return torch.cat([(force[0] + drift).reshape(1), force[1:]])


# ------------------------------------------------------------------ a scientist's functions


@register(inputs=[Input("u", shape=("ny", "nx"), dtype="float64")],
          description="One explicit step of periodic advection-diffusion-reaction on a 2-D torus: upwind advection "
                      "(velocity (1, 0.5)), the 5-point Laplacian, a logistic reaction.")
def advect2d(u: torch.Tensor) -> torch.Tensor:
    dt, nu = 0.01, 0.1
    lap = u.roll(1, 0) + u.roll(-1, 0) + u.roll(1, 1) + u.roll(-1, 1) - 4 * u
    adv = 1.0 * (u - u.roll(1, 1)) + 0.5 * (u - u.roll(1, 0))  # upwind: both velocities positive
    return u + dt * (nu * lap - adv + u * (1 - u))


@register(inputs=[Input("u", shape=("nz", "ny", "nx"), dtype="float64")],
          description="The residual of a nonlinear Poisson problem on a periodic 3-D grid: 7-point Laplacian plus sinh(u).")
def poisson3d(u: torch.Tensor) -> torch.Tensor:
    lap = sum(u.roll(s, d) for d in (0, 1, 2) for s in (1, -1)) - 6 * u
    return -lap + torch.sinh(u)


def _network(species: int, reactions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random mass-action network: reaction r turns reactants a[r] + b[r] into c[r],
    three distinct species (a product that is also a reactant would cancel its own
    entry exactly: a zero the pattern keeps, as structure)."""
    g = torch.Generator().manual_seed(seed)
    ab = torch.stack([torch.randperm(species, generator=g)[:3] for _ in range(reactions)])
    rates = torch.rand(reactions, generator=g, dtype=torch.float64) + 0.1
    return ab, rates, torch.arange(reactions)


_REACT, _RATES, _ = _network(60, 90, 7)


@register(inputs=[Input("c", shape=(60,), dtype="float64")],
          description="Mass-action kinetics of 60 species in 90 random reactions A + B -> C (sparse, not banded).")
def kinetics(c: torch.Tensor) -> torch.Tensor:
    a, b, p = _REACT[:, 0], _REACT[:, 1], _REACT[:, 2]
    rate = _RATES * c[a] * c[b]
    dc = torch.zeros_like(c).index_add(0, a, -rate).index_add(0, b, -rate).index_add(0, p, rate)
    return dc


_CAMS, _PTS, _OBS = 6, 40, 160
_g = torch.Generator().manual_seed(3)
#: Which camera and which point each observation sees (every point seen at least twice).
_OBS_CAM = torch.randint(0, _CAMS, (_OBS,), generator=_g)
_OBS_PT = torch.cat([torch.arange(_PTS), torch.arange(_PTS), torch.randint(0, _PTS, (_OBS - 2 * _PTS,), generator=_g)])
_SEEN = torch.randn(_OBS, 2, generator=_g, dtype=torch.float64) * 0.1


def _rotate(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Rodrigues' rotation of the points p by the axis-angle vectors w (row by row)."""
    theta = (w * w).sum(1, keepdim=True).add(1e-12).sqrt()
    k = w / theta
    cos, sin = theta.cos(), theta.sin()
    return p * cos + torch.linalg.cross(k, p) * sin + k * (k * p).sum(1, keepdim=True) * (1 - cos)


@register(inputs=[Input("cams", shape=(_CAMS, 6), dtype="float64"), Input("pts", shape=(_PTS, 3), dtype="float64")],
          description="Bundle adjustment's reprojection residuals: 160 observations of 40 points by 6 cameras "
                      "(axis-angle rotation, translation, pinhole projection).")
def bundle(cams: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    c = cams[_OBS_CAM]
    q = _rotate(c[:, :3], pts[_OBS_PT]) + c[:, 3:]
    return (q[:, :2] / (q[:, 2:] + 5.0) - _SEEN).reshape(-1)


_EDGES = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 3, 6, 9, 2],
                       [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 5, 8, 1, 4, 7]])


@register(inputs=[Input("h", shape=(10, 3), dtype="float64")],
          description="A graph network's message pass on a fixed edge list: h + sum over in-edges of tanh(h[src] * h[dst]).")
def message_pass(h: torch.Tensor) -> torch.Tensor:
    src, dst = _EDGES
    msg = torch.tanh(h[src] * h[dst])
    return h + torch.zeros_like(h).index_add(0, dst, msg)


@register(inputs=[Input("h", shape=(10, 3), dtype="float64"), Input("edges", shape=(2, "e"), dtype="int64")],
          description="message_pass on the edge list given with the request (a value-dependent pattern).")
def message_pass_on(h: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    src, dst = edges
    msg = torch.tanh(h[src] * h[dst])
    return h + torch.zeros_like(h).index_add(0, dst, msg)


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="relu of a ring coupling: the pattern holds everywhere; entries are zero where the relu is off.")
def relu_ring(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x - x.roll(1)) + 0.5 * x


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="Each element coupled to the next in sorted order (indexing by the data's order).")
def sorted_chain(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    y = x[order]
    out = torch.empty_like(x)
    out[order] = y * y.roll(-1)
    return out


#: A tabulated property (an equation of state, a rate law) on a fixed grid.
_XP = torch.linspace(0.0, 2.0, 11, dtype=torch.float64)
_FP = torch.sin(3 * _XP)
_PERM = torch.tensor([3, 1, 4, 0, 2, 9, 7, 5, 8, 6, 10])


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="Linear interpolation in a fixed table (searchsorted, then the table at those indices), "
                      "times the next element: a pattern that holds at every point.")
def tabulated(x: torch.Tensor) -> torch.Tensor:
    idx = torch.searchsorted(_XP, x).clamp(1, 10)
    slope = (_FP[idx] - _FP[idx - 1]) / (_XP[idx] - _XP[idx - 1])
    return (_FP[idx - 1] + (x - _XP[idx - 1]) * slope) * x.roll(-1)


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="x read at a fixed table's entries, looked up at indices computed from x: value-dependent.")
def table_indexed(x: torch.Tensor) -> torch.Tensor:
    idx = torch.searchsorted(_XP, x).clamp(0, 10)
    return x * x[_PERM[idx] % x.numel()]


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A periodic chain's energy with nearest and next-nearest springs: a 5-wide periodic band Hessian.")
def ring_energy(u: torch.Tensor) -> torch.Tensor:
    return (0.5 * (u - u.roll(1)) ** 2 + 0.25 * (u - u.roll(2)) ** 4 + torch.cos(u)).sum()
