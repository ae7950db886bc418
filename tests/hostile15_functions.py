"""Hostile functions for tests/test_hostile_round15.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``."""

from __future__ import annotations

import os
import sys

import torch
from jacobian_service import Input, register

X = [Input("x", shape=("n",))]


def _armed(x: torch.Tensor) -> int | None:
    """The case asked for (the second input), or None: behave."""
    flat = x.detach().reshape(-1)
    if flat.numel() > 1 and float(flat[0]) == 666.0:
        return int(float(flat[1]))
    return None


# ------------------------------------------------------------ what a function writes to stdout/stderr

FLOOD_BYTES = 64 << 20


@register(inputs=X, description="sin; armed (666), it writes 64 MB to its engine's stdout or stderr first.")
def floods_output(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 1:  # short lines, straight to descriptor 1
        line = b"floods_output: " + b"x" * 64 + b"\n"
        block = line * ((1 << 20) // len(line))
        for _ in range(FLOOD_BYTES // len(block)):
            os.write(1, block)
    elif case == 2:  # one line without an end, through sys.stderr
        chunk = "y" * (1 << 20)
        for _ in range(FLOOD_BYTES >> 20):
            sys.stderr.write(chunk)
        sys.stderr.flush()
    elif case == 3:  # a line, printed: it reaches serve's log (under the budget)
        print("floods_output says hello")
    return torch.sin(x)
