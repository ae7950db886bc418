"""Functions for tests/test_gaps_round1.py: integer and bool inputs of every width."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",), dtype="float64"), Input("i64", shape=(), dtype="int64"),
                  Input("i32", shape=(), dtype="int32"), Input("i16", shape=(), dtype="int16"),
                  Input("u8", shape=(), dtype="uint8"), Input("flag", shape=(), dtype="bool")],
          description="x times the sum of its integer inputs (the flag as 0 or 1).")
def int_widths(x: torch.Tensor, i64: torch.Tensor, i32: torch.Tensor, i16: torch.Tensor, u8: torch.Tensor,
               flag: torch.Tensor) -> torch.Tensor:
    return x * (i64 + i32 + i16 + u8 + flag).to(x.dtype)
