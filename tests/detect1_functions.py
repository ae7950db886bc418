"""Functions for tests/test_detect_round1.py. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A long loop of elementwise steps: each traced op is cheap and its pattern the "
                      "diagonal, but a large x costs the tracer its size at every one of them.")
def long_loop1(x: torch.Tensor) -> torch.Tensor:
    for _ in range(400):
        x = torch.sin(x) + 0.5 * x
    return x + 0.1 * x.roll(1)


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The same loop as an energy (one scalar: a Hessian).")
def long_energy1(x: torch.Tensor) -> torch.Tensor:
    return (long_loop1(x) ** 2).sum()


@register(inputs=[Input("x", shape=(2,), dtype="float64")], description="Another client's cheap request.")
def tiny1(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[0] * x[1], torch.sin(x[0])])
