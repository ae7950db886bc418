"""Symmetric Jacobians: read from JVPs as a Hessian is read from its products.

A Jacobian whose values are symmetric (``J = J^T``: a force ``-dE/dx``, the Jacobian
of any gradient, a symmetric linear operator) holds each off-diagonal pair twice, so a
star or acyclic colouring of its pattern recovers it from ``J S`` (one JVP per colour),
as :func:`.coloring.hessian_coloring` recovers a Hessian from ``H S``. That takes fewer
products than any colouring that does not know the values are symmetric: an arrowhead
with a tridiagonal body (a conservation constraint over a chain) takes 3 (acyclic)
where bicolouring takes 5, and no bicolouring, read directly or by substitution, takes
fewer (an exhaustive search at n = 5 to 7); a pentadiagonal one (a rod's bending
force) 3 where either side takes 5.

A pattern cannot say whether the values are symmetric (a kinetics network's Jacobian
has a symmetric pattern and asymmetric values), so symmetry is never assumed: a
function is read this way only after one of its Jacobians, computed the plain way
(every entry read alone), was symmetric entry by entry within round-off; and every
Jacobian read this way is checked as forward products always are, by one VJP with a
random cotangent against the matrix (:func:`.verify.differs_from_reverse`). Where it
differs (the function is symmetric at some points only), that request is answered by
VJPs, as ``jacrev`` computes it, and the function goes back to its plain colouring.

That VJP tells values apart only past its round-off tolerance (1024 ulps of a column's
scale, :mod:`.verify`): ~2e-13 in float64, but ~1.2e-4 in float32, where a force
symmetric at its first point and slightly asymmetric later (J[0, j] off by 1e-3 of
itself) passed the check and was answered with one triangle copied onto the other.
So only float64 Jacobians are read this way (:func:`checkable`); float32 and narrower
keep their plain colouring, every entry read alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .coloring import Coloring, acyclic_from, hessian_coloring, star_gather
from .patterns import Pattern

__all__ = ["MODE", "checkable", "symmetric_coloring", "symmetric_from", "symmetric_values"]

#: ``Coloring.mode`` (and ``meta.mode``) of a Jacobian read as symmetric from JVPs.
MODE = "symmetric"

# Entries i, j and j, i agree within this many ulps of the larger: round-off (a
# gradient's Jacobian computed by JVPs or VJPs is symmetric up to its own round-off).
_ULPS = 64


# The coarsest machine epsilon whose checking VJP resolves an asymmetry finely enough: float64's.
_COARSEST_EPS = 2.0**-52


def checkable(eps: float) -> bool:
    """Whether a Jacobian whose values have machine epsilon ``eps`` may be read as
    symmetric: whether the one checking VJP tells an asymmetric point from round-off
    closely enough (float64: within ~2e-13 of a column's scale; float32's 1.2e-4 let
    asymmetries of hundreds of ulps of an entry through)."""
    return eps <= _COARSEST_EPS


def symmetric_values(matrix: Any, eps: float) -> bool:
    """Whether the square scipy sparse ``matrix`` equals its transpose entry by entry,
    within ``_ULPS`` ulps (``eps``: the values' machine epsilon) of the larger of each
    pair. Not finite anywhere: False (nothing to compare)."""
    if matrix.shape[0] != matrix.shape[1]:
        return False
    a = matrix.tocsr().astype(np.float64)
    if not np.isfinite(a.data).all():
        return False
    diff = abs(a - a.T)
    if diff.nnz == 0:
        return True
    size = (abs(a) + abs(a.T)).tocsr()
    d = diff.tocoo()
    bound = _ULPS * eps * np.asarray(size[d.row, d.col]).ravel() + np.finfo(np.float64).tiny
    return bool((d.data <= bound).all())


def _wrapped(inner: Coloring) -> Coloring:
    return Coloring(MODE, inner.colors, inner.n_colors, inner.gather, inner.lower_bound, inner.strategy, inner.solve)


def symmetric_coloring(p: Pattern, fewer_than: int, most_summed: int,
                       check_alive: Callable[[], None] | None = None, plain: Coloring | None = None) -> Coloring | None:
    """A star or acyclic colouring of the symmetric pattern ``p`` for JVPs read as a
    symmetric matrix, where it takes fewer than ``fewer_than`` products; else None.
    ``plain``: the Jacobian's colouring by one side, rows or columns, where it has one:
    of a symmetric pattern, the distance-2 colouring star colouring starts from."""
    if p.shape[0] != p.shape[1] or not p.nnz or not p.is_symmetric():
        return None
    d2 = plain if plain is not None and plain.mode in ("fwd", "rev") else None
    inner = hessian_coloring(p, check_alive=check_alive, most_summed=most_summed, distance2=d2)
    return _wrapped(inner) if inner.n_colors < fewer_than else None


def symmetric_from(p: Pattern, colors: np.ndarray) -> Coloring:
    """A cached symmetric colouring's map rebuilt (and checked): read directly where the
    colours are a star colouring, else by substitution (an acyclic one)."""
    colors = np.asarray(colors, np.int64)
    k = int(colors.max(initial=-1)) + 1
    try:
        inner = Coloring("star", colors, k, star_gather(p, colors, k), 2, "cached")
    except AssertionError:
        inner = acyclic_from(p, colors)
    return _wrapped(inner)
