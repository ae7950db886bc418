"""Functions for tests/test_hostile_round32_clients.py (loaded by name like a user module)."""

from __future__ import annotations

import time

import torch
from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))],
          description="2 x, after 0.1 s: a request that holds its arrays on the body budget while it waits and runs.")
def slow_double(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.1)
    return 2 * x
