"""Functions for tests/test_remote_round24.py."""

from __future__ import annotations

import torch
from jacobian_service import Array, Input, register


@register(inputs=[Input("p", tree={"a": Array(("n",)), "bc": [Array(()), Array(("n",))]}), Input("x", shape=("n",))],
          description="A parameter declared with a list inside a dict: (a * x + bc[0], bc[1] . x^2).")
def r24_listed(p: dict, x: torch.Tensor) -> tuple:
    return p["a"] * x.sin() + p["bc"][0] ** 2, (p["bc"][1] * x * x).sum() * p["bc"][0]


@register(inputs=[Input("t", shape=()), Input("y", shape=(2,))],
          description="A time-dependent linear ODE: y' = (y1, -(1 + t^2) y0).")
def r24_airy(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([y[1], -(1 + t * t) * y[0]])


@register(inputs=[Input("x", shape=("n",))], description="A tuple of 100 outputs (x * k for k < 100).")
def r24_many(x: torch.Tensor) -> tuple:
    return tuple(x * k for k in range(100))


@register(inputs=[Input("k", shape=("n",), dtype="int64"), Input("x", shape=())],
          description="An int64 index array beside a float: (k, x * k.sum()) with k returned exact.")
def r24_ids(k: torch.Tensor, x: torch.Tensor) -> tuple:
    return k, x * (k % 7).sum()


@register(inputs=[Input("p", tree={f"k{i}": Array(()) for i in range(40)})],
          description="40 scalar parameters (a dict of 0-d arrays): their weighted squares' sum.")
def r24_wide(p: dict) -> torch.Tensor:
    return sum((i + 1) * v * v for i, v in enumerate(p.values()))
