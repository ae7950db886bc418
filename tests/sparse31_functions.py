"""Functions for tests/test_sparse_round31.py (plain callables: the tests build their specs).

Each records its calls (plain, under vmap, under a transform or the tracer alike), so a
test can tell how many times a sparse request ran the user's function."""

from __future__ import annotations

import torch

from ._tally import Calls

CALLS = Calls()  # (not a list: see tests._tally)


def _chain(x: torch.Tensor, steps: int) -> torch.Tensor:
    """A periodic band widened at each step (roll, multiply): many traced entries per element."""
    for _ in range(steps):
        x = x + 0.01 * torch.roll(x, 1) * torch.roll(x, -2)
    return x


def wide_chain31(x: torch.Tensor) -> torch.Tensor:
    """Twelve steps of a widening band: its detection handles ~300 entries per element."""
    CALLS.append(0)
    return _chain(x, 12)


def branching_chain31(x: torch.Tensor) -> torch.Tensor:
    """The same chain where x[0] > 0, a cheap square elsewhere: the branch reads a value
    before any work, so each point is detected (or refused) on its own."""
    CALLS.append(0)
    if bool(x[0] > 0):
        return _chain(x, 12)
    return x**2


def _arrow(x: torch.Tensor) -> torch.Tensor:
    """A ring scaled by 1 + x[0] / 10: 3 colours for JVPs, one VJP per row."""
    return torch.sin(x) * (1.5 + torch.roll(x, 1)) * (1 + 0.1 * x[0])


def arrow_f32_inside31(x: torch.Tensor) -> torch.Tensor:
    """The arrow computed in float32, returned in the input's dtype (float64)."""
    CALLS.append(0)
    return _arrow(x.float()).to(x.dtype)


def arrow_cast_only31(x: torch.Tensor) -> torch.Tensor:
    """The arrow in the input's dtype of the input's float32 rounding: jacrev's VJP
    rounds each cotangent to float32 at the cast, which a JVP's 0 / 1 seed does not."""
    CALLS.append(0)
    return _arrow(x.float().to(x.dtype))


def arrow_f32_constant31(x: torch.Tensor) -> torch.Tensor:
    """The arrow in the input's dtype times a float32 constant (no input in it): JVPs
    still (a guard)."""
    CALLS.append(0)
    return _arrow(x) * torch.linspace(1, 2, x.numel(), dtype=torch.float32)
