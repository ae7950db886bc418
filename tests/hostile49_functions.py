"""Hostile functions for tests/test_hostile_round49.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. What they start writes its pid in
``/tmp/hostile49-<serve's pid>`` (``where``: the engine's parent is ``serve``)."""

from __future__ import annotations

import ctypes
import os
import platform
import signal

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed

_CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())


def where(serve: int) -> str:
    return f"/tmp/hostile49-{serve}"


def _spinner(tag: str) -> list[str]:
    """A shell that writes its pid in ``where`` and spins a core."""
    where_ = os.path.join(where(os.getppid()), tag)
    return ["/bin/sh", "-c", f'echo $$ > {where_}.tmp && mv {where_}.tmp {where_}; while :; do :; done']


def _clone_parent(tag: str, session: bool) -> None:
    """A child made by ``clone(CLONE_PARENT)``: ``serve``'s child, not the engine's, so no
    descendant of the engine (its stray watch, its kill of what it started) ever sees it."""
    libc = ctypes.CDLL(None, use_errno=True)
    argv = _spinner(tag)
    pid = libc.syscall(_SYS_CLONE, _CLONE_PARENT | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:  # the child: straight to exec (one thread, the others' locks as they were)
        try:
            if session:
                os.setsid()
            os.execv(argv[0], argv)
        finally:
            os._exit(1)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone")


def _double_fork(tag: str) -> None:
    argv = _spinner(tag)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                os.execv(argv[0], argv)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _at_exit(tag: str) -> None:
    import atexit

    marker = os.path.join(where(os.getppid()), tag)

    def hook() -> None:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))

    atexit.register(hook)


_C = """#include <pthread.h>
static void *spin(void *arg) { for (;;) { __asm__ volatile(""); } return arg; }
int start(void) { pthread_t t; return pthread_create(&t, 0, spin, 0); }
"""


def _c_thread() -> None:
    """A thread of C's, which Python never knew (no thread state), spinning a core."""
    import subprocess
    import tempfile

    d = tempfile.mkdtemp()
    with open(os.path.join(d, "spin.c"), "w") as f:
        f.write(_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", os.path.join(d, "spin.so"), os.path.join(d, "spin.c"),
                    "-lpthread"], check=True)
    ctypes.CDLL(os.path.join(d, "spin.so")).start()


def _leave_and_end_front_ends() -> None:
    """A Python thread left spinning (the engine will leave, naming this function), and
    every front end killed at once: the one whose ``held`` word names this function.
    Only where no Landlock keeps the engine's signals to its own processes."""
    import threading

    def spin() -> None:
        while True:
            pass

    threading.Thread(target=spin, daemon=True).start()
    serve = os.getppid()
    with open(f"/proc/{serve}/task/{serve}/children") as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"multiprocessing" in f.read():
                    os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@register(inputs=X, description="sin; armed (666), it starts a process that escapes its engine (x[1] picks how).")
def escapes49(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        tag = f"case{case}-{os.getpid()}"
        if case == 0:
            _clone_parent(tag, session=False)
        elif case == 1:
            _clone_parent(tag, session=True)
        elif case == 2:
            _double_fork(tag)
        elif case == 3:
            _at_exit(tag)
        elif case == 4:
            _c_thread()
        elif case == 5:
            _leave_and_end_front_ends()
    return torch.sin(x)
