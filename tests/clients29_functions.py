"""Functions for tests/test_hostile_round29_clients.py (loaded by name like a user module)."""

from __future__ import annotations

import torch
from jacobian_service import Input, register

STEPS = 400  # (each Jacobian a tenth of a second or more: its cost is linear in a batch's size)
_A = torch.randn(256, 256, generator=torch.Generator().manual_seed(29)) / 16


def chain(x: torch.Tensor) -> torch.Tensor:
    for _ in range(STEPS):
        x = torch.tanh(_A @ x)
    return x


@register(inputs=[Input("x", shape=(256,))],
          description="tanh(A x) 400 times over: a Jacobian whose cost grows with the requests batched together.")
def slow_chain(x: torch.Tensor) -> torch.Tensor:
    return chain(x)
