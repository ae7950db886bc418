"""Hostile functions for tests/test_hostile_round29.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``);
otherwise it is ``sin``. Beside them, the innocent function whose name they forge."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from jacobian_service import ipc, register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)


def _board() -> ipc.StatusBoard:
    """The engine's own status board, a file in the run directory it maps (the functions'
    to write: the same user's)."""
    maps = Path("/proc/self/maps").read_text().split("\n")
    path = next(line.split(None, 5)[5] for line in maps if line.endswith(".status"))
    board = ipc.StatusBoard(Path(path))
    board._ready = 1  # (what the engine's own wrote)
    return board


def _forges(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        board = _board()
        now = board.read()
        board.running(now["beat"], now["deadline"], "innocent34", now["tags"])
        os._exit(5)
    return torch.sin(x)


for _name in ("forges34", "forges34b"):  # two of them: one strike quarantines each
    register(_forges, name=_name, inputs=X,
             description="sin; armed (666), it writes innocent34's name on the engine's status board as the function "
                         "running (its own requests' tags kept), then ends the engine (os._exit).")


@register(inputs=X, description="sin: the innocent function whose name forges34 writes.")
def innocent34(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it writes on the engine's status board that bystander34 left a "
                                "thread running, and ends the engine as one that leaves for it does (status 75).")
def strays34(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        board = _board()
        board.leave(board.read()["beat"], {"stray": "bystander34", "left": "a thread running after it returned"})
        os._exit(75)
    return torch.sin(x)


@register(inputs=X, description="sin: the innocent function whose name strays34 writes (never called before it).")
def bystander34(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)
