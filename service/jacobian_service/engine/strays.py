"""Threads and processes a user function leaves running after it has returned.

A function may start a thread or a process and return: a prefetch, a poller, a
forgotten ``while True``. One that waits costs nothing. A thread that keeps running
Python takes the GIL from the engine's own thread at every switch interval, and every
later request, of every function, runs several times slower (measured: ``sin``'s
median 35-55 -> 171 ms over HTTP) for as long as the engine lives. A process that
keeps running takes a core: one more each time the function is called.

``Strays.check`` finds those that used more than ``share`` of a core over each of the
last two ``every_s`` in which no function ran, or wanted more than half of one (the CPU
time plus the time spent runnable, waiting for a CPU: on a loaded host a spinning
process runs only its turn, a tenth of a core at a load of 20 on two, under the share,
and was never found; a task that sleeps waits only for its wake-ups): one burst (a flush, say) is let be, and a
pool that a function hands work to and waits for works only while it runs. The share is
low (a fifth), and one function's threads are added up, because a thread that spins
gets only its turn of the GIL: beside a busy engine thread, half a core; beside three
other busy threads, a quarter. A process can be killed, and is; a thread cannot be
stopped, so the engine restarts (``EngineServer.serve``). Under load with no idle
second, a stray is found once the load lets up.

Threads that wait cost no CPU, but each holds a stack's address space (8 MiB) and a
pid: a function that starts one at each call and never ends it (a new
``ThreadPoolExecutor`` per call, never shut down) took the engine to "can't start new
thread" from ~220 threads on under a 4 GiB ``ENGINE_MEMORY_LIMIT_BYTES``, and without
a cap takes pids from the whole host. More than ``max_threads`` threads of the functions
alive at once is a leak, not a pool: ``check`` says so, with the functions that started
most of them, and the engine is recycled like one over its memory limit. The limit is
512, or, under an address-space cap, half the stacks that the room left once started
holds (~100 under 4 GiB). Child processes the same, past ``max_processes`` (512),
zombies included: a ``Popen`` kept and never waited for leaves one per call, each
holding a pid until the engine goes (its exit has them reaped).

Threads are told apart after every batch (``threading.enumerate``, cheap, and the
interpreter's own list for those ``_thread.start_new_thread`` started), so a thread
is put down to the function that ran, and their count is held to ``max_threads`` at
once, not once a window: 20 threads a call passed the limit and then the cap's room in
less than a second. Processes are looked for once a window (a walk of ``/proc``, too
dear for every batch): one is put down to the functions run since the window before.
The engine's own children (its thread's, which runs the functions: ``subprocess``,
``os.fork``, and the daemons it takes in as their subreaper) are read after every batch
as well, from a descriptor kept open on their list (~0.5 us), and their functions are
suspects as those of live threads are (``left``): a child one function left sleeping,
which then killed the engine (``sleep 0.3; kill -KILL $engine``) while another
function ran, had that one's request answered 500 and the function struck, quarantined
at the second such death, the sender never named (measured). Not those that have
exited (zombies: a ``Popen`` never waited for), which can kill nothing; never reaped
here, as their functions may still wait for them.
Torch-free; Linux only: elsewhere nothing is ever found.
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..orphans import kill_detached, reap_detached
from ..procfs import cpu_seconds, descendants, status_bytes, waited_seconds

log = logging.getLogger("jacobian_service.engine")

__all__ = ["Found", "Strays"]

# Of a core, over a window, run or waited for: a task that spins on a loaded host (it is
# runnable all the time); a poller's wake-ups wait far less. Not on a host so loaded that
# they wait longer than it sleeps (a 100 Hz poller at a load of ~27 on two cores): it is
# then runnable most of the time, as a spinner is, and is named. Its short turns and
# voluntary switches would tell a process apart, not a thread spinning beside the
# engine's: the GIL cuts its turns short and has it wait voluntarily.
# Taken as the module is imported (an engine process watches this module's names): a
# function that set ``sys._current_frames = lambda: {}`` (sys is no guarded namespace)
# hid the threads it started through ``_thread`` from this watch, which then never
# named it, and put a crash of theirs down to whichever function ran.
_current_frames = sys._current_frames
_WANTED_SHARE = 0.5
_THREAD_SCHED_CLOCK = 6  # CPUCLOCK_PERTHREAD_MASK | CPUCLOCK_SCHED: another thread's CPU clock, by its kernel id


@dataclass
class Found:
    thread_function: str | None = None  # a function whose threads spin: the engine must go
    processes: dict[int, str] = field(default_factory=dict)  # pid -> the functions that may have started it
    # Too many of the functions' threads alive (spinning or not): {"count", "limit",
    # "grown": [[function, threads], ...]} (the engine must go, as for a leak).
    threads_left: dict[str, Any] | None = None
    processes_left: dict[str, Any] | None = None  # the same, for child processes (zombies too)


class Strays:
    """Made before the first user function runs: the threads and processes alive then
    (the engine's own, and any a module started as it was imported) are never named."""

    def __init__(self, share: float = 0.2, every_s: float = 1.0, max_threads: int | None = None,
                 max_processes: int = 512) -> None:
        self.share = share
        self.every_s = every_s
        self.max_threads = max_threads  # None: set at the first check, when the engine has started
        self.max_processes = max_processes
        self._children: dict[int, str] = {}  # pid -> the functions of its window, while it is a child (zombie or not)
        self._known_threads = _threads()  # by kernel id: a Python ident may be reused at once
        # The process's other threads (C's, which Python never knew: a C extension's
        # pthread_create spinning a core went unseen for as long as the engine lived):
        # their kernel ids, those alive now, and how many tasks the process had at the
        # last look (``_natives``).
        self._known_natives = _tasks()
        self._native_owner: dict[int, str] = {}  # tid -> the function after whose batch it was first seen
        self._tasks_seen = len(self._known_natives)
        self._known_processes = set(descendants(os.getpid()))
        self._thread_owner: dict[int, str] = {}  # tid -> the function that ran when it was first seen
        self._alive: set[int] = set()  # every thread alive after the last batch
        self._process_owner: dict[int, str] = {}  # pid -> the functions run in the window it was first seen
        self._ran: set[str] = set()  # functions run since the last window (none: an idle window)
        self._cpu: dict[tuple[str, int], tuple[float, float]] = {}  # CPU and run-queue seconds at the last window
        # Over their share in the last window: ("function", name), for its threads added
        # up, or ("process", pid).
        self._hot: set[tuple[str, Any]] = set()
        self._last = 0.0  # when the last window ended (at most one each ``every_s``)
        self._read_at = 0.0  # when its counters were read
        self._kids_fd: int | None = None  # the engine thread's list of children, kept open (``_kids``)
        self._kid_owner: dict[int, str] = {}  # pid -> the function after whose batch it was first seen
        self._kids: set[int] = set()  # the engine thread's children after the last batch
        self._children_now()  # its descriptor opened now, before the descriptor watch counts the engine's own

    def after_run(self, function: str) -> None:
        """Call after running ``function``: threads new since the last call are its."""
        self._ran.add(function)
        self._alive = _threads()
        for tid in self._alive - self._known_threads - self._thread_owner.keys():
            self._thread_owner[tid] = function
        self._natives(function)
        # Those that have exited (zombies: a ``Popen`` never waited for) are no suspects:
        # they can kill nothing. One was, and an idle engine's death later (a SIGSEGV) was
        # put down to its function, struck; a crash of another function's counted as
        # possibly its (no one struck, the request run again on a second engine to crash).
        self._kids = {pid for pid in self._children_now() - self._known_processes if not _exited(pid)}
        for pid in self._kids - self._kid_owner.keys():
            self._kid_owner[pid] = function
        for pid in self._kid_owner.keys() - self._kids:
            del self._kid_owner[pid]

    def _natives(self, function: str) -> None:
        """Threads no Python code knows (started in C: a C extension's ``pthread_create``),
        new since the last look, are ``function``'s, for the CPU watch only: not suspects
        of a death (``left``), nor counted against ``max_threads``, since torch starts its
        own pools' threads lazily, in whichever function's batch first needs them, and
        those sleep when idle. Listed only when the count of the process's tasks changed
        (a ``stat``, ~4 us on the loaded 2-core VM; the list ~9 us)."""
        count = _task_count()
        if count == self._tasks_seen:
            return
        self._tasks_seen = count
        for tid in _tasks() - self._known_natives - self._alive - self._thread_owner.keys() \
                - self._native_owner.keys():
            self._native_owner[tid] = function

    def _children_now(self) -> set[int]:
        """The children of the engine's thread (the one running the functions; a daemon
        taken in as their subreaper is its child too), read again from one descriptor (a
        ``pread``, ~0.5 us), opened again should a function have closed it; none read
        where the kernel has no such list."""
        for _ in range(2):
            try:
                if self._kids_fd is None:
                    self._kids_fd = os.open(f"/proc/self/task/{threading.get_native_id()}/children",
                                            os.O_RDONLY | os.O_CLOEXEC)
                return {int(pid) for pid in os.pread(self._kids_fd, 1 << 16, 0).split()}
            except (OSError, ValueError):
                self._kids_fd = None  # (a number a function closed, or reused: never closed here)
        return set()

    def left(self) -> list[str]:
        """The functions whose threads (or the engine thread's child processes) were alive
        after the last batch: if the engine dies while it runs nothing, or runs a function
        that left none, one of them may have done it (a timer thread that calls os._exit
        later sleeps, unseen by the CPU watch; a child that kills the engine later), and
        the supervisor is told so."""
        return sorted({self._thread_owner[t] for t in self._alive & self._thread_owner.keys()} |
                      {self._kid_owner[pid] for pid in self._kids & self._kid_owner.keys()})

    def left_clocks(self, besides: str | None = None) -> dict[int, int] | None:
        """The CPU time (ns) each thread of ``left``'s has used, by kernel id; None where
        one cannot be read, or a child process a function left is alive (whose doings no
        clock of this process shows): then anything may have changed. Read from the
        thread's own CPU clock (``MAKE_THREAD_CPUCLOCK``: ~0.3-3 us each): equal readings
        say the thread did not run in between, so changed nothing. ``besides``: not the
        threads (nor the child processes) that function left."""
        if any(self._kid_owner[pid] != besides for pid in self._kids & self._kid_owner.keys()):
            return None
        clocks = {}
        for tid in self._alive & self._thread_owner.keys():
            if self._thread_owner[tid] == besides:
                continue
            try:
                clocks[tid] = time.clock_gettime_ns(((~tid) << 3) | _THREAD_SCHED_CLOCK)
            except (OSError, OverflowError):  # gone, or no such clock here
                return None
        return clocks

    def check(self, now: float) -> Found | None:
        """At most every ``every_s``: what used more than ``share`` of a core in each of
        the last two idle windows (a function's threads added up; a process alone), and
        the functions' threads alive past ``max_threads``, their processes past
        ``max_processes``."""
        if now - self._last < self.every_s:
            if self.max_threads is not None and len(self._alive & self._thread_owner.keys()) > self.max_threads:
                # At once (above): those the last batch left alive.
                alive = {t: f for t, f in self._thread_owner.items() if t in self._alive}
                return Found(threads_left=_too_many(alive, self.max_threads))
            return None
        self._last = now
        reap_detached()  # daemons that ended, taken in as their subreaper (orphans): not left as zombies
        idle = not self._ran
        ran, self._ran = " or ".join(sorted(self._ran)) or "a function", set()
        children = set(descendants(os.getpid())) - self._known_processes
        for pid in children - self._process_owner.keys():
            self._process_owner[pid] = ran
        self._children = {pid: self._children.get(pid, ran) for pid in children}
        used: dict[tuple[str, Any], float] = {}
        wanted: dict[tuple[str, Any], float] = {}
        # The window the counters span: from the reads before to these, not from the
        # ``now`` the caller took. The engine takes it before it pumps and runs a batch:
        # a window that ran a 1 s batch had its counters read 1 s past its ``now``, and
        # the idle window after it, 1.1 s by the ``now``s, held 0.1 s of counting: a
        # stray spinning a whole core read as 9 %, under the share, and went unnamed a
        # window more (test_strays: a batch between the time taken and the look). The
        # next window is counted from these reads too (``_last``): never a sliver.
        read_at = time.monotonic()
        window, self._read_at = read_at - self._read_at, read_at
        self._last = max(now, read_at)
        for kind, owners in (("thread", self._thread_owner), ("native", self._native_owner),
                             ("process", self._process_owner)):
            for ident in list(owners):
                task = (os.getpid(), ident) if kind != "process" else (ident,)
                cpu = cpu_seconds(*task)
                if cpu is None:  # ended
                    del owners[ident]
                    self._cpu.pop((kind, ident), None)
                    continue
                now_seconds = (cpu, waited_seconds(*task))
                before, self._cpu[(kind, ident)] = self._cpu.get((kind, ident)), now_seconds
                if before is not None and idle:
                    key = ("function", owners[ident]) if kind != "process" else ("process", ident)
                    used[key] = used.get(key, 0.0) + cpu - before[0]
                    wanted[key] = wanted.get(key, 0.0) + cpu - before[0] + now_seconds[1] - before[1]
        hot = {key for key, seconds in used.items() if seconds > self.share * window or
               wanted[key] > _WANTED_SHARE * window}
        culprits, self._hot = hot & self._hot, hot
        if self.max_threads is None:
            self.max_threads = _thread_limit()
        threads = _too_many(self._thread_owner, self.max_threads)
        processes = _too_many(self._children, self.max_processes)
        if processes is not None and (killed := kill_detached()):
            # Daemons (a function that starts one at each call), each holding a pid: this
            # engine is their subreaper, and they can be told from the children its
            # functions forked and may still wait for. They go, and the engine goes on;
            # the next window counts what is left.
            log.error("%d processes that functions detached were running while this engine lived, over %d: %d "
                      "killed", processes["count"], self.max_processes, killed)
            processes = None
        if not culprits and threads is None and processes is None:
            return None
        return Found(min((name for kind, name in culprits if kind == "function"), default=None),
                     {pid: self._process_owner[pid] for kind, pid in culprits if kind == "process"}, threads,
                     processes)


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, left unreaped (a zombie), or is gone: asked with
    ``WNOWAIT`` (~1 us), which leaves it to be waited for. Never reaped here: its
    function's ``Popen.wait()`` would then read 0 for whatever status it exited with."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped meanwhile (or not ours after all): nothing left to kill
        return True
    except (OSError, AttributeError):  # (no waitid: not Linux) as before, a suspect
        return False


def _too_many(owners: dict[int, str], limit: int) -> dict[str, Any] | None:
    """Past ``limit``: how many, and the functions that started most of them."""
    if len(owners) <= limit:
        return None
    started = collections.Counter(owners.values())
    return {"count": len(owners), "limit": limit, "grown": [[name, count] for name, count in started.most_common(3)]}


def _thread_limit(most: int = 512) -> int:
    """``most``, or, under an address-space cap, half the thread stacks that fit in
    what is left of it now."""
    cap = resource.getrlimit(resource.RLIMIT_AS)[0]
    if cap == resource.RLIM_INFINITY:
        return most
    stack = threading.stack_size() or resource.getrlimit(resource.RLIMIT_STACK)[0]
    if stack == resource.RLIM_INFINITY or stack <= 0:
        stack = 8 << 20  # (glibc then takes 2 MiB: counted dearer, so sooner)
    used = status_bytes(os.getpid(), "VmSize") or 0
    return max(16, min(most, (cap - used) // stack // 2))


def _threads() -> set[int]:
    """The kernel ids of the process's Python threads: ``threading``'s, and those started
    through ``_thread.start_new_thread``, which ``threading`` never lists (one left
    spinning took ``sin``'s median from 12 to 35 ms for as long as the engine lived, never
    found). The interpreter knows those only by their pthread ids (0.2 us to list)."""
    known = {t.ident: t.native_id for t in threading.enumerate()}
    tids = {tid for tid in known.values() if tid is not None}
    for ident in _current_frames().keys() - known.keys():  # none, nearly always
        if tid := _kernel_id(ident):
            tids.add(tid)
    return tids


def _tasks() -> set[int]:
    """The kernel ids of every thread of this process (none where /proc has no list)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return set()


def _task_count() -> int:
    """How many threads this process has: a task directory's links are its threads plus
    two (procfs), read with one ``stat``; -1 where there is none."""
    try:
        return os.stat("/proc/self/task").st_nlink - 2
    except OSError:
        return -1


def _kernel_id(ident: int) -> int | None:
    """A thread's kernel id from its pthread id, through its CPU-time clock: glibc makes
    the clock's id of the kernel id, as ``~tid << 3 | 6`` (the kernel's own encoding). A
    thread ending meanwhile reads as 0 (none)."""
    try:
        clock = time.pthread_getcpuclockid(ident)
    except (AttributeError, OSError, OverflowError):  # not Linux
        return None
    return ~(clock >> 3) & 0xFFFFFFFF
