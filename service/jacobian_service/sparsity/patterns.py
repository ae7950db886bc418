"""Sparsity patterns: the torch-free ``Pattern`` type, declared constructors, a disk cache.

A pattern is the set of (row, column) positions of a 2-D derivative matrix that may be
nonzero: rows are output elements and columns input elements, both flattened in C
order (several outputs or several differentiated inputs are concatenated in order).

Declared patterns are written at ``@register`` before any shape is known, so each
constructor returns a :class:`Declared`: a recipe that builds the :class:`Pattern` once
the input shapes and the output size are. This module imports numpy only (the registry
imports it and must stay torch-free); scipy is imported where a CSR matrix is asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import logging
import marshal
import os
import site
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

__all__ = [
    "CACHE_ENV",
    "CHOICE_NOTE",
    "Declared",
    "DetectionTooCostly",
    "Pattern",
    "PatternCache",
    "PatternTooLarge",
    "banded",
    "check_entries",
    "check_input_entries",
    "check_product",
    "check_work",
    "block_diagonal",
    "counting_entries",
    "coo",
    "declared",
    "entry_limit",
    "from_callable",
    "from_matrix",
    "function_fingerprint",
    "limits_now",
    "sorted_unique",
    "work_limit",
]

#: Environment variable naming the directory of the on-disk pattern cache.
CACHE_ENV = "JACOBIAN_SERVICE_SPARSITY_CACHE_DIR"

log = logging.getLogger(__name__)
# Bytes its files may hold together by default (Settings.sparsity_cache_max_bytes).
_DISK_BYTES = 1 << 30
# A temporary file older than this is left from a process killed mid-write: removed.
_STALE_TMP_S = 600.0

Shapes = Sequence[tuple[int, ...]]


class PatternTooLarge(RuntimeError):
    """Detection would hold more pattern entries than allowed (never a reason to probe:
    probing would need the dense derivative, larger still)."""


class DetectionTooCostly(PatternTooLarge):
    """Detection handled more entries, summed over its ops, than :func:`entry_limit`
    allows one detection (:data:`TRACE_WORK_PER_INPUT_ENTRY`)."""


#: Entries one detection may handle, summed over every matrix it builds, per entry of the
#: input limit (capped at :data:`_TRACE_WORK_INPUTS_CAP` of them). Detection is one job
#: of the engine, which runs one at a time: measured, a lorenz96 of 1,000,000 elements
#: (38 entries handled per element, ~80 ns each) held the engine its whole 60 s
#: deadline, another client's 2-element Jacobian waiting 58 s behind it. 8 x 2**24 is
#: 134 M entries, 5-10 s of one core: the longest any other client waits behind one.
TRACE_WORK_PER_INPUT_ENTRY = 8
_TRACE_WORK_INPUTS_CAP = 1 << 24  # (a GPU's budget is half its memory; the tracer runs on the CPU all the same)


# Most pattern entries (dependency pairs) one detection may hold in a single matrix, most
# entries of the colouring's graph (its pure-Python greedy pass costs far more per
# entry), and most elements of the differentiated inputs the tracer starts from (one
# entry each); None: no bound. Set per call by :func:`entry_limit` (the service derives
# them from its result limit and memory budget), read where an op would multiply entries.
_LIMITS: contextvars.ContextVar[tuple[int | None, int | None, int | None]] = contextvars.ContextVar(
    "max_pattern_entries", default=(None, None, None)
)


@contextlib.contextmanager
def entry_limit(max_entries: int | None, max_graph_entries: int | None = None,
                max_input_entries: int | None = None) -> Iterator[None]:
    """Bound detection (tracing, probing) and declared patterns to ``max_entries``
    entries each, the colouring graph to ``max_graph_entries``, and the inputs' own
    entries (the tracer's identity, one per differentiated element) to
    ``max_input_entries``: past them they raise :class:`PatternTooLarge`.

    The inputs are bounded apart: they are no part of the answer, which ``max_entries``
    is derived from (the result limit's), and the request's body limit already admitted
    them. Counted as any traced tensor, ``x[:3].prod()`` of more inputs than the result
    could hold entries was refused as too dense, its pattern 3 entries."""
    token = _LIMITS.set((max_entries, max_graph_entries, max_input_entries))
    work = None if max_input_entries is None else min(max_input_entries, _TRACE_WORK_INPUTS_CAP) * TRACE_WORK_PER_INPUT_ENTRY
    work_token = _WORK.set([0, work])
    try:
        yield
    finally:
        _WORK.reset(work_token)
        _LIMITS.reset(token)


# The entries the detection under way has handled so far, and its limit (see entry_limit).
_WORK: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("detection_work", default=None)


# The most entries any one matrix of the detection under way was counted at (see
# counting_entries); None outside one.
_PEAK: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("pattern_peak", default=None)


@contextlib.contextmanager
def counting_entries() -> Iterator[list[int]]:
    """Within: the most entries :func:`check_entries` was asked about for one matrix
    (the graph's apart), in the one-item list yielded. Kept beside a cached pattern, it
    holds a later request to the entry limit its detection would have met: a limit
    derived from the result limit (JSON) is lower than a streamed ``.npy``'s, and a
    pattern detected for the stream was served from the cache to a JSON request that
    detecting would have refused (413)."""
    box = [0]
    token = _PEAK.set(box)
    try:
        yield box
    finally:
        _PEAK.reset(token)


def check_entries(count: int, what: str, graph: bool = False) -> None:
    peak = None if graph else _PEAK.get()
    if peak is not None and count > peak[0]:
        peak[0] = count
    limit = _LIMITS.get()[1 if graph else 0]
    if limit is not None and count > limit:
        raise PatternTooLarge(f"{what} would hold {count:,} entries; the limit is {limit:,}")
    work = None if graph else _WORK.get()
    if work is not None and work[1] is not None:
        work[0] += count
        if work[0] > work[1]:
            raise DetectionTooCostly(f"detection handled more than {work[1]:,} pattern entries (summed over the "
                                     f"function's operations) by {what}")


#: A sparse product's steps (one multiply-add for each entry of the left matrix and each
#: entry of the row of the right one it reads) counted as one entry of detection work.
#: scipy's product takes ~1.5 ns a step, an entry handled ~80 ns (measured: an MLP's
#: 1,000 x 1,000 layer over inputs it depends on whole, 10^9 steps, ~1.5 s).
PRODUCT_STEPS_PER_ENTRY = 32


def check_product(left: Any, right: Any, what: str) -> None:
    """Count the steps of the sparse product ``left @ right`` (CSR or CSC ``right``'s
    rows read by ``left``'s columns) as detection work before it runs, and refuse
    (:class:`DetectionTooCostly`) past the limit. Only its entries were counted (the
    result's, when made): a dense layer over an intermediate that depends on every input
    costs n^3 steps for n^2 entries, and an MLP of 3,000-wide layers held the engine
    minutes, inside scipy (no deadline check), before the work limit refused it; now it is
    refused before its second layer's product. Counted from ``left``'s column counts and
    ``right``'s row lengths: a pass over ``left``'s entries."""
    work = _WORK.get()
    if work is None or work[1] is None:
        return
    left = left if left.format == "csr" else left.tocsr()
    right_rows = np.diff(right.indptr) if right.format == "csr" else np.bincount(right.tocoo().row, minlength=right.shape[0])
    reads = np.bincount(left.indices, minlength=left.shape[1])
    steps = int(np.dot(reads.astype(np.float64), right_rows.astype(np.float64)))
    work[0] += steps // PRODUCT_STEPS_PER_ENTRY
    if work[0] > work[1]:
        raise DetectionTooCostly(f"detection handled more than {work[1]:,} pattern entries (summed over the "
                                 f"function's operations; a sparse product's {PRODUCT_STEPS_PER_ENTRY} steps as "
                                 f"one) by {what}")


def limits_now() -> tuple[Any, ...]:
    """Every limit :func:`entry_limit` set (the entries', the graph's, the inputs' and the
    detection's work): what decides whether one detection is refused."""
    work = _WORK.get()
    return (*_LIMITS.get(), None if work is None else work[1])


def check_input_entries(count: int) -> None:
    """The differentiated inputs' elements against ``max_input_entries`` (:func:`entry_limit`)."""
    limit = _LIMITS.get()[2]
    if limit is not None and count > limit:
        raise PatternTooLarge(f"tracing {count:,} input elements would hold as many entries; the limit is {limit:,}")


#: Steps of compiled work (the colouring graph's sparse product: one multiply-add for each
#: pair of entries sharing a row) allowed per entry of the graph limit. The greedy passes
#: cost about a microsecond per graph entry, a product step about a nanosecond: so a
#: pattern at the work limit costs the product about what a graph at its limit costs the
#: greedy passes (a few seconds on one CPU core with the default 256 MiB budget).
WORK_PER_GRAPH_ENTRY = 1024


def work_limit() -> int | None:
    """Most steps the colouring may spend on one pattern (None: no bound): what
    :func:`entry_limit` set for the graph, times :data:`WORK_PER_GRAPH_ENTRY`."""
    graph = _LIMITS.get()[1]
    return None if graph is None else graph * WORK_PER_GRAPH_ENTRY


def check_work(count: int, what: str) -> None:
    """Refuse (:class:`PatternTooLarge`) work whose cost is known from the pattern's
    counts before it starts, when it is past :func:`work_limit`."""
    limit = work_limit()
    if limit is not None and count > limit:
        raise PatternTooLarge(f"{what} would take {count:,} steps (pairs of entries sharing a row); the limit is {limit:,}")


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` (sorted, distinct) for integer arrays, by one stable sort:
    numpy 2's hash-based ``np.unique`` takes seconds on the millions of entries a dense
    pattern has (4.8 s on 4M keys, against 0.03-0.3 s sorted). Already sorted input (the
    usual row-major pattern) costs one comparison pass and is returned as it is."""
    values = np.asarray(values)
    if values.size < 2 or bool((values[1:] > values[:-1]).all()):
        return values  # already sorted and distinct: the input itself, not a copy
    s = np.sort(values, kind="stable")
    keep = np.empty(s.size, bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


#: Note on a pattern that keeps the entries of every choice the values could make (see
#: :attr:`Pattern.conservative`); the ops that chose follow it in parentheses.
CHOICE_NOTE = (
    "a union over choices the values make (both branches of a where on a computed condition, both sides of a "
    "clamp, maximum or minimum, a relu's zero side, a max's whole window): entries the choices at this point "
    "make zero are stored as zeros"
)


@dataclass(frozen=True, eq=False)
class Pattern:
    """Possible nonzeros of an ``(m, n)`` matrix, as sorted unique (row, col) pairs.

    ``source`` says where it came from: ``declared``, ``traced`` (structural detection),
    ``probe`` (numerical probing at random points: may miss entries), or ``given``.
    ``exact`` is False when the tracer met ops it does not know and assumed them dense.
    ``value_dependent`` is True when detection read the input values (a branch on a
    traced value, an index or mask computed from them, the zeros of a non-differentiated
    input): the pattern then holds at the point it was detected at, not at every point
    of these shapes, and is cached for those values only.
    """

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    name: str = ""
    source: str = "given"
    exact: bool = True
    notes: tuple[str, ...] = ()
    value_dependent: bool = False
    # The coarsest floating dtype the traced function computed in from its inputs, where
    # coarser than the inputs' (``"float32"`` for a float64 function computing in float32
    # inside), else "": its JVPs round otherwise than jacrev's VJPs (detect._coarse).
    arithmetic: str = ""

    def __post_init__(self) -> None:
        m, n = (int(d) for d in self.shape)
        rows, cols = _indices(self.rows, "rows"), _indices(self.cols, "cols")
        if rows.shape != cols.shape:
            raise ValueError("rows and cols must have the same length")
        if rows.size and (rows.min() < 0 or rows.max() >= m or cols.min() < 0 or cols.max() >= n):
            raise ValueError(f"pattern entries fall outside the shape {(m, n)}")
        # Sorted row-major and deduplicated: CSR order, and equal patterns compare equal.
        object.__setattr__(self, "shape", (m, n))
        key = rows * n + cols if rows.size else np.zeros(0, np.int64)
        if key.size > 1 and not bool((key[1:] > key[:-1]).all()):
            key = sorted_unique(key)
            rows, cols = np.divmod(key, max(n, 1))
        # else already in that order (traced and declared patterns are): kept as given
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "cols", cols)

    # ------------------------------------------------------------------ views
    @property
    def conservative(self) -> bool:
        """Whether some stored entries may be zeros at this point by a choice the values
        make, not by chance: a union over the branches of a ``where`` on a computed
        condition, the sides of a ``clamp`` or ``maximum``, a ``relu``'s, a max's
        window (:data:`CHOICE_NOTE`), or ops taken as dense (``exact`` false)."""
        return not self.exact or any(n.startswith(CHOICE_NOTE) for n in self.notes)

    @property
    def nnz(self) -> int:
        return int(self.rows.size)

    @property
    def density(self) -> float:
        m, n = self.shape
        return self.nnz / max(m * n, 1)

    def indptr(self) -> np.ndarray:
        # Searched once per pattern (its rows never change), not at every answer: 0.18 ms
        # of a cached 20^3 Laplacian's ~5 ms request. A copy each call, as before: scipy
        # may sort or cast the CSR it is handed in place.
        known = self.__dict__.get("_indptr")
        if known is None:
            known = np.searchsorted(self.rows, np.arange(self.shape[0] + 1)).astype(np.int64)
            self.__dict__["_indptr"] = known
        return known.copy()

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        out[self.rows, self.cols] = True
        return out

    def to_csr(self, data: np.ndarray | None = None) -> Any:
        """A ``scipy.sparse.csr_array`` with ``data`` (ones when omitted) at the pattern."""
        import scipy.sparse as sp

        values = np.ones(self.nnz, dtype=np.float32) if data is None else data
        return sp.csr_array((values, self.cols.astype(_index_dtype(self)), self.indptr().astype(_index_dtype(self))), shape=self.shape)

    def transpose(self) -> "Pattern":
        return self.replace(shape=(self.shape[1], self.shape[0]), rows=self.cols, cols=self.rows)

    def replace(self, **changes: Any) -> "Pattern":
        fields = {k: getattr(self, k) for k in ("shape", "rows", "cols", "name", "source", "exact", "notes", "value_dependent", "arithmetic")}
        fields.update(changes)
        return Pattern(**fields)

    # ------------------------------------------------------------------ set relations
    def _keys(self) -> np.ndarray:
        return self.rows * self.shape[1] + self.cols

    def contains(self, other: "Pattern") -> bool:
        """Whether every entry of ``other`` is an entry of this pattern."""
        return self.shape == other.shape and bool(np.isin(other._keys(), self._keys(), assume_unique=True).all())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and self.shape == other.shape and np.array_equal(self._keys(), other._keys())

    __hash__ = None  # type: ignore[assignment]

    def is_symmetric(self) -> bool:
        return self == self.transpose()

    @classmethod
    def from_dense(cls, mask: np.ndarray, **kw: Any) -> "Pattern":
        mask = np.asarray(mask)
        rows, cols = np.nonzero(mask)
        return cls(tuple(mask.shape), rows, cols, **kw)  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        m, n = self.shape
        per_row = np.bincount(self.rows, minlength=m) if m else np.zeros(0, np.int64)
        per_col = np.bincount(self.cols, minlength=n) if n else np.zeros(0, np.int64)
        return {
            "name": self.name,
            "source": self.source,
            "exact": self.exact,
            "value_dependent": self.value_dependent,
            "conservative": self.conservative,
            "shape": [m, n],
            "nnz": self.nnz,
            "density": self.density,
            "max_per_row": int(per_row.max()) if m else 0,
            "max_per_col": int(per_col.max()) if n else 0,
            "notes": list(self.notes),
        }


def _indices(values: Any, what: str) -> np.ndarray:
    """A pattern's row or column indices as int64, refusing any that are not whole
    numbers: a declared pattern given as ``0.5, 1.5`` was cast to ``0, 1`` (and ``nan``
    to a huge negative), another pattern than declared, its products then read at the
    wrong places. Whole floats (``np.arange(n, dtype=float)``) lose nothing and pass."""
    a = np.asarray(values).ravel()
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    if a.size == 0:  # (np.asarray([]) is float64)
        return np.zeros(0, np.int64)
    if a.dtype.kind != "f":
        raise ValueError(f"pattern {what} must be integer indices; got an array of {a.dtype}")
    whole = np.isfinite(a) & (np.floor(a) == a)
    if not whole.all():
        shown = ", ".join(repr(float(v)) for v in a[~whole][:3])
        raise ValueError(f"pattern {what} must be whole numbers (indices); got {shown}")
    return a.astype(np.int64)


def _index_dtype(p: Pattern) -> type:
    # int32 indices halve the index bytes on the wire whenever they fit.
    return np.int32 if max(p.shape + (p.nnz,)) < 2**31 - 1 else np.int64


# --------------------------------------------------------------------------- declared


#: Note on a declared Hessian pattern that was not symmetric (one triangle, say).
MIRRORED_NOTE = "the declared Hessian pattern is not symmetric: mirrored (a Hessian is)"


@dataclass(frozen=True)
class Declared:
    """A pattern declared at ``@register``: ``build(in_shapes, out_size)`` makes it.

    ``kind`` names the constructor (``banded``, ...); ``hessian=True`` declares the
    pattern of the Hessian (``n x n``) rather than of the Jacobian.
    """

    kind: str
    builder: Callable[[Shapes, int], Pattern] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    hessian: bool = False

    def build(self, in_shapes: Shapes, out_size: int, name: str = "") -> Pattern:
        n = sum(int(np.prod(s, dtype=np.int64)) for s in in_shapes)
        m = n if self.hessian else int(out_size)
        p = self.builder([tuple(s) for s in in_shapes], m)
        check_entries(p.nnz, f"the declared {self.kind} pattern")
        if p.shape != (m, n):
            raise ValueError(f"declared {self.kind} pattern has shape {p.shape}; the derivative is {(m, n)}")
        if self.hessian and not p.is_symmetric():
            # A Hessian is symmetric: one triangle (Ipopt's and CUTEst's convention for a
            # Hessian's structure) says where the other's entries are. It was refused, a
            # 422 'star colouring needs a square symmetric pattern'.
            check_entries(2 * p.nnz, f"the declared {self.kind} pattern, mirrored")
            p = p.replace(rows=np.concatenate([p.rows, p.cols]), cols=np.concatenate([p.cols, p.rows]),
                          notes=(*p.notes, MIRRORED_NOTE))
        return p.replace(name=name or self.kind, source="declared")

    def describe(self) -> dict[str, Any]:
        params = {k: v for k, v in self.params.items() if isinstance(v, (int, float, str, bool, list, tuple))}
        return {"kind": self.kind, "params": params, "hessian": self.hessian}


def _square(in_shapes: Shapes, m: int, kind: str) -> int:
    n = sum(int(np.prod(s, dtype=np.int64)) for s in in_shapes)
    if m != n:
        raise ValueError(f"a {kind} pattern needs as many outputs as inputs, got {m} x {n}")
    return n


def banded(lower: int, upper: int, *, periodic: bool = False, hessian: bool = False) -> Declared:
    """Entries with ``-lower <= j - i <= upper``; with ``periodic`` the band wraps
    around (``j - i`` taken modulo n), as for a ring of coupled variables."""
    if lower < 0 or upper < 0:
        raise ValueError("bandwidths are non-negative")

    def build(in_shapes: Shapes, m: int) -> Pattern:
        n = _square(in_shapes, m, "banded")
        check_entries(n * (lower + upper + 1), "the declared band")
        offsets = np.arange(-lower, upper + 1)
        rows = np.repeat(np.arange(n), offsets.size)
        cols = rows + np.tile(offsets, n)
        if periodic:
            cols = cols % max(n, 1)
        else:
            keep = (cols >= 0) & (cols < n)
            rows, cols = rows[keep], cols[keep]
        return Pattern((n, n), rows, cols)

    return Declared("banded", build, {"lower": lower, "upper": upper, "periodic": periodic}, hessian)


def block_diagonal(block: int | tuple[int, int], *, hessian: bool = False) -> Declared:
    """Dense ``(r, c)`` blocks on the diagonal (``block=b`` means ``(b, b)``)."""
    br, bc = (block, block) if isinstance(block, int) else block
    if br <= 0 or bc <= 0:
        raise ValueError("block sizes are positive")

    def build(in_shapes: Shapes, m: int) -> Pattern:
        n = sum(int(np.prod(s, dtype=np.int64)) for s in in_shapes)
        if m % br or n % bc or m // br != n // bc:
            raise ValueError(f"({m}, {n}) is not a whole number of ({br}, {bc}) blocks on the diagonal")
        k = m // br
        check_entries(k * br * bc, "the declared blocks")
        r, c = np.meshgrid(np.arange(br), np.arange(bc), indexing="ij")
        rows = (np.arange(k)[:, None] * br + r.ravel()).ravel()
        cols = (np.arange(k)[:, None] * bc + c.ravel()).ravel()
        return Pattern((m, n), rows, cols)

    return Declared("block_diagonal", build, {"block": [br, bc]}, hessian)


def coo(rows: Sequence[int], cols: Sequence[int], shape: tuple[int, int] | None = None, *, hessian: bool = False) -> Declared:
    """An explicit pattern for one fixed shape (checked against the call's)."""
    # (checked as whole indices when the pattern is built: a 422 naming them, not a cast)
    r, c = np.asarray(rows), np.asarray(cols)

    def build(in_shapes: Shapes, m: int) -> Pattern:
        n = sum(int(np.prod(s, dtype=np.int64)) for s in in_shapes)
        if shape is not None and tuple(shape) != (m, n):
            raise ValueError(f"the declared pattern is for shape {tuple(shape)}, the call's derivative is {(m, n)}")
        return Pattern((m, n), r, c)

    return Declared("coo", build, {"nnz": int(r.size)}, hessian)


def from_callable(fn: Callable[[Shapes, int], Any], *, hessian: bool = False) -> Declared:
    """``fn(in_shapes, out_size)`` returns a :class:`Pattern`, ``(rows, cols)``, a
    ``scipy.sparse`` matrix or array (its stored entries) or a dense boolean mask; for
    patterns that follow the shapes (stencils on any grid size)."""

    def build(in_shapes: Shapes, m: int) -> Pattern:
        got = fn(in_shapes, m)
        n = sum(int(np.prod(s, dtype=np.int64)) for s in in_shapes)
        if isinstance(got, Pattern):
            return got
        if isinstance(got, tuple) and len(got) == 2:
            return Pattern((m, n), got[0], got[1])
        if _is_scipy_sparse(got):
            return _from_scipy(got)
        return Pattern.from_dense(np.asarray(got, dtype=bool))

    return Declared("callable", build, {"function": getattr(fn, "__name__", "?")}, hessian)


def _is_scipy_sparse(value: Any) -> bool:
    # (duck-typed: this module stays free of scipy's import until a matrix is asked for)
    return hasattr(value, "tocoo") and hasattr(value, "nnz") and len(getattr(value, "shape", ())) == 2


def _from_scipy(matrix: Any) -> Pattern:
    """A scipy.sparse matrix's stored entries as a pattern (an explicit zero stored is an
    entry: a mesh's structure, whatever its values). np.asarray of one is a 0-d object
    array, so a callable returning the mesh's CSR matrix was a 422 'setting an array
    element with a sequence' at every request."""
    c = matrix.tocoo()
    return Pattern((int(c.shape[0]), int(c.shape[1])), np.asarray(c.row), np.asarray(c.col))


def from_matrix(value: Any, *, hessian: bool = False) -> Declared:
    """A ``scipy.sparse`` matrix or array's stored entries as the pattern, for one fixed
    shape (checked against the call's, as :func:`coo`'s): what a mesh or graph library
    gives. ``@register(sparsity={"mesh": A})`` takes one as it is."""
    if not _is_scipy_sparse(value):
        raise ValueError(f"from_matrix() takes a scipy.sparse matrix or array; got {type(value).__name__}")
    c = value.tocoo()
    shape = (int(c.shape[0]), int(c.shape[1]))
    rows, cols = np.asarray(c.row), np.asarray(c.col)

    def build(in_shapes: Shapes, m: int) -> Pattern:
        n = sum(int(np.prod(s, dtype=np.int64)) for s in in_shapes)
        if shape != (m, n):
            raise ValueError(f"the declared pattern is for shape {shape}, the call's derivative is {(m, n)}")
        return Pattern((m, n), rows, cols)

    return Declared("matrix", build, {"shape": list(shape), "nnz": int(rows.size)}, hessian)


def declared(value: Any) -> dict[str, Declared]:
    """Normalise ``@register(sparsity=...)``: one :class:`Declared` (named by its kind)
    or a mapping of names to them."""
    if value is None:
        return {}
    if _is_scipy_sparse(value):  # a scipy.sparse matrix as it is: see from_matrix()
        value = from_matrix(value)
    if isinstance(value, dict):
        value = {k: from_matrix(v) if _is_scipy_sparse(v) else v for k, v in value.items()}
    if isinstance(value, Declared):
        return {value.kind: value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, Declared) for k, v in value.items()):
        reserved = {"dense", "auto"} & set(value)
        if reserved:
            raise ValueError(f"sparsity names {sorted(reserved)} are reserved")
        return dict(value)
    raise ValueError("sparsity= takes a declared pattern (banded, block_diagonal, coo, from_callable, from_matrix, or a "
                     "scipy.sparse matrix) or a dict of them")


# --------------------------------------------------------------------------- cache


def function_fingerprint(fn: Callable[..., Any]) -> str:
    """A hash of what the function computes: its source when readable, else its
    bytecode and constants, and the source files of the user modules it can reach (its
    own, and those of the helpers it calls), so that an edited function or helper never
    reuses a stale pattern."""
    # Through wrappers (the engine's aux box sets __wrapped__): the memo is keyed by the
    # code of the function underneath, so a wrapped call is as cheap as a bare one.
    # By identity: equal code objects (a reloaded module's unchanged function) may call
    # helpers that changed. The entry holds the code, so its id is not reused meanwhile.
    code = getattr(inspect.unwrap(fn), "__code__", None)
    hit = _FINGERPRINTS.get(id(code)) if code is not None else None
    if hit is not None and hit[0] is code:  # reading source costs ~1 ms a call
        return hit[1]
    found = _fingerprint(fn)
    if code is not None:
        if len(_FINGERPRINTS) > 4096:
            _FINGERPRINTS.clear()
        _FINGERPRINTS[id(code)] = (code, found)
    return found


_FINGERPRINTS: dict[int, tuple[Any, str]] = {}


def _fingerprint(fn: Callable[..., Any]) -> str:
    target = inspect.unwrap(fn)
    try:
        text = inspect.getsource(target).encode()
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        text = marshal.dumps(code) if code is not None else repr(target).encode()
    h = hashlib.sha256(text)
    # The pattern follows every helper the function calls, not only its own lines: the
    # source files of the user modules it can reach (see _user_files).
    for path in _user_files(target):
        h.update(path.encode())
        try:
            h.update(Path(path).read_bytes())
        except OSError:
            h.update(b"(unreadable)")
    return h.hexdigest()[:16]


#: At most this many source files enter one fingerprint (a bound, whatever a module graph holds).
_MAX_FILES = 512

# Installed code: the standard library and site-packages. Their versions, not their
# files, matter (torch's is in the cache key); the rest is the user's code.
_INSTALLED = tuple(
    os.path.realpath(p) + os.sep
    for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} | set(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    if p
)
_OURS = ("jacobian_service", "jacobian_client", "torch", "numpy", "scipy")  # versioned in the key


def _user_module(module: Any) -> str | None:
    """The source file of ``module`` when it is the user's code, else None."""
    name = getattr(module, "__name__", "") or ""
    path = getattr(module, "__file__", None)
    if not path or name.split(".")[0] in _OURS:
        return None
    real = os.path.realpath(path)
    if real.startswith(_INSTALLED) or "site-packages" in real or "dist-packages" in real:
        return None
    return real


def _user_files(fn: Any) -> list[str]:
    """Source files of the user modules ``fn`` can reach: its own module, the modules of
    the functions, classes and modules its module's globals and its closure hold, and
    theirs in turn (every global, not only the names ``fn`` reads: cheap, and an edit
    anywhere in that code may change what the function computes)."""
    seen: dict[str, None] = {}
    modules: list[Any] = []

    def visit(obj: Any) -> None:
        module = obj if inspect.ismodule(obj) else sys.modules.get(getattr(obj, "__module__", None) or "")
        if module is None:
            return
        path = _user_module(module)
        if path is not None and path not in seen and len(seen) < _MAX_FILES:
            seen[path] = None
            modules.append(module)

    visit(fn)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            visit(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    while modules:
        for value in list(vars(modules.pop()).values()):
            if inspect.ismodule(value) or inspect.isfunction(value) or inspect.isclass(value):
                visit(value)
    return sorted(seen)


class PatternCache:
    """Patterns (and their colourings) in memory and, with a directory, on disk.

    Keys are strings built by the caller from the function's name and fingerprint,
    the input shapes and dtypes, argnums and what was asked (jacobian/hessian, name).
    Files are written to a temporary name and renamed, so a crash never leaves a torn
    entry; an unreadable file is treated as a miss.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, max_entries: int = 256,
                 max_bytes: int | None = None, max_disk_bytes: int = _DISK_BYTES) -> None:
        if directory is None:
            directory = os.environ.get(CACHE_ENV) or None
        self.directory = Path(directory) if directory else None
        self.max_entries = max_entries
        # Bytes the entries in memory may hold together (None: no bound but their count).
        # The count alone let clients' shapes fill it: measured, GET dense35/sparsity at
        # 1,000-1,039 elements (1M entries each, within every limit, 0.16 s apiece) grew
        # the engine by 31 MB a request, 1.25 GB in 6 s where its memory budget is 256 MiB,
        # and 256 of them at the entry limit would hold tens of GB.
        self.max_bytes = max_bytes
        # Bytes the directory's files may hold together, the least recently used going
        # first. The disk had no bound: a client's GETs of sin's pattern at a new size
        # each (shapes=1000000, 1001000, ...) wrote 24 MB a request, 40 MB/s from one API
        # key, until the disk was full.
        self.max_disk_bytes = max_disk_bytes
        self._disk_bytes: int | None = None  # what the directory holds, as last counted plus what was written since
        self._memory: dict[str, dict[str, Any]] = {}
        self._sizes: dict[str, int] = {}
        self.held_bytes = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]

    def get(self, key: str) -> dict[str, Any] | None:
        hit = self._memory.get(key)
        if hit is not None or self.directory is None:
            return hit
        path = self.directory / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                entry = _entry_from_arrays({k: z[k] for k in z.files})
        except Exception:  # unreadable, or not an entry as this version writes it (a 0-d shape: TypeError): a miss
            return None
        with contextlib.suppress(OSError):  # used now: the last of the files to go (_trim)
            os.utime(path)
        self._remember(key, entry)
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self._remember(key, entry)
        if self.directory is None:
            return
        try:
            self._write(key, entry)
        except OSError as exc:
            # The disk copy is a restart's shortcut, the entry in memory already: a disk
            # full (another tenant's, or an operator's volume sized small), a directory
            # made read-only or not one at all failed every sparse request and sparsity
            # query with a 500 function_error naming the server's path ("NotADirectoryError:
            # ... '/srv/cache'"), the function blamed. (The log's repeat filter bounds this line.)
            log.warning("sparsity pattern cache: not written to %s (%s); kept in memory only", self.directory,
                        getattr(exc, "strerror", None) or exc)

    def _write(self, key: str, entry: dict[str, Any]) -> None:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fp:
                np.savez(fp, **_entry_to_arrays(entry))
                size = fp.tell()
            if size > self.max_disk_bytes:  # larger than the whole bound: in memory only
                Path(tmp).unlink(missing_ok=True)
                return
            os.replace(tmp, self.directory / f"{key}.npz")
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
            raise
        if self._disk_bytes is not None:
            self._disk_bytes += size
        if self._disk_bytes is None or self._disk_bytes > self.max_disk_bytes:
            self._trim()

    def _trim(self) -> None:
        """Count the directory's files (other engines write there too, and earlier runs
        did) and, past ``max_disk_bytes``, remove the least recently used (by mtime:
        written, or read by ``get``) until three quarters of it are left, so that the
        next count comes only after a quarter of the bound is written again."""
        assert self.directory is not None
        files: list[tuple[float, int, Path]] = []
        now = time.time()
        try:
            listing = list(os.scandir(self.directory))
        except OSError:
            return
        for item in listing:
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:  # removed meanwhile (by another engine's trim)
                continue
            if item.name.endswith(".npz") and item.is_file(follow_symlinks=False):
                files.append((st.st_mtime, st.st_size, Path(item.path)))
            elif item.name.endswith(".tmp") and now - st.st_mtime > _STALE_TMP_S:
                with contextlib.suppress(OSError):
                    os.unlink(item.path)
        total = sum(size for _, size, _ in files)
        if total > self.max_disk_bytes:
            files.sort(key=lambda f: f[0])
            for _, size, path in files:
                if total <= self.max_disk_bytes * 3 // 4:
                    break
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)  # (gone already: another engine's trim)
                    total -= size
        self._disk_bytes = total

    def _remember(self, key: str, entry: dict[str, Any]) -> None:
        if key in self._memory:
            self._forget(key)
        size = entry_bytes(entry)
        if self.max_bytes is not None and size > self.max_bytes:
            return  # larger than the whole bound: on disk only, if anywhere (detected again else)
        # bounded, whatever shapes clients send: in count and in bytes, the oldest going first
        while self._memory and (len(self._memory) >= self.max_entries
                                or self.max_bytes is not None and self.held_bytes + size > self.max_bytes):
            self._forget(next(iter(self._memory)))
        self._memory[key] = entry
        self._sizes[key] = size
        self.held_bytes += size

    def _forget(self, key: str) -> None:
        del self._memory[key]
        self.held_bytes -= self._sizes.pop(key)


def entry_bytes(entry: dict[str, Any]) -> int:
    """Bytes of the arrays a cache entry holds (its pattern's, its colouring's), each array
    once. An entry read from disk holds no colouring yet (``_cached`` builds it on its first
    use, in place): its gather map (an int64 per entry) is counted ahead."""
    seen: set[int] = set()
    total = _held_bytes(entry, seen, 4)
    pattern = entry.get("pattern")
    if isinstance(pattern, Pattern) and "coloring" not in entry:
        total += 8 * pattern.nnz
    return total


def _held_bytes(obj: Any, seen: set[int], depth: int) -> int:
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return 0
    seen.add(id(obj))
    if isinstance(getattr(obj, "nbytes", None), int):  # a numpy array (or a tensor)
        return int(obj.nbytes)
    if depth == 0:
        return 0
    if isinstance(obj, dict):
        return sum(_held_bytes(v, seen, depth - 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_held_bytes(v, seen, depth - 1) for v in obj)
    fields = getattr(obj, "__dict__", None)  # a Pattern, a Coloring, a scipy matrix, a solve plan
    return 0 if fields is None else sum(_held_bytes(v, seen, depth - 1) for v in fields.values())


def _entry_to_arrays(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    if entry.get("value_dependent"):  # the marker: patterns of these shapes are per point
        return {"value_dependent": np.asarray(True)}
    p: Pattern = entry["pattern"]
    out = {
        "shape": np.asarray(p.shape, np.int64),
        "rows": p.rows,
        "cols": p.cols,
        "name": np.asarray(p.name),
        "source": np.asarray(p.source),
        "exact": np.asarray(p.exact),
        "notes": np.asarray(list(p.notes) or [""]),
        "values": np.asarray(p.value_dependent),
        "peak": np.asarray(int(entry.get("peak", 0)), np.int64),
        "arithmetic": np.asarray(p.arithmetic),
    }
    if entry.get("colors") is not None:
        out["colors"] = np.asarray(entry["colors"], np.int64)
        out["mode"] = np.asarray(entry["mode"])
    return out


def _entry_from_arrays(z: dict[str, np.ndarray]) -> dict[str, Any]:
    if "value_dependent" in z:
        return {"value_dependent": True}
    notes = tuple(str(s) for s in z["notes"] if str(s))
    p = Pattern(tuple(int(d) for d in z["shape"]), z["rows"], z["cols"], str(z["name"]), str(z["source"]), bool(z["exact"]), notes,  # type: ignore[arg-type]
                bool(z["values"]) if "values" in z else False, str(z["arithmetic"]) if "arithmetic" in z else "")
    entry: dict[str, Any] = {"pattern": p, "peak": int(z["peak"]) if "peak" in z else 0}
    if "colors" in z:
        entry["colors"] = z["colors"]
        entry["mode"] = str(z["mode"])
    return entry
