"""Functions for tests/test_clients_round31.py (loaded by name like a user module)."""

from __future__ import annotations

import collections
import threading

import torch
from jacobian_service import Input, register

# Calls of each function here (the test's server runs its engines on threads of the test's
# own process: the test reads what the engine ran).
CALLS: collections.Counter[str] = collections.Counter()
CALLED = threading.Event()  # set at each call of counted_chain (a batch of them: one call)
STEPS = 1200  # (a Jacobian of a few tenths of a second or more, in one chunk)
_A = torch.randn(256, 256, generator=torch.Generator().manual_seed(31)) / 16


def chain(x: torch.Tensor) -> torch.Tensor:
    for _ in range(STEPS):
        x = torch.tanh(_A @ x)
    return x


@register(inputs=[Input("x", shape=(256,))],
          description="tanh(A x) 1,200 times over, its calls counted: a slow Jacobian whose runs a test can count.")
def counted_chain(x: torch.Tensor) -> torch.Tensor:
    CALLS["counted_chain"] += 1
    CALLED.set()
    return chain(x)
