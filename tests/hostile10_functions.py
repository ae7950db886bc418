"""Hostile functions for tests/test_hostile_round10.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (``_armed``); the second input
picks what it does, the third carries a pid where one is needed."""

from __future__ import annotations

import os
import resource
import signal
import struct

import torch
from jacobian_service import Input, register

X = [Input("x", shape=("n",))]


def _armed(x: torch.Tensor) -> bool:
    return x.numel() > 0 and float(x.detach().reshape(-1)[0]) == 666.0


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fp:
            kids.extend(int(k) for k in fp.read().split())
    return kids


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as fp:
        return fp.read()


def _front_end() -> int:
    """A front end of this server, found as a red team would: serve's child in serve's session."""
    serve = os.getppid()
    return next(p for p in _children(serve) if os.getsid(p) == os.getsid(serve) and b"spawn_main" in _cmdline(p))


def _spare() -> int:
    return next(p for p in _children(os.getppid()) if b"--standby" in _cmdline(p))


# What each case does to the server's other processes (x[1] picks it; x[2] is a pid).
ATTACKS = {
    0: lambda x: os.kill(os.getppid(), signal.SIGKILL),
    1: lambda x: os.kill(os.getppid(), signal.SIGTERM),
    2: lambda x: os.kill(os.getppid(), signal.SIGINT),
    3: lambda x: os.kill(os.getppid(), signal.SIGSTOP),
    # serve's process group (the front ends'; under pytest, pytest's too): a harmless signal
    4: lambda x: os.killpg(os.getpgid(os.getppid()), signal.SIGCONT),
    5: lambda x: os.kill(-1, 0),  # every process of the user: signal 0 asks only whether it may
    6: lambda x: os.setpriority(os.PRIO_PROCESS, os.getppid(), 19),
    7: lambda x: os.sched_setaffinity(os.getppid(), {0}),
    8: lambda x: resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (16, 16)),
    9: lambda x: os.pidfd_open(os.getppid()),
    10: lambda x: os.kill(int(x[2]), signal.SIGKILL),  # a thread of serve: the signal ends the process
    # Out of the seccomp filter's reach; Landlock's alone:
    11: lambda x: os.kill(_front_end(), signal.SIGKILL),
    12: lambda x: os.kill(_spare(), signal.SIGKILL),
    13: lambda x: os.kill(int(x[2]), signal.SIGURG),  # any other process of the user (the test's canary)
}


@register(inputs=X, description="sin, after acting on another process of the server (x[1] says which way) when "
                                "its first input is 666.")
def signals_the_server(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        ATTACKS[int(x[1])](x.detach().double().tolist())
    return x.sin()


def _corrupt_metrics() -> None:
    """Junk over the engine's sample files in the metrics directory every process
    shares, and a file of its own there."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(folder):
        if name.endswith(f"_{os.getpid()}.db"):
            with open(os.path.join(folder, name), "r+b") as fp:
                fp.seek(8)  # past the length in use: its entries
                fp.write(b"\xff" * 64)
    with open(os.path.join(folder, "gauge.db"), "wb") as fp:
        fp.write(struct.pack("<i", 72) + b"\xff" * 68)


PROBES = {
    20: lambda x: _corrupt_metrics(),
}


@register(inputs=X, description="sin, after misbehaving in the engine (x[1] says how) when its first input is 666.")
def misbehaves(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        PROBES[int(x[1])](x.detach().double().tolist())
    return x.sin()
