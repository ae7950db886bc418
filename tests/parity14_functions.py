"""Functions for tests/test_parity_round14.py, round 14 of PyTorch's own torch.func test
cases replayed over HTTP: TestHessian's functions at points where they are not twice
differentiable (each AD mode takes its own side of a kink)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as nnf
from jacobian_service import Input, register

_W = torch.tensor([0.2], dtype=torch.float64)


@register(inputs=[Input("x", shape=("n",))])
def prelu_energy(x):
    """0.5 x prelu(x), slope 0.2 below 0: its gradient is prelu(x), whose derivative at 0
    forward mode takes as 1 and reverse mode as 0.2 (README: prelu at 0), so at an x
    holding a 0 torch.func.hessian (forward over reverse) says 1 there, jacrev(grad) and
    jacrev(jacrev) 0.6 (half of each side); elsewhere every strategy agrees."""
    return (0.5 * x * nnf.prelu(x, _W.to(x.dtype))).sum()


@register(inputs=[Input("x", shape=(4,))])
def fmax_pairs(x):
    """fmax of x's halves, squared: where a pair ties, forward mode takes the second's
    tangent and reverse mode splits the gradient, so torch.func.hessian and
    jacrev(grad) differ there by 2 (elsewhere they agree); torch's vmap runs it."""
    return (torch.fmax(x[:2], x[2:]) ** 2).sum()


@register(inputs=[Input("x", shape=(2, 3))])
def cdist(x):
    """torch's vmap of cdist's pullback over this (2, 2) output is right for Jacobian rows
    1:3 and wrong for rows 0:2 and 2:4 (round 12 found it wrong for all four at once)."""
    return torch.cdist(x, x.flip(0) + 1)


@register(inputs=[Input("seconds", shape=())])
def hold(seconds):
    """Keeps the engine busy, so that requests sent meanwhile queue and go as one batch."""
    time.sleep(float(seconds))
    return seconds * 1
