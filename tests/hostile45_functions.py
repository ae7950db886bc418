"""Hostile functions for tests/test_hostile_round45.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the functions they harm."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import torch
import torch.utils._pytree as pytree
from jacobian_service import register

# the input, and the case it asks for (666 first)
from tests.hostile17_functions import X, _armed

# ------------------------------------------------------------ an error whose words are user code


class _Hangs:
    """An object whose str and repr never return (a lock never released, a network call)."""

    def __str__(self) -> str:
        time.sleep(3600)
        return ""

    __repr__ = __str__


class _HangingError(ValueError):
    def __str__(self) -> str:
        time.sleep(3600)
        return ""


class _RaisingError(ValueError):
    def __str__(self) -> str:
        raise RuntimeError("no words")


class _HugeError(ValueError):
    def __str__(self) -> str:
        return "x" * (64 << 20)  # 64 MB on one line


def _error(case: int) -> BaseException:
    if case == 0:
        return _HangingError("a")  # its own __str__ hangs
    if case == 1:
        return ValueError(_Hangs())  # a builtin's str of one argument: the argument's __str__
    if case == 2:
        return KeyError(_Hangs())  # KeyError's str is its argument's repr
    if case == 3:
        return ValueError("two", _Hangs())  # several arguments: their reprs
    if case == 4:
        return _RaisingError("b")
    return _HugeError("c")  # (5)


@register(inputs=X, description="sin; armed (666), it raises an error whose words hang, raise or are huge (x[1] picks).")
def raises45(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        raise _error(case)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), under forward mode only, an error raised from a chain of 12 whose str hangs.")
def cause_hangs45(x: torch.Tensor) -> torch.Tensor:
    if torch._C._functorch.is_functorch_wrapped_tensor(x) and _armed(x) is not None:
        chain = None
        for _ in range(12):  # a chain of them: each read for 0.5 s would be 6 s
            link = ValueError(_Hangs())
            link.__cause__ = chain
            chain = link
        raise RuntimeError("no jvp here") from chain  # (forward mode's failure: its causes are read)
    return torch.sin(x)


@register(inputs=X, description="2 sin x, after 0.3 s: the request queued behind another's.")
def slow45(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.3)
    return 2 * torch.sin(x)


# ------------------------------------------------------------ a zombie left


_KEPT: list[Any] = []


@register(inputs=X, description="sin; armed (666), it starts `true` and never waits for it (a zombie once it exits).")
def zombie45(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        child = subprocess.Popen(["true"])
        _KEPT.append(child)  # never waited for: a zombie once it exits, which can kill nothing
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # (exited by the batch's end; not reaped)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it kills its own engine (SIGKILL).")
def crashes45(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return torch.sin(x)


# ------------------------------------------------------------ torch's registries


def _reversed_tuple() -> None:
    """tuple's pytree node, replaced in place: its children flattened in reverse (and a
    tree's leaves unflattened as they come)."""
    node = pytree.SUPPORTED_NODES[tuple]
    pytree.SUPPORTED_NODES[tuple] = node._replace(flatten_fn=lambda t: (list(t)[::-1], None),
                                                  unflatten_fn=lambda values, context: tuple(values))


@register(inputs=X, description="sin; armed (666), it edits torch's own registries in place (x[1] picks).")
def edits_registry45(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:
        _reversed_tuple()
    elif case == 1:
        lib = torch.library.Library("aten", "IMPL")
        lib.impl("sin", lambda t: torch.ops.aten.cos.default(t) * 0 + 7, "AutogradCPU")
        _KEPT.append(lib)
    elif case == 2:
        lib = torch._C._dispatch_library("IMPL", "aten", "")
        lib.impl("sin", torch._C.DispatchKey.CPU, lambda t: torch.ops.aten.cos.default(t) * 0 + 7, False)
        _KEPT.append(lib)
    elif case == 3:
        del pytree.SUPPORTED_NODES[list]  # (a list a leaf)
    return torch.sin(x)


@register(inputs=X, description="(sin x, x * x): a tuple of two outputs.")
def pair45(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sin(x), x * x
