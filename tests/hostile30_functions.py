"""Hostile functions for tests/test_hostile_round26.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``);
otherwise it is ``sin``. Beside them, the function whose large answer they harm."""

from __future__ import annotations

import mmap
import os
import re
import struct
import sys

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)

_NAN = struct.pack("<d", float("nan"))


@register(inputs=X, description="2 cumsum(x): another caller's function, its Jacobian (2 x lower-triangular "
          "ones) large enough for shared memory.")
def cumsum30(x: torch.Tensor) -> torch.Tensor:
    return 2 * torch.cumsum(x, 0)


def _channel_memfds() -> list[int]:
    """This process's descriptors of the channel's shared memory (memfds it names ``jacobian-...``)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:jacobian"):
                fds.append(int(name))
        except OSError:
            continue
    return fds


def _rewrite_mappings() -> int:
    """NaN over every writable mapping of the channel's memory: bytes rewritten."""
    import ctypes

    done = 0
    with open("/proc/self/maps") as f:
        found = [m for m in (re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+) .*memfd:jacobian", line) for line in f) if m]
    for m in found:
        start, end = int(m[1], 16), int(m[2], 16)
        if m[3][1] == "w":
            ctypes.memmove(start, _NAN * ((end - start) // 8), end - start)
            done += end - start
    return done


def _rewrite_descriptors() -> int:
    """NaN through every descriptor of the channel's memory, opened again writable through
    /proc/self/fd: by write(2), then through a writable mapping. Bytes rewritten."""
    done = 0
    for fd in _channel_memfds():
        try:
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        except OSError:
            continue
        try:
            size = os.fstat(rw).st_size
            if not size:
                continue
            try:
                done += os.pwrite(rw, _NAN * (size // 8), 0)
                continue
            except OSError:
                pass
            try:
                with mmap.mmap(rw, size) as m:
                    m[:] = _NAN * (size // 8)
                    done += size
            except (OSError, ValueError):
                pass
        finally:
            os.close(rw)
    return done


@register(inputs=X, description="sin; armed (666), it writes NaN over the channel's shared memory in its "
          "engine: every writable mapping of it, and every descriptor of it opened again writable.")
def rewrites_results30(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        found = len(_channel_memfds())
        done = _rewrite_mappings() + _rewrite_descriptors()
        print(f"rewrites_results30 found {found} descriptors, rewrote {done} bytes", file=sys.stderr, flush=True)
    return torch.sin(x)
