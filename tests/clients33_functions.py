"""Functions for tests/test_hostile_round33_clients.py (loaded by name like a user module)."""

from __future__ import annotations

import collections
import time

import torch
from jacobian_service import Input, register

# Calls of each function here (the test's server runs its engines on threads of the test's
# own process: the test reads what the engine ran).
CALLS: collections.Counter[str] = collections.Counter()
SLEEP_S = 0.5


@register(inputs=[Input("x", shape=("n",))],
          description="The outer product x x^T after 0.5 s, its calls counted: a slow evaluate whose answer "
                      "(n^2 numbers) is a large one, held on the stream budget while it is sent.")
def counted_outer(x: torch.Tensor) -> torch.Tensor:
    CALLS["counted_outer"] += 1
    time.sleep(SLEEP_S)
    return torch.outer(x, x)
