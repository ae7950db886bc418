"""Hostile functions for tests/test_hostile_round31.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``."""

from __future__ import annotations

import os
import resource
import struct
import tempfile

import torch
from jacobian_service import register

from tests.hostile6_functions import _connected_unix_sockets
from tests.hostile10_functions import _front_end, _spare  # found in /proc, as a red team would
from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)


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


@register(inputs=X, description="sin; armed (666), it first writes on its engine's connections to the front ends the "
                                "start of a message of one frame of 2^(x[1]) bytes, and no more.")
def claims_a_frame(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        for fd in _connected_unix_sockets():  # its connections to the front ends (in /proc/self/fd)
            os.write(fd, struct.pack("<IQ", 1, 1 << case))
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it first fills the file system of its temporary directory (where "
                                "the server's run directory is) with a file it leaves there, then ends its engine if "
                                "x[1] is 1.")
def fills_the_disk(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
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
