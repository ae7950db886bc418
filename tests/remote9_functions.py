"""Functions for test_remote_round9: a call that outlasts its client's timeout."""

from __future__ import annotations

import time

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="sin(x), after a stall of x[0] seconds (one call).")
def r9_stall(x: torch.Tensor) -> torch.Tensor:
    time.sleep(float(x[0]))
    return torch.sin(x)
