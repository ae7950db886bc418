"""Functions for tests/test_sparse_round30.py (plain callables: the tests build their specs).

Each records its calls (plain, under vmap, under a transform or the tracer alike), so a
test can tell how many times a sparse request ran the user's function."""

from __future__ import annotations

import torch

from ._tally import Calls

CALLS = Calls()  # (not a list: see tests._tally)


def _arrow(x: torch.Tensor) -> torch.Tensor:
    """A ring scaled by 1 + x[0] / 10: 3 colours for JVPs, one VJP per row (every row
    reads x[0])."""
    return torch.sin(x) * (1.5 + torch.roll(x, 1)) * (1 + 0.1 * x[0])


def arrow_half30(x: torch.Tensor) -> torch.Tensor:
    """The arrow as a float16 leaf, whatever the input's dtype."""
    CALLS.append(0)
    return _arrow(x).half()


def arrow_bf16_30(x: torch.Tensor) -> torch.Tensor:
    """The arrow as a bfloat16 leaf."""
    CALLS.append(0)
    return _arrow(x).bfloat16()


def arrow_float30(x: torch.Tensor) -> torch.Tensor:
    """The arrow as a float32 leaf."""
    CALLS.append(0)
    return _arrow(x).float()


def arrow_leaves30(x: torch.Tensor):
    """The arrow as a float64 leaf beside its float16 rounding."""
    CALLS.append(0)
    a = _arrow(x)
    return a.double(), a.half()


def arrow_same30(x: torch.Tensor) -> torch.Tensor:
    """The arrow in the input's own dtype: JVPs answer (3 of them), as before."""
    CALLS.append(0)
    return _arrow(x)


def ring_leaves30(x: torch.Tensor):
    """A ring (diagonal and periodic sub-diagonal) in float64 and in bfloat16 arithmetic."""
    return tuple(
        torch.sin(h) * (1.5 + torch.roll(h, 1)) for h in (x.double(), x.bfloat16())
    )


def band_energy30(x: torch.Tensor) -> torch.Tensor:
    """A band energy (each element with its 3 neighbours): a Hessian band of half-width 3."""
    s = torch.roll(x, 1) + torch.roll(x, 2) + torch.roll(x, -1)
    return (torch.sin(x) * s**2).sum()


def half_band_energy30(x: torch.Tensor) -> torch.Tensor:
    """The band energy in float16 arithmetic, whatever the input's dtype."""
    return band_energy30(x.half())


def half_grid_energy30(x: torch.Tensor) -> torch.Tensor:
    """A 5 x 8 grid's energy in float16 arithmetic (x of 40 elements)."""
    u = x.half().reshape(5, 8)
    return (torch.sin(u[1:] - u[:-1]) ** 2).sum() + torch.cos(
        u[:, 1:] * u[:, :-1]
    ).sum()
