"""Functions for tests/test_remote_round20.py (remote functions in the caller's autodiff)."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="(2 sin x, argmax x): a float output beside an integer one.")
def r20_sin_argmax(x: torch.Tensor):
    return 2 * torch.sin(x), torch.argmax(x)


@register(inputs=[Input("x", shape=("n",))], description="(x**2, x > 0): a float output beside a boolean mask.")
def r20_square_mask(x: torch.Tensor):
    return x**2, x > 0
