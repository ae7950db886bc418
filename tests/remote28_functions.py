"""Functions for tests/test_remote_round26.py (round 28): inputs named as the SDK's options."""

from __future__ import annotations

import torch
from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",)), Input("mode", shape=("n",))],
          description="x * mode: an input named as the SDK's mode= option (a mode shape's amplitudes).")
def r28_modes(x: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    return x * mode
