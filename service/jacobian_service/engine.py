"""The derivative engine: torch only, no HTTP, run on the one worker thread of a device.

Reverse-mode Jacobians mirror ``torch.func.jacrev``: one ``vjp``, then the pullback
``vmap``-ed over rows of the identity, ``chunk_size`` rows at a time. Rows come out as
a sequence of chunks (:meth:`Engine.jacobian_rows`), so one code path serves gathered
results, streamed ``.npy`` bodies, deadlines (checked between chunks) and the memory
budget (chunk sizes halve on out-of-memory).

Everything here runs on one thread per device: forward-mode AD keeps global state and
is not thread-safe (see DESIGN "Pitfalls").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .errors import FunctionError, InvalidInput, OutOfMemory, ResultTooLarge, ServiceError, Timeout
from .registry import FunctionSpec

__all__ = ["Call", "Engine", "Result", "RowStream", "host_dtype", "to_numpy"]

log = logging.getLogger("jacobian_service.engine")

_TORCH_DTYPES = {
    "bool": torch.bool,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
# A chunk's working set is a few times its cotangent and gradient rows; this factor is
# the CPU estimate (DESIGN: measure on CUDA, estimate on CPU).
_WORKSET_FACTOR = 4
_MIN_AUTO_CHUNK = 16  # CPU BLAS is slower at 2-8 rows than at 1 (DESIGN "Pitfalls")


@dataclass
class Call:
    """One validated request, ready for the engine."""

    spec: FunctionSpec
    args: list[np.ndarray]
    dtypes: list[str]  # compute dtype per input
    argnums: tuple[int, ...] = (0,)
    as_tuple: bool = False
    chunk_size: int | None = None
    batched: bool = False
    mode: str = "rev"
    rows: tuple[int, int] | None = None
    return_output: bool = False
    vectors: Any = None  # cotangents (vjp) or tangents (jvp), as numpy trees
    batched_vectors: bool = False
    deadline: float = math.inf  # time.monotonic() seconds
    max_result_bytes: int | None = None
    cancelled: Callable[[], bool] = field(default=lambda: False)

    def signature(self, batched: bool = False) -> tuple[Any, ...]:
        """What equal requests share: function, argnums, per-example shapes and dtypes."""
        shapes = tuple(a.shape[1:] if batched else a.shape for a in self.args)
        return (self.spec.name, self.argnums, self.as_tuple, shapes, tuple(self.dtypes))

    def row_nbytes(self) -> int:
        """Bytes of one Jacobian row on the wire (args hold bfloat16 as float32 already)."""
        return sum(self.args[i].nbytes for i in self.argnums)

    def check_alive(self) -> None:
        if self.cancelled():
            raise Timeout("the request was cancelled")
        if time.monotonic() > self.deadline:
            raise Timeout("the request ran past its deadline")


@dataclass
class Result:
    value: Any  # tree of numpy arrays
    aux: Any = None
    has_aux: bool = False
    output: Any = None
    chunk_size: int | None = None
    mode: str | None = None

    def nbytes(self) -> int:
        """Bytes of the main result's arrays."""
        return sum(leaf.nbytes for leaf in pytree.tree_leaves(self.value) if isinstance(leaf, np.ndarray))


def to_numpy(tree: Any) -> Any:
    """Tensors -> numpy on the host (bfloat16 as float32); other leaves unchanged."""

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach()
            if leaf.dtype == torch.bfloat16:
                leaf = leaf.float()
            return leaf.cpu().numpy()
        return leaf

    return pytree.tree_map(convert, tree)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _function_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if _is_oom(exc):
        return OutOfMemory(f"out of memory: {type(exc).__name__}")
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return FunctionError(f"{type(exc).__name__}: {message}"[:2000])


