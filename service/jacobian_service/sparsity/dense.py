"""The dense derivatives the sparsity package falls back on, checked as the dense routes
check theirs: probing a pattern (tracing failed), and a pattern its products proved wrong.

``torch.func.jacrev`` and ``torch.func.hessian`` vmap their products over the basis, and
torch's vmap is silently wrong for some ops and shapes: ``masked_select``'s backward
with a broadcast mask gave a row of zeros where the Jacobian has 8 and 6, so a probed
pattern missed them and the dense answer the products then fell back on was that wrong
matrix. So each dense Jacobian is checked against one VJP with a random cotangent
(:func:`..engine.products.agrees_with_reverse`), each dense Hessian against one
Hessian-vector product (:func:`..engine.hessian.agrees_with_hvp`), and where they
disagree the derivative is computed again row by row (``chunk_size=1``: no vmap).

A Jacobian's check is relative to the answer, and large float32 terms that cancel inside
the function (``(x * 1e4 + x) - x * 1e4``) put the random VJP that far past it on a right
vmap: a probe of such a function at 1,500 elements went row by row, 4.9 s where jacrev
takes 0.12 s (a Hessian's, against its Hessian-vector product, likewise). So before vmap
is called wrong, the function's own round-off is measured as the sparse products' check
measures it (:func:`.verify.round_off`: how far three more VJPs, or Hessian-vector
products, are from additive), and a difference within it is no wrong vmap. A flat ``g``
of output leaves coarser than the inputs (a float16 leaf beside a float64 one) is held
to each row's leaf's round-off there, as the sparse check holds it (``leaves``): at the
inputs', a probe of such a function computed its first point's Jacobian row by row.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..engine.calling import GradOffWatch, fresh
from ..engine.hessian import agrees_with_hvp, gradient
from ..engine.products import agrees_with_reverse
from .verify import coarsest, disagrees, leaf_tolerance, noise_seeds, round_off, within_noise

__all__ = ["dense_hessian", "dense_jacobian"]

log = logging.getLogger("jacobian_service.sparsity")


def _with_aux(g: Callable[..., torch.Tensor]) -> Callable[..., tuple[torch.Tensor, tuple[()]]]:
    """``g`` as the checks call it, with an empty aux (torch.func.vjp takes no None there)."""
    return lambda *d: (g(*d), ())


def dense_jacobian(g: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor],
                   verdict: dict[str, bool] | None = None,
                   leaves: Sequence[tuple[int, torch.dtype]] = ()) -> tuple[torch.Tensor, ...]:
    """``jacrev(g, argnums=every primal)`` of a flat ``g``: one block ``(m, *primal.shape)``
    per primal; row by row where vmap's rows (or vmap itself) fail. ``verdict`` carries
    the check's outcome to later calls at other points of the same shapes (a probe's):
    vmap's faults follow shapes, not values, so one check serves them all. ``leaves``:
    the element count and dtype of each output leaf ``g`` concatenates (the check's
    round-off per row; none: the inputs')."""
    argnums = tuple(range(len(primals)))
    verdict = {} if verdict is None else verdict
    jac = None
    if verdict.get("vmap", True):
        try:
            jac = torch.func.jacrev(g, argnums=argnums)(*primals)
        except Exception as exc:
            if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
                raise
        if jac is not None and "vmap" not in verdict:
            verdict["vmap"] = agrees_with_reverse(_with_aux(g), tuple(primals), jac) or _round_off_only(
                g, primals, jac, leaves)
            if not verdict["vmap"]:
                log.warning("jacrev's vmapped rows disagree with one VJP; computing the dense Jacobian row by row")
        if jac is None:
            verdict["vmap"] = False
    if not verdict["vmap"]:
        jac = torch.func.jacrev(g, argnums=argnums, chunk_size=1)(*primals)
    return jac


def _round_off_only(g: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], jac: Sequence[torch.Tensor],
                    leaves: Sequence[tuple[int, torch.dtype]] = ()) -> bool:
    """Whether the dense Jacobian ``jac`` (blocks ``(m, *primal.shape)``) differs from a
    VJP with a random cotangent by no more than the function's own round-off at this
    point (both measured as the sparse check measures them, :mod:`.verify`). Three VJPs
    through one forward pass: paid only where the first check failed."""
    try:
        out, pullback = torch.func.vjp(g, *fresh(list(primals)))
        seeds = noise_seeds(out.numel(), "rev", out, None)  # r1, r2, r1 + r2: r1 is the check's seed
        products = torch.stack([torch.cat([d.reshape(-1) for d in pullback(s.reshape(out.shape))]) for s in seeds])
    except Exception as exc:
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            raise
        return False  # (no verdict of its own: the first check's stands)
    matrix = torch.cat([j.detach().reshape(out.numel(), -1) for j in jac], 1)
    return _within_round_off(matrix, products, seeds, leaves)


