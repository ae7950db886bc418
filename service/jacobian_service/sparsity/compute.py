"""Compressed Jacobians and Hessians: a few vmapped products, decompressed to CSR.

A colouring (see :mod:`.coloring`) groups columns (forward mode), rows (reverse mode)
or symmetric columns (star, for Hessians) so that one product per group recovers every
entry of the pattern. The products run under ``torch.func.vmap`` over the seed matrix,
a chunk of groups at a time under the memory budget (halving on out-of-memory, as the
dense path does), and only the pattern's entries leave the device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .coloring import Coloring, choose_coloring, star_coloring
from .detect import NO_GRAD_NOTE, TraceError, probe, trace_hessian, trace_jacobian
from .patterns import Declared, Pattern, PatternCache, function_fingerprint

__all__ = ["SparseResult", "describe_sparsity", "resolve", "sparse_hessian", "sparse_jacobian"]

log = logging.getLogger("jacobian_service.sparsity")

_WORKSET_FACTOR = 4  # as the dense rows: a product's working set is a few seed-sized rows
_DEFAULT_CACHE = PatternCache()


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
        full = list(args)
        for i, v in zip(argnums, diff):
            full[i] = v
        out = fn(*full)
        if has_aux:
            out = out[0]
        leaves = pytree.tree_leaves(out)
        return leaves[0].reshape(-1) if len(leaves) == 1 else torch.cat([o.reshape(-1) for o in leaves])

    return g


def _at(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int], has_aux: bool
) -> tuple[tuple[int, ...], tuple[torch.Tensor, ...], Callable[..., torch.Tensor], Any, Any]:
    """What both sparse derivatives start from: ``(argnums, primals, flat fn, output, aux)``
    (the forward pass sizes the output before the pattern and the colouring are chosen)."""
    argnums = tuple(argnums)
    full_out = fn(*args)
    out, aux = full_out if has_aux else (full_out, None)
    return argnums, tuple(args[i] for i in argnums), _flat_fn(fn, args, argnums, has_aux), out, aux


def _gather(p: Pattern, coloring: Coloring, compressed: torch.Tensor) -> torch.Tensor:
    """The pattern's entries, in its order, picked out of the compressed products."""
    if not p.nnz:
        return compressed[:0]
    return compressed[torch.as_tensor(coloring.gather, device=compressed.device)]


def _cache_key(fn: Callable[..., Any], name: str | None, args: Sequence[torch.Tensor], argnums: Sequence[int], kind: str, choice: str) -> str:
    return PatternCache.key(
        name or getattr(fn, "__qualname__", "?"), function_fingerprint(fn),
        tuple(tuple(a.shape) for a in args), tuple(str(a.dtype) for a in args), tuple(argnums), kind, choice,
    )


def resolve(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), pattern: Any = "auto", *,
    kind: str = "jacobian", mode: str = "auto", declared: Mapping[str, Declared] | None = None, has_aux: bool = False,
    cache: PatternCache | None = None, name: str | None = None, out_size: int | None = None,
    check_alive: Callable[[], None] | None = None,
) -> tuple[Pattern, Coloring, str]:
    """The pattern and colouring to use, from the cache when this function, these
    shapes and this choice were seen before. ``pattern`` is ``"auto"`` (detect), the
    name of a declared pattern, a :class:`Declared` or a :class:`Pattern`.
    Returns ``(pattern, coloring, cached)`` with ``cached`` in ``""``, ``"memory"``, ``"disk"``.

    ``check_alive`` (a request's deadline and cancel check) is called while detecting
    and colouring; what it raises propagates, and nothing is cached then."""
    cache = _DEFAULT_CACHE if cache is None else cache
    argnums = tuple(argnums)
    if isinstance(pattern, Pattern):
        choice = "given:" + PatternCache.key(pattern.shape, pattern.rows.tobytes(), pattern.cols.tobytes())
    elif isinstance(pattern, Declared):
        choice = "declared:" + repr(pattern)
    else:
        choice = str(pattern)
    key = _cache_key(fn, name, args, argnums, kind, f"{choice}|{mode}")
    hit = cache.get(key)
    if hit is not None and hit.get("colors") is not None:
        p = hit["pattern"]
        if "coloring" not in hit:  # read from disk: rebuild (and check) the map once
            hit["coloring"] = _coloring_from(p, np.asarray(hit["colors"]), hit["mode"])
            return p, hit["coloring"], "disk"
        return p, hit["coloring"], "memory"
    p = _build_pattern(fn, args, argnums, pattern, kind, declared or {}, has_aux, out_size, check_alive)
    if NO_GRAD_NOTE in p.notes and mode != "rev":
        mode = "rev"  # jvp would differentiate through the no_grad values
    if kind == "hessian":
        coloring = star_coloring(p, check_alive=check_alive)
    else:
        coloring = choose_coloring(p, mode, check_alive=check_alive)
    cache.put(key, {"pattern": p, "colors": coloring.colors, "mode": coloring.mode, "coloring": coloring})
    return p, coloring, ""


