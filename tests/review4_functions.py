"""User functions for tests/test_review_round4.py (loaded by name like a user module)."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="sin, after making float64 the default dtype.")
def sets_float64(x: torch.Tensor) -> torch.Tensor:
    torch.set_default_dtype(torch.float64)
    return x.sin()
