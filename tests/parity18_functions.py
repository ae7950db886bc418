"""Functions for tests/test_parity_round18.py, round 18 of PyTorch's own torch.func test
cases replayed over HTTP: test_ops.py's OpInfo sweeps over complex-to-real functions
(sgn, whose derivative is zero for real arguments and not for complex ones)."""

from __future__ import annotations

import torch

from jacobian_service import register


def _z(x: torch.Tensor) -> torch.Tensor:
    """The first half of x as real parts, the second as imaginary ones."""
    n = x.shape[0] // 2
    return torch.complex(x[:n], x[n:])


@register
def complex_sgn(x: torch.Tensor) -> torch.Tensor:
    """view_as_real(sgn(z)): z / |z|, each element's two parts from its own pair of x."""
    return torch.view_as_real(_z(x).sgn())


@register
def complex_sgn_energy(x: torch.Tensor) -> torch.Tensor:
    """A scalar of sgn(z) (a Hessian's), each term from one pair of x."""
    return (torch.sgn(_z(x)).imag * x[: x.shape[0] // 2]).sum()


@register
def real_sgn_times(x: torch.Tensor) -> torch.Tensor:
    """sgn(x) x = |x| away from 0: sgn of a real tensor still has no derivative."""
    return torch.sgn(x) * x
