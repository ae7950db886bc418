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

The result is a scipy CSR, CSC or COO array, or the same 2-D matrix dense, as asked.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from jacobian_client._pattern import braille

from ..errors import InvalidInput, ResultTooLarge, ServiceError, SparsityNotFound
from ..types import Call, Result, stacked_liveness
from .calling import AuxBox, function_error, look

__all__ = ["describe", "preload", "run_batch", "sparse_derivative", "streamed_rows"]

# Pattern sources as the response's meta names them.
log = logging.getLogger("jacobian_service.engine")

_SOURCES = {"declared": "declared", "traced": "detected", "probe": "probed", "given": "given", "empty": "empty"}


def _boxed(call: Call) -> AuxBox:
    box = AuxBox(call.spec)
    # The pattern cache keys on what the function computes (its source): let it see the
    # user's function through the box (inspect.unwrap follows __wrapped__).
    box.__wrapped__ = call.spec.fn  # type: ignore[attr-defined]
    return box


def _plan(
    engine: Any, call: Call, kind: str, args: list[torch.Tensor], box: AuxBox, dense_streamed: bool = False,
    output: Any = None,
) -> tuple[Any, Any, str, Any]:
    """The forward pass (for the output's size), then the pattern and its colouring.
    Returns ``(pattern, coloring, cached, choice)``: ``choice`` is what to hand the
    compute functions (the request's name, or the empty pattern). ``dense_streamed``:
    the result limit does not bound the pattern (the memory budget still does).
    ``output``: the function's output at ``args``, computed already (a batch's vmapped
    forward pass at its first point), so not computed again here."""
    if output is None:
        # (copies: the function may write into its inputs; as reverse mode calls it where a plain call fails: calling.look)
        output, _ = engine.guard(lambda: look(box, lambda: _copies(args)))
    out = output
    m = sum(leaf.numel() for leaf in pytree.tree_leaves(out))
    if kind == "hessian" and m != 1:
        raise InvalidInput(f"a sparse Hessian needs a function with one scalar output; this one has {m} elements")
    mode = _mode(engine, call, kind, args, out)
    # (imported at the engine's warm-up, see preload; here where warm-ups are off)
    from ..sparsity import DetectionTooCostly, Pattern, PatternTooLarge, entry_limit
    from ..sparsity.compute import OutputSizeChanged, resolve

    n = sum(args[i].numel() for i in call.argnums)
    if call.sparse_format == "dense" and not dense_streamed:
        # The dense matrix's size is known from the shapes: refused now, before its pattern
        # is detected and coloured (16 s for a 20,000-element lorenz96, for a 413 after).
        rows = call.rows[1] - call.rows[0] if call.rows is not None else (n if kind == "hessian" else m)
        engine.check_result_size(call, rows * n * engine.wire_itemsize(args[call.argnums[0]].dtype), _remedy(call))
    choice: Any = call.sparsity
    if n == 0 or m == 0:  # nothing to detect (and probing cannot shape an empty Jacobian)
        choice = Pattern((n if kind == "hessian" else m, n), [], [], name="empty", source="empty")
    try:
        with entry_limit(_max_entries(engine, None if dense_streamed else call.max_result_bytes), engine.memory_budget // 64,
                         _max_entries(engine, None)):
            pattern, coloring, cached = resolve(
                box, args, call.argnums, choice, kind=kind, mode=mode, declared=call.spec.sparsity, has_aux=True,
                cache=engine.sparsity_cache, name=call.spec.name, out_size=m, rows=call.rows,
                check_alive=call.check_alive, output=out,
            )
    except ServiceError:  # Timeout from check_alive (504) among them
        raise
    except OutputSizeChanged as exc:
        raise InvalidInput(str(exc)) from None
    except DetectionTooCostly as exc:
        # (refused at the limit, not at the deadline: the engine runs one job at a time,
        # and every other client's request waited behind the detection)
        raise ResultTooLarge(
            f"detecting the sparsity pattern costs too much: {exc}. Declare or pass the pattern, ask for "
            "sparsity=dense, or send a smaller input"
        ) from None
    except PatternTooLarge as exc:
        raise ResultTooLarge(
            f"the sparsity pattern is too dense for the limits: {exc}. Ask for sparsity=dense (streamed as .npy), "
            "or a smaller input"
        ) from None
    except IndexError as exc:  # rows out of range: known only once the output's size is
        raise InvalidInput(str(exc)) from None
    except KeyError:
        raise SparsityNotFound(f"{call.spec.name} declares no sparsity pattern named {call.sparsity!r}") from None
    except ValueError as exc:  # a declared pattern that does not fit these shapes
        raise InvalidInput(f"sparsity {call.sparsity!r}: {exc}") from None
    except BaseException as exc:
        raise function_error(exc) from None
    return pattern, coloring, cached, choice