def _hessian_round_off_only(g: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], h: Any,
                            leaves: Sequence[tuple[int, torch.dtype]] = ()) -> bool:
    """:func:`_round_off_only` for a dense Hessian ``h`` (blocks ``[r][c]``): three
    Hessian-vector products, reverse over reverse (as ``jacrev(jacrev)``: no forward AD
    needed), through one gradient's graph; ``H`` is symmetric, so ``H^T r`` is ``H r``.
    ``leaves``: ``g``'s one element's size and dtype (a float16 energy's products round
    in float16: held to that, as the sparse Hessian's check holds them)."""
    argnums = tuple(range(len(primals)))
    sizes = [p.numel() for p in primals]
    try:
        grads, pullback = torch.func.vjp(gradient(lambda *d: g(*d).reshape(()), argnums), *fresh(list(primals)))
        seeds = noise_seeds(sum(sizes), "rev", grads[0], None)
        products = torch.stack([torch.cat([d.reshape(-1) for d in pullback(tuple(
            part.reshape(q.shape).to(q.dtype) for part, q in zip(s.split(sizes), grads)))]) for s in seeds])
    except Exception as exc:
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            raise
        return False
    matrix = torch.cat([torch.cat([b.detach().reshape(sizes[r], -1) for b in row], 1) for r, row in enumerate(h)], 0)
    return _within_round_off(matrix, products, seeds, leaves)


def _within_round_off(matrix: torch.Tensor, products: torch.Tensor, seeds: torch.Tensor,
                      leaves: Sequence[tuple[int, torch.dtype]] = ()) -> bool:
    """Whether ``products`` of ``seeds`` (r1, r2, r1 + r2: :func:`.verify.noise_seeds`)
    are ``matrix``'s (``(m, n)``, ``r1^T M``) within their own round-off (each row's
    leaf's, where ``leaves`` are coarser than the products' dtype and a Jacobian's rows
    are theirs; else, a Hessian's one element, the coarsest dtype's throughout)."""
    m64 = matrix.to("cpu", torch.float64).numpy()
    got = products.detach().to("cpu", torch.float64).numpy()
    if not (np.isfinite(m64).all() and np.isfinite(got).all()):
        return False  # (NaN or an infinity: no round-off, the first check's verdict stands)
    row_tol = leaf_tolerance(products.dtype, leaves) if sum(n for n, _ in leaves) == m64.shape[0] else None
    coarse = coarsest(products.dtype, [d for _, d in leaves])
    # (beside row_tol the gradient's sum is in the products' dtype: as _Products.tol_dtype)
    tol_dtype = products.dtype if row_tol is not None else coarse
    off = disagrees(m64, "rev", products[0], seeds[0].to("cpu", torch.float64).numpy(), None, tol_dtype, row_tol)
    return off == 0.0 or within_noise(off, round_off(products), coarse)


def dense_hessian(g: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], reverse: bool = False,
                  verdict: dict[str, bool] | None = None, leaves: Sequence[tuple[int, torch.dtype]] = ()) -> Any:
    """The Hessian of a ``g`` with one element, blocks ``[r][c]`` of shape
    ``(1, *primal_r.shape, *primal_c.shape)`` (no leading 1 for a 0-d ``g``):
    ``torch.func.hessian`` (``reverse``: ``jacrev(jacrev)``), or, where it disagrees
    with one Hessian-vector product or cannot run under vmap, ``jacrev(jacrev)`` row by
    row. ``verdict`` as for :func:`dense_jacobian`; ``leaves``: the function's output
    (its one element's size and dtype: a float16 energy of float64 inputs rounds its
    products in float16, and at the inputs' round-off its Hessian went row by row)."""
    argnums = tuple(range(len(primals)))
    verdict = {} if verdict is None else verdict
    strategy = (lambda f: torch.func.jacrev(torch.func.jacrev(f, argnums=argnums), argnums=argnums)) if reverse \
        else (lambda f: torch.func.hessian(f, argnums=argnums))
    h = None
    failed: Exception | None = None  # torch's own strategy's error
    if verdict.get("vmap", True):
        try:
            h = strategy(g)(*primals)
        except Exception as exc:
            if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
                raise
            failed = exc
        if h is not None and "vmap" not in verdict:
            verdict["vmap"] = agrees_with_hvp(_with_aux(g), tuple(primals), argnums, h) or _hessian_round_off_only(
                g, primals, h, leaves)
            if not verdict["vmap"]:
                log.warning("the vmapped dense Hessian disagrees with one Hessian-vector product; computing it row by row")
        if h is None:
            verdict["vmap"] = False
    if not verdict["vmap"]:
        inner = torch.func.jacrev(g, argnums=argnums, chunk_size=1)
        watch = GradOffWatch()
        rows = watch.call(torch.func.jacrev(inner, argnums=argnums, chunk_size=1), *primals)
        if watch.seen and not reverse:
            # A backward that switches grad off (@once_differentiable): reverse over
            # reverse found 0 where the Hessian is not. torch.func.hessian sees through
            # it: its answer, or, where it cannot run (no jvp rule), its error.
            if failed is not None:
                raise failed.with_traceback(None)
            if h is not None:
                return h
        h = rows
    return h