def _coloring_from(p: Pattern, colors: np.ndarray, mode: str) -> Coloring:
    """Rebuild a cached colouring's decompression map (cheap, and re-checked)."""
    from .coloring import _check_unique, _star_gather

    k = int(colors.max(initial=-1)) + 1
    m, n = p.shape
    if mode == "fwd":
        gather = p.rows * k + colors[p.cols]
        lower = int(np.bincount(p.rows, minlength=m).max(initial=0))
    elif mode == "rev":
        gather = colors[p.rows] * n + p.cols
        lower = int(np.bincount(p.cols, minlength=n).max(initial=0))
    else:
        return Coloring("star", colors, k, _star_gather(p, colors, k), 2 if bool((p.rows != p.cols).any()) else 1, "cached")
    _check_unique(gather, mode)
    return Coloring(mode, colors, k, gather, lower, "cached")


def _build_pattern(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...], pattern: Any, kind: str,
    declared: Mapping[str, Declared], has_aux: bool, out_size: int | None,
    check_alive: Callable[[], None] | None = None,
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
        if out_size is None:
            with torch.no_grad():
                out_size = int(_flat_fn(fn, args, argnums, has_aux)(*[args[i] for i in argnums]).numel())
        return spec.build(in_shapes, out_size, name=label)
    g = _flat_fn(fn, args, argnums, has_aux)
    diff = [args[i] for i in argnums]
    try:  # what check_alive raises is never a TraceError: a deadline does not start a probe
        traced = (trace_hessian if kind == "hessian" else trace_jacobian)(
            g, diff, tuple(range(len(diff))), check_alive=check_alive)
        return traced.replace(name="auto")
    except TraceError as exc:
        log.info("sparsity tracing failed (%s); probing numerically", exc)
        return probe(g, diff, tuple(range(len(diff))), hessian=kind == "hessian", why=f"tracing failed: {exc}",
                     check_alive=check_alive).replace(name="auto")


# --------------------------------------------------------------------------- products


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


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


