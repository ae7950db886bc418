"""Functions for tests/test_hostile_round10_clients.py."""

from __future__ import annotations

import time

import torch

from jacobian_service import Input, register


class _SlowBackward(torch.autograd.Function):
    """The identity, whose backward takes a second: each row chunk of its Jacobian does."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(1.0)
        return grad


@register(inputs=[Input("x", shape=("n",))], description="The identity; each Jacobian row chunk takes a second.")
def slow_chunks(x: torch.Tensor) -> torch.Tensor:
    return _SlowBackward.apply(x)
