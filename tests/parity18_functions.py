"""Functions for tests/test_parity_round18.py, round 18 of PyTorch's own torch.func test
cases replayed over HTTP: test_ops.py's OpInfo sweeps over complex-to-real functions
(sgn, whose derivative is zero for real arguments and not for complex ones), and
TestHessian / test_vmap.py cases over custom autograd.Functions without a jvp or a vmap
rule (a backward that cuts its graph; a jvp that disagrees with the backward)."""

from __future__ import annotations

from typing import Any

import torch
from jacobian_service import register

from .parity17_functions import _CubeWrongJvpNoVmap, _energy
from .sparse13_functions import _CubeOnce


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


class _CubeNoJvp(_CubeOnce):
    """a ** 3 with a backward (3 a^2 g) that keeps its graph, and neither a jvp nor a
    vmap rule: torch.func.hessian cannot run, reverse over reverse can."""

    generate_vmap_rule = False

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return 3 * a**2 * g


class _CubeNoJvpDetached(_CubeNoJvp):
    """Its backward cuts its graph (a.detach()): reverse over reverse finds no 6 a term,
    so the Hessian's diagonal comes out 0 where it is 6 a roll(a)."""

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return 3 * a.detach() ** 2 * g


# sum(cube(x) roll(x)) of each (round 17's energy)
_detached, _no_jvp = _energy(_CubeNoJvpDetached), _energy(_CubeNoJvp)
# round 17's Function whose jvp (2 a t) disagrees with its backward (3 a^2 g), no vmap rule:
# torch.func.hessian raises; torch.func.jvp of the gradient, one tangent, answers through the jvp
_wrong_jvp = _energy(_CubeWrongJvpNoVmap)


@register
def cube_energy_detached(x: torch.Tensor) -> torch.Tensor:
    return _detached(x)


@register
def cube_energy_no_jvp(x: torch.Tensor) -> torch.Tensor:
    return _no_jvp(x)


@register
def wrong_jvp_energy_no_vmap(x: torch.Tensor) -> torch.Tensor:
    return _wrong_jvp(x)
