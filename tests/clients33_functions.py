"""Functions for tests/test_hostile_round33_clients.py (loaded by name like a user module)."""

from __future__ import annotations

import time

import torch
from jacobian_service import Input, register

from ._tally import Calls

# counted_outer's calls (the test's server runs its engines on threads of the test's own
# process: the test reads what the engine ran), in a tally the engine's kept-state watch
# does not see (tests._tally): a Counter it saw was state the function keeps.
CALLS = Calls()
SLEEP_S = 0.5


@register(inputs=[Input("x", shape=("n",))],
          description="The outer product x x^T after 0.5 s, its calls counted: a slow evaluate whose answer "
                      "(n^2 numbers) is a large one, held on the stream budget while it is sent.")
def counted_outer(x: torch.Tensor) -> torch.Tensor:
    CALLS.append(1)
    time.sleep(SLEEP_S)
    return torch.outer(x, x)
