"""Functions for tests/test_parity_round40.py: lazy modules (``torch.nn.LazyLinear``,
``LazyConv1d``, ``LazyBatchNorm1d``), whose parameters are materialised, and whose class
changes, at their first call. That first call inside a ``torch.func`` transform (the
engine's warm-up Jacobian, or a first request's) crashed the engine with SIGSEGV
(pytorch/pytorch#184876: a Parameter's ``.data`` set to a tensor of the transform's
level; in-process ``jacrev`` over a fresh LazyLinear crashes too). The engine now runs
such a function once outside any transform first, the dry run lazy modules ask for.
"""

from __future__ import annotations

import torch
from jacobian_service import Input, register

LIN = torch.nn.LazyLinear(2).double()  # (shared by lazy_lin and lazy_net)
CONV = torch.nn.LazyConv1d(2, 2).double()
BN = torch.nn.LazyBatchNorm1d().double().eval()  # (its init is ones and zeros: no draw)
COUNTED = torch.nn.LazyLinear(2).double()
COUNT = [0]


@register(inputs=[Input("x", shape=(3,), dtype="float64")])
def lazy_lin(x):
    return LIN(x)


@register(inputs=[Input("x", shape=(3,), dtype="float64")])
def lazy_net(x):
    return (torch.tanh(LIN(x)) ** 2).sum()


@register(inputs=[Input("x", shape=(1, 5), dtype="float64")])
def lazy_conv(x):
    return CONV(x).sin()


@register(inputs=[Input("x", shape=(4, 3), dtype="float64")])
def lazy_bn(x):
    return BN(x) ** 2


@register(inputs=[Input("x", shape=(3,), dtype="float64")])
def lazy_counted(x):
    """A lazy module and a counter (state a warm-up puts back): the dry run's put-back
    of the counter left the module's ``__dict__`` as before its first call (its
    initialisation hook, ``in_features = 0``) on a module already a Linear."""
    COUNT[0] += 1
    return COUNTED(x) * COUNT[0]


@register(inputs=[Input("x", shape=(), dtype="float64")])
def params_of(x):
    """The materialised modules' parameters, the count and COUNTED's ``in_features``,
    read (for the test's in-process torch.func over the same weights)."""
    ps = [p.detach().reshape(-1) for m in (LIN, CONV, COUNTED) for p in m.parameters()]
    return torch.cat([*ps, torch.tensor([float(COUNT[0]), float(COUNTED.in_features)], dtype=torch.float64)]) + 0 * x


LATE = torch.nn.LazyLinear(2).double()


@register(inputs=[Input("x", shape=("n",), dtype="float64")])
def lazy_late(x):
    """Its warm-up (n = 3) fails before the module is called: a first request
    materialises it, batched (vmap's first call) or not."""
    if x.shape[0] != 4:
        raise ValueError("lazy_late takes 4 numbers")
    return LATE(x)


class _Replaced(torch.nn.Module):
    """A parameter whose ``.data`` its first call replaces (set up on first use):
    inside a transform, SIGSEGV in-process too."""

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.empty(0, dtype=torch.float64))

    def forward(self, x):
        if self.p.numel() == 0:
            self.p.data = torch.arange(1.0, 4.0, dtype=torch.float64)
        return (self.p * x**2).sum()


REPLACED = _Replaced()


@register(inputs=[Input("x", shape=(3,), dtype="float64")])
def replaced_at_first_call(x):
    return REPLACED(x)
