"""Functions for tests/test_parity_round19.py, round 19 of PyTorch's own torch.func test
cases replayed over HTTP: test_eager_transforms.py's TestJac / TestJvp cases over dtype
promotion (a float64 input with a float32 output, and the other way round), and ops
with only reverse-mode AD (cdist) asked for forward mode."""

from __future__ import annotations

import torch
from jacobian_service import Input, register

V = ("n",)
# How many times a registered function here ran under torch.func.jvp (or jacfwd): forward
# mode attempts, counted by the function itself (read through jvp_attempts)
JVP_CALLS = {"n": 0}


def _under_jvp() -> bool:
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


@register(inputs=[Input("x", shape=("n", 2))])
def cdist_rows(x):
    """torch.cdist has no forward-mode AD (torch: 'Trying to use forward AD with
    _cdist_forward'); jacrev differentiates it. Counts its runs under a jvp."""
    JVP_CALLS["n"] += _under_jvp()
    return torch.cdist(x, x.flip(0) + 1).reshape(-1)[:3] * x[0, 0]


@register(inputs=[Input("x", shape=V)])
def jvp_attempts(x):
    """The count of cdist_rows' runs under a jvp so far (x only gives the dtype)."""
    return torch.tensor(float(JVP_CALLS["n"]), dtype=x.dtype)


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
