"""Functions for tests/test_parity_round19.py, round 19 of PyTorch's own torch.func test
cases replayed over HTTP: test_eager_transforms.py's TestJac / TestJvp cases over dtype
promotion (a float64 input with a float32 output, and the other way round)."""

from __future__ import annotations

import torch
from jacobian_service import Input, register

V = ("n",)


@register(inputs=[Input("x", shape=V, dtype="float64")])
def narrowing(x):
    """float64 in, float32 out (TestJac's dtype cases): jacrev's Jacobian is float64,
    each entry a gradient computed in float64 (the cast's backward widens); jacfwd's
    tangents are rounded to float32 by the cast. Outputs outnumber inputs (mode=auto
    takes forward mode)."""
    return torch.outer(x.sin(), x.exp()).float()


@register(inputs=[Input("x", shape=V, dtype="float32")])
def widening(x):
    """float32 in, float64 out: jacrev's Jacobian is float32, forward mode's float64."""
    return torch.outer(x.sin(), x.exp()).double()
