"""Functions for test_remote_round15."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


def _solve(x: torch.Tensor) -> torch.Tensor:
    # As a function handing its tensor to a solver outside torch does (x.numpy() fails
    # under every transform), but in words that name forward mode: its own, not torch's.
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        raise ValueError("the forward solver takes plain tensors: no jvp or vjp of it")
    return torch.sin(x)


@register(inputs=[Input("x", shape=("n",))],
          description="sin(x) that refuses every transform with a ValueError saying 'forward' and 'jvp' (its own "
                      "words, not torch's: no forward-mode rule is missing)")
def r15_says_forward(x: torch.Tensor) -> torch.Tensor:
    return _solve(x)


@register(inputs=[Input("x", shape=("n",))],
          description="sum(sin(x)**2) that refuses every transform with a ValueError saying 'forward' and 'jvp'")
def r15_energy_says_forward(x: torch.Tensor) -> torch.Tensor:
    return _solve(x).pow(2).sum()
