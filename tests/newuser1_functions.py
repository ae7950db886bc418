"""A first-time user's functions (tests/test_newuser_round1.py): an integer input first,
where argnums' default (0) points, and a function that leaves torch for NumPy."""

from __future__ import annotations

import numpy as np
import torch

from jacobian_service import Input, register


@register(inputs=[Input("i", shape=("n",), dtype="int64"), Input("x", shape=("n",))],
          description="x * i, an integer input first.")
def index_first(i: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x * i


@register(inputs=[Input("x", shape=("n",))], description="sin through NumPy: no transform can follow it.")
def through_numpy(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sin(x.detach().numpy()))


@register(inputs=[Input("x", shape=("n",))], description="sin through NumPy, as torch's own words first advise.")
def through_numpy_attached(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sin(x.numpy()))