def preload() -> None:
    """Import what sparse requests use (the tracer, the colourings, scipy.sparse and its
    csgraph), at an engine's warm-up, before it says ready. Imported on the first sparse
    request instead, they made its latency spike: measured (2-core VM, lorenz96 of 100
    elements after a dense warm-up) 585-854 ms for the first sparse Jacobian, 2-26 ms
    for the next; with them preloaded 102-158 ms (its pattern's detection), the warm-up
    0.7-0.9 s longer. Engines start warm (and a spare takes over after a crash), so no
    request waits for it. The zygote calls it too (``fork_server``): forked engines
    start with them."""
    import scipy.sparse  # (the CSR answers; csgraph imports it too)
    import scipy.sparse.csgraph  # noqa: F401  (detection's and acyclic colouring's)

    # torch's forward-AD decompositions, which its first JVP in a process imports (TorchScript
    # compiles them: 0.22 CPU-s here, seconds under load): the warm-up's Jacobian is reverse
    # mode, so the first forward product of an engine paid it in a request (a symmetric
    # Jacobian's first read by JVPs: 0.28 of its 0.29 CPU-s; a sparse Hessian's first
    # products, forward over reverse; any mode=fwd). Imported as torch imports it.
    _forward_ad_imports()

    from ..sparsity import compute, type_reads  # (the tracer, colourings, products)

    del compute
    # The tracer's one lazily made global, made now: made at the first sparse request,
    # after the engine took its modules' names, it was the function's rebinding.
    type_reads.library_dirs()


def _forward_ad_imports() -> None:
    """Import what torch's first forward-mode AD in a process imports, as it does
    (``torch.autograd.forward_ad._maybe_load_decompositions``: only with TorchScript on and
    ``__debug__``)."""
    from torch.autograd import forward_ad

    load = getattr(forward_ad, "_maybe_load_decompositions", None)
    if load is not None:  # (a private name: another torch may not have it)
        load()


def _mode(engine: Any, call: Call, kind: str, args: list[torch.Tensor], output: Any) -> str:
    """The side a sparse Jacobian's products take: the request's ``mode``, or reverse
    mode once forward mode failed for the function (the dense route's profile bit,
    ``forward_ad``): a function without forward AD (cdist) asked for ``mode=fwd`` or
    ``auto`` retried its JVPs (vmapped, then one by one) at every request, for
    reverse mode's answer each time.

    Reverse mode too for ``auto`` where an output leaf is coarser than the inputs
    (``output``: the forward pass's; sparsity.compute.jacobian_side): forward products
    would be proven no jacrev's and VJPs answer after them. Measured (a float16 leaf of
    float32 inputs, an arrow of n = 200, 3 colours forward, 200 reverse): 8 calls of the
    function where reverse mode's answer takes 3 (later requests 3 for 2)."""
    if kind != "jacobian":
        return "auto"
    if not engine.profiles[call.spec.name].forward_ad:
        return "rev"
    from ..sparsity.compute import jacobian_side

    return jacobian_side(call.mode, [args[i] for i in call.argnums], output)


