"""Functions for tests/test_sparse_round22.py. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register

_PART = "__cl"  # (a type read built at run time: no watch sees it, round 21's escape)


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="Large terms that cancel: (x * 1e5 + x) - x * 1e5, whose Jacobian is exactly the "
                      "identity, every product carrying float32 round-off of 1e5 |seed|.")
def cancels22(x: torch.Tensor) -> torch.Tensor:
    return (x * 1e5 + x) - x * 1e5


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="A float32 energy through cancelling terms: its Hessian is 2 I, each "
                      "Hessian-vector product carrying the round-off of 1e5 |seed|.")
def cancels22_energy(x: torch.Tensor) -> torch.Tensor:
    return (((x * 1e5 + x) - x * 1e5) ** 2).sum()


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="The same cancelling terms, coupled to x[0] where a type check built at run time "
                      "says plain torch.Tensor (jacrev's arm): the trace's pattern misses column 0.")
def cancels22_coupled(x: torch.Tensor) -> torch.Tensor:
    first = x[0] if getattr(x, _PART + "ass__") is torch.Tensor else x[0].detach()
    return (x * 1e5 + x) - x * 1e5 + 0.5 * first * x
