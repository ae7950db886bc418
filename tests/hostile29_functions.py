"""Hostile functions for tests/test_hostile_round25.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the function they harm."""

from __future__ import annotations

import ctypes
import re
import struct
import sys
import time

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)

# The first value of a victim's input: what the attacker looks for in the shared memory.
MARK = 12345.678
_MARK = struct.pack("<d", MARK)
_PROT_READ, _PROT_WRITE = 1, 2


@register(inputs=X, description="2 x: another caller's function (its input large enough for shared memory).")
def doubles29(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def _shared_mappings() -> list[tuple[int, int]]:
    """This process's mappings of the channel's segments (memfd ``jacobian-shared``)."""
    with open("/proc/self/maps") as f:
        return [(int(m[1], 16), int(m[2], 16) - int(m[1], 16))
                for m in (re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line) for line in f if "jacobian-shared" in line)]


def _writable(start: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            if line.startswith(f"{start:x}-"):
                return line.split()[1][1] == "w"
    return False


@register(inputs=X, description="sin; armed (666), it waits for a victim's input in the shared memory its "
          "engine maps and rewrites it (making the mapping writable first, with mprotect, where it is not).")
def rewrites_inputs29(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is None:
        return torch.sin(x)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    print("rewrites_inputs29 waiting", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for start, size in _shared_mappings():
            at = ctypes.string_at(start, size).find(_MARK)
            if at < 0:
                continue
            libc.mprotect(start, size, _PROT_READ | _PROT_WRITE)  # fails on a sealed, read-only mapping
            if not _writable(start):
                raise RuntimeError(f"found a victim's input at {start + at:#x}: read-only")
            n = 64
            ctypes.memmove(start + at + 8, struct.pack(f"<{n}d", *([-1.0] * n)), 8 * n)  # its mark stays
            return torch.sin(x)
        time.sleep(0.01)  # the attacker's own polling: the victim's input comes when it comes
    raise RuntimeError("no victim's input seen")
