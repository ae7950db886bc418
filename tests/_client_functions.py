"""Functions only the SDK tests serve (loaded by name through the functions setting)."""

from __future__ import annotations

import time

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="Sleeps x[0] seconds, then returns 2x.")
def slow(x: torch.Tensor) -> torch.Tensor:
    time.sleep(float(x.reshape(-1)[0]))
    return 2 * x


@register(
    inputs=[Input("x", shape=("n",)), Input("w", shape=("n",))],
    has_aux=True,
    description="sum(w * x**3) + sum(x * w**2): a scalar of two inputs, with x**2 as aux.",
)
def cubic_pair(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (w * x**3).sum() + (x * w**2).sum(), x**2


class _SquareNoJvp(torch.autograd.Function):
    """x**2 with a backward (itself differentiable: torch ops) and no jvp: forward mode
    refuses it, so forward-over-reverse (an hvp) cannot run where reverse over reverse can."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return 2 * x * grad


@register(inputs=[Input("x", shape=("n",))], description="sin(x)**2 through an op without a forward-mode rule.")
def square_no_jvp(x: torch.Tensor) -> torch.Tensor:
    return _SquareNoJvp.apply(torch.sin(x))


@register(inputs=[Input("x", shape=("n",))], description="sum(sin(x)**2) through an op without a forward-mode rule.")
def energy_no_jvp(x: torch.Tensor) -> torch.Tensor:
    return _SquareNoJvp.apply(torch.sin(x)).sum()
