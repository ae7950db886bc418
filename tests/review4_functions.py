"""User functions for tests/test_review_round4.py (loaded by name like a user module)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from jacobian_service import Input, ipc, register


@register(inputs=[Input("x", shape=("n",))], description="sin, after making float64 the default dtype.")
def sets_float64(x: torch.Tensor) -> torch.Tensor:
    torch.set_default_dtype(torch.float64)
    return x.sin()


_SCRAWLS = (
    b"[1]",  # no object at all
    b'{"function": ["x"], "tags": ["1:1"]}',  # a function's name that is no name
    b'{"memory": 1}',  # a leak's report that is no report
)


@register(inputs=[Input("x", shape=("n",))],
          description="sin; armed (666, case), it writes a document the engine never writes on its engine's status "
                      "board, and ends the engine (os._exit).")
def scrawls_on_its_board(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1)
    if flat.numel() > 1 and float(flat[0]) == 666.0:
        maps = Path("/proc/self/maps").read_text().split("\n")
        board = ipc.StatusBoard(Path(next(line.split(None, 5)[5] for line in maps if line.endswith(".status"))))
        board._ready, board._beat, board._deadline = 1, time.monotonic(), time.monotonic() + 30
        board._doc = _SCRAWLS[int(float(flat[1]))]
        board._write()
        os._exit(5)
    return torch.sin(x)


def _run_dir() -> Path:
    """The engine's run directory: where its status board, which it maps, lies."""
    maps = Path("/proc/self/maps").read_text().split("\n")
    return Path(next(line.split(None, 5)[5] for line in maps if line.endswith(".status"))).parent


def _fifo_in_place_of(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


@register(inputs=[Input("x", shape=("n",))],
          description="sin; at its warm-up it puts a FIFO in place of its engine's warm-up note, and armed (666) "
                      "in place of the engine's memory budget file, which serve and the front ends read.")
def plants_fifos(x: torch.Tensor) -> torch.Tensor:
    note = ipc.warming_path(_run_dir(), os.getpid())
    if note.is_file() and note.read_text().endswith(" plants_fifos"):  # its own warm-up
        _fifo_in_place_of(note)
        time.sleep(0.5)  # (the supervisor looks at the notes of engines warming up every tick)
    flat = x.detach().reshape(-1)
    if flat.numel() > 1 and float(flat[0]) == 666.0:
        _fifo_in_place_of(ipc.budget_path(_run_dir(), 0))
    return torch.sin(x)
