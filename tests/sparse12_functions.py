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
