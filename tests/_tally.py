"""A tally of a test function's calls that the engine's kept-state watch does not reach.

A list a function appends to is state it keeps across calls, which the engine puts back
between its calls of one request (engine.kept_state.Replay: each request sees one state,
as torch's one call does), so a list counted one call a request where the sparse rounds'
tests count the function's every call (plain, under vmap, traced). The count is kept in
a ``ctypes`` array of one integer, which the watch does not reach (a slotted object's members, watched
since parity round 37, and then an ``array.array``, watched since round 39, no longer hid
it: every sparse round's count read one call a request)."""

from __future__ import annotations

import ctypes

__all__ = ["Calls"]


class Calls:
    """``append`` / ``clear`` / ``len`` as a list's, keeping only the count."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = (ctypes.c_int64 * 1)()  # (indexed: a read of .value is one the sparse tracer watches)

    def append(self, _: object) -> None:
        self.n[0] += 1

    def clear(self) -> None:
        self.n[0] = 0

    def __len__(self) -> int:
        return self.n[0]
