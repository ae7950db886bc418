"""Functions for tests/test_browser_round16.py: one that holds the engine a while (a
queue that fills up behind it)."""

from __future__ import annotations

import time

import torch
from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="x, after holding the engine for 0.4 s.")
def slow(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.4)
    return x * 1.0
