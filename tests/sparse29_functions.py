"""Functions for tests/test_sparse_round29.py (plain callables: the tests build their specs).

Each records its calls (plain, under vmap, under a transform or the tracer alike), so a
test can tell how many times a sparse batch ran the user's function."""

from __future__ import annotations

import torch

from ._tally import Calls

CALLS = Calls()  # (not a list: see tests._tally)


def _ring(x: torch.Tensor) -> torch.Tensor:
    """Element i reads x[i] and x[i - 1] (periodic): a diagonal and a sub-diagonal."""
    return torch.sin(x) * (1.5 + torch.roll(x, 1))


def leaves29(x: torch.Tensor):
    """One ring as float64, float32, float16 and bfloat16 output leaves."""
    CALLS.append(0)
    r = _ring(x)
    return r, r.float(), r.half(), r.bfloat16()


def _coupling(x: torch.Tensor) -> torch.Tensor:
    # x[0] as jacrev sees it, detached under the tracer (its tensors are a subclass): the
    # traced pattern misses column 0, and the products prove it wrong (computed densely)
    return x[0] if type(x) is torch.Tensor else x[0].detach()


def wrong_leaves29(x: torch.Tensor):
    """The ring scaled by 1 + x[0] / 10 (column 0 the trace does not see), as float64 and
    float16 leaves."""
    CALLS.append(0)
    r = _ring(x) * (1 + 0.1 * _coupling(x))
    return r, r.half()


def wrong_half_energy29(x: torch.Tensor) -> torch.Tensor:
    """A ring's energy in float16 arithmetic, scaled by 1 + x[0] / 10 (the coupling the
    trace does not see)."""
    CALLS.append(0)
    h = x.half()
    return (torch.sin(h) * torch.roll(h, 1) ** 2 * (1 + 0.1 * _coupling(x).half())).sum()


def float32_laplacian29(x: torch.Tensor) -> torch.Tensor:
    """A 5-point Laplacian of an 8 x 8 grid minus sin(u) (a symmetric Jacobian: 3 JVPs
    read as symmetric where VJPs take 5), returned as float32 whatever the input."""
    CALLS.append(0)
    u = x.reshape(8, 8)
    p = torch.nn.functional.pad(u, (1, 1, 1, 1))
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u
    return (lap - torch.sin(u)).reshape(-1).float()
