"""Functions for tests/test_hostile_round19.py in a module of their own, whose globals
another module's function (tests/hostile21_functions.py's ``rebinds_a_global``) changes."""

from __future__ import annotations

import torch
from jacobian_service import Input, register

SCALE = 1.0
_CALLS = 0


@register(inputs=[Input("x", shape=("n",))], description="x * SCALE, a global of its module (1.0).")
def module_scaled(x: torch.Tensor) -> torch.Tensor:
    return x * SCALE


@register(inputs=[Input("x", shape=("n",))], description="x * the number of its calls, a global it rebinds itself.")
def counts_calls(x: torch.Tensor) -> torch.Tensor:
    global _CALLS
    _CALLS += 1
    return x * _CALLS


def _scaled_by(scale: float):
    def closure_scaled(x: torch.Tensor) -> torch.Tensor:
        return x * scale
    return closure_scaled


closure_scaled = register(inputs=[Input("x", shape=("n",))],
                          description="x * scale, a variable of the closure a factory made it in (1.0).")(_scaled_by(1.0))
