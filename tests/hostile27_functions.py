"""Hostile functions for tests/test_hostile_round24.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the functions they harm."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)


def _run_dir() -> str:
    return sys.argv[sys.argv.index("--run-dir") + 1]


@register(inputs=X, description="sin: the function another one would have blamed.")
def victim27(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


# ------------------------------------------------------------ the run directory's notes


@register(inputs=X, description="sin; armed (666), it writes a warm-up note under its own engine's pid saying that "
                                "victim27's warm-up is running, and leaves a timer that ends the engine (os._exit) "
                                "once its request is answered.")
def shifts_blame27(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        with open(os.path.join(_run_dir(), f"warming-{os.getpid()}"), "w") as f:  # (ipc.warming_path's name)
            f.write(f"{time.monotonic() + 1e6} victim27")
        threading.Timer(0.5, os._exit, (1,)).start()
    return torch.sin(x)


_SLOW = "slow-spare27"  # while this file is in the run directory, a spare's warm-up of slow_spare27 waits (30 s at most)


@register(inputs=X, description="sin; its warm-up in a spare waits while a file of its own is in the run directory. "
                                "Armed (666): case 0 makes that file, case 1 makes the ready flag of every spare "
                                "of its serve (a process started with --standby) but its own engine, and a warm-up "
                                "note saying it began warming victim27 up long ago, case 2 removes the file.")
def slow_spare27(x: torch.Tensor) -> torch.Tensor:
    case, marker = _armed(x), os.path.join(_run_dir(), _SLOW)
    if case is None and "--standby" in sys.argv:  # a spare's warm-up (the only call a spare makes before it serves)
        deadline = time.monotonic() + 30
        while os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
    elif case == 0:
        open(marker, "w").close()
    elif case == 1:
        flagged = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"--standby" in argv and _run_dir().encode() in argv and int(pid) != os.getpid():  # (this serve's)
                open(os.path.join(_run_dir(), f"spare-{pid}.ready"), "w").close()  # (the flag's name, before)
                with open(os.path.join(_run_dir(), f"warming-{pid}"), "w") as f:  # (ipc.warming_path's name)
                    f.write("0 victim27")  # its warm-up of victim27 began long ago
                flagged += 1
        return torch.full_like(x, flagged)  # how many spares it made the flag of
    elif case == 2 and os.path.exists(marker):
        os.remove(marker)
    return torch.sin(x)


# ------------------------------------------------------------ a kill after the answers


class _Slow:
    """Garbage whose ``__del__`` takes 2 s: the engine's tidying after a batch."""

    def __init__(self) -> None:
        self.me = self  # a cycle: freed only by the garbage collector

    def __del__(self) -> None:
        time.sleep(2.0)


@register(inputs=X, description="sin; armed (666), it leaves garbage whose collection (after its answer, in the "
                                "engine's tidying) takes 2 s, the collector switched off till then.")
def lingers27(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        gc.disable()  # (put back after the batch: the cycle is collected then, not in the call)
        _Slow()
    return torch.sin(x)
