"""Functions for test_remote_round14."""

from __future__ import annotations

import socket
import time

import torch

from jacobian_service import Array, Input, register


@register(inputs=[Input("cotangents", tree={"w": Array(("n",)), "k": Array((), "int64")}), Input("x", shape=("n",))],
          description="w * x * k of a parameter named 'cotangents' holding an integer leaf: its 422s name it")
def r14_named_cotangents(cotangents, x):
    return cotangents["w"] * torch.sin(x) * cotangents["k"].to(x.dtype)


@register(inputs=[Input("x", shape=(2,))],
          description="sin(x) after a sleep of x[0] seconds that no cancel interrupts (one call), having first "
                      "connected to 127.0.0.1 port x[1]: the caller learns that the call has begun")
def r14_announced_stall(x: torch.Tensor) -> torch.Tensor:
    with socket.create_connection(("127.0.0.1", int(x[1])), timeout=10):
        pass
    time.sleep(float(x[0]))
    return torch.sin(x)
