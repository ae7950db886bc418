"""Functions for tests/test_parity_round17.py, round 17 of PyTorch's own torch.func test
cases replayed over HTTP: custom autograd.Functions whose jvp and backward disagree
(test_eager_transforms.py's TestAutogradFunction cases with a jvp staticmethod), with and
without a vmap rule."""

from __future__ import annotations

from typing import Any

import torch

from jacobian_service import Input, register


class _Cube(torch.autograd.Function):
    """a ** 3 with its backward (3 a^2 g) and a jvp that says ``_slope`` a^k t: right for
    this class, wrong (2 a t) for :class:`_CubeWrongJvp`. Its vmap rule is generated."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor) -> torch.Tensor:
        return a**3

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return 3 * a**2 * g

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return 3 * a**2 * t


class _CubeWrongJvp(_Cube):
    """The jvp disagrees with the backward: torch.func.hessian of sum(cube(x) roll(x))
    (forward over reverse) takes the jvp for the cross terms, reverse over reverse the
    backward: 4.5 apart at x = linspace(0.6, 1.6, 5), and torch's is not symmetric."""

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return 2 * a * t


class _CubeNoVmap(_Cube):
    """No vmap rule: torch.func.hessian raises ('You tried to vmap over ...')."""

    generate_vmap_rule = False


class _CubeWrongJvpNoVmap(_CubeWrongJvp):
    generate_vmap_rule = False


def _energy(cube: type[torch.autograd.Function]) -> Any:
    def energy(x: torch.Tensor) -> torch.Tensor:
        return (cube.apply(x) * x.roll(1)).sum()

    return energy


def _energy_probed(cube: type[torch.autograd.Function]) -> Any:
    def energy(x: torch.Tensor) -> torch.Tensor:
        c = torch.tensor(x.detach().tolist(), dtype=x.dtype)  # the tracer cannot read values: probed
        return (cube.apply(x) * x.roll(1) * c).sum()

    return energy


wrong_jvp_energy = _energy(_CubeWrongJvp)
wrong_jvp_energy_no_vmap = _energy(_CubeWrongJvpNoVmap)
wrong_jvp_energy_no_vmap_probed = _energy_probed(_CubeWrongJvpNoVmap)
cube_energy_no_vmap = _energy(_CubeNoVmap)
for _name in ("wrong_jvp_energy", "wrong_jvp_energy_no_vmap", "wrong_jvp_energy_no_vmap_probed", "cube_energy_no_vmap"):
    register(name=_name, inputs=[Input("x", shape=("n",))])(globals()[_name])


@register(inputs=[Input("x", shape=("n",)), Input("w", shape=("n",))])
def loss_and_penalty(x, w):
    """(sum((x w)^2), sum(w^2)): under vmap(in_dims=(0, None)) the penalty depends on the
    shared w alone, and so does its derivative in w (torch's vmap leaves both unbatched)."""
    return ((x * w) ** 2).sum(), (w**2).sum()


@register(inputs=[Input("x", shape=("n",))])
def sin_in_tuple(x):
    """A tuple of one output, (sin x,): its cotangents are a tuple of one, as torch's vjp takes them."""
    return (x.sin(),)
