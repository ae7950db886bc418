"""Functions for tests/test_hostile_round35_clients.py (loaded by name like a user module)."""

from __future__ import annotations

import time

import torch
from jacobian_service import Input, register

SLEEP_S = 0.1


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="lorenz96's right-hand side (a periodic band) after 0.1 s: slow enough that requests "
                      "of several clients queue behind one another and are batched.")
def slow_band35(x: torch.Tensor) -> torch.Tensor:
    time.sleep(SLEEP_S)
    return (torch.roll(x, -1) - torch.roll(x, 2)) * torch.roll(x, 1) - x + 8.0


@register(inputs=[Input("x", shape=("n",), dtype="float64"), Input("idx", shape=("n",), dtype="int64")],
          description="x[idx] squared: its pattern follows idx (value dependent).")
def picked35(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x[idx] ** 2


@register(inputs=[Input("x", shape=("n",))],
          description="x times its sum: a dense Jacobian, its pattern n^2 entries.")
def dense35(x: torch.Tensor) -> torch.Tensor:
    return x * x.sum()


# Calls of slow_picked35 (the test's server runs its engines on threads of the test's own
# process: the test reads what the engine ran).
CALLS: list[int] = []
PICK_SLEEP_S = 0.05


@register(inputs=[Input("x", shape=("n",), dtype="float64"), Input("idx", shape=("n",), dtype="int64")],
          description="x[idx] squared after 0.05 s, its calls counted: a slow value-dependent pattern, whose "
                      "batch runs each member alone from the batch's forward pass.")
def slow_picked35(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    CALLS.append(1)
    time.sleep(PICK_SLEEP_S)
    return x[idx] ** 2
