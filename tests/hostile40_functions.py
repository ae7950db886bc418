"""Hostile functions for tests/test_hostile_round40.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), or in
the warm-ups that follow; otherwise it is ``sin``."""

from __future__ import annotations

import os
import sys
import time

import torch
from jacobian_service import register

# the input, and the case it asks for (666 first)
from tests.hostile17_functions import X, _armed


def _run_dir() -> str:
    return sys.argv[sys.argv.index("--run-dir") + 1]


_FORGE = "forge40"  # while this file is in the run directory, forges_warm40's warm-ups in a spare misbehave


@register(inputs=X, description="sin; armed (666), it arms its warm-ups in spares and ends its engine (os._exit): "
                                "an armed warm-up in a spare removes its note, says 'warm' on the spare's stdin "
                                "(the word the spare itself says once warm) and hangs.")
def forges_warm40(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        open(os.path.join(_run_dir(), _FORGE), "w").close()
        os._exit(3)
    note = os.path.join(_run_dir(), f"warming-{os.getpid()}")
    if "--standby" in sys.argv and os.path.exists(note) and os.path.exists(os.path.join(_run_dir(), _FORGE)):
        os.remove(note)
        os.write(0, b"warm\n")
        open(os.path.join(_run_dir(), "forged40"), "w").close()  # (for the test: it hangs from now)
        time.sleep(3600)
    return torch.sin(x)


@register(inputs=X, description="sin: after forges_warm40 in the warm-up order.")
def after40(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)
