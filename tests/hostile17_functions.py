"""Hostile functions for tests/test_hostile_round17.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the functions they harm."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

import torch
from jacobian_service import Input, register

X = [Input("x", shape=("n",))]


def _armed(x: torch.Tensor) -> int | None:
    """The case asked for (the second input), or None: behave."""
    flat = x.detach().reshape(-1)
    if flat.numel() > 1 and float(flat[0]) == 666.0:
        return int(float(flat[1]))
    return None


# ------------------------------------------------------------ torch.nn's classes

W = [[0.3, 0.6, 0.0], [0.0, 0.3, -0.3], [0.15, 0.0, 0.3]]
B = [0.1, -0.2, 0.3]
_LAYER = torch.nn.Linear(3, 3, dtype=torch.float64)
with torch.no_grad():
    _LAYER.weight.copy_(torch.tensor(W, dtype=torch.float64))
    _LAYER.bias.copy_(torch.tensor(B, dtype=torch.float64))
_TANH = torch.nn.Tanh()


@register(inputs=[Input("x", shape=(3,))], description="tanh(W x + b) through torch.nn.Linear and torch.nn.Tanh.")
def uses_linear(x: torch.Tensor) -> torch.Tensor:
    return _TANH(_LAYER(x.to(torch.float64)))


def _doubled(original):
    def patched(*args, **kwargs):
        return original(*args, **kwargs) * 2
    return patched


@register(inputs=X, description="sin; armed (666), it patches a torch.nn class's method first (x[1] picks).")
def patches_nn(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 1:  # a method of the class itself
        torch.nn.Linear.forward = _doubled(torch.nn.Linear.forward)
    elif case == 2:  # a name added to a subclass, over nn.Module's __call__
        torch.nn.Tanh.__call__ = lambda self, t: t
    return torch.sin(x)


# ------------------------------------------------------------ the import system

LAZY = "tests.hostile17_lazy"  # imported by nobody but uses_a_lazy_import


class _Impostor(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves its own module in place of ``LAZY``."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == LAZY else None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.SCALE = 2.0


@register(inputs=X, description="sin; armed (666), it puts an import finder of its own ahead of Python's first.")
def inserts_an_import_finder(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        sys.meta_path.insert(0, _Impostor())
    return torch.sin(x)


@register(inputs=X, description="x * SCALE of a module it imports at its first call (1.0).")
def uses_a_lazy_import(x: torch.Tensor) -> torch.Tensor:
    return x * importlib.import_module(LAZY).SCALE


# ------------------------------------------------------------ randomness


@register(inputs=X, description="sin; armed (666), it seeds torch's generator (torch.manual_seed(x[1])) first.")
def seeds_torch(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        torch.manual_seed(case)
    return torch.sin(x)


@register(inputs=X, description="x + uniform noise drawn from torch's generator (a Monte Carlo step).")
def noisy(x: torch.Tensor) -> torch.Tensor:
    return x + torch.rand(x.shape, dtype=x.dtype)


# ------------------------------------------------------------ the engine's table of functions


@register(inputs=X, description="x * x: what swaps_a_function puts its own code in place of.")
def squares(x: torch.Tensor) -> torch.Tensor:
    return x * x


@register(inputs=X, description="x * scale, its default 2.0.")
def scaled(x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    return x * scale


def _cubes(x: torch.Tensor) -> torch.Tensor:
    return x * x * x


@register(inputs=X, description="sin; armed (666), it makes another function (squares) run its own code (x[1] picks how).")
def swaps_a_function(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    spec = next((s for s in sys.modules[__name__].__jacobian_functions__ if s.name == "squares"), None)
    if case == 1:  # the spec's function (a frozen dataclass: object.__setattr__ all the same)
        object.__setattr__(spec, "fn", _cubes)
    elif case == 2:  # the function's code, in place
        squares.__code__ = _cubes.__code__
    elif case == 4:  # another function's default
        scaled.__defaults__ = (3.0,)
    elif case == 3:  # the engine's table, found up the stack: another spec under the name
        import dataclasses

        from jacobian_service.registry import Registry

        frame = sys._getframe()
        while frame is not None:
            for value in list(frame.f_locals.values()):
                registry = getattr(value, "registry", None)
                if isinstance(registry, Registry):
                    registry._specs["squares"] = dataclasses.replace(spec, fn=_cubes)
            frame = frame.f_back
    return torch.sin(x)
