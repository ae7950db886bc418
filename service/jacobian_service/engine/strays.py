"""Threads a user function leaves running after it has returned.

A function may start a thread and return: a prefetch, a poller, a forgotten ``while
True``. One that waits costs nothing. One that keeps running Python takes the GIL from
the engine's own thread at every switch interval, and every later request, of every
function, runs several times slower (measured by hand: a small Jacobian 0.03 s -> 0.2 s)
for as long as the engine lives. Python cannot stop a thread, so the engine has to go:
``Strays.check`` names the function whose threads used more than ``share`` of a core
over each of the last two ``every_s`` (one burst, a flush say, is let be), and the
engine restarts (``EngineServer.serve``). The share is low (a fifth), and one
function's threads are added up, because a thread that spins gets only its turn of the
GIL: beside a busy engine thread, half a core; beside three other busy threads, a
quarter.

Torch-free; Linux only (a thread's CPU time comes from ``/proc``): elsewhere nothing is
ever named.
"""

from __future__ import annotations

import os
import threading

__all__ = ["Strays"]

_TICKS_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Strays:
    """Made before the first user function runs: the threads alive then (the engine's
    own, and any a module started as it was imported) are never named."""

    def __init__(self, share: float = 0.2, every_s: float = 1.0) -> None:
        self.share = share
        self.every_s = every_s
        # Threads by their kernel id: a Python ident may be reused at once by the next thread.
        self._known = {t.native_id for t in threading.enumerate()}
        self._owner: dict[int, str] = {}  # thread -> the function that ran when it was first seen
        self._cpu: dict[int, float] = {}  # thread -> its CPU seconds at the last check
        self._hot: set[str] = set()  # functions over their share in the last window
        self._last = 0.0

    def after_run(self, function: str) -> None:
        """Call after running ``function``: threads new since the last call are its."""
        for t in threading.enumerate():
            if t.native_id is not None and t.native_id not in self._known and t.native_id not in self._owner:
                self._owner[t.native_id] = function

    def check(self, now: float) -> str | None:
        """At most every ``every_s``: a function whose threads together used more than
        ``share`` of a core in each of the last two windows, else None."""
        if now - self._last < self.every_s:
            return None
        window, self._last = now - self._last, now
        alive = {t.native_id for t in threading.enumerate()}
        used: dict[str, float] = {}
        for tid in list(self._owner):
            if tid not in alive:  # ended
                del self._owner[tid]
                self._cpu.pop(tid, None)
                continue
            cpu = _cpu_seconds(tid)
            if cpu is None:
                continue
            before, self._cpu[tid] = self._cpu.get(tid), cpu
            if before is not None:
                used[self._owner[tid]] = used.get(self._owner[tid], 0.0) + cpu - before
        hot = {function for function, seconds in used.items() if seconds > self.share * window}
        culprit = min(hot & self._hot, default=None)
        self._hot = hot
        return culprit


def _cpu_seconds(native_id: int) -> float | None:
    """User plus system CPU time of one thread of this process."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": the name may hold spaces
        return (int(fields[11]) + int(fields[12])) / _TICKS_S  # utime, stime: fields 14 and 15
    except (OSError, IndexError, ValueError):
        return None
