"""An engine's open file descriptors against its open-file limit: past three quarters
of it, the engine is recycled (its queue drains, the spare takes over).

A function that opens files, sockets or pipes and keeps them (a handle cached per call,
a log file never closed) leaks descriptors, which belong to the whole process. At the
limit every later ``open`` fails with EMFILE, in every function that reads a file (a
checkpoint, a table), for as long as the engine lives: one function's leak broke the
others for good (measured: 2,000 kept per call, every other file-opening function
answered 500 "Too many open files" from the ninth call on, while ``/readyz`` stayed
200). Unlike memory there is no setting to opt into: at the wall nothing that needs a
descriptor works, the engine's own reads of ``/proc`` included, so it always leaves
before it.

The count is read once a second (a listing of ``/proc/self/fd``: 8 us for the engine's
own few dozen, 0.9 ms for 2,000), not after each batch. Growth is charged to the
functions whose batches in that second raised the lowest free descriptor, which a batch
that keeps one does (a descriptor opened and closed leaves it where it was); failing
that, to every function run in that second. That test costs a ``dup`` and a ``close``
per batch; a lowest free descriptor past the limit has the count read at once, so a
function that leaks fast is not given a second to reach the wall. The log names the
functions charged most. Torch-free; Linux only: elsewhere nothing is counted and the
engine never leaves for this.
"""

from __future__ import annotations

import collections
import logging
import os
import resource

__all__ = ["DescriptorWatch"]

log = logging.getLogger("jacobian_service.engine")

_FDS = "/proc/self/fd"


class DescriptorWatch:
    def __init__(self, share: float = 0.75, every_s: float = 1.0) -> None:
        self.share = share
        self.every_s = every_s
        self.limit: int | None = None
        self._last = 0.0
        self._held = 0
        self._ran: set[str] = set()  # functions run since the last count
        self._kept: set[str] = set()  # of those, the ones whose batches raised the lowest free descriptor
        self._lowest = 0
        self._grown: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        """Ready to serve: the limit is a share of the open-file limit the engine runs
        under (``process_settings`` puts it back after any function that lowers it). One
        already passed (a tiny limit) would recycle every engine at once, for ever: it is
        left unenforced, and said so."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        held = _count()
        if soft == resource.RLIM_INFINITY or held is None:
            return
        self.limit = int(soft * self.share)
        if held >= self.limit:
            log.error("this engine holds %d open descriptors once started, over %d%% of its open-file limit (%d): "
                      "descriptor leaks are not watched", held, self.share * 100, soft)
            self.limit = None
        self._held = held
        self._lowest = _lowest_free()
        self._ran.clear()
        self._kept.clear()
        self._grown.clear()  # start-up's descriptors are nobody's

    def after_run(self, function: str) -> None:
        if self.limit is None:
            return
        function = function or "a function"
        self._ran.add(function)
        lowest, self._lowest = self._lowest, _lowest_free()
        if self._lowest > lowest:
            self._kept.add(function)
            if self._lowest > self.limit:  # at least that many are open: count now, not within the second
                self._last = float("-inf")

    def check(self, now: float) -> dict | None:
        """At most every ``every_s``: past the limit, what the board and the log say."""
        if self.limit is None or now - self._last < self.every_s:
            return None
        self._last = now
        held = _count()
        charged = self._kept or self._ran
        if held is None:  # no descriptor left even to list them: at the wall, by the functions since
            held = self.limit + 1  # (charged to no one, the log said "opened most by no function seen")
        if held > self._held and charged:
            for function in charged:
                self._grown[function] += (held - self._held) // len(charged)
        self._held = held
        self._ran, self._kept = set(), set()
        if held <= self.limit:
            return None
        return {"open": held, "limit": self.limit,
                "grown": [[name, grown] for name, grown in self._grown.most_common(3)]}


def _lowest_free() -> int:
    """The number the next descriptor would get (a ``dup`` takes the lowest free)."""
    try:
        fd = os.dup(2)
    except OSError:  # none free (or no stderr): higher than any
        return 1 << 62
    os.close(fd)
    return fd


def _count() -> int | None:
    try:
        return len(os.listdir(_FDS))
    except OSError:  # EMFILE (the listing needs one), or no /proc
        return None
