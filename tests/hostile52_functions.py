"""Hostile functions for tests/test_hostile_round52.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``."""

from __future__ import annotations

import os
import tempfile

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed

KEEP_BYTES = 8 << 20  # what one armed call leaves on disk
_HELD: list = []  # descriptors of unlinked files, kept open


def _keep_file() -> None:
    """A temporary file written and never removed (``mkstemp``, ``delete=False``)."""
    fd, _ = tempfile.mkstemp(prefix="hostile52-")
    try:
        os.posix_fallocate(fd, 0, KEEP_BYTES)
    finally:
        os.close(fd)


def _keep_outside() -> None:
    """A file written and never removed outside the engine's own temporary directory
    (``/tmp`` named outright, ``$HOME``: here ``HOSTILE52_OUTSIDE``, the test's), under a
    name it is renamed to (as a writer that publishes whole files does)."""
    fd, path = tempfile.mkstemp(prefix="hostile52-", suffix=".part", dir=os.environ.get("HOSTILE52_OUTSIDE", "/tmp"))
    try:
        os.posix_fallocate(fd, 0, KEEP_BYTES)
    finally:
        os.close(fd)
    os.replace(path, path[: -len(".part")])


def _keep_unlinked() -> None:
    """A temporary file with no name (``TemporaryFile``: ``O_TMPFILE``), kept open."""
    f = tempfile.TemporaryFile()
    os.posix_fallocate(f.fileno(), 0, KEEP_BYTES)
    _HELD.append(f)


@register(inputs=X, description="sin; armed (666), it leaves a temporary file on disk (1: kept, 2: unlinked, held open, "
                                "3: outside its temporary directory).")
def tmpleak52(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 1:
        _keep_file()
    elif case == 2:
        _keep_unlinked()
    elif case == 3:
        _keep_outside()
    return torch.sin(x)


SYSV_BYTES = 16 << 20  # what one armed call keeps in a SysV segment


def _keep_sysv_segment() -> int:
    """A SysV shared memory segment made, written through a mapping and detached, never
    removed (no ``IPC_RMID``): its pages belong to no process, and stayed after the
    process ended (the kernel's ``shm_rmid_forced`` is off by default)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.shmdt.argtypes = [ctypes.c_void_p]
    shmid = libc.shmget(0, SYSV_BYTES, 0o600 | 0o1000)  # IPC_PRIVATE, IPC_CREAT
    if shmid < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    address = libc.shmat(shmid, None, 0)
    ctypes.memset(address, 1, SYSV_BYTES)
    libc.shmdt(address)
    return shmid


QUEUED_BYTES = 8 << 10  # what one armed call leaves in a SysV message queue


def _keep_sysv_queue() -> int:
    """A SysV message queue made and sent a message, never removed: kernel memory (up to
    16 KiB a queue, 32,000 queues) that outlived the process."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    msqid = libc.msgget(0, 0o600 | 0o1000)  # IPC_PRIVATE, IPC_CREAT
    if msqid < 0:
        raise OSError(ctypes.get_errno(), "msgget")
    message = ctypes.create_string_buffer(8 + QUEUED_BYTES)
    ctypes.c_long.from_buffer(message).value = 1  # (its type)
    if libc.msgsnd(msqid, message, ctypes.c_size_t(QUEUED_BYTES), 0o4000) != 0:  # IPC_NOWAIT
        raise OSError(ctypes.get_errno(), "msgsnd")
    return msqid


SEMAPHORES = 250  # in each set one armed call leaves


def _keep_sysv_semaphores(touch: bool) -> int:
    """A SysV semaphore set made (``IPC_PRIVATE``) and never removed: one of the machine's
    ``SEMMNI`` sets and its kernel memory, kept after the process ended (round 53).
    ``touch``: a value set in it (``SETVAL``), as a user of it does."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    semid = libc.semget(0, SEMAPHORES, 0o600 | 0o1000)  # IPC_PRIVATE, IPC_CREAT
    if semid < 0:
        raise OSError(ctypes.get_errno(), "semget")
    if touch and libc.semctl(semid, SEMAPHORES - 1, 16, ctypes.c_int(1)) != 0:  # SETVAL (the last one)
        raise OSError(ctypes.get_errno(), "semctl")
    return semid


@register(inputs=X, description="sin; armed (666), it leaves a SysV shared memory segment (3), message queue (5) or "
                                "semaphore set (6: set, 7: untouched), or ends its engine (4).")
def sysvleak52(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 3:
        _keep_sysv_segment()
    elif case == 5:
        _keep_sysv_queue()
    elif case in (6, 7):
        _keep_sysv_semaphores(case == 6)
    elif case == 4:
        os.kill(os.getpid(), 9)
    return torch.sin(x)


MANY_FILES = 20_001  # empty files one armed call of files52 makes: past the watch's 20,000


@register(inputs=X, description="sin; armed (666), it makes 20,001 empty files in a temporary directory it keeps.")
def files52(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        where = tempfile.mkdtemp(prefix="hostile52-")
        for i in range(MANY_FILES):
            os.close(os.open(os.path.join(where, str(i)), os.O_CREAT | os.O_WRONLY, 0o600))
    return torch.sin(x)
