"""The engine's side of ``sparsity`` (SPEC 7): sparse Jacobians and Hessians for requests.

The compression itself lives in :mod:`jacobian_service.sparsity`; this module fits a
:class:`~jacobian_service.types.Call` to it, with the same rules as the dense path:

- the user's function runs through :class:`~.calling.AuxBox` (aux of any kind);
- the pattern is resolved (and cached) first, so the result's size, known from the
  pattern's nnz before any product, is checked against ``max_result_bytes`` (413);
- detection checks the request's deadline (and a cancel) as it traces or probes, and so
  does the colouring (504, nothing cached); products run under the engine's memory
  budget (halving on out-of-memory, 507 when even one fails) and check the deadline
  between chunks;
- an unknown pattern name is a 422 ``sparsity_not_found``; a declared pattern that does
  not fit the shapes a 422 ``invalid_input``; the function's own failures a 500.

The result is a scipy CSR or COO array, or the same 2-D matrix dense, as asked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from jacobian_client._pattern import braille

from ..errors import InvalidInput, ResultTooLarge, ServiceError, SparsityNotFound
from ..types import Call, Result
from .calling import AuxBox, function_error

__all__ = ["describe", "sparse_derivative"]

# Pattern sources as the response's meta names them.
_SOURCES = {"declared": "declared", "traced": "detected", "probe": "probed", "given": "given", "empty": "empty"}


def _boxed(call: Call) -> AuxBox:
    box = AuxBox(call.spec)
    # The pattern cache keys on what the function computes (its source): let it see the
    # user's function through the box (inspect.unwrap follows __wrapped__).
    box.__wrapped__ = call.spec.fn  # type: ignore[attr-defined]
    return box


def _plan(engine: Any, call: Call, kind: str, args: list[torch.Tensor], box: AuxBox) -> tuple[Any, Any, str, Any]:
    """The forward pass (for the output's size), then the pattern and its colouring.
    Returns ``(pattern, coloring, cached, choice)``: ``choice`` is what to hand the
    compute functions (the request's name, or the empty pattern)."""
    out, _ = engine.guard(lambda: box(*args))
    m = sum(leaf.numel() for leaf in pytree.tree_leaves(out))
    if kind == "hessian" and m != 1:
        raise InvalidInput(f"a sparse Hessian needs a function with one scalar output; this one has {m} elements")
    mode = call.mode if kind == "jacobian" else "auto"
    # Imported on the first sparse request: the tracer's imports cost ~0.1 s, which every
    # engine start (and restart after a crash) would pay otherwise.
    from ..sparsity import Pattern, PatternTooLarge, entry_limit
    from ..sparsity.compute import resolve

    n = sum(args[i].numel() for i in call.argnums)
    choice: Any = call.sparsity
    if n == 0 or m == 0:  # nothing to detect (and probing cannot shape an empty Jacobian)
        choice = Pattern((n if kind == "hessian" else m, n), [], [], name="empty", source="empty")
    try:
        with entry_limit(_max_entries(engine, call), engine.memory_budget // 64):
            pattern, coloring, cached = resolve(
                box, args, call.argnums, choice, kind=kind, mode=mode, declared=call.spec.sparsity, has_aux=True,
                cache=engine.sparsity_cache, name=call.spec.name, out_size=m, check_alive=call.check_alive,
            )
    except ServiceError:  # Timeout from check_alive (504) among them
        raise
    except PatternTooLarge as exc:
        raise ResultTooLarge(
            f"the sparsity pattern is too dense for the limits: {exc}. Ask for sparsity=dense (streamed as .npy), "
            "or a smaller input"
        ) from None
    except KeyError:
        raise SparsityNotFound(f"{call.spec.name} declares no sparsity pattern named {call.sparsity!r}") from None
    except ValueError as exc:  # a declared pattern that does not fit these shapes
        raise InvalidInput(f"sparsity {call.sparsity!r}: {exc}") from None
    except BaseException as exc:
        raise function_error(exc) from None
    return pattern, coloring, cached, choice


def _max_entries(engine: Any, call: Call) -> int:
    """Most entries detection may hold in one matrix: what the result limit lets
    through (a value and an index are at least 8 bytes), and what the memory budget
    holds in the tracer's sparse matrices (~16 bytes an entry with a copy). The
    colouring's graph gets budget / 64 (scipy's product, then networkx's greedy pass)."""
    limit = engine.memory_budget // 16
    if call.max_result_bytes is not None:
        limit = min(limit, call.max_result_bytes // 8)
    return max(int(limit), 1)


def _result_nbytes(call: Call, shape: tuple[int, int], nnz: int, itemsize: int) -> int:
    m, n = shape
    index = 4 if max(m, n, nnz) < 2**31 - 1 else 8  # as the CSR is built: int32 when it fits
    if call.sparse_format == "dense":
        return m * n * itemsize
    if call.sparse_format == "coo":
        return nnz * (itemsize + 2 * index)
    return nnz * (itemsize + index) + (m + 1) * index


def sparse_derivative(engine: Any, call: Call, kind: str) -> Result:
    """The Jacobian (or Hessian) of ``call`` as a sparse matrix (or dense 2-D, if asked)."""
    args = engine.tensors(call)
    box = _boxed(call)
    pattern, coloring, cached, choice = _plan(engine, call, kind, args, box)
    like = args[call.argnums[0]]
    engine.check_result_size(call, _result_nbytes(call, pattern.shape, pattern.nnz, engine.wire_itemsize(like.dtype)))
    from ..sparsity.compute import sparse_hessian, sparse_jacobian

    common = dict(has_aux=True, declared=call.spec.sparsity, cache=engine.sparsity_cache, name=call.spec.name)
    try:
        if kind == "jacobian":
            res = sparse_jacobian(box, args, call.argnums, choice, call.mode, engine.memory_budget,
                                  call.check_alive, **common)
        else:
            res = sparse_hessian(box, args, call.argnums, choice, engine.memory_budget, call.check_alive, **common)
    except ServiceError:
        raise
    except BaseException as exc:  # the function failed under the products, or out of memory
        raise function_error(exc) from None
    matrix = res.matrix
    if call.sparse_format == "coo":
        matrix = matrix.tocoo()
    elif call.sparse_format == "dense":
        matrix = matrix.toarray()
    output = engine.host(res.output) if call.return_output else None
    aux = engine.host(box.restore(res.aux))
    meta = {
        "sparsity": call.sparsity,
        "pattern": res.pattern.name,
        "source": _SOURCES.get(res.source, res.source),
        "exact": bool(res.pattern.exact),
        "format": call.sparse_format,
        "shape": [int(d) for d in res.pattern.shape],
        "nnz": int(res.pattern.nnz),
        "colors": int(coloring.n_colors),
        "products": int(res.n_products),
        "dense_products": int(res.pattern.shape[0]),  # jacrev: one VJP per output element
        "cached": cached or None,
    }
    return Result(matrix, aux, call.spec.has_aux, output, res.chunk_size, res.mode, meta)


def describe(engine: Any, call: Call, kind: str) -> Result:
    """What ``GET /v1/functions/{name}/sparsity`` answers: the pattern (as a CSR or COO
    array of ones), its source, the colouring and the number of products."""
    args = engine.tensors(call)
    box = _boxed(call)
    pattern, coloring, cached, _ = _plan(engine, call, kind, args, box)
    matrix = pattern.to_csr(np.ones(pattern.nnz, dtype=np.int8))
    if call.sparse_format == "coo":
        matrix = matrix.tocoo()
    m, n = pattern.shape
    doc = {
        "kind": kind,
        "sparsity": call.sparsity,
        "pattern": {**pattern.describe(), "source": _SOURCES.get(pattern.source, pattern.source)},
        "coloring": coloring.describe(),
        "products": int(coloring.n_colors),
        "dense_products": int(m if kind == "jacobian" else n),
        "cached": cached or None,
        "picture": braille(pattern.rows, pattern.cols, pattern.shape, max_width=40),
    }
    return Result(matrix, sparse_meta=doc, mode=coloring.mode)
