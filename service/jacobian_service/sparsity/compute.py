"""Compressed Jacobians and Hessians: a few vmapped products, decompressed to CSR.

A colouring (see :mod:`.coloring`) groups columns (forward mode), rows (reverse mode)
or symmetric columns (star, for Hessians) so that one product per group recovers every
entry of the pattern. The products run under ``torch.func.vmap`` over the seed matrix,
a chunk of groups at a time under the memory budget (halving on out-of-memory, as the
dense path does), and only the pattern's entries leave the device.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .. import __version__ as _SERVICE_VERSION
from ..engine.calling import GradOffWatch, dense_pullback, lacks_forward_ad, look
from ..engine.hessian import agrees_with_differences, gradient, refusal
from ..engine.products import same_products, vmap_agrees
from ..errors import ServiceError, exception_text
from .coloring import Coloring, choose_coloring, direct_coloring, hessian_coloring, star_coloring
from .dense import dense_hessian, dense_jacobian
from .detect import CUSTOM_NOTE, NO_GRAD_NOTE, TraceError, checked, is_random, probe, random_note, trace_hessian, trace_jacobian
from .draws import Draws, TorchDraws, replaying
from .function_state import function_state
from .patterns import (Declared, DetectionTooCostly, Pattern, PatternCache, PatternTooLarge, check_entries, counting_entries,
                       function_fingerprint, limits_now)
from .verify import coarsest, coarser_than, differs_from_reverse, leaf_tolerance

__all__ = [
    "OutputSizeChanged",
    "PatternMismatch",
    "ProvenWrong",
    "SparseResult",
    "VmapDisagrees",
    "describe_sparsity",
    "jacobian_side",
    "resolve",
    "reverse_coloring",
    "sparse_batch",
    "sparse_hessian",
    "sparse_jacobian",
]

log = logging.getLogger("jacobian_service.sparsity")

_WORKSET_FACTOR = 4  # as the dense rows: a product's working set is a few seed-sized rows
_DEFAULT_CACHE = PatternCache()


class OutputSizeChanged(ValueError):
    """The function's output has another size than its pattern's rows, on inputs of the
    same shapes (and, for a value-dependent pattern, values): its output size follows
    something else (global state, randomness). Never a reason to use the pattern."""


def _check_rows(p: Pattern, kind: str, out_size: int | None) -> None:
    if kind == "jacobian" and out_size is not None and p.shape[0] != out_size:
        raise OutputSizeChanged(
            f"the function's output has {out_size} elements at this call, and {p.shape[0]} where its pattern was "
            "detected on inputs of the same shapes and values: its output size follows something else "
            "(global state, randomness), so no pattern fits it. Ask for sparsity=dense"
        )


class PatternMismatch(ValueError):
    """A declared pattern is proven wrong at this point by the products (see
    :mod:`.verify`): it is trusted, so the values it would give are wrong."""


class ProvenWrong(RuntimeError):
    """A batch's pattern (not declared) is proven wrong at one of its points: the caller
    computes each point alone (where the dense answer replaces it)."""


class VmapDisagrees(RuntimeError):
    """A batch's products, vmapped over its points and seeds, disagree with one product
    at some point (torch's vmap is silently wrong for some ops and shapes): the caller
    computes each point alone, where the products are checked one point at a time."""


#: Note on results computed densely because the products proved the pattern wrong.
DENSE_NOTE = ("the products proved this pattern wrong at this point (it misses entries, or the function's products are "
              "not linear in their seeds: a gradient hook, a custom backward): computed densely instead")

#: Note on a cached pattern that products proved wrong once, widened by that point's nonzeros.
WIDENED_NOTE = "widened by the nonzeros of a point where the products proved it wrong"


@dataclass
class SparseResult:
    """A sparse derivative: ``matrix`` is a ``scipy.sparse.csr_array`` of shape
    (output elements) x (input elements), both flattened in C order and concatenated
    over outputs and differentiated inputs (for a Hessian: inputs x inputs)."""

    matrix: Any
    pattern: Pattern
    coloring: Coloring
    n_products: int
    mode: str
    source: str
    output: Any = None  # the function's output (tensors), from the forward pass
    aux: Any = None
    chunk_size: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    # A JVP (a Hessian's forward-over-reverse product) failed for want of forward AD (an op
    # without it, a custom Function without jvp), so VJPs (reverse over reverse) answered:
    # the caller may remember it and ask for reverse mode from then on
    forward_failed: bool = False

    def nbytes(self) -> int:
        m = self.matrix
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

    def meta(self) -> dict[str, Any]:
        return {
            "sparsity": self.pattern.name or self.source,
            "source": self.source,
            "mode": self.mode,
            "products": self.n_products,
            "nnz": int(self.matrix.nnz),
            "chunk_size": self.chunk_size,
        }


# --------------------------------------------------------------------------- planning


def _flat_fn(fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int], has_aux: bool) -> Callable[..., torch.Tensor]:
    """``fn`` of the differentiated inputs only, returning its outputs flattened and
    concatenated (the row order of the sparse matrix)."""

    def g(*diff: torch.Tensor) -> torch.Tensor:
        # The function may write into its inputs (x.mul_ under no_grad), and runs several
        # times here (detection, products): each call gets its own copy of the others.
        full = fresh(args)
        for i, v in zip(argnums, diff):
            full[i] = v
        out = fn(*full)
        if has_aux:
            out = out[0]
        leaves = pytree.tree_leaves(out)
        return leaves[0].reshape(-1) if len(leaves) == 1 else torch.cat([o.reshape(-1) for o in leaves])

    return g


def fresh(args: Sequence[Any]) -> list[Any]:
    """A copy of each tensor of ``args``, for one call of the user's function."""
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _at(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int], has_aux: bool, forward: Any = None,
) -> tuple[tuple[int, ...], tuple[torch.Tensor, ...], Any, Any]:
    """What both sparse derivatives start from: ``(argnums, primals, output, aux)`` (the
    forward pass sizes the output before the pattern and the colouring are chosen).
    ``forward``: what ``fn`` returned at ``args``, called already by the caller."""
    argnums = tuple(argnums)
    full_out = look(fn, lambda: fresh(args)) if forward is None else forward  # (calling.look: where a plain call fails)
    out, aux = full_out if has_aux else (full_out, None)
    return argnums, tuple(args[i] for i in argnums), out, aux


