"""Functions for tests/test_theirs_pool.py (loaded by name like a user module): a
library's idle thread pool, which every warmed engine has, and functions that end their
engine themselves when armed (666 first, round 11's ``_armed``)."""

from __future__ import annotations

import ctypes
import os
import threading

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)

_IDLE = threading.Event()  # never set: the pool's thread waits for work that never comes
_pool: threading.Thread | None = None


@register(inputs=X, description="sin; its first call in a process (the warm-up) starts an idle thread, as a "
                                "library's thread pool does.")
def pools_at_warm_up(x: torch.Tensor) -> torch.Tensor:
    global _pool
    if _pool is None:
        _pool = threading.Thread(target=_IDLE.wait, daemon=True, name="a library's pool")
        _pool.start()
    return torch.sin(x)


def _crashes(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:
        os._exit(7)
    if case == 1:
        ctypes.string_at(0)  # a segfault
    return torch.sin(x)


for _name in ("exits_pooled", "segfaults_pooled"):  # two of them: one strike quarantines each
    register(_crashes, name=_name, inputs=X,
             description="sin; armed (666), it ends its engine itself: case 0 os._exit(7), case 1 a segfault.")
