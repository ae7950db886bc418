"""Functions for tests/test_hostile_round16.py: ``slow_hessian`` takes 150 ms a call and
counts its calls in the file named by HOSTILE18_STEPS (a byte per call), so a test sees
how far an engine went after its client left. A Hessian calls it once per strategy run,
check and forward pass: a first Hessian (three strategies measured, twice each) is ten."""

from __future__ import annotations

import os
import time

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="sum(x^3) / 6, 150 ms a call, counted: Hessian diag(x).")
def slow_hessian(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.15)
    path = os.environ.get("HOSTILE18_STEPS")
    if path:
        with open(path, "ab") as f:
            f.write(b".")
    return (x**3).sum() / 6
