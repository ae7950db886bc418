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

Memory a function keeps in a shared memory object (a ``memfd``, a file in ``/dev/shm``,
SysV shared memory) written through its descriptor is in no resident size, nor under
``ENGINE_MEMORY_LIMIT_BYTES`` (an address-space cap), nor a SysV segment it made and
unmapped without removing it: a function could fill the
machine's memory past both. What the engine keeps alive that way, by a descriptor or a
mapping, is counted whole (``shared_beyond_resident``) at each check, once a second: a
walk of ``/proc/self/maps``, ~1 ms, too dear for every batch. Its growth is charged to
the functions run since the check before. With only ``ENGINE_MEMORY_LIMIT_BYTES`` set,
the engine's memory counted so is held to that cap the same way (``limit_of``): the
resident part is under it already, and what a function keeps beyond it no longer
escapes it. A file a function leaves in ``/dev/shm`` and
closes is no process's memory: a file, bounded by the tmpfs's size (a container's
``--shm-size``).

The same watch, given a reader of ``torch.cuda.memory_allocated``, holds the tensors an
engine keeps on its GPU between requests to ``ENGINE_MAX_DEVICE_BYTES``
(``devices.device_memory_watch``): a function that keeps device tensors in a global
would otherwise leave every later request of every function out of memory (507), for
as long as the engine lived.

Under ``ENGINE_MEMORY_LIMIT_BYTES`` the address space an engine keeps reserved and never
touches is watched too (``ReservedWatch``, past half the cap): no resident size counts it, yet it is taken
from the cap. A function that kept a 2.9 GiB ``mmap`` (``PROT_NONE``, or of ``/dev/zero``,
untouched) in a global under a 3 GiB cap left every later request that needed room a 507
``out_of_memory``, in that engine until it restarted.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Callable

from ..procfs import status_bytes, sysv_segments

__all__ = ["MemoryWatch", "ReservedWatch", "limit_of", "shared_beyond_resident"]

log = logging.getLogger("jacobian_service.engine")


def _resident() -> int | None:
    return status_bytes(os.getpid(), "VmRSS")


_SHARED = ("/memfd:", "/dev/shm/", "/SYSV")  # how /proc names shared memory objects
_SHARED_BYTES = tuple(p.encode() for p in _SHARED)


