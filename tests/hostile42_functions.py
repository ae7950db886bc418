"""Hostile functions for tests/test_hostile_round42.py: each misbehaves when any member
of its (vmapped, cross-client) batch has first input 666: it unwraps vmap's batched
tensor to see every member's input (no data-dependent branch on a batched tensor, which
vmap refuses), so it misbehaves inside the stacked call itself."""

from __future__ import annotations

import os
import threading
import time

import torch
from jacobian_service import Input, register
from jacobian_service.sparsity import banded

X = [Input("x", shape=("n",))]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """The tensor under every vmap (and grad) level: all members' inputs at once."""
    x = x.detach()
    while torch._C._functorch.is_batchedtensor(x) or torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x


def _armed(x: torch.Tensor) -> bool:
    return bool((_plain(x).reshape(-1, x.shape[-1])[..., 0] == 666.0).any())


@register(inputs=X, description="sin; holds the engine 1.5 s (so others' requests queue into one batch).")
def holds42(x: torch.Tensor) -> torch.Tensor:
    time.sleep(1.5)
    return x.sin()


@register(inputs=X, description="sin; a batch with an armed member ends the engine (os._exit(7)).")
def exits_in_batch42(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        os._exit(7)
    return x.sin()


@register(inputs=X, description="sin; a batch with an armed member hangs for ever.")
def hangs_in_batch42(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        threading.Event().wait()
    return x.sin()


@register(inputs=[Input("x", shape=("n",), dtype="float64")], sparsity={"diag": banded(0, 0)},
          description="x^2, declared diagonal; a batch with an armed member ends the engine.")
def exits_sparse42(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        os._exit(7)
    return x**2

