"""Functions for tests/test_sparse_round27.py (plain callables: the tests build their specs).

Each records its calls (plain, under vmap, under a transform or the tracer alike), so a
test can tell how many times a sparse request alone and a sparse batch ran the user's
function."""

from __future__ import annotations

import torch

from ._tally import Calls

CALLS = Calls()  # (not a list: see tests._tally)


def counted27(x: torch.Tensor):
    """lorenz96's right-hand side (a periodic band), with aux: its input's sum and a label."""
    CALLS.append(type(x).__name__)
    y = (torch.roll(x, -1) - torch.roll(x, 2)) * torch.roll(x, 1) - x + 8.0
    return y, {"total": x.sum(), "label": "lz"}


def picky27(x: torch.Tensor) -> torch.Tensor:
    """Raises for an input whose first element is negative (a data error of one request's)."""
    CALLS.append(type(x).__name__)
    if bool(x[0] < 0):
        raise ValueError("negative first element")
    return torch.sin(x) * torch.roll(x, 1)


def deep27(x: torch.Tensor) -> torch.Tensor:
    """A hundred elementwise steps: cheap to call, and its detection handles 100 entries
    per element (past a small engine's detection work limit)."""
    CALLS.append(type(x).__name__)
    for _ in range(100):
        x = torch.sin(x)
    return x


def picked27(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] squared, idx an input: the pattern follows idx (value dependent)."""
    CALLS.append(type(x).__name__)
    return x[idx] ** 2
