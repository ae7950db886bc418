"""An engine's resident memory against ``ENGINE_MAX_RSS_BYTES``: over it, the engine is
recycled (its queue drains, the spare takes over), before a function that leaks a little
at each call (a cache that only grows, arrays kept in a global list) brings it to the
out-of-memory killer in the middle of some other function's request, which would then
get the 500 and the strike.

Which functions grew the memory is told by the resident size after each batch (read
from ``/proc``, only when the limit is set): a batch after which the
engine holds more than before is charged the difference. (The peak, which ``getrusage``
gives cheaper, would charge nothing once a large request has set a high one.) The log
names the three charged most. Torch-free.

The same watch, given a reader of ``torch.cuda.memory_allocated``, holds the tensors an
engine keeps on its GPU between requests to ``ENGINE_MAX_DEVICE_BYTES``
(``devices.device_memory_watch``): a function that keeps device tensors in a global
would otherwise leave every later request of every function out of memory (507), for
as long as the engine lived.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Callable

from ..procfs import status_bytes

__all__ = ["MemoryWatch"]

log = logging.getLogger("jacobian_service.engine")


def _resident() -> int | None:
    return status_bytes(os.getpid(), "VmRSS")


class MemoryWatch:
    def __init__(self, limit: int | None, every_s: float = 1.0, *, read: Callable[[], int | None] = _resident,
                 setting: str = "ENGINE_MAX_RSS_BYTES") -> None:
        self.limit = limit
        self.every_s = every_s
        self.read = read  # bytes held now
        self.setting = setting  # named in the log
        self._last = 0.0
        self._held = 0
        self._grown: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        """Ready to serve: a limit already below what the engine holds now (torch, the
        functions, their warm-up) would recycle every engine at once, for ever; it is
        left unenforced, and said so."""
        held = self.read()
        if self.limit is not None and held is not None and held >= self.limit:
            log.error("%s (%d MiB) is below what this engine holds once started (%d MiB): not enforced",
                      self.setting, self.limit >> 20, held >> 20)
            self.limit = None
        self._held = held or 0
        self._grown.clear()  # start-up's growth is nobody's

    def after_run(self, function: str) -> None:
        if self.limit is None:
            return
        held = self.read() or 0
        if held > self._held:
            self._grown[function or "a function"] += held - self._held
        self._held = held

    def check(self, now: float) -> dict | None:
        """At most every ``every_s``: over the limit, what the board and the log say."""
        if self.limit is None or now - self._last < self.every_s:
            return None
        self._last = now
        held = self.read()
        if held is None or held <= self.limit:
            return None
        return {"held": held, "limit": self.limit,
                "grown": [[name, grown] for name, grown in self._grown.most_common(3)]}
