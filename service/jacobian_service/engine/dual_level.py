"""Forward mode beside a dual level another thread holds (the in-process layout).

torch keeps forward-AD dual levels in one process-wide list, not per thread, and
``torch.func.jvp`` enters a level of its own only when it is the outermost jvp, which it
learns from a module global (``eager_transforms.JVP_NESTING``), shared by every thread too.
Under the in-process layout (``serve --in-process``, an app embedded in the caller's
program, the tests' server) the engine's thread shares both with the caller's: a caller
inside ``torch.autograd.forward_ad.dual_level()`` (a remote function called on a dual
tensor, ``gradcheck(check_forward_ad=True)``) that asked for a jvp or an hvp got 500
"Nested forward mode AD is not supported at the moment".

While another thread holds a level, the engine's forward-mode work runs as a nested jvp
would: under that level, functorch's own levels (per thread) keeping its tangents apart
from the holder's. The holder is waiting for this answer, so its level outlives the work.
An engine process holds no level between batches (``process_settings`` exits a level a
function left), so there this is never entered.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.autograd.forward_ad as _forward_ad

__all__ = ["beside_a_held_dual_level"]

try:
    from torch._functorch import eager_transforms as _eager
except ImportError:  # a torch without it: nothing to share
    _eager = None  # type: ignore[assignment]


# What a batch runs in where no level is held (an engine process, always): one context
# kept, not a generator's made and entered per batch.
_NOTHING_HELD = contextlib.nullcontext()


def beside_a_held_dual_level() -> contextlib.AbstractContextManager[None]:
    """Around a batch: torch.func's forward mode nests under a dual level already entered."""
    if _eager is None or not hasattr(_eager, "JVP_NESTING") or _forward_ad._current_level < 0:
        return _NOTHING_HELD
    return _nested()


@contextlib.contextmanager
def _nested() -> Iterator[None]:
    _eager.JVP_NESTING += 1
    try:
        yield
    finally:
        _eager.JVP_NESTING -= 1
