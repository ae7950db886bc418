"""Functions for tests/test_parity_round22.py, round 22 of PyTorch's own torch.func test
cases replayed over HTTP: custom ``autograd.Function``s as torch's autograd_function_db
(torch/testing/_internal/autograd_function_db.py) and test_eager_transforms.py's
TestAutogradFunction write them: numpy forwards with a hand-written ``vmap``
staticmethod, ``generate_vmap_rule``, ``setup_context``, ``save_for_forward`` and a jvp,
``mark_non_differentiable``, ``mark_dirty``, ``once_differentiable``, a backward that
returns a gradient larger than its input (autograd sums it down), ``set_materialize_grads(False)``,
a float argument with ``needs_input_grad``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jacobian_service import Input, register

from .sparse13_functions import _CubeOnce

V = ("n",)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class NumpyMul(torch.autograd.Function):
    """x * y computed in numpy: no transform sees through it; its vmap rule moves the
    batch dimensions last and calls itself (the db's NumpyMul)."""

    @staticmethod
    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tensor(_np(x) * _np(y), device=x.device)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, y = ctx.saved_tensors
        gx = NumpyMul.apply(g, y) if ctx.needs_input_grad[0] else None
        gy = NumpyMul.apply(g, x) if ctx.needs_input_grad[1] else None
        return gx, gy

    @staticmethod
    def vmap(info: Any, in_dims: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        x_bdim, y_bdim = in_dims
        x = x.movedim(x_bdim, -1) if x_bdim is not None else x.unsqueeze(-1)
        y = y.movedim(y_bdim, -1) if y_bdim is not None else y.unsqueeze(-1)
        return NumpyMul.apply(x, y).movedim(-1, 0), 0

    @staticmethod
    def jvp(ctx: Any, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
        x, y = ctx.saved_tensors
        return tx * y + ty * x


class NumpyCube(torch.autograd.Function):
    """(x ** 3, 3 x ** 2) in numpy, saving an output for backward and forward; its
    backward and jvp through NumpyMul (the db's NumpyCube)."""

    @staticmethod
    def forward(x: torch.Tensor) -> Any:
        a = _np(x)
        return torch.tensor(a**3, device=x.device), torch.tensor(3 * a**2, device=x.device)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(inputs[0], output[1])
        ctx.save_for_forward(inputs[0], output[1])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, g_slope: torch.Tensor) -> torch.Tensor:
        x, slope = ctx.saved_tensors
        return NumpyMul.apply(g, slope) + 6 * NumpyMul.apply(g_slope, x)

    @staticmethod
    def vmap(info: Any, in_dims: Any, x: torch.Tensor) -> Any:
        return NumpyCube.apply(x), (in_dims[0], in_dims[0])

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> Any:
        x, slope = ctx.saved_tensors
        return NumpyMul.apply(t, slope), 6 * NumpyMul.apply(t, x)


class NumpySort(torch.autograd.Function):
    """Sorted values and the (non-differentiable) orders, in numpy (the db's NumpySort)."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int) -> Any:
        a = _np(x)
        ind = np.argsort(a, axis=dim)
        inv = np.argsort(ind, axis=dim)
        return (torch.tensor(np.take_along_axis(a, ind, dim), device=x.device), torch.tensor(ind, device=x.device),
                torch.tensor(inv, device=x.device))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        _, ind, inv = output
        ctx.mark_non_differentiable(ind, inv)
        ctx.save_for_backward(ind, inv)
        ctx.save_for_forward(ind, inv)
        ctx.dim = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, _0: Any, _1: Any) -> Any:
        ind, inv = ctx.saved_tensors
        return NumpyTake.apply(g, inv, ind, ctx.dim), None

    @staticmethod
    def vmap(info: Any, in_dims: Any, x: torch.Tensor, dim: int) -> Any:
        x = x.movedim(in_dims[0], 0)
        dim = dim if dim >= 0 else dim + x.dim() - 1
        return NumpySort.apply(x, dim + 1), (0, 0, 0)

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor, _: Any) -> Any:
        ind, inv = ctx.saved_tensors
        return NumpyTake.apply(t, ind, inv, ctx.dim), None, None


class NumpyTake(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, ind: torch.Tensor, inv: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.tensor(np.take_along_axis(_np(x), _np(ind), dim), device=x.device)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        _, ind, inv, dim = inputs
        ctx.save_for_backward(ind, inv)
        ctx.save_for_forward(ind, inv)
        ctx.dim = dim

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        ind, inv = ctx.saved_tensors
        return NumpyTake.apply(g, inv, ind, ctx.dim), None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: Any, x: torch.Tensor, ind: torch.Tensor, inv: torch.Tensor, dim: int) -> Any:
        x_bdim, ind_bdim, inv_bdim, _ = in_dims
        logical = x.dim() if x_bdim is None else x.dim() - 1
        dim = dim if dim >= 0 else dim + logical

        def lead(t: torch.Tensor, bdim: int | None) -> torch.Tensor:
            return t.expand(info.batch_size, *t.shape) if bdim is None else t.movedim(bdim, 0)

        return NumpyTake.apply(lead(x, x_bdim), lead(ind, ind_bdim), lead(inv, inv_bdim), dim + 1), 0

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor, _i: Any, _j: Any, _: Any) -> torch.Tensor:
        ind, inv = ctx.saved_tensors
        return NumpyTake.apply(t, ind, inv, ctx.dim)


class CubeGenVmap(torch.autograd.Function):
    """(x ** 3, 3 x ** 2), vmap rule generated; its backward (g slope + 6 slope) and jvp
    are the db's, which disagree: jacrev answers the backward, jacfwd the jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> Any:
        return x**3, 3 * x**2

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, outputs: Any) -> None:
        ctx.save_for_backward(inputs[0], outputs[1])
        ctx.save_for_forward(inputs[0], outputs[1])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, g_slope: torch.Tensor) -> torch.Tensor:
        _, slope = ctx.saved_tensors
        return g * slope + 6 * slope

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> Any:
        x, slope = ctx.saved_tensors
        return t * slope, 6 * t * x


