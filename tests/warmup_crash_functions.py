"""Functions that end their engine process on the warm-up's input (values in [0, 1)),
and serve on others: a crash in native code on an input out of its domain, an
``os._exit``. Loaded only by the warm-up crash test."""

from __future__ import annotations

import ctypes
import os

import torch

from jacobian_service import Input, register


def _small(x: torch.Tensor) -> bool:
    return float(x.detach().reshape(-1)[0]) < 1.0


@register(inputs=[Input("x", shape=("n",))], description="A segmentation fault when x[0] < 1.")
def segfaults_below_one(x: torch.Tensor) -> torch.Tensor:
    if _small(x):
        ctypes.string_at(0)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="os._exit(3) when x[0] < 1.")
def exits_below_one(x: torch.Tensor) -> torch.Tensor:
    if _small(x):
        os._exit(3)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Raises SystemExit when x[0] < 1 (sys.exit in user code).")
def raises_system_exit_below_one(x: torch.Tensor) -> torch.Tensor:
    if _small(x):
        raise SystemExit(2)
    return x.sin()
