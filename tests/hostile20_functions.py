"""Functions for tests/test_hostile_round18.py: ``counted_rows`` is the identity whose
backward takes 50 ms a call (a Jacobian row chunk, a VJP) and counts its calls in the file
named by HOSTILE20_STEPS (a byte per call), so a test sees how far an engine went after
its client left; ``slow_sin`` is sin(x) that takes 100 ms a call, so a request waits for
its engine long enough for anything a client does meanwhile to land; ``slow_fourth_call``
counts its calls in the file named by HOSTILE20_CALLS and takes 1.5 s at the fourth (a
first Hessian's: its forward pass, jacrev(grad) measured twice, then the first of the
check's three calls)."""

from __future__ import annotations

import os
import time

import torch

from jacobian_service import Input, register


class _CountedBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        path = os.environ.get("HOSTILE20_STEPS")
        if path:
            with open(path, "ab") as f:
                f.write(b".")
        return grad


@register(inputs=[Input("x", shape=("n",))], description="The identity, 50 ms per backward call, counted.")
def counted_rows(x: torch.Tensor) -> torch.Tensor:
    return _CountedBackward.apply(x)


@register(inputs=[Input("x", shape=("n",))], description="sin(x), 100 ms a call.")
def slow_sin(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.1)
    return torch.sin(x)


@register(inputs=[Input("x", shape=("n",))], description="sum(x^3) / 6, its calls counted; the fourth takes 1.5 s.")
def slow_fourth_call(x: torch.Tensor) -> torch.Tensor:
    path = os.environ.get("HOSTILE20_CALLS")
    if path:
        with open(path, "ab") as f:
            f.write(b".")
        if os.path.getsize(path) == 4:
            time.sleep(1.5)
    return (x**3).sum() / 6
