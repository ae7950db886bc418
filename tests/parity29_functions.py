"""Functions for tests/test_parity_round29.py, round 29 of PyTorch's own torch.func test
cases replayed over HTTP: an integer output beside a floating one (indices, counts) under
per-example and second derivatives through the SDK adapters."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))])
def float_and_int(x):
    """A floating output and an integer one beside it: sum(sin x), and a count."""
    return x.sin().sum(), (x > 0).long().sum()


@register(inputs=[Input("x", shape=("n",))])
def vec_and_int(x):
    """A vector floating output and an integer vector beside it."""
    return x.sin() * x, (x * 3).long()


@register(inputs=[Input("w", shape=("n",)), Input("x", shape=("n",))])
def weighted_and_int(w, x):
    """Weights every example shares (vmap's in_dims None) and a count beside the loss."""
    return (w * x).sin().sum(), (x > 0).long().sum()


@register(inputs=[Input("x", shape=("n",))])
def real_and_complex(x):
    """A real output beside a complex one (torch.polar of e^x and x**2)."""
    return x.sin() * x, torch.polar(x.exp(), x**2)
