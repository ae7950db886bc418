"""Hostile functions for tests/test_hostile_round23.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the functions they harm."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)

# ------------------------------------------------------------ torch's random generator


@register(inputs=X, description="x + torch.rand (one draw each): a Monte Carlo step.")
def noise25(x: torch.Tensor) -> torch.Tensor:
    return x + torch.rand(x.shape, dtype=x.dtype)


# Drawn unseeded as the module loads, as an nn.Linear made without a seed draws its weights.
_W = torch.randn(3)


@register(inputs=X, description="x * W, W drawn from torch's generator (unseeded) as the module loads.")
def module_weights25(x: torch.Tensor) -> torch.Tensor:
    return x * _W.to(x.dtype)


@register(inputs=X, description="sin; armed (666), it ends its engine (os._exit).")
def exits25(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        os._exit(3)
    return torch.sin(x)


# ------------------------------------------------------------ the standard streams


@register(inputs=X, description="sin, printing x to stdout and a line to stderr (a function that logs).")
def prints25(x: torch.Tensor) -> torch.Tensor:
    print("prints25 x =", x.tolist())
    sys.stderr.write(f"prints25 stderr {x.tolist()}\n")
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), case 0 closes sys.stdout, case 1 sys.stderr's buffer.")
def closes_streams(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:
        sys.stdout.close()
    elif case == 1:
        sys.stderr.buffer.close()
    return torch.sin(x)


# ------------------------------------------------------------ signal handlers of C's


@register(inputs=X, description="sin; armed (666), it gives SIGTERM a handler of C's that does nothing "
                                "(libc's getpid, through ctypes' signal), which Python's table does not show.")
def catches_sigterm(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal(signal.SIGTERM, ctypes.cast(libc.getpid, ctypes.c_void_p).value)
    return torch.sin(x)
