"""Hostile functions for tests/test_hostile_round39.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how, or in the warm-ups that follow; otherwise it is ``sin``."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)


def _run_dir() -> str:
    return sys.argv[sys.argv.index("--run-dir") + 1]


_ERASE = "erase39"  # while this file is in the run directory, erases_its_note's warm-ups misbehave (how: its text)


@register(inputs=X, description="sin; armed (666), it arms its own warm-ups (x[1] = 0: they crash, 1: they hang, 2: they crash, the board first saying ready) and "
                                "ends its engine (os._exit); an armed warm-up first removes its warm-up note.")
def erases_its_note(x: torch.Tensor) -> torch.Tensor:
    note, marker = os.path.join(_run_dir(), f"warming-{os.getpid()}"), os.path.join(_run_dir(), _ERASE)
    if (case := _armed(x)) is not None:
        with open(marker, "w") as f:
            f.write({1: "hang", 2: "ready"}.get(case, "crash"))
        os._exit(3)
    if os.path.exists(note) and os.path.exists(marker):  # its warm-up (the note names it), armed
        with open(marker) as f:
            how = f.read()
        os.remove(note)
        if how == "hang":
            open(os.path.join(_run_dir(), "hanging39"), "w").close()  # (for the test: it hangs from now)
            time.sleep(3600)
        if how == "ready":  # its board says the engine is ready (past its warm-ups), seen by the supervisor
            from jacobian_service.ipc import StatusBoard

            StatusBoard(Path(_run_dir()) / "engine-0.status").set_ready(time.monotonic())
            time.sleep(0.5)
        os._exit(4)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it raises serve's out-of-memory score adjustment to 1000 (as a "
                                "function about to use up the memory would) and answers how many seconds it stayed "
                                "there (at most 2), in place of sin(x[0]).")
def raises_serves_oom_score(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        from tests.hostile38_functions import _serve_and_front_ends

        serve = _serve_and_front_ends()[0]
        path = f"/proc/{serve}/oom_score_adj"
        with open(path) as f:
            taken = f.read()
        with open(path, "w") as f:
            f.write("1000")
        start = time.monotonic()
        while time.monotonic() - start < 2.0:
            with open(path) as f:
                if f.read() == taken:
                    break
            time.sleep(0.002)
        held = time.monotonic() - start
        return torch.cat([torch.tensor([held], dtype=x.dtype), torch.sin(x[1:])])
    return torch.sin(x)


_FRAME = "frame39"  # while this file is in the run directory, frames_victim39's warm-ups in a spare misbehave


@register(inputs=X, description="sin: the function another one would have blamed.")
def victim39(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it arms its warm-ups in a spare and ends its engine (os._exit): "
                                "an armed warm-up in a spare says on the spare's stdin that victim39's warm-up "
                                "began, and ends the spare.")
def frames_victim39(x: torch.Tensor) -> torch.Tensor:
    marker = os.path.join(_run_dir(), _FRAME)
    if _armed(x) is not None:
        open(marker, "w").close()
        os._exit(3)
    if "--standby" in sys.argv and os.path.exists(marker) \
            and os.path.exists(os.path.join(_run_dir(), f"warming-{os.getpid()}")):  # a spare's warm-up, armed
        os.write(0, b"w victim39\n")  # (ipc.say_warming's word)
        os._exit(5)
    return torch.sin(x)
