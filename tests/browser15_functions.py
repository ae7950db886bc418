"""Functions for tests/test_browser_round15.py: integers a page's JSON.parse cannot hold
(int64 and uint64 values past 2**53), as an output and as aux."""

from __future__ import annotations

import torch

from jacobian_service import Input, register

BIG = 2**53 + 1  # the first integer a JavaScript number cannot hold


@register(inputs=[Input("x", shape=("n",))], description="x's elements' indices plus 2**53 + 1, as int64.")
def big_ids(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0], dtype=torch.int64) + BIG


@register(inputs=[Input("x", shape=("n",))], has_aux=True, description="sin(x), with big integers as aux.")
def sin_big_aux(x: torch.Tensor):
    return torch.sin(x), {"id": BIG, "ids": torch.arange(2, dtype=torch.int64) + BIG}


@register(inputs=[Input("x", shape=("n",)), Input("id", shape=(), dtype="int64")],
          description="id, once per element of x, as int64: what the page sent, read back.")
def echo_id(x: torch.Tensor, id: torch.Tensor) -> torch.Tensor:
    return id + torch.zeros(x.shape, dtype=torch.int64)
