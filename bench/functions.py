"""Functions the benchmarks register with the service (loaded with
``JACOBIAN_SERVICE_FUNCTIONS=jacobian_service.examples,bench.functions`` and the repo root
on ``PYTHONPATH``): a tall and a wide function, for forward against reverse mode, and one
that crashes its engine on demand, for the load test."""

from __future__ import annotations

import os

import torch

from jacobian_service import Input, register

__jacobian_functions__: list = []


@register(
    inputs=[Input("x", shape=(4,)), Input("t", shape=("m",))],
    description="Tall (4 -> m): damped waves sin(x0 t + x1) exp(-x2 t^2) + x3 t sampled at t.",
)
def tall(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.sin(x[0] * t + x[1]) * torch.exp(-x[2] * t * t) + x[3] * t


@register(
    inputs=[Input("x", shape=("m",))],
    description="Wide (m -> 4): four weighted sums of sin/cos features of x.",
)
def wide(x: torch.Tensor) -> torch.Tensor:
    s, c = torch.sin(x), torch.cos(x)
    return torch.stack([s.sum(), (s * c).sum(), (x * c).sum(), (s * s * x).sum()])


@register(
    inputs=[Input("x", shape=("n",))],
    description="sin(x), except that x[0] == 666 kills its engine process (os._exit): the load test's injected crash.",
)
def crashes(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach().reshape(-1)[0]) == 666.0:
        os._exit(3)
    return x.sin()
