"""The function round fifty's hostile functions harm: another module's ``sin``."""

from __future__ import annotations

import time

import torch
from jacobian_service import register

from tests.hostile17_functions import X


@register(inputs=X, description="sin, through torch.sin looked up at each call.")
def victim50(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


_SCALE = 1.0  # (a module global the function reads at each call: a weight, a constant)


@register(inputs=X, description="sin times a module global (1.0).")
def scaled50(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * _SCALE


@register(inputs=X, description="sin of x plus a constant made at each call (0.1, in the default dtype).")
def offset50(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) + torch.tensor(0.1)


@register(inputs=X, description="sin, after 20 ms waiting (on I/O, a lock: the GIL let go).")
def slow50(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.02)
    return torch.sin(x)
