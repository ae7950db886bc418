"""Functions only the SDK tests serve (loaded by name through the functions setting)."""

from __future__ import annotations

import time

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="Sleeps x[0] seconds, then returns 2x.")
def slow(x: torch.Tensor) -> torch.Tensor:
    time.sleep(float(x.reshape(-1)[0]))
    return 2 * x


@register(
    inputs=[Input("x", shape=("n",)), Input("w", shape=("n",))],
    has_aux=True,
    description="sum(w * x**3) + sum(x * w**2): a scalar of two inputs, with x**2 as aux.",
)
def cubic_pair(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (w * x**3).sum() + (x * w**2).sum(), x**2
