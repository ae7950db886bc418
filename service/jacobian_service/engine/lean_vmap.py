"""``torch.func.vmap(pullback)(rows)`` for a Jacobian's rows, without vmap's Python
wrapping: the same functorch level, batch dimension and kernels, so the same rows.

A reverse-mode Jacobian's pullback runs under vmap once per request (``rows.RowStream``),
and for a small Jacobian torch.func.vmap's Python was a third of that call (``mlp``,
64x128: ~220 us of which ~75 us): pytree walks of the cotangent, of ``in_dims`` and of
the outputs, a decorated wrapper made per stream, and five function-level imports of
``torch._export`` (one per nesting step and batch dimension, each asking whether an
export's pre-dispatch mode is on). Here the common case, one cotangent tensor mapped
over its first dimension, asks that once and calls functorch's own operations in the
order vmap does; anything else, or a torch without them, is torch.func.vmap's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

__all__ = ["vmap_rows"]

try:
    from torch._C import _functorch as _F
    from torch._export.utils import _maybe_find_pre_dispatch_tf_mode_for_export as _export_mode
    from torch._functorch import predispatch as _predispatch

    _STEPS = (_F._vmap_increment_nesting, _F._vmap_decrement_nesting, _F._add_batch_dim, _F._remove_batch_dim,
              _predispatch.lazy_load_decompositions)
except (ImportError, AttributeError):  # another torch: vmap itself, always
    _STEPS = None


def vmap_rows(pullback: Callable[[Any], Any], cotangents: Any) -> Any:
    """``torch.func.vmap(pullback)(cotangents)``: in_dims and out_dims 0, randomness
    "error" (vmap's defaults), chunk_size None."""
    if _STEPS is None or type(cotangents) is not torch.Tensor or cotangents.ndim == 0 or _export_mode() is not None:
        return torch.func.vmap(pullback)(cotangents)
    increment, decrement, add_dim, remove_dim, load_decompositions = _STEPS
    if not getattr(_predispatch, "DECOMPOSITIONS_LOADED", False):  # (once: vmap's own first step asks at each call,
        load_decompositions()  # through one more import of torch._export, and returns at this flag)
    size = cotangents.shape[0]
    level = increment(size, "error")
    try:
        outputs = pullback(add_dim(cotangents, 0, level))
        if type(outputs) is tuple and all(type(out) is torch.Tensor for out in outputs):  # (a vjp's, nearly always)
            return tuple([remove_dim(out, level, size, 0) for out in outputs])
        leaves, spec = pytree.tree_flatten(outputs)
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):  # as vmap's _maybe_remove_batch_dim says it
                raise ValueError(f"vmap(pullback, ...): `pullback` must only return Tensors, got type {type(leaf)}. "
                                 "Did you mean to set out_dims= to None for output?")
        return pytree.tree_unflatten([remove_dim(leaf, level, size, 0) for leaf in leaves], spec)
    finally:
        decrement()
