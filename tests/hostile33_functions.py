"""Hostile functions for tests/test_hostile_round28.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the innocent functions
whose runs their threads end."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)

_WAITING = threading.Event()  # never set: what leaves_a_waiter33's threads wait for


def _end_the_engine(case: int) -> None:
    if case == 0:
        os._exit(3)
    elif case == 1:
        ctypes.string_at(0)  # a segfault
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _when_running(case: int, name: str, started_by: object = None) -> None:
    """Wait, sleeping, until function ``name`` runs in another thread (a call other than
    ``started_by``, the frame of the one that started this thread); then end the engine."""
    me = threading.get_ident()
    while True:
        for ident, frame in sys._current_frames().items():
            while ident != me and frame is not None:
                if frame.f_code.co_name == name and frame is not started_by:
                    _end_the_engine(case)
                frame = frame.f_back
        time.sleep(0.01)


@register(inputs=X, description="sin; armed (666), it leaves a thread that ends the engine while slow33 runs: "
                                "case 0 os._exit, 1 a segfault (ctypes), 2 SIGKILL of its own process.")
def leaves_a_killer33(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        threading.Thread(target=_when_running, args=(case, "slow33"), daemon=True).start()
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it leaves a thread that waits for ever (harmless).")
def leaves_a_waiter33(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        threading.Thread(target=_WAITING.wait, daemon=True).start()
    return torch.sin(x)


def _crashes(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        os._exit(7)
    return torch.sin(x)


for _name in ("crashes33", "crashes33b"):  # two of them: one strike quarantines each
    register(_crashes, name=_name, inputs=X,
             description="sin; armed (666), it ends its engine itself (os._exit), whatever else runs.")


@register(inputs=X, description="sin, after 0.5 s: an innocent function that takes a while.")
def slow33(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.5)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it leaves a thread that ends the engine (os._exit) the next "
                                "time this function runs (0.5 s, unarmed).")
def kills_itself_later33(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        threading.Thread(target=_when_running, args=(0, "kills_itself_later33", sys._getframe()), daemon=True).start()
    else:
        time.sleep(0.5)
    return torch.sin(x)
