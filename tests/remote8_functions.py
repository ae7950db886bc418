"""Functions for test_remote_round8: one function as a registry served it before a
restart (``r8_changed``) and as the changed registry serves it after (``r8_changed_v2``,
which the test's client reaches under the first one's name)."""

from __future__ import annotations

import time

import torch

from jacobian_service import Input, register


@register(inputs=[Input("a", shape=("n",)), Input("b", shape=("n",))], description="a * exp(b), elementwise.")
def r8_changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * torch.exp(b)


@register(inputs=[Input("b", shape=("n",)), Input("a", shape=("n",))],
          description="r8_changed after a registry change: its inputs in the other order, two rows out.")
def r8_changed_v2(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.stack([a * torch.exp(b), b])


class _SlowPull(torch.autograd.Function):
    """The identity, whose backward takes 20 ms and reads its cotangent's value: torch's
    vmap cannot batch it, so a stack of cotangents runs one at a time (an engine looks for
    a cancel between them)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: object, inputs: object, output: object) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02 + 0.0 * float(grad.sum()))
        return grad


@register(inputs=[Input("x", shape=("n",))], description="The identity; 20 ms per vjp, one cotangent at a time.")
def r8_slow_pull(x: torch.Tensor) -> torch.Tensor:
    return _SlowPull.apply(x)