def _copies(args: list[Any]) -> list[Any]:
    """Each input copied for one call of the user's function, which may write into its
    inputs: every call (this forward, detection, the products) starts from the request's."""
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _max_entries(engine: Any, max_result_bytes: int | None) -> int:
    """Most entries detection may hold in one matrix: what the result limit lets
    through (a value and an index are at least 8 bytes), and what the memory budget
    holds in the tracer's sparse matrices (~16 bytes an entry with a copy). The
    colouring's graph gets budget / 64 (scipy's product, then the greedy passes), and
    the inputs' own entries the budget's part alone (``max_result_bytes`` None): they
    are no part of the answer."""
    limit = engine.memory_budget // 16
    if max_result_bytes is not None:
        limit = min(limit, max_result_bytes // 8)
    return max(int(limit), 1)


def _shape(call: Call, pattern: Any) -> tuple[int, int]:
    """The result's (rows, columns): the pattern's, or the requested rows of it."""
    m, n = pattern.shape
    return (call.rows[1] - call.rows[0], n) if call.rows is not None else (m, n)


def _remedy(call: Call) -> str:
    """What a sparse result over the limit may ask for instead (a key of core's _REMEDIES).
    With aux or the output beside it, the dense form is not one array: no ``.npy``
    (a 406), so no stream to offer."""
    if call.sparse_format != "dense":
        return "sparse"
    return "sparse_dense_parts" if call.spec.has_aux or call.return_output else "sparse_dense"


def _result_nbytes(call: Call, shape: tuple[int, int], nnz: int, itemsize: int) -> int:
    m, n = shape
    index = 4 if max(m, n, nnz) < 2**31 - 1 else 8  # as the CSR is built: int32 when it fits
    if call.sparse_format == "dense":
        return m * n * itemsize
    if call.sparse_format == "coo":
        return nnz * (itemsize + 2 * index)
    major = n if call.sparse_format == "csc" else m  # csc's indptr runs over the columns
    return nnz * (itemsize + index) + (major + 1) * index


def sparse_derivative(engine: Any, call: Call, kind: str, dense_streamed: bool = False, forward: Any = None) -> Result:
    """The Jacobian (or Hessian) of ``call`` as a sparse matrix (or dense 2-D, if asked).
    ``dense_streamed``: the dense 2-D form will be streamed from the CSR returned here,
    row chunk by row chunk, so the result limit does not apply to it. ``forward``: what
    the boxed function returned at this point (output, aux tensors), computed already
    (by its batch's vmapped forward pass, which draws no random numbers)."""
    args = engine.tensors(call)
    box = _boxed(call)
    if forward is None:
        from ..sparsity.draws import TorchDraws

        before = TorchDraws()
        # (copies: the function may write into its inputs; as reverse mode calls it where a plain call fails: calling.look)
        forward = engine.guard(lambda: look(box, lambda: _copies(args)))
        output = forward[0]
        if TorchDraws() != before:  # it draws: the derivative's own first call sees it do so (sparsity.draws)
            forward = None
    else:
        output = forward[0]
    pattern, coloring, cached, choice = _plan(engine, call, kind, args, box, dense_streamed, output)
    like = args[call.argnums[0]]
    if not dense_streamed:
        nbytes = _result_nbytes(call, _shape(call, pattern), pattern.nnz, engine.wire_itemsize(like.dtype))
        engine.check_result_size(call, nbytes, _remedy(call))
    from ..sparsity import PatternTooLarge
    from ..sparsity.compute import OutputSizeChanged, PatternMismatch, sparse_hessian, sparse_jacobian

    common = dict(has_aux=True, declared=call.spec.sparsity, cache=engine.sparsity_cache, name=call.spec.name,
                  chunk_size=call.chunk_size)
    try:
        if kind == "jacobian":
            res = sparse_jacobian(box, args, call.argnums, choice, _mode(engine, call, kind, args, output), engine.memory_budget,
                                  call.check_alive, rows=call.rows, forward=forward, **common)
            if res.forward_failed:
                engine.profiles[call.spec.name].forward_ad = False
        else:
            profile = engine.profiles[call.spec.name]
            res = sparse_hessian(box, args, call.argnums, choice, engine.memory_budget, call.check_alive,
                                 forward_ad=profile.hvp_forward, forward=forward, **common)
            if res.forward_failed:  # forward over reverse, for want of forward AD: reverse over reverse next time
                profile.hvp_forward = False
    except ServiceError:
        raise
    except (OutputSizeChanged, PatternMismatch) as exc:  # never blamed on the function as its failure (500)
        raise InvalidInput(str(exc)) from None
    except PatternTooLarge as exc:  # the dense answer, when the products proved a pattern wrong
        raise ResultTooLarge(f"{exc}. Ask for sparsity=dense (streamed as .npy)") from None
    except BaseException as exc:  # the function failed under the products, or out of memory
        raise function_error(exc) from None
    coloring = res.coloring  # recoloured for VJPs where forward mode differed from jacrev
    if res.pattern is not pattern:  # computed densely: the products proved the pattern wrong
        pattern = res.pattern
        if not dense_streamed:
            nbytes = _result_nbytes(call, _shape(call, pattern), pattern.nnz, engine.wire_itemsize(like.dtype))
            engine.check_result_size(call, nbytes, _remedy(call))
    aux = box.restore(res.aux)
    half = _half_meta(call, res.output, aux)  # (of the tensors, before they go to the host)
    output = engine.host(res.output) if call.return_output else None
    aux = engine.host(aux)
    meta = _meta(call, pattern, coloring, cached)
    matrix = res.matrix if dense_streamed else _formatted(call, res.matrix)
    return Result(matrix, aux, call.spec.has_aux, output, res.chunk_size, res.mode, meta, batch_meta=half)


def _half_meta(call: Call, output: Any, aux: Any) -> dict[str, list[bool]] | None:
    """A sparse result's ``meta.bfloat16`` (one flag: one matrix), ``output_bfloat16`` and
    ``aux_bfloat16``, as a dense answer's (engine.core.derivative_half_meta). The matrix
    is float32 whatever its values were computed in (scipy.sparse holds no bfloat16): it
    was unflagged, so a bfloat16 function's sparse Jacobian could not be told from a
    float32 one's. Its values are bfloat16 where jacrev's (the dense answer's, whatever
    the mode) are: every differentiated input bfloat16 (a Hessian's too); with a float32
    one beside it, the concatenated values are float32, as torch.cat promotes them."""
    from .core import derivative_half_meta

    flags = [all(call.dtypes[i] == "bfloat16" for i in call.argnums)]
    return derivative_half_meta(call, None, output, aux, flags)


def streamed_rows(engine: Any, call: Call, stream_threshold: int, kind: str) -> Result | Any:
    """A sparse Jacobian (``kind``, or Hessian) asked for as a dense ``.npy``
    (``sparse_format=dense``): the products and the CSR as always (O(nnz) memory), then,
    when the dense matrix is larger than ``stream_threshold``, its rows densified a chunk
    at a time as the client reads them. So a 16,384 x 16,384 Jacobian (1 GB dense) never
    exists whole in any process, and is not held to the result limit."""
    from ..types import SPARSE_CHUNK_BYTES
    from .core import Streamed, room_rows

    result = sparse_derivative(engine, call, kind, dense_streamed=True)
    csr = result.value
    m, n = csr.shape
    dtype = _dense_dtype(call)
    if m * n * dtype.itemsize <= call.gathered_at_most(stream_threshold):
        result.value = csr.toarray().astype(dtype, copy=False)  # as the streamed rows are
        return result
    # Chunks of about 1 MiB of dense rows (at least one row): the front end's buffer,
    # within its room for this stream.
    chunk = room_rows(call, SPARSE_CHUNK_BYTES, n * dtype.itemsize, m)
    rows = (csr[s : s + chunk].toarray().astype(dtype, copy=False) for s in range(0, m, chunk))
    return Streamed((m, n), dtype, chunk, rows, result.batch_meta)


def _formatted(call: Call, matrix: Any) -> Any:
    """The computed CSR in the format asked for."""
    if call.sparse_format == "dense":
        return matrix.toarray().astype(_dense_dtype(call), copy=False)
    return _as_format(matrix, call.sparse_format)


def _as_format(matrix: Any, fmt: str) -> Any:
    """A CSR as ``fmt`` (csr, csc or coo): the POSTs' matrices and GET's pattern alike."""
    if fmt == "coo":
        return matrix.tocoo()
    if fmt == "csc":
        return matrix.tocsc()
    return matrix


def _dense_dtype(call: Call) -> np.dtype:
    """The dtype of a sparse Jacobian asked for densely: the dense Jacobian's (the CSR
    holds float16 as float32, which scipy.sparse lacks)."""
    from .core import TORCH_DTYPES, host_dtype

    return host_dtype(TORCH_DTYPES[call.dtypes[call.argnums[0]]])


def _meta(call: Call, pattern: Any, coloring: Any, cached: str) -> dict[str, Any]:
    return {
        "sparsity": call.sparsity,
        "pattern": pattern.name,
        "source": _SOURCES.get(pattern.source, pattern.source),
        "exact": bool(pattern.exact),
        "value_dependent": bool(pattern.value_dependent),
        "conservative": bool(pattern.conservative),
        "notes": list(pattern.notes),
        "format": call.sparse_format,
        "shape": [int(d) for d in _shape(call, pattern)],
        "nnz": int(pattern.nnz),
        "colors": int(coloring.n_colors),
        "products": int(coloring.n_colors),
        "dense_products": int(_shape(call, pattern)[0]),  # jacrev: one VJP per output element
        "cached": cached or None,
    }


def run_batch(engine: Any, kind: str, calls: list[Call]) -> list[Result | ServiceError]:
    """Equal sparse requests (function, shapes, options) as one computation: one vmapped
    forward pass (every point's output and aux), the pattern and colouring once, then
    every product chunk vmapped over the requests' points as well as over the seeds.
    Raises when vmap cannot run the function; the scheduler then runs each request alone.
    Where each member runs alone after all (a value-dependent pattern, a Hessian), a
    member's own failure is returned in its place (:func:`_each`), not raised.

    A batch costs no more calls of the function than its requests alone: it made 7 for
    two requests where one alone made 3 (the forward pass that sized the output was made
    once more for the batch, then thrown away when the batch went on to each alone)."""
    if kind != "jacobian":
        # A Hessian's products are forward over reverse, which torch's vmap over the points
        # gets wrong for some ops (see below): each point alone, with no batch pass first.
        return _each(calls, lambda call, i: sparse_derivative(engine, call, kind))
    from ..sparsity.compute import sparse_batch
    from . import batched as _batched

    first = calls[0]
    # As for dense batches: the batch stops once no member can use it, each past its own
    # deadline or gone (one member's short deadline must not stop the others' work).
    alive = replace(first, **stacked_liveness(calls))
    stacked = [torch.stack(column) for column in zip(*[engine.tensors(c) for c in calls])]
    box = _boxed(first)
    # Outputs and aux of every point in one vmapped call, as request batching gets them for
    # dense Jacobians; the first point's output sizes the pattern (no forward pass of its own).
    out, aux = _batched.over_examples(engine, first, box, box, _copies(stacked), allow_loop=False)
    at_first = pytree.tree_map(lambda leaf: leaf[0] if isinstance(leaf, torch.Tensor) else leaf, out)
    pattern, coloring, cached, _ = _plan(engine, alive, kind, [a[0] for a in stacked], box, output=at_first)
    def each_alone() -> list[Result]:
        # Each from its own point's output and aux, as the vmapped forward pass gave them: no
        # forward pass of its own (the batch cost one more call than its requests alone)
        tensors = [leaf for leaf in pytree.tree_leaves(aux) if isinstance(leaf, torch.Tensor)]
        return _each(calls, lambda call, i: sparse_derivative(engine, call, kind, forward=(
            pytree.tree_map(lambda leaf: leaf[i] if isinstance(leaf, torch.Tensor) else leaf, out),
            tuple(t[i] for t in tensors))))

    # A value-dependent pattern holds at the first point only: each point detects its own.
    if pattern.value_dependent:
        return each_alone()
    if coloring.mode != "rev":
        # Forward products (jvp) under a vmap over points are what torch (2.13) gets wrong
        # for some ops (linalg.solve, det: see batched.py), and alone each is checked by a
        # VJP anyway: the batch takes VJPs over the same pattern (jacrev's own products, so
        # the same answer), unless that colouring takes far more products than this one.
        # (Whatever their number where an output leaf is coarser than the inputs: alone,
        # each point's JVPs round that leaf's columns in its dtype, are proven no jacrev's
        # at the inputs' round-off (verify.differs_from_reverse) and VJPs answer after
        # them; the batch went to each alone, 7 calls of the function for 3 points, not 2.)
        reverse = _reverse_coloring(engine, alive, pattern, [a[0] for a in stacked])
        if reverse is None or (reverse.n_colors > 2 * coloring.n_colors + 2
                               and not _coarser_leaves(stacked[first.argnums[0]].dtype, at_first)):
            return each_alone()
        coloring = reverse
    nbytes = _result_nbytes(first, _shape(first, pattern), pattern.nnz, engine.wire_itemsize(stacked[first.argnums[0]].dtype))
    for call in calls:
        engine.check_result_size(call, nbytes, _remedy(call))
    m = sum(leaf.numel() for leaf in pytree.tree_leaves(out)) // len(calls)

    from ..sparsity.compute import PatternMismatch, ProvenWrong, VmapDisagrees

    try:
        matrices, chunk = sparse_batch(box, stacked, first.argnums, pattern, coloring, m, engine.memory_budget,
                                       alive.check_alive, has_aux=True, rows=first.rows, chunk_size=first.chunk_size,
                                       name=first.spec.name, out=at_first)  # (its leaves' dtypes: the check's round-off)
    # wrong at some point (a 422, or densely), or torch's vmap over the points wrong: each
    # alone (the function is not marked unbatchable: its dense batches have their own check)
    except (PatternMismatch, ProvenWrong, VmapDisagrees):
        return each_alone()
    half = _half_meta(first, out, aux)  # (as sent: the same dtypes at every point)
    out, aux = engine.host(out), engine.host(aux)
    meta = _meta(first, pattern, coloring, cached)
    mode = coloring.mode
    return [
        Result(_formatted(call, matrices[i]), _batched.take(aux, i), call.spec.has_aux,
               _batched.take(out, i) if call.return_output else None, chunk, mode, dict(meta),
               batch_meta=None if half is None else {k: list(v) for k, v in half.items()})
        for i, call in enumerate(calls)
    ]


def _coarser_leaves(like: torch.dtype, output: Any) -> bool:
    """Whether some leaf of ``output`` rounds in a coarser dtype than the inputs' ``like``."""
    from ..sparsity.verify import coarser_than

    dtypes = [leaf.dtype for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]
    return (like.is_floating_point or like.is_complex) and coarser_than(float(torch.finfo(like).eps), dtypes)


def _each(calls: list[Call], one: Any) -> list[Result | ServiceError]:
    """``one(call, i)`` for each member of a batch in turn, each under its own deadline and
    cancel check: a member's own failure (its deadline passed, its client gone, its point
    refused or its function failing there) is its answer alone, in its place in the list
    (``Worker._run_batch`` settles it so). Raised, it failed the batch, and every member
    ran again: measured on a real server (a 0.05 s value-dependent function), a client
    that closed its connection while the third member of its batch ran had its two
    batch-mates' computed answers thrown away and computed again (17 calls of the function
    where 14 answered all three; 0.85 s for their 0.53 s)."""
    out: list[Result | ServiceError] = []
    for i, call in enumerate(calls):
        try:
            out.append(one(call, i))
        except ServiceError as exc:
            # (its traceback and cause hold the frames down to the function, with their
            # arrays: they go now, as Worker._run_alone drops a lone failure's)
            exc = exc.with_traceback(None)
            exc.__cause__ = exc.__context__ = None
            out.append(exc)
    return out


def _reverse_coloring(engine: Any, call: Call, pattern: Any, args: list[torch.Tensor]) -> Any:
    """``pattern``'s colouring for VJPs (cached beside it), or None where it has none
    (an empty pattern's, a restricted one's rows)."""
    if pattern.source == "empty" or call.rows is not None:
        return None
    from ..sparsity.compute import reverse_coloring

    try:
        return reverse_coloring(pattern, engine.sparsity_cache, _boxed(call), call.spec.name, args, call.argnums,
                                call.check_alive)
    except ServiceError:  # a Timeout (504) among them
        raise
    except Exception as exc:  # never a reason to fail the batch: each alone then
        log.info("no reverse colouring for a batch (%s); each point alone", type(exc).__name__)
        return None


def describe(engine: Any, call: Call, kind: str) -> Result:
    """What ``GET /v1/functions/{name}/sparsity`` answers: the pattern (as a CSR, CSC or
    COO array of ones), its source, the colouring and the number of products."""
    args = engine.tensors(call)
    box = _boxed(call)
    pattern, coloring, cached, _ = _plan(engine, call, kind, args, box)
    # Held to the result limit as a POST's sparse matrix is, in its words (the pattern's
    # ones are int8): it was 'the result takes N bytes with its aux and output', the
    # engine's last check of what a function returned, where this has neither.
    engine.check_result_size(call, _result_nbytes(call, pattern.shape, pattern.nnz, 1), _remedy(call))
    matrix = _as_format(pattern.to_csr(np.ones(pattern.nnz, dtype=np.int8)), call.sparse_format)
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
