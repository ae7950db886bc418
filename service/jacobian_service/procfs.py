"""What Linux's ``/proc`` says of a process tree: its children and descendants, their
sessions, CPU time and memory.

Torch-free and dependency-free: the engine's watch for stray threads and processes
(``engine.strays``) reads it, so does the supervisor (the orphans it took in:
``orphans``), and so do the benchmarks (a server's CPU per request). Elsewhere than
Linux there is no ``/proc``: no descendants, no CPU times.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

__all__ = ["children", "cpu_seconds", "descendants", "descriptor_identity", "dumpable", "living", "session",
           "set_dumpable", "start_ticks", "status_bytes", "stopped", "sysv_queues", "sysv_segments",
           "sysv_semaphores", "waited_seconds"]

_TICKS_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PF_EXITING = 0x4  # a task's flags (include/linux/sched.h)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a child belongs to the thread that forked
    it: every thread is asked)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fp:
                found.extend(int(c) for c in fp.read().split())
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Children, grandchildren...: a process that left ``pid``'s process group (``setsid``)
    is still its child. (One whose parent has exited is out of reach, unless a subreaper
    above took it in: ``orphans``.)"""
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        found.extend(kids)
        todo.extend(kids)
    return found


def cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User plus system CPU time of a process, or of one of its threads (by kernel id);
    None once it has gone, or is a zombie."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": the name may hold spaces
        if fields[0] == b"Z":
            return None
        return (int(fields[11]) + int(fields[12])) / _TICKS_S  # utime, stime: fields 14 and 15
    except (OSError, IndexError, ValueError):
        return None


def waited_seconds(pid: int, thread: int | None = None) -> float:
    """The time a thread (or a process's main thread) has spent runnable, waiting for a
    CPU: the run-queue delay, ``schedstat``'s second field. A task that spins on a loaded
    host runs only its share of a core but waits the rest of the time; one that sleeps
    waits only for its wake-ups. 0 where there is no ``schedstat`` (a kernel without
    scheduler statistics) or the task has gone."""
    try:
        with open(f"/proc/{pid}/schedstat" if thread is None else f"/proc/{pid}/task/{thread}/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot): with its pid, who it is, as a pid
    alone may have been reused. None once it has gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22
    except (OSError, IndexError, ValueError):
        return None


def session(pid: int) -> tuple[int, bool] | None:
    """The session ``pid`` is in, and whether it has ended (a zombie, not yet collected);
    None once it has gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[3]), fields[0] == b"Z"  # fields 6 and 3
    except (OSError, IndexError, ValueError):
        return None


def living(pid: int) -> bool:
    """Whether ``pid`` runs and is not on its way out: a process that is exiting
    (``PF_EXITING``, set before the kernel closes its descriptors) or a zombie is not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0] not in (b"Z", b"X") and not int(fields[6]) & _PF_EXITING  # fields 3 and 9
    except (OSError, IndexError, ValueError):
        return False


def stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal (SIGSTOP, SIGTSTP...: state ``T``). Not a
    tracer's stop (``t``: a debugger or py-spy looking at it for a moment)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"T"  # field 3
    except (OSError, IndexError):
        return False


def status_bytes(pid: int, field: str) -> int | None:
    """A memory field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) in bytes; None where
    there is none."""
    try:
        with open(f"/proc/{pid}/status") as fp:
            for line in fp:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def _sysv(kind: str, columns: tuple[str, ...], by: str, pid: int) -> list[tuple[int, ...]]:
    """Of ``/proc/sysvipc/<kind>``, the ``columns`` of the rows whose ``by`` is ``pid``
    (empty where there is none, or its header lacks one of them)."""
    try:
        with open(f"/proc/sysvipc/{kind}", "rb") as f:
            header, *rows = f.read().splitlines()
    except (OSError, ValueError):
        return []
    names = header.split()
    try:
        at = [names.index(name.encode()) for name in columns]
        key = names.index(by.encode())
    except ValueError:
        return []
    found = []
    for row in rows:
        fields = row.split()
        try:
            if int(fields[key]) == pid:
                found.append(tuple(int(fields[i]) for i in at))
        except (IndexError, ValueError):
            continue
    return found


def sysv_segments(creator: int) -> list[tuple[int, int, int]]:
    """The SysV shared memory segments ``creator`` made that still exist (``shmget``):
    each as its id, the bytes of its pages in memory (its size where the kernel does not
    say) and how many mappings it has. Empty where there is no ``/proc/sysvipc``."""
    found = _sysv("shm", ("shmid", "rss", "nattch"), "cpid", creator)
    return found or _sysv("shm", ("shmid", "size", "nattch"), "cpid", creator)  # type: ignore[return-value]


def sysv_queues(sender: int) -> list[tuple[int, int]]:
    """The SysV message queues ``sender`` was the last to send to (``msgsnd``; the kernel
    names no queue's maker): each as its id and the bytes of the messages it holds."""
    return _sysv("msg", ("msqid", "cbytes"), "lspid", sender)  # type: ignore[return-value]


def sysv_semaphores(owner: int) -> list[tuple[int, int, int, int, int]]:
    """The SysV semaphore sets user ``owner`` made that still exist (``semget``): each as
    its id, its number of semaphores, its key (0: ``IPC_PRIVATE``), and when it was last
    operated on (``semop``; 0: never) and last changed (made, or a value set). The
    kernel names no set's maker: which process last operated on each semaphore is asked
    of the set itself (``semctl(GETPID)``)."""
    return _sysv("sem", ("semid", "nsems", "key", "otime", "ctime"), "cuid", owner)  # type: ignore[return-value]


def descriptor_identity(fd: int) -> tuple[int, int] | None:
    """What descriptor ``fd`` is open on (device, inode); None when it is not open: a
    descriptor closed and its number taken by another file reads as a change."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4


@functools.cache
def _prctl() -> Callable[..., int]:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def dumpable() -> bool:
    """Whether this process is dumpable: only then may another process of its user open
    its ``/proc/PID/fd`` and ``/proc/PID/mem``, or trace it."""
    return bool(_prctl()(_PR_GET_DUMPABLE, 0, 0, 0, 0))


def set_dumpable(on: bool) -> None:
    _prctl()(_PR_SET_DUMPABLE, int(on), 0, 0, 0)