def shared_beyond_resident() -> int:
    """Bytes of the shared memory objects this process keeps alive (by a descriptor or a
    mapping) that its resident size leaves out: their pages in memory, less those it
    has touched through a mapping (``RssShmem``, in ``VmRSS`` already)."""
    held: dict[tuple[int, int], int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(_SHARED):
                st = os.stat(f"/proc/self/fd/{fd}")
                held[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        except OSError:  # closed just now
            continue
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) < 6 or not fields[5].startswith(_SHARED_BYTES):
                continue
            major, minor = (int(n, 16) for n in fields[3].split(b":"))
            key = (os.makedev(major, minor), int(fields[4]))
            if key in held:
                continue
            start, end = (int(n, 16) for n in fields[0].split(b"-"))
            try:  # one whose descriptor is closed: its pages in memory, where /proc lets us look
                held[key] = os.stat(f"/proc/self/map_files/{fields[0].decode()}").st_blocks * 512
            except OSError:  # (that takes CAP_SYS_ADMIN): the mapping's length, at most what it holds
                held[key] = end - start
    # SysV segments it made and unmapped (never removed: no descriptor, no mapping, yet
    # their pages stay; the supervisor removes them as the engine ends); mapped ones are above.
    unmapped = sum(resident for _, resident, attached in sysv_segments(os.getpid()) if attached == 0)
    return max(0, sum(held.values()) - (status_bytes(os.getpid(), "RssShmem") or 0)) + unmapped


def limit_of(max_rss: int | None, address_space: int | None) -> tuple[int | None, str]:
    """The bound for an engine's memory (resident, and shared memory kept beyond it), and
    the setting that gives it: ``ENGINE_MAX_RSS_BYTES``, or else the address-space cap.
    Under the cap alone, a function that wrote 64 MiB at each call into memfds (through
    their descriptors, never mapped) held ~1.5 GiB under a 1.25 GiB cap, nothing said."""
    if max_rss is not None or address_space is None:
        return max_rss, "ENGINE_MAX_RSS_BYTES"
    return address_space, "ENGINE_MEMORY_LIMIT_BYTES"


class MemoryWatch:
    def __init__(self, limit: int | None, every_s: float = 1.0, *, read: Callable[[], int | None] = _resident,
                 setting: str = "ENGINE_MAX_RSS_BYTES", beyond: Callable[[], int] | None = None) -> None:
        self.limit = limit
        self.every_s = every_s
        self.read = read  # bytes held now
        self.setting = setting  # named in the log
        self.beyond = beyond  # bytes held that ``read`` leaves out, dearer to read: at each check only
        self._last = 0.0
        self._held = 0
        self._beyond = 0
        self._ran: set[str] = set()  # functions run since the last check
        self._grown: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        """Ready to serve: a limit already below what the engine holds now (torch, the
        functions, their warm-up) would recycle every engine at once, for ever; it is
        left unenforced, and said so."""
        held = self.read()
        if held is not None and self.limit is not None and self.beyond is not None:
            self._beyond = self.beyond()
            held += self._beyond
        if self.limit is not None and held is not None and held >= self.limit:
            log.error("%s (%d MiB) is below what this engine holds once started (%d MiB): not enforced",
                      self.setting, self.limit >> 20, held >> 20)
            self.limit = None
        self._held = (held or 0) - self._beyond
        self._grown.clear()  # start-up's growth is nobody's
        self._ran.clear()

    def after_run(self, function: str) -> None:
        if self.limit is None:
            return
        held = self.read() or 0
        if held > self._held:
            self._grown[function or "a function"] += held - self._held
        self._held = held
        self._ran.add(function or "a function")

    def check(self, now: float) -> dict | None:
        """At most every ``every_s``: over the limit, what the board and the log say."""
        if self.limit is None or now - self._last < self.every_s:
            return None
        self._last = now
        held = self.read()
        if held is not None and self.beyond is not None:
            beyond = self.beyond()
            if beyond > self._beyond and self._ran:
                self._grown[" or ".join(sorted(self._ran))] += beyond - self._beyond
            self._beyond = beyond
            held += beyond
        self._ran.clear()
        if held is None or held <= self.limit:
            return None
        return {"held": held, "limit": self.limit, "setting": self.setting,
                "grown": [[name, grown] for name, grown in self._grown.most_common(3)]}


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _untouched() -> int | None:
    """Address space this process holds but has no page of in memory (``VmSize`` less
    ``VmRSS``, one read of ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            size, resident = f.read().split()[:2]
        return (int(size) - int(resident)) * _PAGE
    except (OSError, ValueError):
        return None


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _stack_bytes() -> int:
    """A new thread's stack, as ``strays`` counts it."""
    import resource
    import threading

    stack = threading.stack_size() or resource.getrlimit(resource.RLIMIT_STACK)[0]
    return 8 << 20 if stack == resource.RLIM_INFINITY or stack <= 0 else stack


class ReservedWatch(MemoryWatch):
    """Address space reserved and left untouched between requests, beyond what the engine
    held so once started (libraries' unread pages, thread stacks), against half the
    address-space cap: past it, the engine is recycled as for its memory (half the room
    gone for good to a reservation nobody uses is a leak; below it, a large request's
    own untouched reservations come and go). The stacks of threads started since are
    left out: those are the threads' watch's (``strays``), which recycles at half the
    stacks the room holds, naming them. Pages swapped out read as untouched too, and a
    thread's malloc arena (64 MiB reserved) as a reservation. Unset cap: nothing watched."""

    def __init__(self, address_space: int | None) -> None:
        super().__init__(address_space // 2 if address_space else None, read=self._beyond_start,
                         setting="half of ENGINE_MEMORY_LIMIT_BYTES")
        self._start = 0
        self._threads = 0
        self._stack = 0

    def _beyond_start(self) -> int | None:
        untouched = _untouched()
        if untouched is None:
            return None
        stacks = max(0, _threads() - self._threads) * self._stack
        return max(0, untouched - self._start - stacks)

    def start(self) -> None:
        if self.limit is not None:
            self._start, self._threads, self._stack = _untouched() or 0, _threads(), _stack_bytes()
        super().start()
