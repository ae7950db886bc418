"""Functions for tests/test_sparse_round23.py. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register

# ------------------------------------------------------------------ the dense check's round-off

_TABLE = torch.zeros(4096, dtype=torch.float32)  # (a buffer made elsewhere: writing into it is not traced)


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="Large float32 terms that cancel, written into a module buffer the tracer cannot "
                      "follow: the pattern is probed, from dense Jacobians.")
def probed_cancels23(x: torch.Tensor) -> torch.Tensor:
    buf = _TABLE[: x.shape[0]].clone()
    buf.copy_((x * 1e4 + x) - x * 1e4)
    return buf * x.roll(1)
