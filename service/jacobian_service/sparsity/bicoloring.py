"""Bicolouring: a Jacobian from forward and reverse products together.

One-sided colouring needs at least as many products as the densest row (forward mode)
or column (reverse mode) has entries. A pattern with both a dense row and a dense
column (an arrowhead: a constraint over every variable beside local equations, a global
parameter read by every equation) so needs one product per column either way. Mixing
the two needs few: the dense rows by VJPs, every other row by JVPs over a colouring of
the remaining rows alone (the arrowhead: 1 VJP and 2 JVPs, whatever its size).

This is the row/column partition of Coleman and Verma ("The efficient computation of
sparse Jacobian matrices using automatic differentiation", SIAM J. Sci. Comput. 19(4),
1998), with the rows to peel taken by their entry counts: the ``k`` densest rows go to
reverse mode (those rows coloured among themselves over every column), the others to
forward mode (the columns coloured over those rows only); and the same on the
transpose (the densest columns to forward mode, the rest to reverse mode). A few ``k``
are tried where the rows' counts drop, each only where its lower bound could beat the
one-sided colouring; the fewest products win, and only when they are fewer than the
one-sided colouring's.

Every entry is read where exactly one seeded column (or row) of its colour reaches it:
from ``J S`` at ``(i, colour j)`` when that slot holds it alone, else from ``S^T J`` at
``(colour i, j)``; :func:`bicoloring_from` rebuilds that map from the colours (a cached
colouring) and checks it, so a wrong colouring raises instead of mixing entries.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .patterns import Pattern, PatternTooLarge

__all__ = ["bicoloring", "bicoloring_from"]

Check = Callable[[], None] | None

# The most peelings tried per side, and the most rows one may send to reverse mode.
_CANDIDATES = 4
_MOST_PEELED = 256


def _counts(values: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(values, minlength=size).astype(np.int64)


def _peelings(p: Pattern, fewer_than: int) -> list[int]:
    """How many of the densest rows to send to reverse mode: where the counts drop (a
    smaller ``k`` at the same count gains nothing), and only where the lower bound (one
    VJP, and the densest row left for the JVPs) is at most half of ``fewer_than``, and
    where the rows peeled are at least twice as dense as the densest one left. Each
    trial is a full colouring: trying every drop in the counts made auto's colouring of
    random patterns 5 to 13 times slower (a product or two saved, at best); dense lines
    beside sparse ones (an arrowhead: n against 2) are what bicolouring is for."""
    m = p.shape[0]
    deg = np.sort(_counts(p.rows, m))[::-1]
    out = []
    for k in range(1, min(m - 1, _MOST_PEELED) + 1):  # (every row to VJPs is row colouring)
        rest = int(deg[k])
        if 0 < rest and int(deg[k - 1]) >= 2 * rest and 2 * (1 + rest) <= fewer_than:
            out.append(k)
            if len(out) == _CANDIDATES:
                break
    return out


def _peeled(p: Pattern, k: int, check_alive: Check) -> tuple[np.ndarray, np.ndarray]:
    """Column colours (forward) and row colours (reverse) with the ``k`` densest rows
    sent to reverse mode; -1 where a column or row is not seeded."""
    from .coloring import column_coloring, row_coloring

    m = p.shape[0]
    order = np.argsort(-_counts(p.rows, m), kind="stable")
    peeled = np.zeros(m, bool)
    peeled[order[:k]] = True
    on = peeled[p.rows]
    top = p.replace(rows=p.rows[on], cols=p.cols[on])
    rest = p.replace(rows=p.rows[~on], cols=p.cols[~on])
    rev = row_coloring(top, check_alive=check_alive).colors  # rows of top only: the others -1
    fwd = column_coloring(rest, check_alive=check_alive).colors
    return fwd, rev


def _side(p: Pattern, fewer_than: int, check_alive: Check) -> tuple[np.ndarray, np.ndarray] | None:
    best: tuple[np.ndarray, np.ndarray] | None = None
    for k in _peelings(p, fewer_than):
        try:
            fwd, rev = _peeled(p, k, check_alive)
        except PatternTooLarge:  # this peeling's graph is past the limits: another may not be
            continue
        total = int(fwd.max(initial=-1)) + 1 + int(rev.max(initial=-1)) + 1
        if total < fewer_than:
            best, fewer_than = (fwd, rev), total
    return best


def bicoloring(p: Pattern, fewer_than: int, *, check_alive: Check = None):  # -> Coloring | None
    """A bidirectional colouring of ``p`` with fewer than ``fewer_than`` products (JVPs
    and VJPs together), or None where none of the peelings tried has that few."""
    if not p.nnz or fewer_than <= 2:  # both sides take a product each: never below 2
        return None
    rows = _side(p, fewer_than, check_alive)
    if rows is not None:
        fewer_than = int(rows[0].max()) + int(rows[1].max()) + 2
    # the transpose: its densest rows are p's densest columns, sent to forward mode
    cols = _side(p.transpose(), fewer_than, check_alive)
    if cols is not None:
        rev, fwd = cols
        return bicoloring_from(p, np.concatenate([fwd, rev]), "dense columns by JVPs, the rest by VJPs")
    if rows is not None:
        return bicoloring_from(p, np.concatenate(rows), "dense rows by VJPs, the rest by JVPs")
    return None


def _alone(slots: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
    """Whether each valid slot is the only one of its value among the valid ones."""
    count = np.bincount(slots[valid], minlength=size) if size else np.zeros(0, np.int64)
    out = np.zeros(slots.shape, bool)
    out[valid] = count[slots[valid]] == 1
    return out


def bicoloring_from(p: Pattern, colors: np.ndarray, strategy: str = "cached"):  # -> Coloring
    """The bidirectional colouring ``colors`` (``n`` column colours, then ``m`` row
    colours; -1: not seeded) with its decompression map: ``gather`` indexes the forward
    products ``J S`` (``(m, kf)`` row-major) followed by the reverse ones ``S^T J``
    (``(kr, n)`` row-major). Raises where an entry cannot be read alone on either side."""
    from .coloring import Coloring

    m, n = p.shape
    colors = np.asarray(colors, np.int64)
    col_c, row_c = colors[:n], colors[n:]
    kf, kr = int(col_c.max(initial=-1)) + 1, int(row_c.max(initial=-1)) + 1
    fc, rc = col_c[p.cols], row_c[p.rows]
    fslot = p.rows * kf + fc  # J S at (i, colour j)
    rslot = rc * n + p.cols  # S^T J at (colour i, j)
    by_fwd = _alone(fslot, fc >= 0, m * kf)
    by_rev = _alone(rslot, rc >= 0, kr * n) & ~by_fwd
    if not bool((by_fwd | by_rev).all()):
        raise AssertionError("bicolouring cannot recover an entry directly")
    gather = np.where(by_fwd, fslot, m * kf + rslot)
    fwd_lower = int(_counts(p.rows, m).max(initial=0))
    rev_lower = int(_counts(p.cols, n).max(initial=0))
    parts = (Coloring("fwd", col_c, kf, p.rows * kf + fc, fwd_lower, strategy),
             Coloring("rev", row_c, kr, rc * n + p.cols, rev_lower, strategy))
    # Only one side's products: at least that side's bound; both sides: at least 2.
    return Coloring("bidirectional", colors, kf + kr, gather, min(fwd_lower, rev_lower, 2), strategy, parts=parts)