def _flatcat(parts: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
    return torch.cat([p.reshape(rows, -1) for p in parts], dim=1)


def _compressed(
    product: Callable[..., torch.Tensor], colors: np.ndarray, k: int, width: int, like: torch.Tensor,
    shapes: Sequence[torch.Size], memory_budget: int, check_alive: Callable[[], None] | None,
) -> tuple[torch.Tensor, int]:
    """``(k, out)`` compressed products, ``chunk`` seeds per vmapped call. ``product``
    takes one seed per differentiated input (seed width ``width``) and returns a flat row."""
    per = _WORKSET_FACTOR * (width + len(colors)) * like.element_size()
    chunk = max(1, min(k, memory_budget // max(per, 1)))
    rows: list[torch.Tensor] = []
    start = 0
    vmapped = torch.func.vmap(product)
    use_vmap = True
    while start < k:
        if check_alive is not None:
            check_alive()
        stop = min(start + chunk, k)
        seeds = _split(_seeds(colors, start, stop, like), shapes)
        try:
            if use_vmap and stop - start > 1:
                try:
                    block = vmapped(*seeds)
                except Exception as exc:
                    if _is_oom(exc):
                        raise
                    log.info("vmap of the products failed (%s); looping", type(exc).__name__)
                    use_vmap = False
                    continue
            else:
                block = torch.stack([product(*[s[r] for s in seeds]) for r in range(stop - start)])
        except Exception as exc:
            if _is_oom(exc) and chunk > 1:
                chunk = max(1, chunk // 2)
                if like.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            raise
        rows.append(block)
        start = stop
    out = torch.cat(rows) if rows else torch.zeros(0, width, dtype=like.dtype, device=like.device)
    return out, chunk


def _to_csr(p: Pattern, values: torch.Tensor) -> Any:
    import scipy.sparse as sp

    data = values.detach()
    if data.dtype == torch.bfloat16:
        data = data.float()
    idx = np.int32 if max(p.shape + (p.nnz,)) < 2**31 - 1 else np.int64
    return sp.csr_array((data.cpu().numpy(), p.cols.astype(idx), p.indptr().astype(idx)), shape=p.shape)


def sparse_jacobian(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), pattern: Any = "auto",
    mode: str = "auto", memory_budget: int = 1 << 30, check_alive: Callable[[], None] | None = None, *,
    has_aux: bool = False, declared: Mapping[str, Declared] | None = None, cache: PatternCache | None = None,
    name: str | None = None,
) -> SparseResult:
    """The Jacobian of ``fn`` at ``args`` w.r.t. ``argnums`` as a CSR matrix."""
    t0 = time.perf_counter()
    argnums, primals, g, out, aux = _at(fn, args, argnums, has_aux)
    m = sum(o.numel() for o in pytree.tree_leaves(out))
    p, coloring, cached = resolve(fn, args, argnums, pattern, kind="jacobian", mode=mode, declared=declared,
                                  has_aux=has_aux, cache=cache, name=name, out_size=m, check_alive=check_alive)
    t1 = time.perf_counter()
    shapes = [t.shape for t in primals]
    n = p.shape[1]
    like = primals[0]
    if coloring.mode == "fwd":

        def push(*t: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(g, primals, t)[1]

        block, chunk = _compressed(push, coloring.colors, coloring.n_colors, m, like, shapes, memory_budget, check_alive)
        compressed = block.T.reshape(-1)  # (m, k) row-major, as gather counts
    else:
        _, pullback = torch.func.vjp(g, *primals)

        def pull(*t: torch.Tensor) -> torch.Tensor:
            grads = pullback(t[0])
            return torch.cat([gr.reshape(-1) for gr in grads])

        block, chunk = _compressed(pull, coloring.colors, coloring.n_colors, n, like, [torch.Size([m])], memory_budget, check_alive)
        compressed = block.reshape(-1)  # (k, n) row-major
    matrix = _to_csr(p, _gather(p, coloring, compressed))
    t2 = time.perf_counter()
    return SparseResult(matrix, p, coloring, coloring.n_colors, coloring.mode, p.source, out, aux, chunk,
                        {"plan_s": t1 - t0, "compute_s": t2 - t1, "cached": cached})  # type: ignore[dict-item]


def sparse_hessian(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: Sequence[int] = (0,), pattern: Any = "auto",
    memory_budget: int = 1 << 30, check_alive: Callable[[], None] | None = None, *, has_aux: bool = False,
    declared: Mapping[str, Declared] | None = None, cache: PatternCache | None = None, name: str | None = None,
) -> SparseResult:
    """The Hessian of a scalar ``fn`` as CSR, from star-coloured Hessian-vector products
    (forward over reverse: ``jvp`` of ``grad``)."""
    t0 = time.perf_counter()
    argnums, primals, g, out, aux = _at(fn, args, argnums, has_aux)
    if sum(o.numel() for o in pytree.tree_leaves(out)) != 1:
        raise ValueError("a sparse Hessian needs a function with one scalar output")
    p, coloring, cached = resolve(fn, args, argnums, pattern, kind="hessian", declared=declared, has_aux=has_aux,
                                  cache=cache, name=name, out_size=1, check_alive=check_alive)
    t1 = time.perf_counter()
    grad = torch.func.grad(lambda *d: g(*d).sum(), argnums=tuple(range(len(primals))))
    n = p.shape[0]

    def hvp(*t: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.reshape(-1) for h in torch.func.jvp(grad, primals, t)[1]])

    block, chunk = _compressed(hvp, coloring.colors, coloring.n_colors, n, primals[0], [q.shape for q in primals], memory_budget, check_alive)
    compressed = block.T.reshape(-1)  # H S is (n, k) row-major
    matrix = _to_csr(p, _gather(p, coloring, compressed))
    t2 = time.perf_counter()
    return SparseResult(matrix, p, coloring, coloring.n_colors, "star", p.source, out, aux, chunk,
                        {"plan_s": t1 - t0, "compute_s": t2 - t1, "cached": cached})  # type: ignore[dict-item]


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
