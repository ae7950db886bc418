"""Reverse-mode Jacobian rows, chunk by chunk, as ``torch.func.jacrev`` computes them.

One ``vjp``, then the pullback ``vmap``-ed over rows of the identity, ``chunk_size``
rows at a time. Rows come out as a sequence of chunks, so one code path serves gathered
results, streamed ``.npy`` bodies, deadlines (checked between chunks) and the memory
budget (chunk sizes halve on out-of-memory).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch.utils import _pytree as pytree

from ..types import Call
from .calling import AuxBox, dense_pullback, function_error, is_oom, partial
from .devices import PeakMemory
from .lean_vmap import vmap_rows
from .products import same_products, vmap_agrees

if TYPE_CHECKING:
    from .core import Engine

__all__ = ["RowStream"]

log = logging.getLogger("jacobian_service.engine")

# A chunk's working set is a few times its cotangent and gradient rows: this factor is
# an estimate; a streamed Jacobian's chunks measure their peak instead (``chunks(calibrate=True)``).
WORKSET_FACTOR = 4
_MIN_AUTO_CHUNK = 16  # CPU BLAS is slower at 2-8 rows than at 1 (a 2048-wide MLP; flat past ~256)
# The spec of an output that is one tensor (nearly every function's): such an output
# needs no pytree walk to flatten or rebuild. Each walk costs a few microseconds, and
# each leaves a reference cycle (torch's recursive helper) for the collector.
_ONE_TENSOR = pytree.tree_structure(torch.empty(0))


def _basis(
    sizes: Sequence[int], shapes: Sequence[torch.Size], start: int, stop: int, like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Rows ``start:stop`` of the identity over the concatenated flattened outputs."""
    if len(sizes) == 1 and start == 0 and stop == sizes[0] and len(shapes[0]) == 1:
        # One vector output, every row (a small Jacobian, the common case): the identity
        # in one op, where the general case below takes four (~60k instructions).
        return [torch.eye(stop, dtype=like[0].dtype, device=like[0].device)]
    out = []
    offset = 0
    n = stop - start
    for size, shape, ref in zip(sizes, shapes, like):
        block = torch.zeros(n, size, dtype=ref.dtype, device=ref.device)
        # Row r is global row start + r, column c global offset + c: the ones lie on the
        # diagonal c = r + (start - offset) (an empty view when this output has none).
        # A view and a fill: cheaper than scattering through index tensors.
        block.diagonal(start - offset).fill_(1)
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
        self.box = AuxBox(call.spec)
        self.primals = [args[i] for i in call.argnums]
        g = partial(self.box, args, call.argnums)
        try:
            if call.spec.has_aux:
                output, self._pullback, aux_tensors = torch.func.vjp(g, *self.primals, has_aux=True)
            else:  # no aux to carry through the transform (torch's has_aux path walks it: ~50k instructions)
                output, self._pullback = torch.func.vjp(lambda *p: g(*p)[0], *self.primals)
                aux_tensors = ()
        except BaseException as exc:
            raise function_error(exc) from None
        self.output = output
        self.aux = self.box.restore(aux_tensors)
        if type(output) is torch.Tensor:
            self.leaves, self.out_spec = [output], _ONE_TENSOR
        else:
            self.leaves, self.out_spec = pytree.tree_flatten(output)
        self.sizes = [leaf.numel() for leaf in self.leaves]
        self.total_rows = sum(self.sizes)
        self.chunk_used: int | None = None  # after out-of-memory halving; 1 once rows loop
        self.looped = False  # rows ran one VJP at a time: vmap could not run them, or got them wrong
        self.signature = call.signature()  # the profile's key for this Jacobian's rows

    def auto_chunk(self) -> int:
        per_row = WORKSET_FACTOR * sum((p.numel() + sum(self.sizes)) * p.element_size() for p in self.primals)
        chunk = max(1, self.engine.memory_budget // max(per_row, 1))
        if chunk >= self.total_rows:
            return max(self.total_rows, 1)
        if chunk < _MIN_AUTO_CHUNK:
            return 1 if chunk < 2 else min(_MIN_AUTO_CHUNK, self.total_rows)
        return 1 << (chunk.bit_length() - 1)  # round down to a power of two

    def chunks(
        self, start: int, stop: int, chunk_size: int, calibrate: bool = False
    ) -> Iterator[tuple[int, int, tuple[torch.Tensor, ...]]]:
        """Rows ``start:stop`` in chunks of ``chunk_size`` (halved on out-of-memory).

        With ``calibrate`` (a streamed Jacobian whose chunk size the engine chose), the
        memory budget is held, not just estimated (estimates are off by 10x and more for
        functions with large temporaries): chunks start at one row and double while the
        peak memory of each is measured, up to what the measurements say fits the budget,
        never more than the estimate. What a row costs (the most measured) is remembered
        per request signature, so later requests start at the right size.
        """
        profile = self.engine.profiles[self.call.spec.name]
        key = self.signature
        measure, full, per_row = False, chunk_size, 0
        if calibrate:
            known = profile.row_bytes.get(key)
            if known is not None:
                chunk_size = min(chunk_size, self._fitting(known))
            elif stop - start > 1:
                measure, chunk_size = True, 1
        s = start
        while s < stop:
            self.call.check_alive()
            e = min(s + chunk_size, stop)
            meter = PeakMemory(self.engine.device) if measure else contextlib.nullcontext()
            try:
                with meter:
                    grads = self._rows(s, e)
            except BaseException as exc:
                if is_oom(exc) and chunk_size > 1:
                    self.engine.release_memory()
                    chunk_size = full = max(1, chunk_size // 2)
                    log.warning("out of memory at %d rows; retrying with %d", e - s, chunk_size)
                    continue
                raise function_error(exc) from None
            if measure:
                growth = meter.growth  # type: ignore[union-attr]
                if growth is None:  # this platform cannot measure: the estimate it is
                    measure, chunk_size = False, full
                else:
                    per_row = max(per_row, -(-growth // (e - s)))
                    fits = min(full, self._fitting(per_row))
                    if chunk_size * 2 <= fits:
                        chunk_size *= 2
                    else:
                        measure, chunk_size = False, fits
                        profile.row_bytes[key] = per_row
            # meta.chunk_size is the rows one vmap took: none where they ran one by one
            # (it said the chunk asked for, 5 of 5 rows, where each row was its own VJP)
            self.chunk_used = 1 if self.looped else chunk_size
            yield s, e, grads
            s = e

    def _fitting(self, per_row: int) -> int:
        """Rows per chunk whose peak, plus two chunks of results on their way out (the
        one being sent and the one being computed), stay within the memory budget."""
        out_row = sum(p.numel() * p.element_size() for p in self.primals)
        rows = self.engine.memory_budget // max(1, per_row + 2 * out_row)
        return 1 if rows < 2 else 1 << (int(rows).bit_length() - 1)

    def _rows(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        basis = _basis(self.sizes, [leaf.shape for leaf in self.leaves], start, stop, self.leaves)
        profile = self.engine.profiles[self.call.spec.name]
        if stop - start > 1 and profile.vmap_pullback:
            cotangents = self.nest(basis)
            try:
                grads = vmap_rows(self._pullback, cotangents)  # torch.func.vmap's, less its Python
            except Exception as exc:
                if is_oom(exc):
                    raise
                grads = self._row_loop(basis)  # raises if the function itself fails
                log.info("vmap of %s's pullback failed (%s); using the row loop", self.call.spec.name, type(exc).__name__)
                profile.vmap_pullback = False
                return grads
            # torch's vmap can be silently wrong (products.vmap_agrees), for some rows and
            # not others of one size: cdist's pullback over a (2, 2) output is right for
            # rows 1:3 and wrong for rows 0:2 and 2:4, so a request whose chunks were
            # checked at other rows (a streamed .npy's calibration runs 0:1, 1:3, 3:4)
            # answered chunk_size=2 wrong, where the README says the result never depends
            # on it. Checked once per signature and chunk, its first row with its size.
            # A pass where every row is zero compared zeros with zeros: it says nothing of
            # other values, so it is not kept (cdist's pullback under vmap is right where all
            # points coincide, its Jacobian zero, and wrong elsewhere: a first request at
            # x = [0, 0, 0] let x = [0, 1, 2] be answered 1.0 off).
            key = ("rows", self.signature, start, stop)
            if key not in profile.vmap_checked:
                if not vmap_agrees(self._pullback, (cotangents,), grads):
                    looped = self._row_loop(basis, count=False)
                    if not same_products(looped, grads):
                        profile.vmap_checked[key] = False
                        log.warning("vmap of %s's pullback disagrees with one VJP; using the row loop", self.call.spec.name)
                        profile.vmap_pullback = False
                        self.looped = True
                        return looped
                    # vmap's rows are the VJPs one by one: a pullback not linear in its
                    # cotangent, which vmap runs right (products.same_products)
                if any(bool(g.any()) for g in grads):
                    profile.vmap_checked[key] = True
            return grads
        return self._row_loop(basis)

    def _row_loop(self, basis: list[torch.Tensor], count: bool = True) -> tuple[torch.Tensor, ...]:
        """One VJP a row; ``count`` False: a check's rows, not (yet) the answer's."""
        self.looped = self.looped or (count and basis[0].shape[0] > 1)
        pullback = dense_pullback(self._pullback)
        rows = [pullback(self.nest([b[k] for b in basis])) for k in range(basis[0].shape[0])]
        return tuple(torch.stack([r[i] for r in rows]) for i in range(len(self.primals)))

    def nest(self, leaves: list[torch.Tensor]) -> Any:
        """One tensor per output leaf, nested as the output is."""
        return leaves[0] if self.out_spec is _ONE_TENSOR else pytree.tree_unflatten(leaves, self.out_spec)
