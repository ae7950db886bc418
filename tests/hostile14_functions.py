"""Functions for tests/test_hostile_round14.py: each step of work (a backward or a
forward-mode call of one product) takes 50 ms and is counted in the file named by
HOSTILE14_STEPS (a byte per step), so a test sees how far an engine went after its client left."""

from __future__ import annotations

import os
import time

import torch

from jacobian_service import Input, register


def _step() -> None:
    time.sleep(0.05)
    path = os.environ.get("HOSTILE14_STEPS")
    if path:
        with open(path, "ab") as f:
            f.write(b".")


class _Slow(torch.autograd.Function):
    """sin(x), whose backward and forward-mode rule each take a step. No vmap rule: the
    products run one at a time, each a step (a Jacobian's rows, a stack of vectors)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.x = inputs[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        _step()
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        _step()
        return tangent * torch.cos(ctx.x)


@register(inputs=[Input("x", shape=("n",))], description="sin(x), 50 ms a product, counted.")
def slow_steps(x: torch.Tensor) -> torch.Tensor:
    return _Slow.apply(x)


@register(inputs=[Input("x", shape=("n",))], description="sum(sin(x)^2), 50 ms a product, counted.")
def slow_scalar(x: torch.Tensor) -> torch.Tensor:
    return (_Slow.apply(x) ** 2).sum()