class _AuxBox:
    """Wraps a function so that only tensors cross torch.func transforms.

    jacrev/vjp refuse non-tensor aux ("Expected tensors, got unsupported type"), so the
    non-tensor leaves of aux are kept here, beside the call, and put back afterwards.
    """

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.leaves: list[Any] = []
        self.treespec: Any = None

    def __call__(self, *args: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, ...]]:
        result = self.spec.fn(*args)
        if not self.spec.has_aux:
            _check_output(result)
            return result, ()
        if not (isinstance(result, tuple) and len(result) == 2):
            raise FunctionError(f"{self.spec.name} has has_aux=True but did not return (output, aux)")
        out, aux = result
        _check_output(out)
        self.leaves, self.treespec = pytree.tree_flatten(aux)
        return out, tuple(leaf for leaf in self.leaves if isinstance(leaf, torch.Tensor))

    def restore(self, tensors: Sequence[torch.Tensor]) -> Any:
        if not self.spec.has_aux:
            return None
        it = iter(tensors)
        leaves = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        return pytree.tree_unflatten(leaves, self.treespec)


def _check_output(out: Any) -> None:
    leaves, _ = pytree.tree_flatten(out)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise FunctionError(
            f"the function returned {type(out).__name__}; expected a tensor or a tuple/dict of tensors"
        )


def _partial(fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...]) -> Callable[..., Any]:
    """``fn`` as a function of the differentiated inputs only, the others held fixed."""

    def selected(*diff: torch.Tensor) -> Any:
        full = list(args)
        for i, value in zip(argnums, diff):
            full[i] = value
        return fn(*full)

    return selected


