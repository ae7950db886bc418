"""Functions for tests/test_remote_round22.py (a scientist's programs through remote functions)."""

from __future__ import annotations

import torch
from jacobian_service import Array, Input, register


@register(
    inputs=[Input("params", tree={"w": Array(("m", "n")), "b": Array(("m",))}), Input("x", shape=("n",))],
    description="A dense layer tanh(w @ x + b).",
)
def r22_layer(params: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(params["w"] @ x + params["b"])


@register(inputs=[Input("y", shape=(3,))], description="Robertson's stiff chemical kinetics.")
def r22_robertson(y: torch.Tensor) -> torch.Tensor:
    a, b, c = y[0], y[1], y[2]
    return torch.stack([-0.04 * a + 1e4 * b * c, 0.04 * a - 1e4 * b * c - 3e7 * b**2, 3e7 * b**2])


@register(inputs=[Input("x", shape=("n",))], description="Raises for a negative first element.")
def r22_picky(x: torch.Tensor) -> torch.Tensor:
    if x[0] < 0:
        raise ValueError("x[0] must be non-negative")
    return x.exp().sum()


@register(inputs=[Input("y", shape=(2,)), Input("g", shape=())], description="A pendulum: (y1, -g sin y0).")
def r22_pendulum(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.stack([y[1], -g * torch.sin(y[0])])
