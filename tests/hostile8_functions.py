"""Hostile functions for tests/test_hostile_round8.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (``_armed``)."""

from __future__ import annotations

import sys

import torch

from jacobian_service import Input, register

X = [Input("x", shape=("n",))]


def _armed(x: torch.Tensor) -> bool:
    return x.numel() > 0 and float(x.detach().reshape(-1)[0]) == 666.0


def _patched(*args, **kwargs):
    raise RuntimeError("patched by rebinds_shared_names")


@register(inputs=X, description="sin, after rebinding names in torch, torch.Tensor and sys.modules that the engine "
                                "and every function use, when its first input is 666.")
def rebinds_shared_names(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        torch.autograd.grad = _patched
        torch.func.vmap = _patched
        torch.sin = torch.cos  # every later torch.sin(x) silently cos(x)
        torch.Tensor.sin = lambda self: torch.cos(self)  # shadows TensorBase.sin: x.sin() silently cos(x)
        sys.modules["jacobian_service.engine.profile"] = None  # a later `from .engine.profile import` fails
        sys.modules["orjson"] = None
    return x.sin()


@register(inputs=[Input("x", shape=("m", "n"))], has_aux=True,
          description="sin of a matrix, with its shape as aux: rows of no elements in, rows of none out.")
def matrix_sin(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    return x.sin(), list(x.shape)


_LIBRARIES: list = []  # the Library objects it registered with: kept, as a module would


@register(inputs=X, description="sin, after registering cos as torch's sin on the CPU (torch.library), when its "
                                "first input is 666.")
def overrides_a_torch_kernel(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        library = torch.library.Library("aten", "IMPL")
        library.impl("sin", lambda t: torch.cos(t), "CPU")
        _LIBRARIES.append(library)
    return x.sin()


@register(inputs=X, description="sin, through an operator of its own (torch.library) defined at its first call.")
def own_operator(x: torch.Tensor) -> torch.Tensor:
    if not hasattr(torch.ops, "hostile8") or not hasattr(torch.ops.hostile8, "twice"):
        library = torch.library.Library("hostile8", "DEF")
        library.define("twice(Tensor x) -> Tensor")
        library.impl("twice", lambda t: t * 2, "CPU")
        _LIBRARIES.append(library)
    return torch.ops.hostile8.twice(x.detach()) * 0 + x.sin()