def _detection_digest() -> str:
    """A hash of this package's own source (tracer, colourings, patterns): a build that
    detects or colours differently (a tracer fix, with the same version number) never
    reads a pattern an older one left on disk."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_DETECTION_DIGEST = _detection_digest()


def _cache_key(fn: Callable[..., Any], name: str | None, args: Sequence[torch.Tensor], argnums: Sequence[int], kind: str, choice: str) -> str:
    return PatternCache.key(
        # the versions of what detects and differentiates: another may trace differently
        torch.__version__, _SERVICE_VERSION, _DETECTION_DIGEST,
        # a registered name is one function; without one, two functions may share a
        # source (closures of one factory, lambdas of one line): their state tells them apart
        name or getattr(fn, "__qualname__", "?"), function_fingerprint(fn), "" if name else function_state(fn),
        tuple(tuple(a.shape) for a in args), tuple(str(a.dtype) for a in args), tuple(argnums), kind, choice,
    )


def resolve(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), pattern: Any = "auto", *,
    kind: str = "jacobian", mode: str = "auto", declared: Mapping[str, Declared] | None = None, has_aux: bool = False,
    cache: PatternCache | None = None, name: str | None = None, out_size: int | None = None,
    rows: tuple[int, int] | None = None, check_alive: Callable[[], None] | None = None, drew: bool = False,
    output: Any = None,
) -> tuple[Pattern, Coloring, str]:
    """The pattern and colouring to use, from the cache when this function, these
    shapes and this choice were seen before. ``pattern`` is ``"auto"`` (detect), the
    name of a declared pattern, a :class:`Declared` or a :class:`Pattern`. With
    ``rows=(start, stop)`` (a Jacobian's rows of the flattened output), the pattern
    keeps only those rows' entries and is coloured on its own: fewer products.
    Returns ``(pattern, coloring, cached)`` with ``cached`` in ``""``, ``"memory"``, ``"disk"``.

    ``check_alive`` (a request's deadline and cancel check) is called while detecting
    and colouring; what it raises propagates, and nothing is cached then. ``drew``:
    the function drew random numbers in the caller's forward pass (see :mod:`.draws`),
    so a detected pattern is this draw's alone: detected afresh and never cached.
    ``output``: that forward pass's output (without aux), which a detection's traced
    run is compared with (``detect._diverged``)."""
    if rows is not None:
        if kind != "jacobian":
            raise ValueError("rows applies to Jacobians only")
        full, _, _ = resolve(fn, args, argnums, pattern, kind=kind, mode=mode, declared=declared, has_aux=has_aux,
                             cache=cache, name=name, out_size=out_size, check_alive=check_alive, drew=drew, output=output)
        return _restricted(full, fn, args, argnums, mode, cache, name, rows, check_alive)
    argnums = tuple(argnums)
    if isinstance(pattern, Pattern):
        choice = "given:" + _fingerprint(pattern)
    elif isinstance(pattern, Declared):
        choice = "declared:" + repr(pattern)
    else:
        choice = str(pattern)
    key = _cache_key(fn, name, args, argnums, kind, f"{choice}|{mode}")
    p, coloring, cached = _cached(cache, key, lambda: _colored(
        _build_pattern(fn, args, argnums, pattern, kind, declared or {}, has_aux, out_size, check_alive, drew, output),
        kind, mode, check_alive, _products_eps(args, argnums, output)), lambda: values_digest(args),
        # an entry with another output size is stale (the function's output size followed
        # something the key does not hold): detected again, and replaced
        fits=lambda q: kind != "jacobian" or out_size is None or q.shape[0] == out_size,
        # a detection that draws anew is never served from the cache
        fresh=drew and not isinstance(pattern, (Pattern, Declared)) and pattern == "auto")
    _check_rows(p, kind, out_size)  # the fresh detection's own forward pass disagrees: refuse
    return p, coloring, cached


def values_digest(args: Sequence[Any]) -> str:
    """A hash of the inputs' values (dtypes and shapes included): the cache key of a
    pattern that holds at this point only."""
    h = hashlib.sha256()
    for a in args:
        if isinstance(a, torch.Tensor):
            t = a.detach().contiguous().cpu().reshape(-1)
            h.update(f"{t.dtype}{tuple(a.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(a).encode())
    return h.hexdigest()[:32]


def _cached(
    cache: PatternCache | None, key: str, build: Callable[[], tuple[Pattern, Coloring]],
    values: Callable[[], str] | None = None, fits: Callable[[Pattern], bool] | None = None, fresh: bool = False,
) -> tuple[Pattern, Coloring, str]:
    """The pattern and colouring cached under ``key``, else ``build()``'s, cached then.
    Returns ``(pattern, coloring, cached)`` with ``cached`` in ``""``, ``"memory"``, ``"disk"``.

    A pattern that depends on the input values (``value_dependent``) holds at the point
    it was detected at only: it is cached under ``key`` and ``values()`` (a digest of
    the point), and ``key`` itself holds a marker that sends every later request of
    these shapes to its own point's entry. So no other point reuses it, and a point
    seen before (a client's repeated call) still skips detection.

    A pattern of a function that draws random numbers holds for one draw, not at a
    point: it is never cached (nor looked up, with ``fresh``)."""
    cache = _DEFAULT_CACHE if cache is None else cache
    hit = None if fresh else cache.get(key)
    marked = False
    if hit is not None and hit.get("value_dependent") and values is not None:
        key, marked = PatternCache.key(key, values()), True
        hit = cache.get(key)
    if hit is not None and hit.get("colors") is not None and (fits is None or fits(hit["pattern"])):
        p = hit["pattern"]
        # as detecting would have refused it under this request's limit (a JSON answer's,
        # lower than a streamed .npy's, whose detection cached it)
        check_entries(int(hit.get("peak", 0)), "detecting this pattern")
        if "coloring" not in hit:  # read from disk: rebuild (and check) the map once
            hit["coloring"] = _coloring_from(p, np.asarray(hit["colors"]), hit["mode"])
            return p, hit["coloring"], "disk"
        return p, hit["coloring"], "memory"
    refused = None if fresh or values is None else (key, limits_now())
    # A trace refused for its work (DetectionTooCostly) is refused under any entry limit
    # with the same work limit: a higher one never stopped it sooner, a lower one refuses
    # it sooner (413 all the same). GET .../sparsity and a POST's JSON answer have other
    # entry limits (their result limits): the POST traced again, 4 s of the engine.
    costly = None if refused is None else (key, ("work", refused[1][2:]))
    for seen in (refused, costly):
        if seen is not None and seen in _REFUSED:
            points = _REFUSED[seen]
            said = points.get(_ANY_POINT) or (points.get(values()) if seen is refused else None)
            if said is not None:  # the same detection at the same point, under the same limits
                raise said[0](said[1])
    try:
        with counting_entries() as peak:
            p, coloring = build()
    except PatternTooLarge as exc:
        if refused is not None:
            anywhere = getattr(exc, "any_point", False)
            _remember_refusal(refused, _ANY_POINT if anywhere else values(), exc)
            if anywhere and isinstance(exc, DetectionTooCostly):
                _remember_refusal(costly, _ANY_POINT, exc)
        raise
    if is_random(p):
        return p, coloring, ""
    if p.value_dependent and not marked:
        if values is None:  # nowhere to keep it apart from other points: not cached
            return p, coloring, ""
        cache.put(key, {"value_dependent": True})
        key = PatternCache.key(key, values())
    cache.put(key, {"pattern": p, "colors": coloring.colors, "mode": coloring.mode, "coloring": coloring, "peak": peak[0]})
    return p, coloring, ""


# Detections refused at their limits (PatternTooLarge, DetectionTooCostly), by cache key and
# limits, then by the point's values: the same request is refused again at once, not after
# the same seconds of tracing. Measured: GET lorenz96/sparsity?shapes=1000000 was a 413
# after 1.5-6 s of the engine each time, every other client's request waiting behind it.
# (Per point: a function may branch on its values, and trace more at one point than
# another.) Bounded: clients choose shapes and values.
_REFUSED: collections.OrderedDict[Any, dict[str, tuple[type, str]]] = collections.OrderedDict()
_REFUSED_MAX = 256
# The point a trace refused before it read any value stands for (``any_point`` on the
# refusal, set by detect._trace): the tracer ran the same ops at every point up to the
# limit. Measured: lorenz96 of 10^6 elements at a new point each time (an integrator's
# every step) took 6-12 s of the engine for each 413, the first's cost again.
_ANY_POINT = "*"


def _remember_refusal(refused: Any, values: str, exc: PatternTooLarge) -> None:
    points = _REFUSED.setdefault(refused, {})
    _REFUSED.move_to_end(refused)
    if len(points) >= 16:  # (one function and shapes at many points: the oldest go)
        points.pop(next(iter(points)))
    points[values] = (type(exc), str(exc))
    while len(_REFUSED) > _REFUSED_MAX:
        _REFUSED.popitem(last=False)


def _products_eps(args: Sequence[Any], argnums: Sequence[int], output: Any = None) -> float:
    """Machine epsilon of the products' dtype (the first differentiated input's, as the
    seeds'; the coarsest where they differ): how much round-off a Hessian's acyclic
    substitution may sum (see :mod:`.acyclic`). The cache key holds the dtypes.

    With ``output`` (the function's, at a point), the coarsest of its floating leaves
    too: a float16 energy of float64 inputs computes its Hessian-vector products in
    float16, and an acyclic colouring (allowed by float64's round-off) summed their
    float16 roundings: 54 to 138 entries of a ring's or band's 120 to 280 were 1 to 4
    float16 roundings off torch.func.hessian's (the dense /hessian: none)."""
    dtypes = [args[i].dtype for i in argnums if isinstance(args[i], torch.Tensor) and args[i].dtype.is_floating_point]
    dtypes += [d for _, d in _leaves(output) if d.is_floating_point]
    return max((float(torch.finfo(d).eps) for d in dtypes), default=float(torch.finfo(torch.float32).eps))


def _colored(p: Pattern, kind: str, mode: str, check_alive: Callable[[], None] | None,
             eps: float = float(torch.finfo(torch.float32).eps)) -> tuple[Pattern, Coloring]:
    """``p`` with its colouring: star or acyclic for a Hessian (acyclic where it takes
    fewer products, within what ``eps``, the products' round-off, allows it to sum),
    else the side ``mode`` asks for."""
    if kind == "hessian" and NO_GRAD_NOTE in p.notes:
        return _every_column(p)
    if kind == "hessian":
        from .acyclic import most_summed

        coloring = hessian_coloring(p, check_alive=check_alive, most_summed=most_summed(eps))
        if most_summed(eps) == 0 and coloring.mode == "star":
            return p, _own_places(p, coloring, check_alive)
        return p, coloring
    if (NO_GRAD_NOTE in p.notes or CUSTOM_NOTE in p.notes) and mode != "rev":
        mode = "rev"  # jvp would differentiate through the no_grad values, or use a custom jvp jacrev does not
    if mode == "auto" and _coarse_arithmetic(p):
        # (JVPs would be proven no jacrev's and VJPs answer after them: measured, an arrow
        # of n = 200 in float32 arithmetic of float64 inputs, 9 calls of the function, not 3)
        mode = "rev"
    return p, choose_coloring(p, mode, check_alive=check_alive)


def _coarse_arithmetic(p: Pattern) -> bool:
    """Whether the tracer saw the function compute in a coarser dtype than its inputs
    (``Pattern.arithmetic``): its JVPs round otherwise than jacrev's VJPs."""
    return bool(getattr(p, "arithmetic", ""))  # (a pattern pickled before the field: none)


def _own_places(p: Pattern, star: Coloring, check_alive: Callable[[], None] | None) -> Coloring:
    """A half-precision Hessian's colouring: the direct one (every entry ``(i, j)`` read
    at its own place, ``(i, colour j)``: torch.func.hessian's own column ``j``) where it
    takes no more products than ``star``, which reads some entries at their mirror
    ``(j, colour i)``. In float16 or bfloat16 torch's Hessian is not symmetric: ``H[j,
    i]`` rounds otherwise than ``H[i, j]`` (an ulp), so each mirrored entry was an ulp off
    torch.func.hessian's (3 to 6 of a float16 band's 280; the dense /hessian: none). Star
    colouring stands where the direct one takes more (an arrow's 2 against n)."""
    if bool((star.gather == p.rows * star.n_colors + star.colors[p.cols]).all()):
        return star  # (every entry read at its own place already)
    direct = direct_coloring(p, check_alive=check_alive)
    return direct if direct.n_colors <= star.n_colors else star


#: Note on Hessians of functions that use torch.no_grad (see :func:`_every_column`).
NO_GRAD_HESSIAN_NOTE = (
    "uses torch.no_grad: computed densely (one Hessian-vector product per input element), as torch.func.hessian "
    "computes it, since its forward-over-reverse products differentiate through the no_grad values the pattern leaves out"
)


def _every_column(p: Pattern) -> tuple[Pattern, Coloring]:
    """A Hessian of a function that computes under ``torch.no_grad``: torch.func.hessian
    (forward over reverse, as the HVPs are) differentiates through those values in its
    forward pass, so the traced pattern (which gives them no dependencies) misses
    entries. Every entry then, one HVP per column: torch.func.hessian's own columns."""
    n = p.shape[0]
    check_entries(n * n, "a dense Hessian (the function uses torch.no_grad)")
    rows, cols = np.divmod(np.arange(n * n, dtype=np.int64), max(n, 1))
    dense = p.replace(rows=rows, cols=cols, notes=p.notes + (NO_GRAD_HESSIAN_NOTE,))
    colors = np.arange(n, dtype=np.int64)
    # (n, n) products, row-major: entry (i, j) is H[i, j] from the product of column j
    return dense, Coloring("star", colors, n, rows * n + cols, n, "every column")


def _fingerprint(p: Pattern) -> str:
    return PatternCache.key(p.shape, p.rows.tobytes(), p.cols.tobytes())


def _restricted(
    full: Pattern, fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int], mode: str,
    cache: PatternCache | None, name: str | None, rows: tuple[int, int], check_alive: Callable[[], None] | None = None,
) -> tuple[Pattern, Coloring, str]:
    """``full`` keeping rows ``start:stop`` (same shape, the other rows empty), with its
    own colouring, cached beside the full one. In reverse mode the empty rows get no
    colour, so no seed touches them; in forward mode the products compute every row and
    only the kept ones are read."""
    start, stop = rows
    if not 0 <= start <= stop <= full.shape[0]:
        raise IndexError(f"rows [{start}, {stop}] is out of range for {full.shape[0]} output elements")
    choice = f"rows:{start}:{stop}:{full.source}:{full.name}:" + _fingerprint(full)
    key = _cache_key(fn, name, args, argnums, "jacobian", f"{choice}|{mode}")

    def build() -> tuple[Pattern, Coloring]:
        keep = (full.rows >= start) & (full.rows < stop)
        return _colored(full.replace(rows=full.rows[keep], cols=full.cols[keep]), "jacobian", mode, check_alive)

    return _cached(cache, key, build)


def _coloring_from(p: Pattern, colors: np.ndarray, mode: str) -> Coloring:
    """Rebuild a cached colouring's decompression map (cheap, and re-checked)."""
    from .coloring import check_unique, star_gather

    k = int(colors.max(initial=-1)) + 1
    m, n = p.shape
    if mode == "fwd":
        gather = p.rows * k + colors[p.cols]
        lower = int(np.bincount(p.rows, minlength=m).max(initial=0))
    elif mode == "rev":
        gather = colors[p.rows] * n + p.cols
        lower = int(np.bincount(p.cols, minlength=n).max(initial=0))
    elif NO_GRAD_HESSIAN_NOTE in p.notes:  # every column, read as computed: H need not be symmetric
        return _every_column(p.replace(notes=tuple(n for n in p.notes if n != NO_GRAD_HESSIAN_NOTE)))[1]
    elif mode == "acyclic":
        from .coloring import acyclic_from

        return acyclic_from(p, colors)
    elif mode == "bidirectional":
        from .bicoloring import bicoloring_from

        return bicoloring_from(p, colors)
    elif mode == "symmetric":
        from .symmetric import symmetric_from

        return symmetric_from(p, colors)
    else:
        return Coloring("star", colors, k, star_gather(p, colors, k), 2 if bool((p.rows != p.cols).any()) else 1, "cached")
    check_unique(gather, mode)
    return Coloring(mode, colors, k, gather, lower, "cached")


def _flat(output: Any) -> torch.Tensor | None:
    """The forward pass's output flattened and concatenated (as ``_flat_fn`` returns
    it), for comparing with the traced run's; None where there is none (or not tensors)."""
    leaves = pytree.tree_leaves(output) if output is not None else []
    if not leaves or not all(isinstance(o, torch.Tensor) for o in leaves):
        return None
    return torch.cat([o.detach().reshape(-1) for o in leaves])


def _build_pattern(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...], pattern: Any, kind: str,
    declared: Mapping[str, Declared], has_aux: bool, out_size: int | None,
    check_alive: Callable[[], None] | None = None, drew: bool = False, output: Any = None,
) -> Pattern:
    in_shapes = [tuple(args[i].shape) for i in argnums]
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str) and pattern != "auto":
        if pattern not in declared:
            raise KeyError(f"no declared sparsity pattern named {pattern!r}; declared: {sorted(declared)}")
        spec, label = declared[pattern], pattern
    elif isinstance(pattern, Declared):
        spec, label = pattern, pattern.kind
    else:
        spec, label = None, ""
    if spec is not None:
        if spec.hessian != (kind == "hessian"):
            raise ValueError(f"the declared pattern {label!r} is for the {'Hessian' if spec.hessian else 'Jacobian'}")
        if out_size is None:  # a plain call: see probe's (a function may call torch.autograd.grad)
            out_size = int(look(_flat_fn(fn, args, argnums, has_aux), lambda: fresh([args[i] for i in argnums])).numel())
        return spec.build(in_shapes, out_size, name=label)
    g = _flat_fn(fn, args, argnums, has_aux)
    diff = [args[i] for i in argnums]
    before = Draws()
    try:  # what check_alive raises is never a TraceError: a deadline does not start a probe
        # Every input is traced (the others with no dependencies), so that reading a
        # non-differentiated input's values (A @ x, x[idx]) is seen.
        every = _flat_fn(fn, args, tuple(range(len(args))), has_aux)
        found = (trace_hessian if kind == "hessian" else trace_jacobian)(every, list(args), argnums, check_alive=check_alive,
                                                                         against=_flat(output))
    except TraceError as exc:
        log.info("sparsity tracing failed (%s); probing numerically", exc)
        found = probe(g, diff, tuple(range(len(diff))), hessian=kind == "hessian", why=f"tracing failed: {exc}",
                      check_alive=check_alive, leaves=_leaves(output))
    # Draws from numpy's or Python's generators are no torch op: the states say it.
    if (drew or Draws() != before) and not is_random(found):
        found = found.replace(notes=found.notes + (random_note(),), value_dependent=True)
    return found.replace(name="auto")


# --------------------------------------------------------------------------- products


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in exception_text(exc)


def _seeds(colors: np.ndarray, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start:stop`` of the seed matrix: row c is the indicator of colour c."""
    c = torch.as_tensor(colors, device=like.device)
    groups = torch.arange(start, stop, device=like.device)
    return (c.unsqueeze(0) == groups.unsqueeze(1)).to(like.dtype)


def _split(seeds: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(seeds[:, offset : offset + size].reshape(seeds.shape[0], *shape))
        offset += size
    return out


def _product_at(mode: str, fn: Callable[..., Any], argnums: tuple[int, ...], has_aux: bool) -> Callable[..., Callable[..., torch.Tensor]]:
    """``at(*args)`` -> ``product(*seed)``: one compressed product at one point, a flat
    row. fwd: a JVP (seed: one tangent per differentiated input); rev: a VJP (seed: one
    cotangent of the flat output); star: a Hessian-vector product, forward over reverse;
    star_rev: the same product reverse over reverse (``H v = (v^T H)^T``), for functions
    with an op that has no forward AD (index_reduce), as the dense Hessian falls back.
    The point is an argument, not a closure, so request batching can vmap over it."""

    def at(*args: torch.Tensor) -> Callable[..., torch.Tensor]:
        g = _flat_fn(fn, args, argnums, has_aux)
        primals = tuple(args[i] for i in argnums)
        # Each call of the function gets its own copy of the primals (see _flat_fn).
        if mode == "fwd":
            # in the dtype a VJP's row has (the inputs', as jacrev's blocks): a JVP's is
            # the output's, so a float64 output of a float32 input, mode=fwd, came back
            # a float64 matrix where every other route answers float32
            rev = _gradient_dtype(primals)
            return lambda *t: _as(torch.func.jvp(g, tuple(fresh(primals)), t)[1], rev)
        if mode == "rev":
            _, pullback = torch.func.vjp(g, *fresh(primals))  # one forward pass for every seed
            pullback = dense_pullback(pullback)  # (embedding(sparse=True)'s COO gradients)
            return lambda t: torch.cat([gr.reshape(-1) for gr in pullback(t)])
        grad = gradient(lambda *d: g(*d).sum(), tuple(range(len(primals))))
        if mode == "star_rev":
            _, pullback = torch.func.vjp(grad, *fresh(primals))  # one gradient pass for every seed
            return lambda *t: torch.cat([h.reshape(-1) for h in pullback(tuple(t))])
        return lambda *t: torch.cat([h.reshape(-1) for h in torch.func.jvp(grad, tuple(fresh(primals)), t)[1]])

    return at


def _gradient_dtype(primals: Sequence[torch.Tensor]) -> torch.dtype | None:
    """The dtype of a reverse product's flat row (its gradients concatenated), where
    every differentiated input is real floating; else None."""
    dtypes = [p.dtype for p in primals]
    if not dtypes or not all(d.is_floating_point for d in dtypes):
        return None
    return functools.reduce(torch.promote_types, dtypes)


def _as(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype)


@dataclass
class _Products:
    """How one derivative's products run: the colouring's seeds, split per input."""

    coloring: Coloring
    seed_shapes: list[torch.Size]  # one per seed part (differentiated inputs; rev: the output)
    width: int  # elements in one product's row
    like: torch.Tensor  # dtype and device of the seeds
    rows: tuple[int, int] | None = None  # the rows asked for (rev: the random cotangent's support)
    # Whether the products carry one more, with a random seed, that checks the answer (see
    # _proven_wrong): run beside the colours', in their vmap, it costs a fraction of one
    # product alone (a second call's fixed cost was most of the check's: +90 % on lorenz96)
    checks: bool = True
    checked_by: tuple[torch.Tensor, np.ndarray] | None = field(default=None, repr=False)  # (product, seed)
    # The checks' round-off where an output leaf is coarser than the inputs (verify:
    # leaf_tolerance, coarsest): a Jacobian's per output row (None: the inputs' for all),
    # and the dtype whose round-off caps the measured noise (None: the inputs')
    row_tol: np.ndarray | None = field(default=None, repr=False)
    noise_dtype: torch.dtype | None = None
    leaves: list[tuple[int, torch.dtype]] = field(default_factory=list, repr=False)  # (with row_tol: each leaf's)

    @property
    def check_dtype(self) -> torch.dtype:
        """The dtype whose round-off caps the function's measured noise."""
        return self.noise_dtype or self.like.dtype

    @property
    def tol_dtype(self) -> torch.dtype:
        """The dtype of the random check's tolerance: the inputs' beside ``row_tol`` (the
        gradient's sum), else the coarsest (a Hessian's one output element)."""
        return self.like.dtype if self.row_tol is not None else self.check_dtype

    def compressed(
        self, run: Callable[[list[torch.Tensor]], torch.Tensor], memory_budget: int,
        check_alive: Callable[[], None] | None, chunk_size: int | None = None, batch: int = 1,
    ) -> tuple[torch.Tensor, int]:
        """Every product, ``chunk`` seeds per ``run(seeds)`` call, concatenated along the
        seed axis (0, or 1 for a batch of points). ``chunk_size`` (the request's option)
        caps the chunk; the memory budget sizes it, halved on out-of-memory as the dense
        rows are; the deadline is checked between chunks."""
        from .verify import random_row

        k = self.coloring.n_colors
        seed_width = sum(int(np.prod(s, dtype=np.int64)) for s in self.seed_shapes)
        # (the checking seed is row k of the seed matrix: chunked, halved on out of memory
        # and deadline-checked as the colours' rows are)
        check = random_row(seed_width, self.coloring.mode, self.like, self.rows) if (
            self.checks and self.width and seed_width) else None
        total = k + (check is not None)
        per = _WORKSET_FACTOR * batch * (self.width + seed_width) * self.like.element_size()
        chunk = max(1, min(total, memory_budget // max(per, 1), chunk_size or total))
        axis = 0 if batch == 1 else 1
        if total == 0 and self.width and seed_width:
            # An empty pattern needs no product, but jacrev still runs the function under
            # its transform, and fails where it fails (an op without a derivative, such as
            # unique; a write through out=, which the trace never sees): one product with
            # a zero seed, its value unused, so that the answer is that failure, not zeros
            # (and the callers' fallbacks run as for any product: reverse over reverse).
            run(_split(torch.zeros((1, seed_width), dtype=self.like.dtype, device=self.like.device), self.seed_shapes))
        blocks: list[torch.Tensor] = []
        start = 0
        while start < total:
            if check_alive is not None:
                check_alive()
            stop = min(start + chunk, total)
            seeds = _seeds(self.coloring.colors, start, min(stop, k), self.like)
            if stop > k:
                seeds = torch.cat([seeds, check[0]])  # type: ignore[index]
            try:
                blocks.append(run(_split(seeds, self.seed_shapes)))
            except Exception as exc:
                if _is_oom(exc) and chunk > 1:
                    chunk = max(1, chunk // 2)
                    if self.like.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                raise
            start = stop
        if not blocks:
            shape = (0, self.width) if batch == 1 else (batch, 0, self.width)
            return torch.zeros(shape, dtype=self.like.dtype, device=self.like.device), chunk
        block = torch.cat(blocks, dim=axis)
        if check is not None:
            self.checked_by = (block.narrow(axis, k, 1), check[1])
            block = block.narrow(axis, 0, k)
        return block, min(chunk, max(k, 1))  # (meta's chunk_size: the colours' products per vmap)

    def round_off(self, run: Callable[[list[torch.Tensor]], torch.Tensor], batch: int = 0) -> list[float]:
        """The function's own round-off in these products (verify.round_off: one more vmap
        of 3 seeds), at this point, or at each of a ``batch`` of points (``run`` over all of
        them at once); read only where the random check failed."""
        from .verify import noise_seeds, round_off

        width = sum(int(np.prod(s, dtype=np.int64)) for s in self.seed_shapes)
        # Seeded over every row, not the rows asked for: round-off is the function's at this
        # point, and a few rows' products give it at a few places only, where the largest
        # residual may fall far below the check's (rows=[49, 50] of a float32 ring through
        # cancelling terms: 7 of 150 such requests were proven wrong and answered densely;
        # a declared pattern would have been a 422). The same one VJP per seed.
        out = run(_split(noise_seeds(width, self.coloring.mode, self.like, None), self.seed_shapes))
        return [round_off(point) for point in out] if batch else [round_off(out)]

    def leaf_round_off(self, run: Callable[[list[torch.Tensor]], torch.Tensor], batch: int = 0) -> list[np.ndarray]:
        """The function's own round-off per output row (``row_tol``'s rows), at this point
        or at each of a ``batch`` of points, as a relative allowance to add to each row's
        tolerance (:func:`.verify.noise_tolerance` of its leaf dtype's round-off: 0 where
        that is past the dtype's cap, no round-off then).

        One number for every row (:meth:`round_off`) let a coarse leaf's round-off stand
        for the finer rows' too: a bfloat16 leaf's arithmetic is 5 % from additive, and a
        declared pattern missing a float64 leaf's sub-diagonal (7 % off) passed as
        "within the function's own round-off", a 200 with wrong values (mode=rev, any
        input dtype; mode=auto once it chose VJPs for such outputs). So each group of rows
        of one dtype is measured alone: forward products' places are rows, read per
        group; reverse products sum every row into each place, so each group gets its own
        three cotangents, zero outside it (one vmap for all)."""
        from .verify import coarsest, noise_seeds, noise_tolerance, round_off

        assert self.row_tol is not None
        group = np.repeat(np.arange(len(self.leaves)), [n for n, _ in self.leaves])
        dtypes = [coarsest(self.like.dtype, [d]) for _, d in self.leaves]
        width = sum(int(np.prod(s, dtype=np.int64)) for s in self.seed_shapes)
        seeds = noise_seeds(width, self.coloring.mode, self.like, None)
        if self.coloring.mode == "rev":
            masks = [torch.as_tensor(group == g, device=seeds.device).to(seeds.dtype) for g in range(len(self.leaves))]
            seeds = torch.cat([seeds * mask for mask in masks])
        out = run(_split(seeds, self.seed_shapes))
        points = list(out) if batch else [out]
        allowances = []
        for point in points:
            noise = np.zeros(len(self.leaves))
            for g in range(len(self.leaves)):
                part = point[3 * g : 3 * g + 3] if self.coloring.mode == "rev" else point[:, torch.as_tensor(group == g)]
                noise[g] = round_off(part)
            allowances.append(np.array([noise_tolerance(float(v), d) for v, d in zip(noise, dtypes)])[group])
        return allowances

    def values(self, p: Pattern, block: torch.Tensor) -> torch.Tensor:
        """The pattern's entries (last axis) out of the products ``(..., k, width)``."""
        if self.coloring.mode != "rev":  # J S (or H S) is (width, k): entries index it row-major
            block = block.transpose(-1, -2)
        flat = block.reshape(*block.shape[:-2], -1)
        if not p.nnz:
            return flat[..., :0]
        read = _take(flat, self.coloring.gather)
        solve = self.coloring.solve
        if solve is None:
            return read
        # Acyclic: the off-diagonal entries by substitution over the two-coloured trees,
        # differences of prefix sums in preorder (see .acyclic), in float64.
        dev = flat.device
        signed = _take(flat, solve.need).to(torch.float64) * torch.as_tensor(solve.sign, device=dev)
        prefix = torch.nn.functional.pad(torch.cumsum(signed, dim=-1), (1, 0))
        solved = (torch.as_tensor(solve.sign_of, device=dev) * (_take(prefix, solve.hi) - _take(prefix, solve.lo))).to(read.dtype)
        return torch.where(torch.as_tensor(solve.direct, device=dev), read, solved)

    def finite_reads(self, p: Pattern, block: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """A star colouring's ``values`` with each entry that is not finite read at its
        other place where that is finite: ``(i, j)`` is at ``(i, colour j)`` and ``(j,
        colour i)`` wherever either holds it alone, and a NaN at one is that row's (a NaN
        or infinite gradient entry makes every tangent of it NaN), not the entry's.
        Star colouring read each entry at one place, chosen before the values were known:
        a chain whose gradient is inf at x[-1] answered NaN at (n-2, n-1), read in row
        n-1, where torch.func.hessian (and row n-2's own place) has -1. Also whether some
        off-diagonal entry is not finite and has one place only (the other sums several
        entries): the direct colouring reads it twice (:func:`.coloring.direct_coloring`)."""
        c = self.coloring
        if c.mode != "star" or not p.nnz or bool(torch.isfinite(values).all()):
            return values, False
        k = c.n_colors
        slot, mirror = p.rows * k + c.colors[p.cols], p.cols * k + c.colors[p.rows]
        count = np.bincount(slot, minlength=p.shape[0] * k)
        dev = values.device
        flat = block.transpose(-1, -2).reshape(-1)
        out = values
        for place, alone in ((slot, count[slot] == 1), (mirror, count[mirror] == 1)):
            there = flat[torch.as_tensor(place, device=dev)]
            use = ~torch.isfinite(out) & torch.isfinite(there) & torch.as_tensor(alone, device=dev)
            out = torch.where(use, there, out)
        once = torch.as_tensor((p.rows != p.cols) & ((count[slot] != 1) | (count[mirror] != 1)), device=dev)
        return out, bool((~torch.isfinite(out) & once).any())

    def unsolvable(self, block: torch.Tensor) -> bool:
        """Whether an acyclic colouring's substitution would spread a NaN or an infinity
        of the products over a tree (star colouring keeps each where its entry is)."""
        solve = self.coloring.solve
        if solve is None or not solve.need.size:
            return False
        flat = block.transpose(-1, -2).reshape(*block.shape[:-2], -1)
        return not bool(torch.isfinite(_take(flat, solve.need)).all())


def _take(flat: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``flat[..., index]``, the same elements by ``index_select``: advanced indexing
    took ~8 times as long on the CPU (measured, 53,600 entries of a 20^3 Laplacian's
    compressed JVPs: 260 against 32 us), a decompression's largest part."""
    return flat.index_select(-1, torch.as_tensor(index, device=flat.device))


def _products(p: Pattern, coloring: Coloring, primals: Sequence[torch.Tensor], m: int,
              rows: tuple[int, int] | None = None, checks: bool = True, out: Any = None) -> _Products:
    """``out``: the function's output (its leaves' dtypes set the checks' round-off: see
    :func:`_leaves`); a Hessian's is its one element, whose row is no matrix row."""
    # (a custom autograd.Function's backward need not be linear in its cotangent (the db's
    # CubeGenVmap adds 6 slope): a random seed's product is then no mix of the colours',
    # and the check sent every request dense, where jacrev's rows are the products')
    checks = checks and CUSTOM_NOTE not in p.notes
    if coloring.mode == "rev":
        plan = _Products(coloring, [torch.Size([m])], p.shape[1], primals[0], rows, checks)
    else:
        plan = _Products(coloring, [q.shape for q in primals], p.shape[0], primals[0], rows, checks)
    leaves = _leaves(out)
    if leaves:
        plan.noise_dtype = coarsest(plan.like.dtype, [d for _, d in leaves])
        hessian = coloring.mode in ("star", "acyclic")
        # (leaves of several dtypes: per row, so that the round-off each row may carry is its
        # own leaf's, see _Products.leaf_round_off, even where the tolerances are alike)
        mixed = len({d for _, d in leaves}) > 1
        plan.row_tol = None if hessian or sum(n for n, _ in leaves) != m else leaf_tolerance(plan.like.dtype, leaves, mixed)
        plan.leaves = leaves if plan.row_tol is not None else []
    return plan


def _leaves(out: Any) -> list[tuple[int, torch.dtype]]:
    """Each output leaf's element count and dtype, in the flat output's order (none for
    no ``out``). A float16 leaf beside float64 ones (or of a float64 input) rounds its
    products in float16: the checks hold its rows to that (see :mod:`.verify`)."""
    if out is None:
        return []
    return [(o.numel(), o.dtype) for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]


# (function, mode, shapes) whose products vmap was seen to run (_single's vmap_error);
# bounded as _VMAP_CHECKED
_VMAP_RUNS: collections.OrderedDict[Any, bool] = collections.OrderedDict()

# (function, mode, shapes, seeds per chunk) -> whether vmap's products agreed with one
# product (the engine's products.vmap_agrees); bounded: clients choose shapes
_VMAP_CHECKED: collections.OrderedDict[Any, bool] = collections.OrderedDict()


def _products_key(fn: Callable[..., Any], name: str | None, argnums: Sequence[int], args: Sequence[torch.Tensor]) -> Any:
    """What a verdict of :func:`vmap_agrees` is remembered under: the function (its
    registered name, else the function itself), argnums, and the inputs' shapes and
    dtypes (torch's vmap bugs follow shapes, not values). None for a function that
    cannot be a key (an unhashable callable): its products are then checked at every
    chunk, never taken unchecked."""
    who: Any = name
    if who is None:
        try:
            hash(fn)
        except TypeError:
            return None
        who = fn
    return (who, tuple(argnums), tuple((tuple(a.shape), a.dtype) for a in args))


def _agrees(seen: Any, check: Callable[[], bool], what: str) -> bool:
    """``check()``'s verdict, run once per ``seen`` (None: every time) and remembered.
    A disagreement is logged (a warning, ``what`` saying what runs instead) when it is
    found, not at every later request that the remembered verdict sends the slow way."""
    if seen is not None and seen in _VMAP_CHECKED:
        return _VMAP_CHECKED[seen]
    verdict = check()
    if not verdict:
        log.warning("vmap of the products disagrees with one product; %s", what)
    if seen is not None:
        _VMAP_CHECKED[seen] = verdict
        while len(_VMAP_CHECKED) > 256:
            _VMAP_CHECKED.popitem(last=False)
    return verdict


def _single(at: Callable[..., Callable[..., torch.Tensor]], args: Sequence[torch.Tensor],
            key: Any = None, check: bool = True, eps: float = 0.0) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """``run(seeds)`` at one point: the seeds vmapped; looped when vmap cannot run the
    function (learned once, then every chunk loops), or runs it wrong: torch's vmap of
    ``masked_select``'s backward with a broadcast mask is silently wrong when it batches
    as many seeds as the mask has rows (a compressed Jacobian 2.0 off), so vmap's
    products are checked against one product by linearity, once per ``key`` (the
    function, mode and shapes; none: at every chunk) and number of seeds. ``check``
    False: vmap's products are the answer (a Hessian that must be torch.func.hessian's,
    itself vmapped: see :data:`NO_GRAD_HESSIAN_NOTE`). ``eps``: the machine epsilon of
    an output coarser than the inputs, whose round-off the products carry (see
    :func:`.engine.products.vmap_agrees`)."""
    product = at(*args)
    vmapped = torch.func.vmap(product)
    state: dict[str, Any] = {"vmap": True, "ran": False, "error": None}

    def run(seeds: list[torch.Tensor]) -> torch.Tensor:
        count = seeds[0].shape[0]
        if state["vmap"] and count > 1:
            try:
                out = vmapped(*seeds)
            except Exception as exc:
                if _is_oom(exc):
                    raise
                log.info("vmap of the products failed (%s); looping", type(exc).__name__)
                state["vmap"], state["error"] = False, exc
            else:
                state["ran"] = True
                looped: list[torch.Tensor] = []

                def agrees() -> bool:
                    if vmap_agrees(product, tuple(seeds), out, eps):
                        return True
                    # vmap's products may be right for a product not linear in its seed
                    # (a custom backward adding a term of its own): the same one by one
                    looped.append(one_by_one(seeds))
                    return same_products(looped[0], out, eps)

                if not check or _agrees(key and (key, count), agrees, "one product at a time"):
                    return out
                state["vmap"] = False
                if looped:
                    return looped[0]
        return one_by_one(seeds)

    def one_by_one(seeds: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([product(*[s[r] for s in seeds]) for r in range(seeds[0].shape[0])])

    def vmap_error(seeds: list[torch.Tensor]) -> Exception | None:
        """vmap's error for these products, None where it runs them; tried on two copies
        of ``seeds`` where no chunk had more than one seed to vmap (chunk_size=1, or one
        colour: a diagonal Hessian), once per ``key`` where it runs (a try costs two
        products, as much as such a request's own)."""
        if not state["ran"] and state["error"] is None and not (key is not None and key in _VMAP_RUNS):
            try:
                vmapped(*[torch.cat([s, s]) for s in seeds])
            except Exception as exc:
                if _is_oom(exc):
                    raise
                state["error"] = exc
            else:
                state["ran"] = True
                if key is not None:
                    _VMAP_RUNS[key] = True
                    while len(_VMAP_RUNS) > 256:
                        _VMAP_RUNS.popitem(last=False)
        return state["error"]

    run.vmap_error = vmap_error  # type: ignore[attr-defined]
    return run


def _refused_where_torchs_cannot_run(fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...],
                                     has_aux: bool, plan: "_Products", run: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
    """Raise torch.func.hessian's error where it cannot run (vmap of its products fails:
    a custom ``autograd.Function`` without a vmap rule) and the looped forward-over-reverse
    products disagree with reverse over reverse at one random seed (a Function whose jvp
    and backward disagree: the dense /hessian refuses it, see engine.hessian.refusal).
    Where torch's vmap runs, its products are the answer, whichever side they take."""
    gen = torch.Generator().manual_seed(0)
    seeds = [(torch.rand((1, *s), generator=gen, dtype=torch.float64) - 0.5).to(plan.like.device, plan.like.dtype)
             for s in plan.seed_shapes]
    error = run.vmap_error(seeds)  # type: ignore[attr-defined]
    if error is None:
        return
    forward = run(seeds)[0]
    try:
        reverse = _product_at("star_rev", fn, argnums, has_aux)(*args)(*[s[0] for s in seeds])
    except Exception as exc:  # no double backward: nothing to disagree with
        if _is_oom(exc) or isinstance(exc, ServiceError):
            raise
        return
    if not forward.numel():
        return
    scale = float(forward.abs().max()) + float(reverse.abs().max())
    if float((forward - reverse).abs().max()) > min(1024 * _products_eps(args, argnums), 1e-2) * scale:
        raise refusal(error)


def _to_csr(p: Pattern, values: torch.Tensor) -> Any:
    import scipy.sparse as sp

    data = values.detach()
    if data.dtype in (torch.bfloat16, torch.float16):  # scipy.sparse holds neither: float32 holds them exactly
        data = data.float()
    idx = np.int32 if max(p.shape + (p.nnz,)) < 2**31 - 1 else np.int64
    return sp.csr_array((data.cpu().numpy(), p.cols.astype(idx), p.indptr().astype(idx)), shape=p.shape)


def _rows_of(matrix: Any, rows: tuple[int, int] | None) -> Any:
    return matrix if rows is None else matrix[rows[0] : rows[1]]


def sparse_jacobian(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), pattern: Any = "auto",
    mode: str = "auto", memory_budget: int = 1 << 30, check_alive: Callable[[], None] | None = None, *,
    has_aux: bool = False, declared: Mapping[str, Declared] | None = None, cache: PatternCache | None = None,
    name: str | None = None, rows: tuple[int, int] | None = None, chunk_size: int | None = None, forward: Any = None,
) -> SparseResult:
    """The Jacobian of ``fn`` at ``args`` w.r.t. ``argnums`` as a CSR matrix; with
    ``rows=(start, stop)`` only those rows (of the flattened output), from only the
    products they need. ``forward``: what ``fn`` returned at ``args``, where the caller
    called it already and it drew no random numbers (not called again to size the output)."""
    t0 = time.perf_counter()

    def plan(f: Callable[..., Any], at: Any, drew: bool) -> tuple[Pattern, Coloring, str]:
        nonlocal mode
        m = sum(o.numel() for o in pytree.tree_leaves(at[2]))
        mode = jacobian_side(mode, at[1], at[2])
        return resolve(f, args, argnums, pattern, kind="jacobian", mode=mode, declared=declared, has_aux=has_aux,
                       cache=cache, name=name, out_size=m, rows=rows, check_alive=check_alive, drew=drew, output=at[2])

    fn, (argnums, primals, out, aux), planned, drawn = _one_draw(fn, args, argnums, has_aux, plan, forward)
    try:
        res = _sparse_jacobian(fn, args, argnums, primals, out, aux, planned, mode, memory_budget, check_alive,
                               has_aux, cache, name, rows, chunk_size, t0)
        if res.pattern is not planned[0] and DENSE_NOTE in res.pattern.notes:
            _widen(fn, args, argnums, pattern, "jacobian", mode, cache, name, res.pattern, res.output)
        elif res.pattern is planned[0] and rows is None and mode == "auto" and isinstance(pattern, str):
            _symmetric_next(fn, args, argnums, pattern, cache, name, planned[1], res, check_alive)
        return res
    finally:
        if drawn is not None:  # the generators as one call leaves them, as after jacrev
            drawn.restore()


_At = tuple[tuple[int, ...], tuple[torch.Tensor, ...], Any, Any]


def jacobian_side(mode: str, primals: Sequence[torch.Tensor], output: Any) -> str:
    """The side ``mode`` takes for a Jacobian whose function returns ``output`` at
    ``primals`` (the differentiated inputs): ``auto`` is reverse mode where an output leaf
    rounds coarser than the inputs (a float16 leaf of float32 inputs, float32 of float64):
    a JVP rounds that leaf's column in its dtype where jacrev's VJPs do not, so forward
    products are proven no jacrev's (verify.differs_from_reverse) and VJPs answer after
    them, whatever the colourings' sizes. Chosen up front, a lone request pays no JVPs
    for nothing (measured, an arrow of n = 200: 8 calls of the function, not 3)."""
    if mode != "auto" or not primals:
        return mode
    eps = _products_eps(primals, range(len(primals)))
    return "rev" if coarser_than(eps, [d for _, d in _leaves(output)]) else mode


def _one_draw(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int], has_aux: bool,
    plan: Callable[[Callable[..., Any], _At, bool], tuple[Pattern, Coloring, str]], forward: Any = None,
) -> tuple[Callable[..., Any], _At, tuple[Pattern, Coloring, str], Draws | None]:
    """The forward pass (:func:`_at`) and ``plan(fn, at, drew)`` (the pattern and
    colouring), with the ``fn`` every later call is to use: ``fn`` itself, or, for a
    function that draws random numbers, ``fn`` replaying one draw at every call (see
    :mod:`.draws`); then also the generators' states to leave at the end (else None).

    A function draws when its forward pass moved torch's generators (a microsecond to
    see), or when detection saw it draw (numpy's or Python's generators too). It then
    runs again from torch's states before the forward pass (the draws ``jacrev`` would
    see there) and numpy's and Python's now, and its pattern is detected at that draw.
    A function that draws nothing pays for no more than the first look.

    ``forward``: the caller's own forward pass at ``args``, which drew nothing from
    torch's generators: taken for the first (a sparse request ran its function once more
    for nothing, a third of its time for a slow function)."""
    before = TorchDraws()
    at = _at(fn, args, argnums, has_aux, forward)
    if TorchDraws() == before:
        planned = plan(fn, at, False)
        if not is_random(planned[0]):
            return fn, at, planned, None
    before.restore()
    start = Draws()
    fn = replaying(fn, start)
    at = _at(fn, args, argnums, has_aux)
    end = Draws()
    return fn, at, plan(fn, at, True), end


def _sparse_jacobian(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...], primals: tuple[torch.Tensor, ...],
    out: Any, aux: Any, planned: tuple[Pattern, Coloring, str], mode: str, memory_budget: int,
    check_alive: Callable[[], None] | None, has_aux: bool, cache: PatternCache | None, name: str | None,
    rows: tuple[int, int] | None, chunk_size: int | None, t0: float,
) -> SparseResult:
    m = sum(o.numel() for o in pytree.tree_leaves(out))
    p, coloring, cached = planned
    forward_failed = False
    _check_rows(p, "jacobian", m)
    t1 = time.perf_counter()
    key = _products_key(fn, name, argnums, args)
    reverse = _lazily(lambda: _single(_product_at("rev", fn, argnums, has_aux), args, key and ("rev", key)))
    try:
        matrix, p, coloring, chunk = _jacobian_products(fn, args, argnums, has_aux, p, coloring, m, memory_budget,
                                                        check_alive, rows, chunk_size, reverse, key, out)
    except _ForwardFailed as exc:  # an op without forward AD (cdist): jacrev has an answer
        log.info("forward-mode products failed (%s); using reverse mode", exc)
        matrix = None
        forward_failed = lacks_forward_ad(exc)  # not a NaN of this point, nor an error of these inputs
    # (a symmetric Jacobian's JVPs too: the VJP proves the values symmetric at this point)
    if coloring.mode in ("fwd", "bidirectional", "symmetric") and (
            matrix is None or differs_from_reverse(matrix, m, primals[0], reverse, rows)):
        # The answer never depends on mode (SPEC): where jvp and vjp differ (prelu at 0,
        # ties of fmax) or jvp cannot run, jacrev's, by VJPs over the same pattern.
        coloring = _recolored(p, "rev", cache, fn, name, args, argnums, check_alive)
        matrix, p, coloring, chunk = _jacobian_products(fn, args, argnums, has_aux, p, coloring, m, memory_budget,
                                                        check_alive, rows, chunk_size, reverse, key, out)
    matrix = _rows_of(matrix, rows)
    t2 = time.perf_counter()
    return SparseResult(matrix, p, coloring, coloring.n_colors, coloring.mode, p.source, out, aux, chunk,
                        {"plan_s": t1 - t0, "compute_s": t2 - t1, "cached": cached},  # type: ignore[dict-item]
                        forward_failed)


def _widen(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...], pattern: Any, kind: str, mode: str,
    cache: PatternCache | None, name: str | None, found: Pattern, output: Any = None,
) -> None:
    """After the products proved a cached pattern wrong (``found``: its entries and this
    point's nonzeros, from the dense answer), the cache entry of this function, these
    shapes and choice holds their union, coloured: the next request at this point (or
    any other where the union holds) gets its products again, not another dense
    derivative over a pattern already known to miss entries. A pattern that holds at one
    point or one draw only is cached per point or not at all: nothing to widen."""
    if found.value_dependent or not isinstance(pattern, str) or pattern != "auto":
        return  # (declared patterns proven wrong are a 422 before this)
    cache = _DEFAULT_CACHE if cache is None else cache
    key = _cache_key(fn, name, args, argnums, kind, f"{pattern}|{mode}")
    hit = cache.get(key)
    if hit is None or hit.get("value_dependent") or "pattern" not in hit:
        return
    old: Pattern = hit["pattern"]
    if old.shape != found.shape or old.contains(found):
        return
    n = max(old.shape[1], 1)
    parts = [old.rows * n + old.cols, found.rows * n + found.cols]
    if kind == "hessian":  # star colouring needs it symmetric (round-off may not be)
        parts.append(found.cols * n + found.rows)
    rows, cols = np.divmod(np.unique(np.concatenate(parts)), n)
    wider = old.replace(rows=rows, cols=cols, notes=old.notes + (WIDENED_NOTE,) if WIDENED_NOTE not in old.notes else old.notes)
    try:  # no deadline here: the answer is computed, and this colouring is bounded by it (dense)
        p, coloring = _colored(wider, kind, mode, None, _products_eps(args, argnums, output))  # (as resolve's)
    except Exception as exc:  # never a reason to fail the answer: the next request re-checks
        log.warning("widening sparsity pattern %r failed: %s", old.name, exception_text(exc))
        return
    cache.put(key, {"pattern": p, "colors": coloring.colors, "mode": coloring.mode, "coloring": coloring})
    log.info("sparsity pattern %r (%s) of %s widened by the nonzeros the products missed: %d -> %d entries",
             old.name, old.source, name, old.nnz, p.nnz)


def _symmetric_next(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...], pattern: str,
    cache: PatternCache | None, name: str | None, planned: Coloring, res: SparseResult,
    check_alive: Callable[[], None] | None = None,
) -> None:
    """What colouring the next request of this function and these shapes gets, as far as
    symmetry goes (see :mod:`.symmetric`): a Jacobian computed the plain way that is
    symmetric entry by entry, with a symmetric pattern a star or acyclic colouring
    reads from fewer JVPs, sends later requests to that colouring (tried once per cache
    entry); one read as symmetric that the VJP proved otherwise (answered by VJPs)
    sends them back to the plain colouring. Per-point and per-draw patterns are left
    alone (nothing reuses them). The colouring runs within the request's deadline
    (``check_alive``): one stopped by it is logged, the answer stands, and the function
    keeps its plain colouring."""
    from .symmetric import MODE, checkable, symmetric_coloring, symmetric_values

    p = res.pattern
    # (detected patterns only: a declared or probed one gets the random product's check,
    # which would take an asymmetric point for a pattern missing entries)
    if p.source != "traced" or p.value_dependent or is_random(p) or NO_GRAD_NOTE in p.notes or CUSTOM_NOTE in p.notes:
        return
    cache = _DEFAULT_CACHE if cache is None else cache
    key = _cache_key(fn, name, args, argnums, "jacobian", f"{pattern}|auto")
    hit = cache.get(key)
    if hit is None or hit.get("pattern") is not p or hit.get("coloring") is not planned:
        return  # (another request replaced the entry meanwhile, or it was never cached)
    try:
        if planned.mode == MODE:
            if res.coloring is not planned:  # the VJP proved it not symmetric here: the plain colouring
                plain = hit.get("plain") or _colored(p, "jacobian", "auto", check_alive)[1]  # (kept, or from disk)
                cache.put(key, {"pattern": p, "colors": plain.colors, "mode": plain.mode, "coloring": plain,
                                "symmetric_tried": True})
                log.info("the Jacobian of %s is not symmetric at this point: back to its %s colouring", name, plain.mode)
            return
        if hit.get("symmetric_tried") or res.coloring is not planned or planned.n_colors <= 2:
            return
        hit["symmetric_tried"] = True
        eps = _products_eps(args, argnums)
        # An output leaf coarser than the inputs (float32 of float64 inputs) rounds each
        # JVP's column there, and the VJP that checks JVPs at the inputs' round-off proves
        # them no jacrev's at every point: a symmetric reading was taken (from VJPs, exact
        # to the inputs' round-off), and the next request paid its JVPs, the VJP and the
        # VJPs again (7 calls of the function, not 2) and was logged as asymmetric there.
        coarse = coarser_than(eps, [d for _, d in _leaves(res.output)]) or _coarse_arithmetic(p)
        if not checkable(eps) or coarse or not symmetric_values(res.matrix, eps):  # (float32: cannot tell)
            return
        from .acyclic import most_summed

        # JVPs read as symmetric get the one VJP forward products get: against VJPs
        # alone (reverse mode's colouring) that check is one more product to pay for
        # (a 5-point Laplacian's 3 acyclic colours and the VJP: 4 products where 5 VJPs)
        fewer_than = planned.n_colors - (1 if planned.mode == "rev" else 0)
        sym = symmetric_coloring(p, fewer_than, most_summed(eps), check_alive, planned)
    except Exception as exc:  # never a reason to fail the answer (a deadline passed meanwhile among them)
        log.warning("symmetric colouring of %s failed: %s", name, exception_text(exc))
        return
    if sym is not None:
        cache.put(key, {"pattern": p, "colors": sym.colors, "mode": sym.mode, "coloring": sym, "symmetric_tried": True,
                        "plain": planned})
        log.info("the Jacobian of %s is symmetric: %d JVPs read as symmetric from now on, where %s took %d",
                 name, sym.n_colors, planned.mode, planned.n_colors)


def _lazily(make: Callable[[], Callable[[list[torch.Tensor]], torch.Tensor]]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """``make()``'s ``run``, made on its first call: reverse mode's forward pass is paid
    only when VJPs are run (and fails there, for a function only jvp can differentiate)."""
    made: list[Callable[[list[torch.Tensor]], torch.Tensor]] = []

    def run(seeds: list[torch.Tensor]) -> torch.Tensor:
        if not made:
            made.append(make())
        return made[0](seeds)

    return run


class _ForwardFailed(RuntimeError):
    """A forward-mode product failed (not for want of memory): reverse mode may not."""


class _NotFinite(_ForwardFailed):
    """Forward mode ran, but a symmetric colouring cannot read these products (a NaN):
    of this point, not of the function."""


def _infinity_missed(forward: Callable[[list[torch.Tensor]], torch.Tensor], primals: Sequence[torch.Tensor],
                     rows: tuple[int, int] | None) -> Callable[[Any], str | None]:
    """A check of reverse products' ``matrix`` from the other side, for a matrix holding
    a NaN or an infinity: one JVP with a random positive tangent, infinite or NaN in a row
    where the matrix's product is finite, shows such an entry the pattern misses. The
    checks by columns cannot: a colour's VJP sums its rows, so a missing infinity lands
    on the entry of its column's other row of that colour, and the column holds one
    either way (a declared diagonal missing y[0]'s sqrt(x[1]) read inf at (1, 1), a 200,
    where jacrev has it at (0, 1)). No forward mode: no such check."""
    def missed(matrix: Any) -> str | None:
        from .verify import random_row

        if np.isfinite(matrix.data).all():
            return None

        seed, rv = random_row(matrix.shape[1], "fwd", primals[0], None)
        try:
            got = forward(_split(seed, [q.shape for q in primals])).reshape(-1).detach().to("cpu", torch.float64).numpy()
        except _ForwardFailed:
            return None
        with np.errstate(invalid="ignore", over="ignore"):
            want = matrix.astype(np.float64) @ rv
        # Not finite where the matrix's row is: an entry the pattern misses, infinite or NaN
        # (sqrt of a negative). Forward mode spreads no NaN over rows as a VJP's zero seeds
        # do (where(x > 0, sqrt(x), 0) selects its taken branch's tangent: finite), so a
        # NaN here is that row's own; counting infinities only, a declared band missing
        # y[0]'s sqrt(x[-1]) answered a 200 without it at x[-1] < 0.
        lost = ~np.isfinite(got) & np.isfinite(want)
        if (lost[rows[0] : rows[1]] if rows is not None else lost).any():
            return "a product with a random tangent is infinite or NaN in a row where the matrix's is finite"
        return None

    return missed


def _infinities_unconfirmed(p: Pattern, coloring: Coloring, block: torch.Tensor,
                            run: Callable[[list[torch.Tensor]], torch.Tensor], primals: Sequence[torch.Tensor],
                            memory_budget: int, check_alive: Callable[[], None] | None) -> Callable[[Any], str | None]:
    """A check of a Hessian's products ``block`` (``B = H S``, ``(k, n)`` as computed,
    ``coloring`` star) that hold an infinity. A Hessian-vector product sums columns, so
    the infinity of an entry the pattern misses, ``(i, m)``, stays in its row and lands on
    the covered entry ``(i, j)`` of ``m``'s colour there, where neither the free check (it
    counts an infinity at an uncovered place only) nor the random product (its row is not
    finite either way) sees it: a declared band missing the periodic coupling x[0]
    sqrt(x[-1]) answered a 200 at x[-1] = 0 with inf at (0, 0) or (0, 1), where
    torch.func.hessian has it at (0, n-1) (NaN at the others: forward mode's zero
    tangents times inf).

    So each entry ``(i, j)`` alone and infinite at its place ``(i, colour j)`` is read
    again from products seeded with part of its colour's columns only, each part holding
    ``j``: that same infinity there unless a column of the colour left out of some part
    (``m``) carried it (a column left out is seeded 0, and 0 * inf is NaN). The parts:
    ``j`` alone (torch.func.hessian's own column), or, where fewer, for each bit of the
    column index, the colour's columns whose bit is 0 and those whose bit is 1 (any
    ``m != j`` differs from ``j`` in some bit): 2 x colours x log2(n) products at most.
    Columns alone were 2,500 products at a 5,000-variable point with 2,500 infinite
    diagonal entries (49 s, where the answer took 0.3 s); the bits are 78. Paid only
    where a product is infinite. (A NaN is no sign: a NaN gradient entry makes its
    whole row NaN, in torch's Hessian as in the products.)"""
    def missed(matrix: Any) -> str | None:
        if coloring.mode != "star" or not p.nnz or not bool(torch.isinf(block).any()):
            return None
        k, n = coloring.n_colors, p.shape[1]
        colors = np.asarray(coloring.colors)
        slot = p.rows * k + colors[p.cols]
        flat = block.transpose(-1, -2).reshape(-1).detach().to("cpu", torch.float64).numpy()
        inf = np.isinf(flat[slot]) & (np.bincount(slot, minlength=flat.size)[slot] == 1)
        rows, cols, want = p.rows[inf], p.cols[inf], flat[slot][inf]
        alone = np.unique(cols)
        if not alone.size:
            return None
        shades = np.unique(colors[alone])
        bits = max(int(n - 1).bit_length(), 1)
        index = np.arange(n)
        if alone.size <= 2 * shades.size * bits:
            seeds = np.zeros((alone.size, n), dtype=bool)
            seeds[np.arange(alone.size), alone] = True
            reads = [np.searchsorted(alone, cols)]  # each entry's one part: its column
        else:
            # part (colour c, bit t, value v): c's columns whose bit t is v
            part = [(colors == c) & (((index >> t) & 1) == v) for c in shades for t in range(bits) for v in (0, 1)]
            seeds = np.stack(part)
            at = np.searchsorted(shades, colors[cols]) * (2 * bits)
            reads = [at + 2 * t + ((cols >> t) & 1) for t in range(bits)]
        like = primals[0]
        # as many per vmap as the memory budget takes (as _Products.compressed sizes them):
        # chunks of the colours' few cost a call each (0.27 s at 20,000 variables)
        step = max(1, min(len(seeds), memory_budget // max(_WORKSET_FACTOR * 2 * n * like.element_size(), 1)))
        seen = np.empty((len(seeds), n))
        for start in range(0, len(seeds), step):
            if check_alive is not None:
                check_alive()
            part_seeds = torch.as_tensor(seeds[start : start + step], device=like.device).to(like.dtype)
            seen[start : start + len(part_seeds)] = run(_split(part_seeds, [q.shape for q in primals])).reshape(
                len(part_seeds), n).detach().to("cpu", torch.float64).numpy()
        if any((seen[r, rows] != want).any() for r in reads):
            return "an infinite entry is not infinite in a product seeded with part of its colour holding it"
        return None

    return missed


def _jacobian_products(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...], has_aux: bool, p: Pattern,
    coloring: Coloring, m: int, memory_budget: int, check_alive: Callable[[], None] | None,
    rows: tuple[int, int] | None, chunk_size: int | None, reverse: Callable[[list[torch.Tensor]], torch.Tensor],
    key: Any = None, out: Any = None,
) -> tuple[Any, Pattern, Coloring, int]:
    """The Jacobian over ``p`` from ``coloring``'s products (``reverse`` runs VJPs), or
    densely when they prove ``p`` wrong (``out``: the function's output, whose leaves'
    dtypes set the check's round-off). Returns ``(matrix, pattern, coloring, chunk)``;
    raises :class:`_ForwardFailed` when a JVP fails."""
    primals = [args[i] for i in argnums]
    jvps = _lazily(lambda: _single(_product_at("fwd", fn, argnums, has_aux), args, key and ("fwd", key)))

    def forward(seeds: list[torch.Tensor]) -> torch.Tensor:
        try:
            return jvps(seeds)
        except Exception as exc:
            if _is_oom(exc):
                raise
            raise _ForwardFailed(f"{type(exc).__name__}: {exception_text(exc)}") from exc

    if coloring.mode == "bidirectional":  # JVPs for some entries, VJPs for the others
        # (checked by the VJP differs_from_reverse runs after forward products)
        sides = [_products(p, part, primals, m, rows, checks=False, out=out) for part in coloring.parts]
        runs = [forward, reverse]
        blocks, chunks = zip(*[plan.compressed(run, memory_budget, check_alive, chunk_size) for plan, run in zip(sides, runs)])
        flat = torch.cat([blocks[0].transpose(-1, -2).reshape(-1), blocks[1].reshape(-1)])
        matrix = _to_csr(p, _take(flat, coloring.gather) if p.nnz else flat[:0])
        wrong = _proven_wrong(p, coloring, sides, list(blocks), matrix, rows)
        chunk = max(chunks)
    else:
        # Forward products (JVPs read as symmetric too) are checked by the VJP with a random
        # cotangent that proves them jacrev's (differs_from_reverse, after this): where it
        # differs, VJPs over the same pattern, checked here, answer. (Checked here as well,
        # a symmetric reading proven wrong at an asymmetric point went dense, where those
        # VJPs answer.)
        plan = _products(p, coloring, primals, m, rows, checks=coloring.mode == "rev", out=out)
        run = reverse if coloring.mode == "rev" else forward
        block, chunk = plan.compressed(run, memory_budget, check_alive, chunk_size)
        if plan.unsolvable(block):  # a symmetric Jacobian's substitution would spread a NaN: jacrev's
            raise _NotFinite("a product is not finite: an acyclic colouring's substitution would spread it")
        matrix = _to_csr(p, plan.values(p, block))
        other = _infinity_missed(forward, primals, rows) if coloring.mode == "rev" else None
        wrong = _proven_wrong(p, coloring, [plan], [block], matrix, rows, run, other)
    if wrong:
        matrix, p, coloring = _densely(fn, args, argnums, has_aux, p, "jacobian", out)
    return matrix, p, coloring, chunk


def _star_instead(
    p: Pattern, cache: PatternCache | None, fn: Callable[..., Any], name: str | None, args: Sequence[torch.Tensor],
    argnums: tuple[int, ...], check_alive: Callable[[], None] | None,
) -> Coloring:
    """``p``'s star colouring, cached beside its acyclic one (keyed by its entries)."""
    key = _cache_key(fn, name, args, argnums, "hessian", f"star:{p.source}:{p.name}:{_fingerprint(p)}")
    _, coloring, _ = _cached(cache, key, lambda: (p, star_coloring(p, check_alive=check_alive)))
    return coloring


def _direct_instead(
    p: Pattern, cache: PatternCache | None, fn: Callable[..., Any], name: str | None, args: Sequence[torch.Tensor],
    argnums: tuple[int, ...], check_alive: Callable[[], None] | None,
) -> Coloring:
    """``p``'s direct colouring (:func:`.coloring.direct_coloring`), cached beside its
    star one (keyed by its entries)."""
    key = _cache_key(fn, name, args, argnums, "hessian", f"direct:{p.source}:{p.name}:{_fingerprint(p)}")
    _, coloring, _ = _cached(cache, key, lambda: (p, direct_coloring(p, check_alive=check_alive)))
    return coloring


def _recolored(
    p: Pattern, mode: str, cache: PatternCache | None, fn: Callable[..., Any], name: str | None,
    args: Sequence[torch.Tensor], argnums: tuple[int, ...], check_alive: Callable[[], None] | None,
) -> Coloring:
    """``p`` coloured on the side ``mode`` names, cached beside it (keyed by its entries)."""
    key = _cache_key(fn, name, args, argnums, "jacobian", f"recolored:{p.source}:{p.name}:{_fingerprint(p)}|{mode}")
    _, coloring, _ = _cached(cache, key, lambda: _colored(p, "jacobian", mode, check_alive))
    return coloring


def reverse_coloring(
    p: Pattern, cache: PatternCache | None, fn: Callable[..., Any], name: str | None, args: Sequence[torch.Tensor],
    argnums: Sequence[int], check_alive: Callable[[], None] | None = None,
) -> Coloring:
    """``p``'s colouring for VJPs, cached beside it: what a request batch computes a
    Jacobian with when its pattern was coloured for JVPs (engine.sparse.run_batch)."""
    return _recolored(p, "rev", cache, fn, name, args, tuple(argnums), check_alive)


def sparse_hessian(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), pattern: Any = "auto",
    memory_budget: int = 1 << 30, check_alive: Callable[[], None] | None = None, *, has_aux: bool = False,
    declared: Mapping[str, Declared] | None = None, cache: PatternCache | None = None, name: str | None = None,
    chunk_size: int | None = None, forward_ad: bool = True, forward: Any = None,
) -> SparseResult:
    """The Hessian of a scalar ``fn`` as CSR, from star-coloured Hessian-vector products
    (forward over reverse: ``jvp`` of ``grad``). ``forward_ad`` False: they failed for
    ``fn`` before for want of forward AD (``SparseResult.forward_failed``), so reverse
    over reverse runs first, and forward over reverse only where its error is the answer.
    ``forward``: as :func:`sparse_jacobian`'s."""
    t0 = time.perf_counter()

    def plan(f: Callable[..., Any], at: Any, drew: bool) -> tuple[Pattern, Coloring, str]:
        if sum(o.numel() for o in pytree.tree_leaves(at[2])) != 1:
            raise ValueError("a sparse Hessian needs a function with one scalar output")
        return resolve(f, args, argnums, pattern, kind="hessian", declared=declared, has_aux=has_aux,
                       cache=cache, name=name, out_size=1, check_alive=check_alive, drew=drew, output=at[2])

    fn, (argnums, primals, out, aux), planned, drawn = _one_draw(fn, args, argnums, has_aux, plan, forward)
    try:
        res = _sparse_hessian(fn, args, argnums, primals, out, aux, planned, memory_budget, check_alive, has_aux,
                              chunk_size, t0, name, cache, forward_ad)
        if res.pattern is not planned[0] and DENSE_NOTE in res.pattern.notes:
            _widen(fn, args, argnums, pattern, "hessian", "auto", cache, name, res.pattern, res.output)
        return res
    finally:
        if drawn is not None:  # the generators as one call leaves them, as after torch.func.hessian
            drawn.restore()


def _sparse_hessian(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...], primals: tuple[torch.Tensor, ...],
    out: Any, aux: Any, planned: tuple[Pattern, Coloring, str], memory_budget: int,
    check_alive: Callable[[], None] | None, has_aux: bool, chunk_size: int | None, t0: float, name: str | None = None,
    cache: PatternCache | None = None, forward_ad: bool = True,
) -> SparseResult:
    p, coloring, cached = planned
    t1 = time.perf_counter()
    plan = _products(p, coloring, primals, 1, out=out)
    key = _products_key(fn, name, argnums, args)
    # A function computing under no_grad: torch.func.hessian's columns, vmapped as it
    # vmaps them (one product alone differentiates an in-place write under no_grad
    # twice: x.mul_(2) then x**3 gave 48 x where torch.func.hessian says 24 x)
    torchs = NO_GRAD_HESSIAN_NOTE in p.notes
    forward_failed: Exception | None = None  # torch.func.hessian's own error, reverse over reverse answering
    # Forward over reverse not run, having failed for this function before for want of
    # forward AD (it ran again, failing, at every request): run only where its error is
    # the answer, this request's own (a kept one may be of other inputs)
    unasked = False
    # (a float16 energy's products round in float16: vmap's checked at that round-off)
    eps = float(torch.finfo(plan.check_dtype).eps)
    run = star = _single(_product_at("star", fn, argnums, has_aux), args, key and ("star", key), check=not torchs,
                         eps=eps)

    def reverse_over_reverse() -> tuple[Callable[[list[torch.Tensor]], torch.Tensor], tuple[torch.Tensor, int]]:
        # (building it takes the gradient, which fails for an op without a derivative)
        rev = _single(_product_at("star_rev", fn, argnums, has_aux), args, key and ("star_rev", key), eps=eps)
        return rev, plan.compressed(rev, memory_budget, check_alive, chunk_size)

    try:
        if not forward_ad and not torchs:
            raise _Unasked
        block, chunk = plan.compressed(run, memory_budget, check_alive, chunk_size)
    except Exception as exc:
        if _is_oom(exc):
            raise
        # An op without forward AD: the same products by reverse over reverse, as the
        # dense Hessian falls back. Where that fails too (no double backward either:
        # ctc_loss), the answer is forward over reverse's error, torch.func.hessian's
        # own ("Trying to use forward AD with _ctc_loss ..."), as the dense Hessian's is.
        log.info("forward-over-reverse Hessian products %s; using reverse over reverse",
                 "failed before" if isinstance(exc, _Unasked) else f"failed ({type(exc).__name__})")
        watch = GradOffWatch()
        answered = True
        try:
            run, (block, chunk) = watch.call(reverse_over_reverse)
        except Exception as rev_exc:
            if _is_oom(rev_exc) or isinstance(rev_exc, ServiceError):  # out of memory, past the deadline
                raise
            answered = False
        if not answered or watch.seen:
            # A backward that switches grad off (@once_differentiable, no_grad inside it):
            # reverse over reverse differentiated a gradient computed without a graph, 0
            # where the Hessian is not. Only forward over reverse sees through it, and it
            # cannot run: its error, torch.func.hessian's, as the dense Hessian answers.
            if isinstance(exc, _Unasked):
                return _asked(fn, args, argnums, primals, out, aux, planned, memory_budget, check_alive, has_aux,
                              chunk_size, t0, name, cache)
            raise exc.with_traceback(None) from None
        unasked = isinstance(exc, _Unasked)
        forward_failed = None if unasked else exc
    if not torchs and run is star:
        _refused_where_torchs_cannot_run(fn, args, argnums, has_aux, plan, star)
    if plan.unsolvable(block):  # a NaN or an infinity: star colouring keeps it at its entry
        log.info("a Hessian product is not finite: star colouring instead of acyclic")
        coloring = _star_instead(p, cache, fn, name, args, argnums, check_alive)
        plan = _products(p, coloring, primals, 1, out=out)
        block, chunk = plan.compressed(run, memory_budget, check_alive, chunk_size)
    values, once = plan.finite_reads(p, block, plan.values(p, block))
    if once:
        log.info("a Hessian entry read at one place is not finite: every entry read at both")
        coloring = _direct_instead(p, cache, fn, name, args, argnums, check_alive)
        plan = _products(p, coloring, primals, 1, out=out)
        block, chunk = plan.compressed(run, memory_budget, check_alive, chunk_size)
        values, _ = plan.finite_reads(p, block, plan.values(p, block))
    matrix = _to_csr(p, values)
    if _proven_wrong(p, coloring, [plan], [block], matrix, None, run,
                     _infinities_unconfirmed(p, coloring, block, run, primals, memory_budget, check_alive)):
        matrix, p, coloring = _densely(fn, args, argnums, has_aux, p, "hessian", out)
    elif (forward_failed is not None or unasked) and not _agrees_with_differences(fn, args, argnums, has_aux, primals,
                                                                                 matrix, check_alive):
        if forward_failed is None:
            return _asked(fn, args, argnums, primals, out, aux, planned, memory_budget, check_alive, has_aux,
                          chunk_size, t0, name, cache)
        raise forward_failed.with_traceback(None) from None
    t2 = time.perf_counter()
    return SparseResult(matrix, p, coloring, coloring.n_colors, coloring.mode, p.source, out, aux, chunk,
                        {"plan_s": t1 - t0, "compute_s": t2 - t1, "cached": cached},  # type: ignore[dict-item]
                        unasked or (forward_failed is not None and lacks_forward_ad(forward_failed)))


class _Unasked(Exception):
    """Forward over reverse not run (see _sparse_hessian's ``unasked``)."""


def _asked(*args: Any) -> SparseResult:
    """_sparse_hessian's answer with forward over reverse run (its ``forward_ad``
    True): where reverse over reverse, run first, cannot stand alone, torch's products
    answer, or their error, this request's own, is the answer."""
    return _sparse_hessian(*args, forward_ad=True)


def _agrees_with_differences(fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...],
                             has_aux: bool, primals: tuple[torch.Tensor, ...], matrix: Any,
                             check_alive: Callable[[], None] | None) -> bool:
    """A reverse-over-reverse Hessian (torch.func.hessian's forward over reverse could
    not run: a custom ``autograd.Function`` without ``jvp``) against central differences
    of jacrev, as the dense Hessian is checked (engine.hessian.agrees_with_differences):
    reverse over reverse misses what a backward hides from its graph (``a.detach()``
    inside it), and answered 0 there with a 200 where the dense route refuses."""
    g = _flat_fn(fn, args, argnums, has_aux)

    def product(v: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = np.concatenate([d.detach().to(torch.float64).cpu().numpy().reshape(-1) for d in v])
        hv = torch.from_numpy(np.asarray(matrix @ flat, dtype=np.float64))
        return [part.reshape(d.shape) for part, d in zip(hv.split([d.numel() for d in v]), v)]

    return agrees_with_differences(lambda *d: (g(*d).sum(), ()), tuple(fresh(primals)), tuple(range(len(primals))),
                                   product, check_alive or (lambda: None))


def _proven_wrong(
    p: Pattern, coloring: Coloring, plans: "list[_Products]", blocks: list[torch.Tensor], matrix: Any,
    rows: tuple[int, int] | None, run: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    other_side: Callable[[Any], str | None] | None = None,
) -> bool:
    """Whether the products prove ``p`` wrong (see :mod:`.verify`). Every pattern is
    checked against the product with a random seed its products carried (``checked_by``;
    a Jacobian's forward products carry none: the random VJP of differs_from_reverse,
    run after them, checks them); all but exact traced ones (supersets of what the trace
    saw) get the free check too.

    A traced pattern was once trusted unless the trace noticed something it could not
    follow (``detect.checked``: its tensors' text, its type...): the tracer's tensors are
    no jacrev tensors, and any Python that tells them apart (``type``, an attribute name
    built at run time, ``operator.attrgetter("__class__.__name__")``, code compiled under
    a library's file name, a profiler of its own) can take another branch than jacrev
    with the same values: an exact, unchecked, wrong 200. No reading of the function's
    code can rule that out, so none is trusted; run in the colours' vmap the check
    costs a fraction of one product. A declared pattern proven wrong raises
    :class:`PatternMismatch` (it is trusted: the caller must know); for the others the
    caller computes densely.

    ``run`` (the last plan's products, one point): before the random check's difference
    calls the pattern wrong, the function's own round-off is measured by it
    (:meth:`_Products.round_off`), and a difference within it is round-off: large terms
    cancelling inside the function (``(x * 1e5 + x) - x * 1e5`` in float32) made a
    right pattern "proven wrong", its answer dense (a 504 at 10^5 elements).

    ``other_side`` (one point's products): why an entry the pattern misses is seen where
    the products are not finite (else None): a product from the other side of a
    Jacobian's VJPs (:func:`_infinity_missed`), a Hessian's infinite entries' columns
    alone (:func:`_infinities_unconfirmed`)."""
    from .verify import disagrees, disagrees_batch, strays, within_noise

    batch = isinstance(matrix, list)
    stray = 0
    if not (p.source == "traced" and p.exact and not is_random(p) and not checked(p)):
        for plan, block in zip(plans, blocks):  # (a bicolouring: its JVPs' and its VJPs')
            part = plan.coloring
            stray += sum(strays(p, part, b, rows) for b in block) if batch else strays(p, part, block, rows)
    off = 0.0
    plan = plans[-1]  # (a bicolouring's VJPs: a random cotangent checks every entry)
    mode = "rev" if plan.coloring.mode == "rev" else "fwd"
    if not stray and plan.checked_by is not None:
        check = disagrees_batch if batch else disagrees
        off = check(matrix, mode, *plan.checked_by, rows, plan.tol_dtype, plan.row_tol)
    lost = other_side(matrix) if not stray and not batch and other_side is not None else None
    if not stray and not off and not lost:
        return False
    if not stray and not lost and run is not None and plan.row_tol is not None:
        # Leaves of several dtypes: each row's own leaf's round-off (see leaf_round_off)
        allow = plan.leaf_round_off(run, len(matrix) if batch else 0)
        points = list(zip(matrix, plan.checked_by[0])) if batch else [(matrix, plan.checked_by[0])]  # type: ignore[index]
        offs = [disagrees(point, mode, got, plan.checked_by[1], rows, plan.tol_dtype, plan.row_tol + a)  # type: ignore[index]
                for (point, got), a in zip(points, allow)]
        if all(o == 0.0 for o in offs):
            log.info("sparsity pattern %r (%s): a product with a random seed differs from the matrix by %.3g "
                     "relative, within each output leaf's own round-off here: the pattern holds", p.name, p.source, off)
            return False
    elif not stray and not lost and run is not None:
        # A batch's points each against their own round-off: unmeasured, a batch of float32
        # points through cancelling terms was proven wrong (every point's products run
        # again alone, each measured there: a declared pattern's batch paid twice)
        noise = plan.round_off(run, len(matrix) if batch else 0)
        offs = [disagrees(point, mode, got, plan.checked_by[1], rows, plan.tol_dtype, plan.row_tol)  # type: ignore[index]
                for point, got in zip(matrix, plan.checked_by[0])] if batch else [off]  # type: ignore[index]
        if all(o == 0.0 or within_noise(o, n, plan.check_dtype) for o, n in zip(offs, noise)):
            log.info("sparsity pattern %r (%s): a product with a random seed differs from the matrix by %.3g "
                     "relative, within the function's own round-off here (%.3g): the pattern holds",
                     p.name, p.source, off, max(noise))
            return False
    why = (f"{stray} product value(s) fall where the pattern has no entry of that colour" if stray
           else lost if lost
           else f"a product with a random seed differs from the matrix by {off:.3g} relative")
    if p.source == "declared":
        raise PatternMismatch(
            f"the declared sparsity pattern {p.name!r} misses nonzeros at this point ({why}). A declared pattern "
            "is trusted, so the values it gives would be wrong. Ask for sparsity=auto or sparsity=dense, or fix the "
            "declaration"
        )
    if batch:
        raise ProvenWrong(why)
    log.warning("sparsity pattern %r (%s) proven wrong by its products (%s): computing densely", p.name, p.source, why)
    return True


def _densely(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...], has_aux: bool, p: Pattern, kind: str,
    out: Any = None,
) -> tuple[Any, Pattern, Coloring]:
    """The dense derivative at this point (jacrev; torch.func.hessian for a Hessian, as
    the dense routes compute them, checked as they are: see :mod:`.dense`), as CSR over
    ``p``'s entries and every nonzero, with a note; and the colouring it amounts to (one
    product per row, or per column). ``out``: the function's output, whose leaves' dtypes
    set the dense check's round-off (:func:`_leaves`; a Jacobian's per row): at the
    inputs', a float16 leaf beside float64 ones (a float16 energy) took jacrev's right
    vmapped rows for wrong ones, and the dense derivative was computed again row by row."""
    g = _flat_fn(fn, args, argnums, has_aux)
    primals = fresh([args[i] for i in argnums])
    m, n = p.shape
    check_entries(m * n, "the dense derivative (the pattern was proven wrong)")
    if kind == "hessian":
        blocks = dense_hessian(lambda *d: g(*d).sum(), primals, leaves=_leaves(out))
        dense = torch.cat([torch.cat([b.reshape(primals[r].numel(), -1) for b in row], 1) for r, row in enumerate(blocks)], 0)
    else:
        dense = torch.cat([j.reshape(m, -1) for j in dense_jacobian(g, primals, leaves=_leaves(out))], 1)
    dense = dense.detach()
    mask = (dense != 0).cpu().numpy() | p.to_dense()
    q = Pattern.from_dense(mask, name=p.name, source=p.source, exact=p.exact, notes=p.notes + (DENSE_NOTE,),
                           value_dependent=p.value_dependent)
    values = dense[torch.as_tensor(q.rows, device=dense.device), torch.as_tensor(q.cols, device=dense.device)]
    side = n if kind == "hessian" else m
    gather = q.rows * side + q.cols if kind == "hessian" else q.rows * n + q.cols
    coloring = Coloring("star" if kind == "hessian" else "rev", np.arange(side, dtype=np.int64), side, gather, side, "dense")
    return _to_csr(q, values), q, coloring


def sparse_batch(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int], p: Pattern, coloring: Coloring,
    out_size: int, memory_budget: int = 1 << 30, check_alive: Callable[[], None] | None = None, *,
    has_aux: bool = False, rows: tuple[int, int] | None = None, chunk_size: int | None = None,
    name: str | None = None, out: Any = None,
) -> tuple[list[Any], int]:
    """The sparse derivative at each of a batch of points (``args`` stacked along a new
    leading axis), with one pattern and colouring (resolved at any one of them: the
    pattern holds at every point, so it must not be ``value_dependent``). Every product chunk is one ``vmap`` over the points
    of a ``vmap`` over the seeds, checked against one product at each point (once per
    ``name`` or ``fn``, shapes, batch and seeds). Returns ``(matrices, chunk)``; raises
    when vmap cannot run the function, or :class:`VmapDisagrees` when it runs it wrong
    (the caller then computes each point alone). ``out``: the function's output at any
    one point: its leaves' dtypes set the check's round-off per output row, as a request
    alone's do (:func:`_products`). Without it, a float16 leaf beside float64 ones had
    its rows held to float64's round-off, the batch was proven wrong at every point, and
    each ran again alone (6 calls of the function for 3 points where 2 answer them)."""
    if p.value_dependent:
        raise ValueError("a pattern that depends on the input values holds at one point only: not for a batch")
    argnums = tuple(argnums)
    batch = int(args[0].shape[0])
    plan = _products(p, coloring, [args[i][0] for i in argnums], out_size, rows, out=out)
    at = _product_at(coloring.mode, fn, argnums, has_aux)
    key = _products_key(fn, name, argnums, [a[0] for a in args])

    def run(seeds: list[torch.Tensor]) -> torch.Tensor:
        # torch's vmap can be silently wrong over the seeds (masked_select's backward with
        # a broadcast mask) and over the points as well: every point's products are
        # checked against one product there, once per function, shapes, batch and seeds
        seen = key and ("batch", coloring.mode, key, batch, int(seeds[0].shape[0]))
        if seen is not None and _VMAP_CHECKED.get(seen) is False:
            raise VmapDisagrees("vmap of the products over the points disagrees with one product")
        out = torch.func.vmap(lambda *point: torch.func.vmap(at(*point))(*seeds))(*args)
        if not _agrees(seen, lambda: all(_agrees_at(at(*[a[i] for a in args]), seeds, out[i]) for i in range(batch)),
                       f"over {batch} points: each point alone"):
            raise VmapDisagrees("vmap of the products over the points disagrees with one product")
        return out

    block, chunk = plan.compressed(run, memory_budget, check_alive, chunk_size, batch=batch)
    if plan.unsolvable(block):  # each point alone, where star colouring replaces it
        raise ProvenWrong("a product is not finite: an acyclic colouring's substitution would spread it")
    values = plan.values(p, block)
    full = [_to_csr(p, values[i]) for i in range(batch)]
    _proven_wrong(p, coloring, [plan], [block], full, rows, run)  # raises for any point proven wrong
    if coloring.mode == "rev" and not all(np.isfinite(m.data).all() for m in full):
        # a NaN or an infinity in VJPs' matrix may be a missing entry's that a colour put
        # on another row (_infinity_missed): each point alone, where one JVP checks it. A
        # batch went unchecked: a declared band missing sqrt(x[-1]) answered two requests
        # at x[-1] < 0 that arrived together with a 200 each, without the entry.
        raise ProvenWrong("a matrix from VJPs is not finite: each point alone, checked by one JVP")
    return [_rows_of(m, rows) for m in full], chunk


def _agrees_at(product: Callable[..., torch.Tensor], seeds: list[torch.Tensor], out: torch.Tensor) -> bool:
    """Whether ``out`` holds ``product``'s products of ``seeds`` at one point: by
    linearity (one product), else against the products one at a time, as _single's
    chunks are. The checking seed (random, every entry) makes the linear mix round where
    its product's terms cancel, past vmap_agrees's tolerance, which is relative to the
    (cancelled) result: a right vmap was taken for a wrong one, and every later batch of
    the function answered one point at a time."""
    if vmap_agrees(product, tuple(seeds), out):
        return True
    return same_products(torch.stack([product(*[s[r] for s in seeds]) for r in range(seeds[0].shape[0])]), out)


def describe_sparsity(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), pattern: Any = "auto", *,
    kind: str = "jacobian", mode: str = "auto", has_aux: bool = False, declared: Mapping[str, Declared] | None = None,
    cache: PatternCache | None = None, name: str | None = None, picture_width: int = 40,
    check_alive: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """What ``GET /v1/functions/{name}/sparsity`` answers: the pattern (summary, source,
    a braille picture), the colouring and the number of products, as JSON-able data."""
    from jacobian_client._pattern import braille

    p, coloring, cached = resolve(fn, args, argnums, pattern, kind=kind, mode=mode, declared=declared,
                                  has_aux=has_aux, cache=cache, name=name, check_alive=check_alive)
    return {
        "kind": kind,
        "pattern": p.describe(),
        "coloring": coloring.describe(),
        "products": coloring.n_colors,
        "dense_products": min(p.shape) if kind == "jacobian" else p.shape[0],
        "declared": sorted(declared or {}),
        "cached": cached or None,
        "picture": braille(p.rows, p.cols, p.shape, max_width=picture_width),
    }