class ScaleGrad(torch.autograd.Function):
    """The identity whose backward and jvp both scale by 3.14 (the db's ScaleGradGenVmap):
    its derivative is what the Function says, not the identity's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, outputs: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * 3.14

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t * 3.14


class ZeroGradients(torch.autograd.Function):
    """(x, y) cloned; the backward returns zeros larger than x (3, 4, *x.shape), which
    autograd sums down (the db's ZeroGradientsGenVmap)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, y: torch.Tensor) -> Any:
        return x.clone(), y.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, outputs: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, gx: torch.Tensor, gy: torch.Tensor) -> Any:
        return torch.zeros(3, 4, *gx.shape, dtype=gx.dtype, device=gx.device), torch.zeros(gy.shape, dtype=gy.dtype)

    @staticmethod
    def jvp(ctx: Any, gx: torch.Tensor, gy: torch.Tensor) -> Any:
        return torch.zeros(gx.shape, dtype=gx.dtype), torch.zeros(gy.shape, dtype=gy.dtype)


class NumpyExp_(torch.autograd.Function):
    """exp in place, in numpy (mark_dirty), the db's NumpyExp_."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        a = _np(x)
        np.exp(a, a)
        return x

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.mark_dirty(inputs[0])
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return NumpyMul.apply(g, out)

    @staticmethod
    def vmap(info: Any, in_dims: Any, x: torch.Tensor) -> Any:
        NumpyExp_.apply(x)
        return x, in_dims[0]

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        t.mul_(out)
        return t


class CubeOnce(_CubeOnce):
    """sparse13's cube with a @once_differentiable backward (3 x^2 g, no graph), vmap
    rule generated, given a jvp: torch.func.hessian runs it."""

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        _CubeOnce.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


@register(inputs=[Input("x", shape=V)])
def numpy_cube(x):
    return NumpyCube.apply(x)


@register(inputs=[Input("x", shape=V)])
def numpy_cube_energy(x):
    c, s = NumpyCube.apply(x)
    return (c * x.roll(1)).sum() + s.sum()


@register(inputs=[Input("x", shape=V), Input("y", shape=(3, "n"))])
def numpy_mul(x, y):
    return NumpyMul.apply(x, y)


@register(inputs=[Input("x", shape=(3, "n"))])
def numpy_sort(x):
    return NumpySort.apply(x, 1)[0] * x


@register(inputs=[Input("x", shape=V)])
def cube_gen_vmap(x):
    return CubeGenVmap.apply(x)


@register(inputs=[Input("x", shape=V)])
def scaled_energy(x):
    return (ScaleGrad.apply(x) ** 2 * x.sin()).sum()


@register(inputs=[Input("x", shape=V), Input("y", shape=V)])
def zero_gradients(x, y):
    a, b = ZeroGradients.apply(x, y)
    return a * b + x


@register(inputs=[Input("x", shape=V)])
def numpy_exp(x):
    return NumpyExp_.apply(x.clone()) * x


@register(inputs=[Input("x", shape=V)])
def cube_once_energy(x):
    return (CubeOnce.apply(x) * x.cos()).sum()


class _SplitLazy(torch.autograd.Function):
    """(sin x, cos x) with set_materialize_grads(False): its backward gets None for an
    output that was not used."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> Any:
        return x.sin(), x.cos()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0])
        ctx.x = inputs[0]

    @staticmethod
    def backward(ctx: Any, gs: Any, gc: Any) -> Any:
        (x,) = ctx.saved_tensors
        out = torch.zeros_like(x)
        if gs is not None:
            out = out + gs * x.cos()
        if gc is not None:
            out = out - gc * x.sin()
        return out

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> Any:
        x = ctx.x
        return t * x.cos(), -t * x.sin()


class _Scaled(torch.autograd.Function):
    """a * x with a float argument; needs_input_grad; a vmap rule by hand that moves the
    batch last; a jvp reading what setup_context kept on ctx."""

    @staticmethod
    def forward(x: torch.Tensor, a: float) -> torch.Tensor:
        return a * x

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.a = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        return (ctx.a * g if ctx.needs_input_grad[0] else None), None

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor, _: Any) -> torch.Tensor:
        return ctx.a * t

    @staticmethod
    def vmap(info: Any, in_dims: Any, x: torch.Tensor, a: float) -> Any:
        return _Scaled.apply(x.movedim(in_dims[0], -1), a), x.dim() - 1


@register(inputs=[Input("x", shape=V)])
def lazy_sin(x):
    return _SplitLazy.apply(x)[0] * x


@register(inputs=[Input("x", shape=V)])
def lazy_sin_energy(x):
    return (_SplitLazy.apply(x)[0] ** 2).sum()


@register(inputs=[Input("x", shape=(2, "n"))])
def scaled_moved(x):
    return _Scaled.apply(x, 2.5) * x
