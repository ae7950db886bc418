"""Functions for tests/test_parity_round8.py: outputs torch.func refuses (not a pair for
has_aux, complex, not tensors, on two devices), and a nested output whose cotangents'
errors must name their path. Each is compared with in-process torch.func."""

from __future__ import annotations

import torch
from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))])
def nested_out(x):
    """A dict holding a tuple: cotangents nest as {"a": [.., ..], "b": ..}."""
    return {"a": (x.sin(), x.sum()), "b": x**2}


@register(inputs=[Input("x", shape=("n",)), Input("y", shape=("n",))])
def pair_in(x, y):
    """Two inputs, for argnums out of range and repeated, on every endpoint."""
    return (x * y.sin()).sum()


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_triple(x):
    """has_aux, but three values: torch.func says it wants (output, aux)."""
    return x.sin(), x, x


@register(inputs=[Input("x", shape=("n",))])
def complex_out(x):
    """A complex output: jacrev, vjp, hvp refuse it (jacrev: real outputs only)."""
    return (x * (1 + 1j)).sum() if x.dim() == 0 else x * (1 + 1j)


@register(inputs=[Input("x", shape=("n",))])
def string_out(x):
    """Not a tensor at all."""
    return "done"


@register(inputs=[Input("x", shape=("n",))])
def tuple_with_int(x):
    """A tuple holding a Python int beside a tensor."""
    return x.sin(), 3


@register(inputs=[Input("x", shape=("n",))])
def meta_out(x):
    """Outputs on two devices (the only second device a CPU has: meta)."""
    return x.sin(), torch.zeros(2, device="meta")


@register(inputs=[Input("x", shape=("n",))])
def scalar_meta(x):
    """A scalar output on the meta device."""
    return (x.sin().sum()).to("meta")
