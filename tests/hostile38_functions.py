"""Hostile functions for tests/test_hostile_round38.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``."""

from __future__ import annotations

import os
import time

import torch
from jacobian_service import register
from jacobian_service.procfs import children

from tests.hostile17_functions import X, _armed


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fp:
            return fp.read()
    except OSError:
        return b""


def _serve_and_front_ends() -> list[int]:
    """``serve`` (the ancestor whose children include the front ends, multiprocessing's
    ``spawn_main``) and its front ends, found in /proc as a red team would."""
    pid = os.getpid()
    for _ in range(4):
        with open(f"/proc/{pid}/stat", "rb") as fp:
            pid = int(fp.read().rsplit(b")", 1)[1].split()[1])  # the parent
        front_ends = [child for child in children(pid) if b"spawn_main" in _cmdline(child)]
        if front_ends:
            return [pid, *front_ends]
    return []


@register(inputs=X, description="sin; armed (666), it first lowers its engine's out-of-memory score adjustment to 0 "
                                "(x[1] = 0), or raises serve's and the front ends' to 1000 and waits 2 s (x[1] = 1).")
def moves_the_oom_score(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        for pid in [os.getpid()] if case == 0 else _serve_and_front_ends():
            with open(f"/proc/{pid}/oom_score_adj", "w") as fp:
                fp.write("0" if case == 0 else "1000")
        if case == 1:
            # serve's check (every 0.5 s) must find it running to name it; serve, reniced
            # to 19, may wait seconds for a CPU on a loaded machine (a 2 s sleep was missed
            # once beside six other test runs)
            time.sleep(5.0)  # (the next out-of-memory kill would be serve's)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it first sets its engine's scheduling autogroup's niceness to 19 "
                                "(x[1] = 0), or serve's (x[1] = 1, then waits 2 s).")
def renices_the_autogroup(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        pid = os.getpid() if case == 0 else _serve_and_front_ends()[0]
        with open(f"/proc/{pid}/autogroup", "w") as fp:
            fp.write("19")
        if case == 1:
            # serve's check (every 0.5 s) must find it running to name it; serve, reniced
            # to 19, may wait seconds for a CPU on a loaded machine (a 2 s sleep was missed
            # once beside six other test runs)
            time.sleep(5.0)
    return torch.sin(x)
