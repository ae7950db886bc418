"""Functions for tests/test_remote_round23.py: outputs and aux that hold lists, which
must come back as lists (torch.func keeps a list a list; the wire said only "sequence")."""

from __future__ import annotations

import torch
from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="A list of two arrays.")
def r23_list(x: torch.Tensor) -> list:
    return [x.sin(), (x * x).sum()]


@register(inputs=[Input("x", shape=("n",))], has_aux=True,
          description="A dict holding a list and a tuple; aux a list holding a dict.")
def r23_mixed(x: torch.Tensor) -> tuple:
    out = {"seq": [x.exp(), (x[0] * x[-1], x.cos())], "tup": (x.sum(),)}
    return out, [x.detach().mean(), {"n": [x.detach().max()]}]


@register(inputs=[Input("x", shape=("n",))], description="A tuple of two arrays (no list anywhere).")
def r23_tuple(x: torch.Tensor) -> tuple:
    return x.sin(), (x * x).sum()
