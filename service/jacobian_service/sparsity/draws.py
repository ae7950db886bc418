"""The random draws of a function that draws random numbers, the same at every call.

``jacrev`` calls the function once: its Jacobian is that of one draw. A sparse
derivative calls it several times (the forward pass, detection, the products, the
checks), and a function that draws its indices (``torch.randint`` / ``randperm`` for a
scatter, a random sub-sample of edges, a dropout mask) would draw anew at each: a
pattern traced at one draw decompresses products made at others, and the values are
silently wrong. So for a function that draws (its forward pass moved torch's generators,
or detection saw it draw), the global generators' states are taken before a call, every
later call starts from them (the same draws), and afterwards they are left where one
call leaves them, as after ``jacrev``.

Generators counted: torch's default CPU generator, CUDA's (once CUDA is initialised),
numpy's global ``np.random`` state and Python's ``random``. A ``torch.Generator`` the
function keeps for itself cannot be put back from here: the tracer sees its draws
(every seeded op is tagged) and the pattern is then checked against the products.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["Draws", "TorchDraws", "replaying"]


class Draws:
    """The global random generators' states at one moment (a full capture costs ~0.2 ms,
    mostly numpy's and Python's states: taken only for functions known to draw)."""

    __slots__ = ("torch", "numpy", "python")

    def __init__(self) -> None:
        self.torch = TorchDraws()
        self.numpy = np.random.get_state(legacy=False)
        self.python = random.getstate()

    def restore(self) -> None:
        self.torch.restore()
        np.random.set_state(self.numpy)
        random.setstate(self.python)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Draws):
            return NotImplemented
        return self.torch == other.torch and _same_numpy(self.numpy, other.numpy) and self.python == other.python

    __hash__ = None  # type: ignore[assignment]


class TorchDraws:
    """torch's default generators' states (about a microsecond): whether a call drew
    from them, and where to rewind them."""

    __slots__ = ("cpu", "cuda")

    def __init__(self) -> None:
        self.cpu = torch.random.get_rng_state()
        # Reading CUDA's state before anything used CUDA would initialise it: not ours to do.
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TorchDraws):
            return NotImplemented
        if not torch.equal(self.cpu, other.cpu):
            return False
        if self.cuda is None or other.cuda is None:
            return self.cuda is None and other.cuda is None
        return len(self.cuda) == len(other.cuda) and all(torch.equal(a, b) for a, b in zip(self.cuda, other.cuda))

    __hash__ = None  # type: ignore[assignment]


def _same_numpy(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """numpy's state dicts (``legacy=False``): nested dicts of arrays and numbers."""
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if isinstance(x, dict):
            if not isinstance(y, dict) or not _same_numpy(x, y):
                return False
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


def replaying(fn: Callable[..., Any], start: Draws) -> Callable[..., Any]:
    """``fn`` that starts every call from the generators' states ``start``: every call
    draws what the first call drew."""

    @functools.wraps(fn)
    def again(*args: Any, **kwargs: Any) -> Any:
        start.restore()
        return fn(*args, **kwargs)

    return again
