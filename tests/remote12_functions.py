"""Functions for test_remote_round12: outputs whose shape follows the input values."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=(6,))],
          description="sin(x) as 2 x 3 where sum(x) > 0, else as 3 x 2: the output's shape follows the values")
def r12_turns(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x).reshape((2, 3) if float(x.detach().sum()) > 0 else (3, 2))


@register(inputs=[Input("s", shape=(), dtype="float64"), Input("x", shape=("n",))],
          description="s * sin(x): a 0-d scale first, as torch promotes it (it decides neither dtype nor device)")
def r12_scaled(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s * torch.sin(x)
