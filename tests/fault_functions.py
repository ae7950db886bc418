"""Hostile user functions for the engine-fault tests, loaded by name like a user module.

Each behaves (sin) unless its first input element is 666, so the engines' warm-up, which
calls every function, passes; then it takes its engine process down in one way.
"""

from __future__ import annotations

import ctypes
import os
import time

import torch

from jacobian_service import Input, register

TRIGGER = 666.0


def _armed(x: torch.Tensor) -> bool:
    return float(x.detach().reshape(-1)[0]) == TRIGGER


@register(inputs=[Input("x", shape=("n",))], description="os._exit(3) on the trigger.")
def exits(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        os._exit(3)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="A segmentation fault on the trigger.")
def segfaults(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="A busy loop that never returns, on the trigger.")
def spins(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        while True:
            pass
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Sleeps for an hour on the trigger.")
def sleeps(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        time.sleep(3600)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Allocates 64 MiB blocks until memory runs out, on the trigger.")
def hogs(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        held = []
        while True:  # under ENGINE_MEMORY_LIMIT_BYTES an allocation fails; without, the OOM killer
            held.append(torch.ones(16 << 20))
    return x.sin()
