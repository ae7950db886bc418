"""Hostile functions for tests/test_logs_round1.py (loaded by name like a user module):
each floods the server's log only when its first input is 666 (round 11's ``_armed``),
the second input picking how; otherwise it is ``sin``."""

from __future__ import annotations

import os
import struct

import torch
from jacobian_service import register

from tests.hostile6_functions import _connected_unix_sockets
from tests.hostile17_functions import X, _armed

FORGED = '2026-01-01 00:00:00,000 INFO jacobian_service.access: "GET /forged HTTP/1.1" 200'

# What each case writes on its engine's connections to the front ends, a message at a
# time: bytes that are no reply (0), a header without an id (1), one that is no object (2).
MESSAGES = {0: b"not json", 1: b"{}", 2: b"[1]"}


@register(inputs=X, description="sin; armed (666), it first writes x[2] messages (one frame each) on its engine's "
                                "connections to the front ends, each one no reply (x[1] says how).")
def floods_its_connection(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        frame = MESSAGES[case]
        message = struct.pack("<IQ", 1, len(frame)) + frame
        for fd in _connected_unix_sockets():
            os.write(fd, message * int(float(x.reshape(-1)[2])))
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it first sets an environment variable whose name (PYTHON...) has a "
                                "newline, a line like the server's own access line and a terminal's clear-screen "
                                "sequence (the engine names it in its log as it puts the environment back).")
def names_a_variable(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        os.environ["PYTHON_LOGS1\n" + FORGED + "\x1b[2J"] = "1"
    return torch.sin(x)
