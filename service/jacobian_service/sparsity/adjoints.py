"""The backward ops a gradient taken inside a traced function runs, as the forward ops
whose vector-Jacobian products they are.

A function that computes a force as ``-torch.func.grad(E)(x)`` (or an adjoint, or a
gradient-descent step) runs aten's backward ops: ``convolution_backward``,
``avg_pool2d_backward``, ``native_layer_norm_backward``, ``upsample_linear1d_backward``,
... Each sums the cotangent over the places each element reached in the forward op, so
none is elementwise, and the tracer took them as dense: the force of a 1-D convolution
energy over 16 points stored all 256 entries for 74.

``grad_z = J_F(z)^T g`` for the forward op ``F`` over its differentiated arguments
``z``: element ``k`` of ``grad_z`` reads the cotangent where ``F``'s outputs reach
``k`` (``L^T g``, ``L`` the forward op's links, outputs x arguments), and, where ``F``
is not linear, the arguments that meet ``k`` in the second derivative of one of those
outputs (``(L^T L) o H``, ``H`` the pairs ``F`` makes). The tracer finds ``L`` and
``H`` by tracing ``F`` itself on its arguments with one dependency each (see
``_Tracer.adjoint``), so every forward rule (a constant kernel's zero taps, pooling
windows, interpolation weights) serves its backward op too. This module only says, for
each backward op, which forward op with which arguments it is the adjoint of.

Saved statistics (``mean`` / ``rstd`` of the normalization layers, a loss's total
weight) are values of the forward's own arguments; their dependencies are added to the
elements they were computed over (``saved``: broadcast to the first argument's shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

aten = torch.ops.aten

__all__ = ["ADJOINTS", "Adjoint", "adjoint"]


@dataclass
class Adjoint:
    """``forward(*args)`` (its output ``pick`` of a tuple) is the op whose
    vector-Jacobian product with ``grad`` the backward op computes; backward output
    ``i`` is the gradient for ``args[wrt[i]]``. ``linear``: ``F`` is linear where it is
    differentiable (the max-pooling ops choose by the values: no second derivative), so
    the gradient reads the cotangent only. ``saved``: tensors computed from ``args[0]``
    by the forward op, each with the flat index of its element every element of
    ``args[0]`` reads (see the module doc)."""

    forward: Any
    args: list[Any]
    grad: Any
    wrt: list[int]
    pick: int | None = None
    linear: bool = False
    saved: list[tuple[Any, Callable[[], np.ndarray]]] = field(default_factory=list)


def _named(func: Any, args: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    schema = func._schema.arguments
    named = {a.name: a.default_value for a in schema if a.has_default_value()}
    named.update(zip((a.name for a in schema), args))
    named.update(kwargs)
    return named


def _zeros(shape: Any, like: torch.Tensor) -> torch.Tensor:
    """A stand-in for an argument the backward op does not take (an upsampled input:
    the op is linear in it), so that the forward op can run on it."""
    return torch.zeros([int(s) for s in shape], dtype=like.dtype, device=like.device)


def _broadcast(saved: Any, shape: tuple[int, ...], view: tuple[int, ...] | None = None) -> Callable[[], np.ndarray]:
    """Each element of ``shape`` reads element ``i`` of ``saved`` (seen as ``view``,
    broadcast to ``shape``)."""
    def index() -> np.ndarray:
        at = np.arange(saved.numel()).reshape(view if view is not None else tuple(saved.shape))
        return np.broadcast_to(at, shape).reshape(-1)

    return index


def _conv(n: dict[str, Any]) -> Adjoint:
    g, x, w = n["grad_output"], n["input"], n["weight"]
    sizes = n["bias_sizes"]
    bias = _zeros(sizes, g) if n["output_mask"][2] and sizes is not None and int(np.prod(sizes)) > 0 else None
    args = [x, w, bias, n["stride"], n["padding"], n["dilation"], n["transposed"], n["output_padding"], n["groups"]]
    return Adjoint(aten.convolution.default, args, g, [0, 1, 2])


def _same(forward: Any, rest: tuple[str, ...], *, pick: int | None = None, linear: bool = False) -> Callable[[dict[str, Any]], Adjoint]:
    """``op_backward(grad_output, self, *rest...)``, the adjoint of ``op(self, *rest)``."""
    def build(n: dict[str, Any]) -> Adjoint:
        return Adjoint(forward, [n["self"]] + [n[r] for r in rest], n["grad_output"], [0], pick, linear)

    return build


def _adaptive(forward: Any, dims: int, *, pick: int | None = None, linear: bool = False) -> Callable[[dict[str, Any]], Adjoint]:
    def build(n: dict[str, Any]) -> Adjoint:
        g = n["grad_output"]
        return Adjoint(forward, [n["self"], list(g.shape[-dims:])], g, [0], pick, linear)

    return build


def _upsample(forward: Any, rest: tuple[str, ...]) -> Callable[[dict[str, Any]], Adjoint]:
    """``upsample_*_backward(grad_output, output_size, input_size, ...)``: the adjoint of
    the upsampling of an input of ``input_size`` (linear: the input is not needed)."""
    def build(n: dict[str, Any]) -> Adjoint:
        g = n["grad_output"]
        return Adjoint(forward, [_zeros(n["input_size"], g), n["output_size"]] + [n[r] for r in rest], g, [0], linear=True)

    return build


def _unfold(n: dict[str, Any]) -> Adjoint:
    g = n["grad_in"]
    return Adjoint(aten.unfold.default, [_zeros(n["input_sizes"], g), n["dim"], n["size"], n["step"]], g, [0], linear=True)


def _embedding(n: dict[str, Any]) -> Adjoint:
    g = n["grad_output"]
    weight = _zeros((n["num_weights"], g.shape[-1]), g)
    return Adjoint(aten.embedding.default, [weight, n["indices"], n["padding_idx"]], g, [0], linear=True)


def _layer_norm(n: dict[str, Any]) -> Adjoint:
    x = n["input"]
    args = [x, n["normalized_shape"], n["weight"], n["bias"], 1e-5]
    shape = tuple(x.shape)
    saved = [(n["mean"], _broadcast(n["mean"], shape)), (n["rstd"], _broadcast(n["rstd"], shape))]
    return Adjoint(aten.native_layer_norm.default, args, n["grad_out"], [0, 2, 3], pick=0, saved=saved)


def _batch_norm(n: dict[str, Any]) -> Adjoint:
    x, g = n["input"], n["grad_out"]
    channels = int(x.shape[1]) if x.dim() > 1 else 1
    bias = _zeros((channels,), g) if n["output_mask"][2] else None
    # (the running statistics are written in place by a training forward: copies)
    running = [r.clone() if isinstance(r, torch.Tensor) else r for r in (n["running_mean"], n["running_var"])]
    args = [x, n["weight"], bias, running[0], running[1], n["train"], 0.1, n["eps"]]
    shape = tuple(x.shape)
    view = (1, channels) + (1,) * (x.dim() - 2)
    saved = [(s, _broadcast(s, shape, view)) for s in (n["save_mean"], n["save_invstd"])
             if isinstance(s, torch.Tensor) and s.numel() == channels]
    return Adjoint(aten.native_batch_norm.default, args, g, [0, 1, 2], pick=0, saved=saved)


def _group_norm(n: dict[str, Any]) -> Adjoint:
    x, g = n["input"], n["grad_out"]
    N, C, HxW, groups = (int(n[k]) for k in ("N", "C", "HxW", "group"))
    bias = _zeros((C,), g) if n["output_mask"][2] else None
    args = [x, n["weight"], bias, N, C, HxW, groups, 1e-5]
    shape = (N, groups, (C // max(groups, 1)) * HxW)
    saved = []
    for s in (n["mean"], n["rstd"]):
        index = _broadcast(s, shape, (N, groups, 1))
        saved.append((s, index))
    return Adjoint(aten.native_group_norm.default, args, g, [0, 1, 2], pick=0, saved=saved)


def _grid_sampler(forward: Any) -> Callable[[dict[str, Any]], Adjoint]:
    def build(n: dict[str, Any]) -> Adjoint:
        args = [n["input"], n["grid"], n["interpolation_mode"], n["padding_mode"], n["align_corners"]]
        return Adjoint(forward, args, n["grad_output"], [0, 1])

    return build


def _nll_loss(forward: Any) -> Callable[[dict[str, Any]], Adjoint]:
    def build(n: dict[str, Any]) -> Adjoint:
        x = n["self"]
        args = [x, n["target"], n["weight"], n["reduction"], n["ignore_index"]]
        total = n["total_weight"]
        return Adjoint(forward, args, n["grad_output"], [0], pick=0, linear=True,
                       saved=[(total, _broadcast(total, tuple(x.shape), (1,) * x.dim()))])

    return build


def _table() -> dict[str, Callable[[dict[str, Any]], Adjoint]]:
    table: dict[str, Callable[[dict[str, Any]], Adjoint]] = {
        "convolution_backward": _conv,
        "avg_pool2d_backward": _same(aten.avg_pool2d.default, ("kernel_size", "stride", "padding", "ceil_mode",
                                                               "count_include_pad", "divisor_override"), linear=True),
        "avg_pool3d_backward": _same(aten.avg_pool3d.default, ("kernel_size", "stride", "padding", "ceil_mode",
                                                               "count_include_pad", "divisor_override"), linear=True),
        "max_pool2d_with_indices_backward": _same(aten.max_pool2d_with_indices.default,
                                                  ("kernel_size", "stride", "padding", "dilation", "ceil_mode"), pick=0, linear=True),
        "max_pool3d_with_indices_backward": _same(aten.max_pool3d_with_indices.default,
                                                  ("kernel_size", "stride", "padding", "dilation", "ceil_mode"), pick=0, linear=True),
        "_adaptive_avg_pool2d_backward": _adaptive(aten._adaptive_avg_pool2d.default, 2, linear=True),
        "_adaptive_avg_pool3d_backward": _adaptive(aten._adaptive_avg_pool3d.default, 3, linear=True),
        "adaptive_max_pool2d_backward": _adaptive(aten.adaptive_max_pool2d.default, 2, pick=0, linear=True),
        "adaptive_max_pool3d_backward": _adaptive(aten.adaptive_max_pool3d.default, 3, pick=0, linear=True),
        "reflection_pad1d_backward": _same(aten.reflection_pad1d.default, ("padding",), linear=True),
        "reflection_pad2d_backward": _same(aten.reflection_pad2d.default, ("padding",), linear=True),
        "reflection_pad3d_backward": _same(aten.reflection_pad3d.default, ("padding",), linear=True),
        "replication_pad1d_backward": _same(aten.replication_pad1d.default, ("padding",), linear=True),
        "replication_pad2d_backward": _same(aten.replication_pad2d.default, ("padding",), linear=True),
        "replication_pad3d_backward": _same(aten.replication_pad3d.default, ("padding",), linear=True),
        "glu_backward": _same(aten.glu.default, ("dim",)),
        "unfold_backward": _unfold,
        "embedding_dense_backward": _embedding,
        "native_layer_norm_backward": _layer_norm,
        "native_batch_norm_backward": _batch_norm,
        "native_group_norm_backward": _group_norm,
        "grid_sampler_2d_backward": _grid_sampler(aten.grid_sampler_2d.default),
        "grid_sampler_3d_backward": _grid_sampler(aten.grid_sampler_3d.default),
        "nll_loss_backward": _nll_loss(aten.nll_loss_forward.default),
        "nll_loss2d_backward": _nll_loss(aten.nll_loss2d_forward.default),
    }
    for name, rest in (("upsample_linear1d", ("align_corners", "scales")),
                       ("upsample_bilinear2d", ("align_corners", "scales_h", "scales_w")),
                       ("upsample_bicubic2d", ("align_corners", "scales_h", "scales_w")),
                       ("upsample_trilinear3d", ("align_corners", "scales_d", "scales_h", "scales_w")),
                       ("_upsample_bilinear2d_aa", ("align_corners", "scales_h", "scales_w")),
                       ("_upsample_bicubic2d_aa", ("align_corners", "scales_h", "scales_w")),
                       ("upsample_nearest1d", ("scales",)), ("upsample_nearest2d", ("scales_h", "scales_w")),
                       ("upsample_nearest3d", ("scales_d", "scales_h", "scales_w")),
                       ("_upsample_nearest_exact1d", ("scales",)), ("_upsample_nearest_exact2d", ("scales_h", "scales_w")),
                       ("_upsample_nearest_exact3d", ("scales_d", "scales_h", "scales_w"))):
        forward = getattr(aten, name, None)
        if forward is not None and hasattr(forward, "default"):
            table[f"{name}_backward"] = _upsample(forward.default, rest)
    return table


#: backward op name -> its :class:`Adjoint`, from the op's arguments by name.
ADJOINTS: dict[str, Callable[[dict[str, Any]], Adjoint]] = _table()


def adjoint(func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Adjoint, list[bool] | None]:
    """The op's :class:`Adjoint`, and its ``output_mask`` (which gradients it computes;
    None: all of them)."""
    named = _named(func, args, kwargs)
    mask = named.get("output_mask")
    return ADJOINTS[func.overloadpacket.__name__](named), None if mask is None else [bool(m) for m in mask]
