"""Functions for test_remote_round14."""

from __future__ import annotations

import torch

from jacobian_service import Array, Input, register


@register(inputs=[Input("cotangents", tree={"w": Array(("n",)), "k": Array((), "int64")}), Input("x", shape=("n",))],
          description="w * x * k of a parameter named 'cotangents' holding an integer leaf: its 422s name it")
def r14_named_cotangents(cotangents, x):
    return cotangents["w"] * torch.sin(x) * cotangents["k"].to(x.dtype)
