"""Hostile functions for tests/test_hostile_round44.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the functions they harm."""

from __future__ import annotations

import _thread
import os
import subprocess
import threading
import time
from typing import Any

import torch
from jacobian_service import register

# the input, and the case it asks for (666 first)
from tests.hostile17_functions import X, _armed

# ------------------------------------------------------------ torch's dispatch keys of the thread

_KEPT: list[Any] = []  # a guard entered and kept (a global, a generator suspended inside its ``with``)


def _guard(case: int) -> Any:
    """A guard of torch's over the thread's dispatch keys or its torch-function handling."""
    C, K = torch._C, torch._C.DispatchKey
    if case == 0:
        return C._DisableFuncTorch()  # excludes torch.func's keys: every later jacrev all zeros
    if case == 1:
        return C._IncludeDispatchKeyGuard(K.Python)  # every later op an internal assert
    if case == 2:
        return C._ExcludeDispatchKeyGuard(C.DispatchKeySet(K.CPU))  # every later CPU op without a kernel
    if case == 3:
        return C.DisableTorchFunction()  # every later subclass's and mode's __torch_function__ skipped
    return C._AutoDispatchBelowAutograd()  # (4) every later function's own autograd off


def _keeps_guard(case: int) -> Any:
    def keeps(x: torch.Tensor) -> torch.Tensor:
        if _armed(x) is not None:
            _KEPT.append(_guard(case))
            _KEPT[-1].__enter__()
        return torch.sin(x)

    return keeps


# One function per guard (keeps_guard44_0 ... _4): the log names each (function, setting) once.
for _case in range(5):
    register(_keeps_guard(_case), name=f"keeps_guard44_{_case}", inputs=X,
             description=f"sin; armed (666), it enters torch's dispatch guard {_case} and keeps it.")


@register(inputs=X, description="2 sin x: any function's Jacobian (2 cos x on its diagonal).")
def victim44(x: torch.Tensor) -> torch.Tensor:
    return 2 * torch.sin(x)


class _Doubled(torch.Tensor):
    """A subclass whose every torch call's result is doubled (a unit, a scale a library
    keeps in its tensors' type)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out * 2 if func is torch.sin else out


@register(inputs=X, description="sin through a subclass whose __torch_function__ doubles it: 2 sin x.")
def subclass_victim44(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x.as_subclass(_Doubled)).as_subclass(torch.Tensor)


@register(inputs=X, description="the gradient of sum(x**2) by torch.autograd.grad inside (its own autograd): 2 x; "
                                "evaluated only.")
def own_grad44(x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        y = x.detach().requires_grad_()
        (g,) = torch.autograd.grad((y * y).sum(), y)
    return g


# ------------------------------------------------------------ SIGINT for the engine, later


@register(inputs=X, description="sin; armed (666), SIGINT for its engine 0.3 s later: case 0 a Timer's "
                                "_thread.interrupt_main(), case 1 a child left sleeping (kill -INT).")
def interrupts44(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:
        threading.Timer(0.3, _thread.interrupt_main).start()
    elif case == 1:
        subprocess.Popen(["sh", "-c", f"sleep 0.3; kill -INT {os.getpid()}"])
    return torch.sin(x)


@register(inputs=X, description="2 sin x, after 1 s (its request runs when another's SIGINT comes).")
def sleeps44(x: torch.Tensor) -> torch.Tensor:
    time.sleep(1.0)
    return 2 * torch.sin(x)


# ------------------------------------------------------------ a child that ends the engine later


@register(inputs=X, description="sin; armed (666), it leaves a child that SIGKILLs its engine 0.3 s later.")
def kills_later44(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        subprocess.Popen(["sh", "-c", f"sleep 0.3; kill -KILL {os.getpid()}"])
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it leaves a child that SIGSTOPs its engine 0.3 s later.")
def stops_later44(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        subprocess.Popen(["sh", "-c", f"sleep 0.3; kill -STOP {os.getpid()}"])
    return torch.sin(x)
