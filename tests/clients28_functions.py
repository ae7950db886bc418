"""Functions for tests/test_hostile_round28_clients.py (loaded by name like a user module)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from jacobian_service import Input, register


def gate(number: int) -> Path:
    """The file whose creation lets :func:`holds_the_engine` of ``number`` return."""
    # Not tempfile.gettempdir(): an engine's is a directory of its own (Supervisor._start).
    return Path("/tmp") / f"clients28-gate-{number}"


@register(inputs=[Input("x", shape=("n",))],
          description="2 x, once the file gate(x[0]) names exists (at most 30 s): holds its engine until then.")
def holds_the_engine(x: torch.Tensor) -> torch.Tensor:
    path, deadline = gate(int(x[0])), time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:  # (another process's event: a file)
        time.sleep(0.005)
    return 2 * x
