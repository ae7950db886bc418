"""Many vector products at once (``batched_vectors``): ``vmap`` over the vectors'
leading dimension, or one vector at a time where ``vmap`` cannot run the product.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..errors import ServiceError
from .calling import is_oom

__all__ = ["over_vectors"]

log = logging.getLogger("jacobian_service.engine")


def over_vectors(name: str, product: Callable[..., Any], vectors: tuple[Any, ...],
                 again: Callable[[], Callable[..., Any]] | None = None) -> Any:
    """``vmap(product)(*vectors)``; where torch's ``vmap`` cannot run the product (an op
    of the derivative without a batching rule, a custom ``autograd.Function`` without a
    vmap rule), one vector at a time, stacked: what ``vmap`` would answer, as a
    Jacobian's rows are then (rows.py), so a stack of vectors is answered wherever one
    vector is. ``again()`` gives the product for the loop on fresh inputs (``vmap`` may
    have written into them before it failed, for a function writing into its inputs)."""
    leaves = [v for v in pytree.tree_leaves(vectors) if isinstance(v, torch.Tensor) and v.dim()]
    batch = leaves[0].shape[0] if leaves else 0
    try:
        return torch.func.vmap(product)(*vectors)
    except Exception as exc:
        if is_oom(exc) or isinstance(exc, ServiceError) or not batch:
            raise
        log.info("vmap of %s's products failed (%s); one vector at a time", name, type(exc).__name__)
    one = again() if again is not None else product
    per = [one(*pytree.tree_map(lambda v: v[k], vectors)) for k in range(batch)]
    return pytree.tree_map(lambda *xs: torch.stack(xs), *per)