def _basis(
    sizes: Sequence[int], shapes: Sequence[torch.Size], start: int, stop: int, like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Rows ``start:stop`` of the identity over the concatenated flattened outputs."""
    out = []
    offset = 0
    n = stop - start
    for size, shape, ref in zip(sizes, shapes, like):
        block = torch.zeros(n, size, dtype=ref.dtype, device=ref.device)
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            idx = torch.arange(lo, hi, device=ref.device)
            block[idx - start, idx - offset] = 1
        out.append(block.reshape((n, *shape)))
        offset += size
    return out


class RowStream:
    """The rows of one Jacobian, chunk by chunk, after a single forward pass (vjp).

    ``chunks`` yields ``(start, stop, grads)`` with one ``(stop - start, *input.shape)``
    tensor per differentiated input, in row order over the flattened outputs.
    """

    def __init__(self, engine: "Engine", call: Call, args: list[torch.Tensor]) -> None:
        self.engine = engine
        self.call = call
        self.box = _AuxBox(call.spec)
        self.primals = [args[i] for i in call.argnums]
        g = _partial(self.box, args, call.argnums)
        try:
            output, self._pullback, aux_tensors = torch.func.vjp(g, *self.primals, has_aux=True)
        except Exception as exc:
            raise _function_error(exc) from None
        self.output = output
        self.aux = self.box.restore(aux_tensors)
        self.leaves, self.out_spec = pytree.tree_flatten(output)
        for leaf in self.leaves:
            if not leaf.is_floating_point():
                raise FunctionError(f"the function returned a {leaf.dtype} output; only floating outputs can be differentiated")
        self.sizes = [leaf.numel() for leaf in self.leaves]
        self.total_rows = sum(self.sizes)
        self.chunk_used: int | None = None  # after out-of-memory halving

    def auto_chunk(self) -> int:
        per_row = _WORKSET_FACTOR * sum(
            (p.numel() + sum(self.sizes)) * p.element_size() for p in self.primals
        )
        chunk = max(1, self.engine.memory_budget // max(per_row, 1))
        if chunk >= self.total_rows:
            return max(self.total_rows, 1)
        if chunk < _MIN_AUTO_CHUNK:
            return 1 if chunk < 2 else min(_MIN_AUTO_CHUNK, self.total_rows)
        return 1 << (chunk.bit_length() - 1)  # round down to a power of two

    def chunks(self, start: int, stop: int, chunk_size: int) -> Iterator[tuple[int, int, tuple[torch.Tensor, ...]]]:
        s = start
        while s < stop:
            self.call.check_alive()
            e = min(s + chunk_size, stop)
            try:
                grads = self._rows(s, e)
            except Exception as exc:
                if _is_oom(exc) and chunk_size > 1:
                    self.engine.release_memory()
                    chunk_size = max(1, chunk_size // 2)
                    log.warning("out of memory at %d rows; retrying with %d", e - s, chunk_size)
                    continue
                raise _function_error(exc) from None
            self.chunk_used = chunk_size
            yield s, e, grads
            s = e

    def _rows(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        basis = _basis(self.sizes, [leaf.shape for leaf in self.leaves], start, stop, self.leaves)
        name = self.call.spec.name
        if stop - start > 1 and name not in self.engine.no_vmap_pullback:
            try:
                return torch.func.vmap(self._pullback)(pytree.tree_unflatten(basis, self.out_spec))
            except Exception as exc:
                if _is_oom(exc):
                    raise
                log.info("vmap of %s's pullback failed (%s); using the row loop", name, type(exc).__name__)
                grads = self._row_loop(basis)
                self.engine.no_vmap_pullback.add(name)
                return grads
        return self._row_loop(basis)

    def _row_loop(self, basis: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        rows = [self._pullback(pytree.tree_unflatten([b[k] for b in basis], self.out_spec)) for k in range(basis[0].shape[0])]
        return tuple(torch.stack([r[i] for r in rows]) for i in range(len(self.primals)))


def _wire_itemsize(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.bfloat16 else dtype.itemsize


def host_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a tensor of ``dtype`` reaches the host (and the wire) in."""
    return np.dtype("float32") if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


class Engine:
    """Computes derivatives on one device. Not thread-safe: one worker thread owns it."""

    def __init__(self, device: torch.device, memory_budget: int) -> None:
        self.device = device
        self.memory_budget = memory_budget
        # Facts learned per function name, so that a failing fast path is tried once.
        self.no_vmap_pullback: set[str] = set()
        self.no_vmap_function: set[str] = set()
        self.no_forward_ad: set[str] = set()
        self.hessian_choice: dict[Any, str] = {}  # (function, argnums, shapes) -> strategy

    # ----------------------------------------------------------------- helpers

    def host(self, tree: Any) -> Any:
        """Results to numpy on the host. On CUDA the copies go through pinned memory,
        non-blocking, with one synchronisation for the whole tree."""
        if self.device.type != "cuda":
            return to_numpy(tree)

        def stage(leaf: Any) -> Any:
            if not isinstance(leaf, torch.Tensor):
                return leaf
            leaf = leaf.detach()
            dtype = torch.float32 if leaf.dtype == torch.bfloat16 else leaf.dtype
            pinned = torch.empty(leaf.shape, dtype=dtype, pin_memory=True)  # cached by torch's host allocator
            return pinned.copy_(leaf, non_blocking=True)

        staged = pytree.tree_map(stage, tree)
        torch.cuda.current_stream(self.device).synchronize()
        return to_numpy(staged)

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def tensors(self, call: Call) -> list[torch.Tensor]:
        out = []
        cuda = self.device.type == "cuda"
        for arr, dtype in zip(call.args, call.dtypes):
            t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
            if cuda:  # a pinned staging copy lets the upload run asynchronously
                t = t.pin_memory()
            out.append(t.to(device=self.device, dtype=_TORCH_DTYPES[dtype], non_blocking=cuda))
        return out

    def mark_unbatchable(self, name: str, why: BaseException | None = None) -> None:
        """Remember that ``vmap`` cannot run ``name`` (learned once the same inputs ran
        one by one), so batched requests loop and request batching leaves it alone."""
        if name not in self.no_vmap_function:
            log.info("vmap cannot batch %s (%s); looping over examples from now on", name, type(why).__name__ if why else "?")
            self.no_vmap_function.add(name)

    def _check_result_size(self, call: Call, nbytes: int) -> None:
        if call.max_result_bytes is not None and nbytes > call.max_result_bytes:
            raise ResultTooLarge(
                f"the result would take {nbytes} bytes; the limit is {call.max_result_bytes}. "
                "Ask for application/x-npy (streamed), fewer rows, or a smaller input."
            )

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise _function_error(exc) from None

    def wants_forward(self, call: Call, rows: RowStream) -> bool:
        if call.spec.name in self.no_forward_ad or call.rows is not None:
            return False
        if call.mode == "fwd":
            return True
        inputs = sum(p.numel() for p in rows.primals)
        return call.mode == "auto" and inputs < rows.total_rows

    # ----------------------------------------------------------------- jacobian

    def row_stream(self, call: Call) -> RowStream:
        if call.batched:
            raise InvalidInput("batched Jacobians are not streamed")
        stream = RowStream(self, call, self.tensors(call))
        if call.rows is not None:
            start, stop = call.rows
            if len(stream.leaves) != 1:
                raise InvalidInput("rows applies to functions with a single output")
            if not 0 <= start <= stop <= stream.total_rows:
                raise InvalidInput(f"rows [{start}, {stop}] is out of range for {stream.total_rows} output rows")
        return stream

    def jacobian(self, call: Call, stream: RowStream | None = None) -> Result:
        """The whole Jacobian, gathered; ``stream`` reuses a forward pass already made."""
        if call.batched:
            return self._batched(call, "jacobian")
        stream = stream or self.row_stream(call)
        start, stop = call.rows or (0, stream.total_rows)
        self._check_result_size(call, (stop - start) * call.row_nbytes())
        output = self.host(stream.output) if call.return_output else None
        aux = self.host(stream.aux)
        if self.wants_forward(call, stream):
            value = self._forward_jacobian(call)
            if value is not None:
                return Result(value, aux, call.spec.has_aux, output, call.chunk_size, "fwd")
        chunk = call.chunk_size or stream.auto_chunk()
        value = self._gather(stream, start, stop, chunk)
        return Result(value, aux, call.spec.has_aux, output, stream.chunk_used or chunk, "rev")

    def _gather(self, stream: RowStream, start: int, stop: int, chunk: int) -> Any:
        """All rows ``start:stop`` written into preallocated host arrays, then nested.

        When one chunk holds every row its arrays are used as they are: no second copy
        of the Jacobian (jacrev's torch.cat would make one too)."""
        rows_only = stream.call.rows is not None
        leaves = stream.leaves[:1] if rows_only else stream.leaves
        offsets = np.cumsum([0, *stream.sizes]).tolist()
        # (first row, row count) of each output's block in the flattened row space
        bounds = [(start, stop - start)] if rows_only else list(zip(offsets, stream.sizes))
        blocks: list[list[np.ndarray]] | None = None
        for s, e, grads in stream.chunks(start, stop, chunk):
            host = self.host(tuple(grads))  # one synchronisation per chunk on CUDA
            if s == start and e == stop:
                blocks = [[h[base - s : base - s + size] for h in host] for base, size in bounds]
                break
            if blocks is None:
                blocks = [[np.empty((size, *h.shape[1:]), h.dtype) for h in host] for _, size in bounds]
            for j, (base, size) in enumerate(bounds):
                lo, hi = max(s, base), min(e, base + size)
                if lo < hi:
                    for i, h in enumerate(host):
                        blocks[j][i][lo - base : hi - base] = h[lo - s : hi - s]
        if blocks is None:  # no rows at all
            blocks = [[np.empty((size, *p.shape), host_dtype(p.dtype)) for p in stream.primals] for _, size in bounds]
        return self._nest(stream, leaves, blocks)

    @staticmethod
    def _nest(stream: RowStream, leaves: list[torch.Tensor], blocks: list[list[np.ndarray]]) -> Any:
        """Row blocks per (output, input) -> jacrev's nesting: outputs outer, inputs inner."""
        nested = []
        for j, leaf in enumerate(leaves):
            shaped = [
                b.reshape((*leaf.shape, *p.shape)) if stream.call.rows is None else b
                for b, p in zip(blocks[j], stream.primals)
            ]
            nested.append(tuple(shaped) if stream.call.as_tuple else shaped[0])
        if stream.call.rows is not None:
            return nested[0]
        return pytree.tree_unflatten(nested, stream.out_spec)

    def _forward_jacobian(self, call: Call) -> Any | None:
        """jacfwd, or None when forward AD cannot run this function (then reverse)."""
        args = self.tensors(call)
        box = _AuxBox(call.spec)
        g = _partial(box, args, call.argnums)
        argnums: int | tuple[int, ...] = tuple(range(len(call.argnums))) if call.as_tuple else 0
        try:
            jac, _ = torch.func.jacfwd(g, argnums=argnums, has_aux=True)(
                *[args[i] for i in call.argnums]
            )
        except Exception as exc:
            if _is_oom(exc):
                raise OutOfMemory(f"out of memory: {type(exc).__name__}") from None
            log.info("jacfwd failed for %s (%s); using reverse mode", call.spec.name, type(exc).__name__)
            self.no_forward_ad.add(call.spec.name)
            return None
        return self.host(jac)

    # ----------------------------------------------------------------- batched

    def _batched(self, call: Call, kind: str, allow_loop: bool = True) -> Result:
        """``vmap(jacrev(f))`` (or hessian) over the leading dim of every input.

        When vmap cannot run the function, loop over examples; ``allow_loop=False``
        raises instead (request batching then runs each request alone)."""
        args = self.tensors(call)
        batch = args[0].shape[0] if args else 0
        box = _AuxBox(call.spec)
        argnums: int | tuple[int, ...] = tuple(range(len(call.argnums))) if call.as_tuple else 0

        def per_example(*example: torch.Tensor) -> Any:
            g = _partial(box, example, call.argnums)
            primals = [example[i] for i in call.argnums]
            if kind == "hessian":
                return self._hessian_fn(g, argnums, primals, call.signature(batched=True))(*primals)
            if call.mode == "fwd":  # jacfwd takes no chunk_size
                return torch.func.jacfwd(g, argnums=argnums, has_aux=True)(*primals)
            return torch.func.jacrev(g, argnums=argnums, has_aux=True, chunk_size=call.chunk_size)(*primals)

        # Size check from one example's forward pass, before any derivative.
        first = self._guard(lambda: box(*[a[0] for a in args])[0]) if batch else None
        if first is not None:
            out_numel = sum(leaf.numel() for leaf in pytree.tree_leaves(first))
            in_numel = sum(args[i][0].numel() for i in call.argnums)
            width = in_numel if kind == "jacobian" else in_numel * in_numel
            self._check_result_size(call, batch * out_numel * width * _wire_itemsize(args[call.argnums[0]].dtype))
        value, aux = self._over_examples(call, box, per_example, args, allow_loop)
        output = self.evaluate(call).value if call.return_output else None
        return Result(self.host(value), self.host(aux), call.spec.has_aux, output, call.chunk_size, call.mode)

    def _over_examples(
        self, call: Call, box: _AuxBox, fn: Callable[..., Any], args: list[torch.Tensor], allow_loop: bool
    ) -> tuple[Any, Any]:
        """``vmap(fn)`` over the leading dim of ``args`` -> ``(value, aux)``; when vmap
        cannot run the function, a loop over examples (unless ``allow_loop`` is False:
        request batching then runs each request alone)."""
        batch = args[0].shape[0] if args else 0
        if batch == 0:
            raise InvalidInput("batched inputs need a leading batch dimension of at least 1")
        vmap_error: Exception | None = None
        if call.spec.name not in self.no_vmap_function:
            try:
                value, aux_t = torch.func.vmap(fn)(*args)
                return value, box.restore(aux_t)
            except Exception as exc:
                if _is_oom(exc):
                    raise OutOfMemory(f"out of memory: {type(exc).__name__}") from None
                vmap_error = exc
        if not allow_loop:
            raise _function_error(vmap_error) if vmap_error else FunctionError(f"{call.spec.name} cannot be batched with vmap")
        per: list[tuple[Any, Any]] = []
        for b in range(batch):
            call.check_alive()
            value_b, aux_t = self._guard(lambda: fn(*[a[b] for a in args]))
            per.append((value_b, box.restore(aux_t)))
        if vmap_error is not None:  # every example works alone: vmap itself is what fails
            self.mark_unbatchable(call.spec.name, vmap_error)
        value = pytree.tree_map(lambda *xs: torch.stack(xs), *[p[0] for p in per])
        return value, _stack_aux([p[1] for p in per])

    # ----------------------------------------------------------------- hessian

    def _hessian_fn(self, g: Callable[..., Any], argnums: int | tuple[int, ...], primals: Sequence[torch.Tensor], key: Any = None) -> Callable[..., Any]:
        """The strategy measured fastest for ``key``, else the usual winner: ``jacrev(grad)``
        for 0-d outputs, ``jacfwd(jacrev)`` otherwise."""
        choice = self.hessian_choice.get(key)
        if choice is None:
            out, _ = g(*primals)
            choice = _hessian_candidates(isinstance(out, torch.Tensor) and out.dim() == 0)[0]
        return _HESSIAN_STRATEGIES[choice](g, argnums)

    def hessian(self, call: Call) -> Result:
        """``torch.func.hessian``'s result by the equal strategy that is fastest for this
        function and these shapes: measured on the first small call, then remembered
        (DESIGN: jacrev(grad) beat jacfwd(jacrev) 50x on one function, not on all)."""
        if call.batched:
            return self._batched(call, "hessian")
        args = self.tensors(call)
        box = _AuxBox(call.spec)
        g = _partial(box, args, call.argnums)
        primals = [args[i] for i in call.argnums]
        argnums: int | tuple[int, ...] = tuple(range(len(primals))) if call.as_tuple else 0
        out, _ = self._guard(lambda: g(*primals))
        out_numel = sum(leaf.numel() for leaf in pytree.tree_leaves(out))
        in_numel = sum(p.numel() for p in primals)
        self._check_result_size(call, out_numel * in_numel * in_numel * _wire_itemsize(primals[0].dtype))
        key = call.signature()
        if key in self.hessian_choice:
            candidates: tuple[str, ...] = (self.hessian_choice[key], "jacrev_jacrev")
        else:
            candidates = _hessian_candidates(isinstance(out, torch.Tensor) and out.dim() == 0)
        measure = key not in self.hessian_choice and out_numel * in_numel * in_numel <= _MEASURE_HESSIAN_ELEMENTS
        found: Any = None
        used = ""
        timings: dict[str, float] = {}
        failure: Exception | None = None
        for name in candidates:
            fn = _HESSIAN_STRATEGIES[name](g, argnums)
            try:
                fn(*primals) if measure else None  # warm: the first call of a transform pays extra
                start = time.perf_counter()
                value = fn(*primals)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                timings[name] = time.perf_counter() - start
            except Exception as exc:
                if _is_oom(exc) or isinstance(exc, ServiceError):
                    raise _function_error(exc) from None
                failure = exc  # e.g. no forward-AD rule for an op: try the next strategy
                continue
            if found is None:
                found, used = value, name
            if not measure:
                break
        if found is None:
            raise _function_error(failure or RuntimeError("no Hessian strategy ran"))
        if key not in self.hessian_choice:
            if len(self.hessian_choice) > 4096:  # bounded, whatever shapes clients send
                self.hessian_choice.clear()
            self.hessian_choice[key] = min(timings, key=timings.__getitem__)
        value, aux_t = found
        output = self.host(out) if call.return_output else None
        return Result(self.host(value), self.host(box.restore(aux_t)), call.spec.has_aux, output, mode=used)

    # ----------------------------------------------------------------- evaluate, vjp, jvp

    def evaluate(self, call: Call, allow_loop: bool = True) -> Result:
        args = self.tensors(call)
        box = _AuxBox(call.spec)
        if call.batched:
            out, aux = self._over_examples(call, box, box, args, allow_loop)
            return Result(self.host(out), self.host(aux), call.spec.has_aux)
        out, aux_t = self._guard(lambda: box(*args))
        return Result(self.host(out), self.host(box.restore(aux_t)), call.spec.has_aux)

    def _vectors(self, tree: Any, like: Any, what: str, batched: bool) -> Any:
        """Check a cotangent/tangent tree against the shapes it must match; to tensors."""
        ref_leaves, ref_spec = pytree.tree_flatten(like)
        if isinstance(tree, np.ndarray) and len(ref_leaves) == 1:
            leaves = [tree]
        else:
            seq = list(tree.values()) if isinstance(tree, dict) and isinstance(like, dict) else tree
            if isinstance(like, dict) and isinstance(tree, dict):
                if set(tree) != set(like):
                    raise InvalidInput(f"{what} keys {sorted(tree)} do not match {sorted(like)}")
                seq = [tree[k] for k in like]
            if not isinstance(seq, (list, tuple)) or len(seq) != len(ref_leaves):
                raise InvalidInput(f"{what}: expected {len(ref_leaves)} arrays")
            leaves = list(seq)
        out = []
        for arr, ref in zip(leaves, ref_leaves):
            if not isinstance(arr, np.ndarray):
                raise InvalidInput(f"{what}: expected arrays")
            want = ((arr.shape[0],) if batched and arr.ndim else ()) + tuple(ref.shape)
            if tuple(arr.shape) != want or (batched and arr.ndim == 0):
                shape = ("B", *ref.shape) if batched else tuple(ref.shape)
                raise InvalidInput(f"{what}: expected shape {list(shape)}, got {list(arr.shape)}")
            if arr.dtype.kind not in "biuf":
                raise InvalidInput(f"{what}: expected numbers")
            t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
            out.append(t.to(device=self.device, dtype=ref.dtype))
        batch_sizes = {t.shape[0] for t in out} if batched else set()
        if len(batch_sizes) > 1:
            raise InvalidInput(f"{what}: batched vectors disagree on the batch size: {sorted(batch_sizes)}")
        return pytree.tree_unflatten(out, ref_spec)

    def vjp(self, call: Call) -> Result:
        args = self.tensors(call)
        box = _AuxBox(call.spec)
        g = _partial(box, args, call.argnums)
        primals = [args[i] for i in call.argnums]
        out, pullback, aux_t = self._guard(lambda: torch.func.vjp(g, *primals, has_aux=True))
        cot = self._vectors(call.vectors, out, "cotangents", call.batched_vectors)
        fn = torch.func.vmap(pullback) if call.batched_vectors else pullback
        grads = self._guard(lambda: fn(cot))
        value = tuple(grads) if call.as_tuple else grads[0]
        output = self.host(out) if call.return_output else None
        return Result(self.host(value), self.host(box.restore(aux_t)), call.spec.has_aux, output)

    def jvp(self, call: Call) -> Result:
        args = self.tensors(call)
        box = _AuxBox(call.spec)
        g = _partial(box, args, call.argnums)
        primals = tuple(args[i] for i in call.argnums)
        like = primals if call.as_tuple else primals[0]
        tangents = self._vectors(call.vectors, like, "tangents", call.batched_vectors)
        tangents = tuple(tangents) if call.as_tuple else (tangents,)

        def push(*t: torch.Tensor) -> tuple[Any, Any, Any]:
            return torch.func.jvp(g, primals, t, has_aux=True)

        if call.batched_vectors:
            out, _, aux_t = self._guard(lambda: push(*[torch.zeros_like(p) for p in primals]))
            value = self._guard(lambda: torch.func.vmap(lambda *t: push(*t)[1])(*tangents))
        else:
            out, value, aux_t = self._guard(lambda: push(*tangents))
        output = self.host(out) if call.return_output else None
        return Result(self.host(value), self.host(box.restore(aux_t)), call.spec.has_aux, output)

    # ----------------------------------------------------------------- hvp (issue 12)

    def hvp(self, call: Call) -> Result:
        """Hessian-vector products of a scalar (0-d) function, forward-over-reverse:
        ``jvp(grad(f), primals, tangents)``; ``batched_vectors`` vmaps over the tangents.
        The result is shaped like the differentiated inputs (a tuple for tuple argnums)."""
        args = self.tensors(call)
        box = _AuxBox(call.spec)
        g = _partial(box, args, call.argnums)
        primals = tuple(args[i] for i in call.argnums)
        out, aux_t = self._guard(lambda: g(*primals))
        if not (isinstance(out, torch.Tensor) and out.dim() == 0):
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidInput(f"hvp needs a function with a scalar (0-d) output; {call.spec.name} returns {shape}")
        like = primals if call.as_tuple else primals[0]
        tangents = self._vectors(call.vectors, like, "tangents", call.batched_vectors)
        tangents = tuple(tangents) if call.as_tuple else (tangents,)
        grad = torch.func.grad(g, argnums=tuple(range(len(primals))), has_aux=True)

        def push(*t: torch.Tensor) -> Any:
            return torch.func.jvp(lambda *p: grad(*p)[0], primals, t)[1]

        fn = torch.func.vmap(push) if call.batched_vectors else push
        value = self._guard(lambda: fn(*tangents))
        value = tuple(value) if call.as_tuple else value[0]
        output = self.host(out) if call.return_output else None
        return Result(self.host(value), self.host(box.restore(aux_t)), call.spec.has_aux, output)

    # ----------------------------------------------------------------- request batching

    def can_batch(self, spec: FunctionSpec) -> bool:
        return spec.name not in self.no_vmap_function

    def run_batch(self, kind: str, calls: Sequence[Call]) -> list[Result]:
        """Several requests with equal options and shapes as one ``vmap`` call, split back.

        Raises when the stacked call fails for any reason; the scheduler then runs each
        request alone, so one bad request cannot fail its batch-mates.
        """
        first = calls[0]
        stacked = replace(
            first,
            args=[np.stack([c.args[i] for c in calls]) for i in range(len(first.args))],
            batched=True,
            deadline=min(c.deadline for c in calls),
            max_result_bytes=None if first.max_result_bytes is None else first.max_result_bytes * len(calls),
            cancelled=lambda: all(c.cancelled() for c in calls),
        )
        if kind == "evaluate":
            result = self.evaluate(stacked, allow_loop=False)
        else:
            result = self._batched(stacked, kind, allow_loop=False)
        return [
            Result(
                value=_take(result.value, i),
                aux=_take(result.aux, i),
                has_aux=result.has_aux,
                output=_take(result.output, i) if c.return_output else None,
                chunk_size=result.chunk_size,
                mode=result.mode,
            )
            for i, c in enumerate(calls)
        ]


def _take(tree: Any, i: int) -> Any:
    """Example ``i`` of a batched numpy tree; non-array leaves were computed once for all."""
    # leaf[i, ...] keeps a 0-d result an array (leaf[i] would be a numpy scalar)
    return pytree.tree_map(lambda leaf: leaf[i, ...] if isinstance(leaf, np.ndarray) else leaf, tree)


# Equal ways to compute torch.func.hessian; which is fastest depends on the function.
_HESSIAN_STRATEGIES: dict[str, Callable[[Callable[..., Any], Any], Callable[..., Any]]] = {
    "jacrev_grad": lambda g, a: torch.func.jacrev(torch.func.grad(g, argnums=a, has_aux=True), argnums=a, has_aux=True),
    "jacfwd_jacrev": lambda g, a: torch.func.jacfwd(torch.func.jacrev(g, argnums=a, has_aux=True), argnums=a, has_aux=True),
    "jacrev_jacrev": lambda g, a: torch.func.jacrev(torch.func.jacrev(g, argnums=a, has_aux=True), argnums=a, has_aux=True),
}
_MEASURE_HESSIAN_ELEMENTS = 1 << 20  # measure strategies only where running each is cheap


def _hessian_candidates(scalar_output: bool) -> tuple[str, ...]:
    """Strategies in the order usually fastest; grad needs a 0-d output."""
    return ("jacrev_grad", "jacfwd_jacrev", "jacrev_jacrev") if scalar_output else ("jacfwd_jacrev", "jacrev_jacrev")


def _stack_aux(auxes: list[Any]) -> Any:
    """Per-example aux -> one tree: tensors stacked, other values listed."""
    if not auxes or auxes[0] is None:
        return None
    leaves0, spec = pytree.tree_flatten(auxes[0])
    columns = zip(*[pytree.tree_flatten(a)[0] for a in auxes])
    stacked = [torch.stack(col) if isinstance(col[0], torch.Tensor) else list(col) for col in columns]
    return pytree.tree_unflatten(stacked, spec) if leaves0 else auxes[0]
