"""Hostile functions for tests/test_hostile_round31.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``."""

from __future__ import annotations

import os
import resource
import socket
import struct

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fp:
                found += [int(child) for child in fp.read().split()]
        except OSError:  # a thread gone meanwhile
            pass
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fp:
            return fp.read()
    except OSError:
        return b""


def _front_end() -> int:
    """A front end of this server, found as a red team would: serve's child running uvicorn."""
    return next(p for p in _children(os.getppid()) if b"spawn_main" in _cmdline(p))


def _spare() -> int:
    return next(p for p in _children(os.getppid()) if b"--standby" in _cmdline(p))


# What each case does to another process of the server, out of Landlock's signal scope
# (x[1] picks it): each would have left that process unable to serve, or slowed it.
ATTACKS = {
    0: lambda: resource.prlimit(_front_end(), resource.RLIMIT_NOFILE, (12, 12)),  # accepts no connection
    1: lambda: resource.prlimit(_front_end(), resource.RLIMIT_CPU, (1, 1)),  # ends it
    2: lambda: resource.prlimit(_front_end(), resource.RLIMIT_AS, (1 << 28, 1 << 28)),  # its next allocations fail
    3: lambda: os.sched_setscheduler(_front_end(), os.SCHED_IDLE, os.sched_param(0)),  # runs when nothing else does
    4: lambda: os.setpriority(os.PRIO_PROCESS, _front_end(), 19),
    5: lambda: os.sched_setaffinity(_front_end(), {min(os.sched_getaffinity(0))}),
    6: lambda: resource.prlimit(_spare(), resource.RLIMIT_NOFILE, (12, 12)),  # the next engine, once promoted
    7: lambda: os.setpriority(os.PRIO_PGRP, os.getpgid(_spare()), 19),
}


@register(inputs=X, description="sin; armed (666), it first sets a limit, priority, scheduling policy or affinity of "
                                "another process of the server (x[1] says which).")
def limits_the_server(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        ATTACKS[case]()
    return torch.sin(x)


def _connections() -> list[int]:
    """The engine's connections to its front ends: its connected Unix stream sockets,
    found in /proc/self/fd as a red team would."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            probe = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # the listing's own descriptor, gone
            continue
        with probe:
            if probe.family == socket.AF_UNIX and probe.type == socket.SOCK_STREAM \
                    and not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found.append(int(name))
    return found


@register(inputs=X, description="sin; armed (666), it first writes on its engine's connections to the front ends the "
                                "start of a message of one frame of 2^(x[1]) bytes, and no more.")
def claims_a_frame(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        for fd in _connections():
            os.write(fd, struct.pack("<IQ", 1, 1 << case))
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it first fills the file system of its temporary directory (where "
                                "the server's run directory is) with a file it leaves there, then ends its engine if "
                                "x[1] is 1.")
def fills_the_disk(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        import tempfile
        block = b"\xff" * (1 << 20)
        with open(os.path.join(tempfile.gettempdir(), f"filler-{os.getpid()}"), "ab") as fp:
            try:
                while True:
                    fp.write(block)
                    fp.flush()
            except OSError:
                pass
        if case == 1:
            os._exit(3)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it first truncates its engine's status board (a file in the run "
                                "directory, which the supervisor maps) to nothing.")
def truncates_its_board(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        with open("/proc/self/maps") as fp:
            board = next(line.split(None, 5)[5].strip() for line in fp if line.rstrip().endswith(".status"))
        os.truncate(board, 0)
    return torch.sin(x)
