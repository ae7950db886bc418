"""Hostile functions for tests/test_hostile_round50.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the function they harm
(``victim50``: another client's, in another module's namespace)."""

from __future__ import annotations

import sys
import threading
import time

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed


def _arm_later(delay_s: float) -> None:
    """A thread left asleep (no CPU: no stray), which after ``delay_s``, with no function
    of its own running, rebinds ``torch.sin`` to a doubler that puts the original back as
    it is called: the next function to call ``torch.sin`` answers twice its sine, and the
    name is torch's own again by the end of that batch."""
    original = torch.sin

    def once(*args, **kwargs):
        torch.sin = original
        return original(*args, **kwargs) * 2

    def arm() -> None:
        time.sleep(delay_s)
        torch.sin = once

    threading.Thread(target=arm, daemon=True).start()


def _rebind_later(delay_s: float) -> None:
    """A thread left asleep that, after ``delay_s``, with no function running, rebinds a
    global of another function's module (``victim50_functions._SCALE``)."""
    def rebind() -> None:
        time.sleep(delay_s)
        sys.modules["tests.victim50_functions"]._SCALE = 2.0

    threading.Thread(target=rebind, daemon=True).start()


_FILLED = 0.0  # (what its own thread fills in, later: a cache, a prefetched batch)


def _fill_own_later(delay_s: float) -> None:
    """A thread left asleep that, after ``delay_s``, sets a global of its own module (a
    function's own state, which stays), then waits for good."""
    def fill() -> None:
        time.sleep(delay_s)
        globals()["_FILLED"] = 1.0
        threading.Event().wait()  # (and waits on, alive: a pool's idle worker)

    threading.Thread(target=fill, daemon=True).start()


_KEPT: list = []  # (the Library objects: alive, their kernels stay registered)


def _settings_later(delay_s: float, how: int) -> None:
    """A thread left asleep that, after ``delay_s``, changes what every function's batch
    runs under: a kernel over ``aten::sin`` on the CPU (3), torch's default dtype, float64 (4)."""
    def change() -> None:
        time.sleep(delay_s)
        if how == 3:
            lib = torch.library.Library("aten", "IMPL")
            lib.impl("sin", lambda x: (x.cos() * 0 + 7.0), "CPU")
            _KEPT.append(lib)
        elif how == 4:
            torch.set_default_dtype(torch.float64)

    threading.Thread(target=change, daemon=True).start()


def _lie_in_wait(victim: str = "victim50", put_back: bool = False) -> None:
    """A thread that polls (1 ms: no stray) for ``victim``'s batch to begin and rebinds
    ``torch.sin`` to a doubler within it; ``put_back``: one that puts the original back as
    it is called, the name torch's own again before the batch ends."""
    main = threading.main_thread().ident
    original = torch.sin
    if put_back:  # (and first, in its own batch, no other thread running: torch's dict moved, no name changed,
        torch.sin = abs  # which must not have torch passed by in every other function's batches after)
        torch.sin = original

    def doubled(*args, **kwargs):
        if put_back:
            torch.sin = original
        return original(*args, **kwargs) * 2

    def wait() -> None:
        while True:
            time.sleep(0.001)
            frame = sys._current_frames().get(main)
            while frame is not None:
                if frame.f_code.co_name == victim:
                    torch.sin = doubled
                    time.sleep(0.05)
                    break
                frame = frame.f_back

    threading.Thread(target=wait, daemon=True).start()


@register(inputs=X, description="sin (plus what its own thread filled in); armed (666), it leaves a thread that acts after it returned (x[1] picks how).")
def arms50(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:
        _arm_later(0.3)
    elif case == 1:
        _rebind_later(0.3)
    elif case == 2:
        _fill_own_later(0.3)
    elif case in (3, 4):
        _settings_later(0.3, case)
    elif case == 7:
        _lie_in_wait()
    elif case == 8:
        _lie_in_wait("slow50", put_back=True)
    return torch.sin(x) + _FILLED
