"""Functions for tests/test_remote_round21.py (remote functions in the caller's autodiff)."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("t", shape=()), Input("y", shape=("n",))], description="A time-dependent rhs: -t y + sin y.")
def r21_rhs(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -t * y + torch.sin(y)


@register(inputs=[Input("x", shape=("n",)), Input("k", shape=(), dtype="int64")], description="x**k, k an integer.")
def r21_pow(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return x**k
