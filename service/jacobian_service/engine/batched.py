"""Per-example results: ``vmap(jacrev(f))`` (or hessian, or f) over a leading batch dim.

Serves both ``batched=true`` requests and request batching, where the scheduler stacks
equal requests into one batched call and splits the result back.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..errors import FunctionError, InvalidInput, OutOfMemory, ServiceError, Timeout
from ..types import Call, Result, stacked_liveness
from . import kept_state
from .kept_state import KeptState
from .shapes import span
from .calling import (AuxBox, GradOffWatch, as_input_dtypes, changed_between_calls, differentiable, fresh,
                      function_error, is_oom, look)
from .hessian import (CHECK_ELEMENTS, STRATEGIES, TORCHS, agrees_with_differences, agrees_with_hvp, finite, gradient,
                      half_precision, hvp_misses, jacrev_rows, with_output)
from .products import agrees_with_reverse, reverse_misses, same_products
from . import vmap_dims as _dims

if TYPE_CHECKING:
    from .core import Engine

__all__ = ["PerRequest", "SharedDraws", "UnbatchedOutputs", "batched", "deterministic_failure", "over_examples", "run_batch", "take"]

log = logging.getLogger("jacobian_service.engine")


def batched(engine: "Engine", call: Call, kind: str, allow_loop: bool = True) -> Result:
    """``vmap(jacrev(f))`` (or a Hessian) over the leading dim of every input.

    Reverse mode only under ``vmap`` over examples: torch (2.13) gets forward-mode AD
    under such a ``vmap`` wrong for some ops, silently (``vmap(jacfwd(linalg.solve))``
    thousands off, ``vmap(torch.func.hessian(f))`` of a solve or a ``det`` too, while
    each example alone is right). So a batched Jacobian is ``jacrev``'s whatever
    ``mode`` asks, a batched Hessian reverse over reverse (where torch cannot run one
    strategy, the next, and torch's own last, example by example); a function whose
    Hessian must be torch's own (it switches grad off) loops over its examples.
    """
    args = engine.tensors(call)
    in_dims = _dims.dims(call)
    batch = _dims.batch_size(args, in_dims)
    box = AuxBox(call.spec)
    argnums: int | tuple[int, ...] = tuple(range(len(call.params))) if call.as_tuple else 0

    profile = engine.profiles[call.spec.name]
    # Size check from one example's forward pass, before any derivative; it also tells
    # whether the function computes with grad off (calling.GradOffWatch).
    watch = GradOffWatch(active=kind == "hessian")  # not on reverse mode's hot path
    # (as reverse mode calls it where a plain call fails: calling.look)
    first = engine.guard(lambda: watch.call(look, box, lambda: fresh(_dims.example(args, in_dims, 0)))[0]) if batch else None
    no_rows = first is not None and not any(leaf.numel() for leaf in pytree.tree_leaves(first))
    profile.grad_off = profile.grad_off or watch.seen
    attempts = [("rev", not profile.vmap_pullback)]  # (strategy, jacrev row by row: see rows.py)
    if kind == "hessian":
        scalar = isinstance(first, torch.Tensor) and first.dim() == 0
        known = profile.hessian.get(("per example", call.signature()))
        # 16-bit floats: torch's own first, as for a plain Hessian (hessian.half_precision)
        order = [TORCHS] if profile.grad_off else _hessian_order(TORCHS if half_precision(args, first) else known, scalar)
        attempts = [(name, False) for name in order]
    elif profile.vmap_pullback:  # vmap of its pullback may be what fails: jacrev row by row next
        attempts.append(("rev", True))
    mode, rows_loop = attempts[0]

    outer_rows: int | None = None  # (set below, from one example's sizes: _outer_rows)
    output_rows: int | None = None  # (likewise, for jacrev_rows)

    def per_example(*example: torch.Tensor) -> Any:
        g, primals = differentiable(box, example, call)
        g = with_output(g)  # return_output's output: the one differentiated, not another call's
        if kind == "hessian":
            if mode == "jacrev_jacrev" and outer_rows is not None:
                # STRATEGIES' own, its outer pullback in chunks that fit the memory budget
                inner = torch.func.jacrev(g, argnums=argnums, has_aux=True)
                h, (out, aux_t) = torch.func.jacrev(inner, argnums=argnums, has_aux=True, chunk_size=outer_rows)(*primals)
            elif mode == "jacrev_rows":  # its output rows in chunks that fit the memory budget
                h, (out, aux_t) = jacrev_rows(g, argnums, chunk_size=output_rows)(*primals)
            else:
                h, (out, aux_t) = STRATEGIES[mode](g, argnums)(*primals)
            return (as_input_dtypes(h, primals, depth=2), out), aux_t
        chunk = 1 if rows_loop else call.chunk_size
        if chunk == 1 and (no_rows or (not batch and not rows_loop)):
            # torch's jacrev(chunk_size=1) asserts on an output of no elements ("expected
            # t.size(0) to be 1, got 0"), which any other chunk size answers: no rows. A
            # batch of no examples has no first example to say whether the output is
            # empty, and vmap computes nothing there: the chunk asked for cannot matter
            chunk = None
        jac, (out, aux_t) = torch.func.jacrev(g, argnums=argnums, has_aux=True, chunk_size=chunk)(*primals)
        return (jac, out), aux_t

    def as_torch(*example: torch.Tensor) -> Any:
        """One example's result as torch's own transform computes it, for what torch's
        vmap leaves unbatched (``out_dims`` null): torch.func.hessian is forward over
        reverse, whatever strategy ran. Reverse over reverse pulls every output's rows
        back through one VJP, so d2/ds2 of an output of a shared ``s`` alone came out
        batched beside an output that depends on x, and the request was a 422 where
        ``vmap(hessian(f), out_dims=(0, None))`` answers."""
        if kind != "hessian":
            return per_example(*example)[0][0]
        g, primals = differentiable(box, example, call)
        return STRATEGIES[TORCHS](with_output(g), argnums)(*primals)[0]

    if first is not None:
        out_numel = sum(leaf.numel() for leaf in pytree.tree_leaves(first))
        one = _dims.example(args, in_dims, 0)
        in_numel = sum(one[i].numel() for i in call.argnums)
        width = in_numel if kind == "jacobian" else in_numel * in_numel
        widest = max(span(one[i].shape) for i in call.argnums)
        if kind == "hessian":
            itemsize = engine.wire_itemsize(args[call.argnums[0]].dtype)
            outer_rows = _outer_rows(engine, batch, out_numel * in_numel, itemsize)
            # jacrev_rows: each output row's products are one example's inputs^2 entries
            output_rows = _outer_rows(engine, batch, in_numel * in_numel, itemsize, out_numel)
        engine.check_result_size(call, batch * out_numel * width * engine.wire_itemsize(args[call.argnums[0]].dtype),
                                 "examples", batch * max((span(o.shape) for o in pytree.tree_leaves(first)), default=1)
                                 * widest ** (1 if kind == "jacobian" else 2) * engine.wire_itemsize(args[call.argnums[0]].dtype))
    for i, (mode, rows_loop) in enumerate(attempts):
        # Reverse over reverse is watched for a backward pass under no_grad (hessian.py)
        strategy = GradOffWatch(active=kind == "hessian" and mode != TORCHS)
        try:
            (value, output), aux = strategy.call(over_examples, engine, call, box, per_example,
                                                 engine.tensors(call) if i else args, allow_loop, mode != TORCHS, kind)
            break
        except FunctionError:
            # A strategy can fail where an equal one runs (torch lacks a double backward
            # that forward over reverse does not need: native_layer_norm's; vmap cannot run
            # a pullback that runs row by row): the next one, as a plain Hessian tries them
            # and a plain Jacobian's rows loop; the last (torch's own) fails as torch does.
            if i == len(attempts) - 1:
                raise
    if kind == "hessian" and len(attempts) > 1:
        profile.hessian[("per example", call.signature())] = mode
    # Examples that ran one by one, each a call of its own, of a function whose calls
    # changed the state it keeps: each answer is its own call's, and a check that calls
    # the function again (one state for every example) cannot agree with them (a
    # counter's Jacobians [1x, 2x, 3x] checked at 3x, then computed again: 5 steps, each
    # answered 2 on). Not checked then: each example is torch's transform of its own call.
    own_calls = _own_calls(call)
    if kind == "jacobian" and batch and not own_calls and not _vmap_rows_agree(engine, call, value, rows_loop, first):
        rows_loop, vmapped = True, value  # torch's vmap of the pullback is wrong for these shapes: row by row
        log.warning("vmap of %s's per-example Jacobians disagrees with one VJP; computing them example by example",
                    call.spec.name)
        (value, output), aux = over_examples(engine, call, box, per_example, engine.tensors(call), allow_loop, what=kind)
        rows_loop = not same_products(value, vmapped)  # (the same: a pullback not linear in its cotangent)
    if kind == "jacobian" and rows_loop:
        profile.vmap_pullback = False
    profile.grad_off = profile.grad_off or strategy.seen
    if kind == "hessian" and mode != TORCHS and (strategy.seen or not finite(value)):
        # where f is not smooth the strategies may differ (NaN against torch's 0), and a
        # backward under no_grad makes reverse over reverse 0: torch's own, example by example
        mode = TORCHS
        (value, output), aux = over_examples(engine, call, box, per_example, engine.tensors(call), allow_loop, False, kind)
    if kind == "hessian" and mode != TORCHS and batch and not own_calls and not _hessian_agrees_with_hvp(engine, call, value):
        # a strategy torch's vmap gets wrong, or one choosing otherwise than torch's own
        # (hessian.agrees_with_hvp): torch's own, example by example, from now on
        mode = TORCHS
        (value, output), aux = over_examples(engine, call, box, per_example, engine.tensors(call), allow_loop, False, kind)
        profile.hessian[("per example", call.signature())] = TORCHS
    if kind == "hessian" and mode != TORCHS and batch and not own_calls:
        value = _examples_as_torchs(engine, call, value, argnums)
    if kind == "hessian" and mode != TORCHS and batch and not own_calls:
        _check_where_torch_fails(engine, call, _dims.example(engine.tensors(call), in_dims, 0),
                                 pytree.tree_map(lambda t: t[0], value))
    if call.out_dims != 0:  # vmap's out_dims: the batch moved, as the last step
        value = _dims.lay_out(call, value, kind, _dims.torch_says_unbatched(
            as_torch, engine.tensors(call), in_dims, value) if _dims.has_none(call) else None)
        aux = _dims.lay_out_extra(call, aux)  # return_output's output is no part of torch's call: batch first
    from .core import derivative_half_meta  # (core imports this module)

    half = derivative_half_meta(call, value, output, aux)
    output = engine.host(output) if call.return_output else None
    # meta.chunk_size: the rows of one example's Jacobian each vmap took (row by row: 1;
    # never more than the example's output has); a Hessian's strategies take no chunks
    used = None
    if kind == "jacobian":
        rows = sum(leaf.numel() for leaf in pytree.tree_leaves(first)) if first is not None else None
        used = 1 if rows_loop else call.chunk_size
        if used is not None and rows is not None:
            used = max(1, min(used, rows))
    return Result(engine.host(value), engine.host(aux), call.spec.has_aux, output, used, mode, batch_meta=half)


def _own_calls(call: Call) -> bool:
    """Whether this request's examples ran one by one, each a call of its own, and
    changed the state the function keeps (over_examples, kept_state.Replay.restart)."""
    replay = kept_state.active.replay
    return replay is not None and replay.fn is call.spec.fn and replay.looped and replay.keeps_state


def _vmap_rows_agree(engine: "Engine", call: Call, value: Any, rows_loop: bool, first: Any) -> bool:
    """Whether ``jacrev``'s rows under ``vmap`` are right for every example of this
    request: torch's vmap of a pullback can be silently wrong (products.vmap_agrees), for
    some shapes and, at the same shapes, for some values and not others. cdist's pullback
    is wrong where two points coincide (x = [0, 1]: 1.0 off), and right where all do
    (x = [0, 0], a Jacobian of zeros): the first example alone was checked, once per
    signature and chunk size, so [[0, 0], [0, 1]] answered the second 1.0 off with a 200,
    and so did every later request of that shape. So every example's Jacobian is checked
    against one VJP of its own at its own inputs (products.reverse_misses), all in one
    vmap over the examples (example by example where that vmap cannot run); a pass is
    kept for the signature and chunk size only where no example's Jacobian is all zeros
    (such a pass says nothing of other values), as a plain Jacobian's chunks (rows.py).
    Checking every request cost one vmapped VJP each, ~0.5 ms on a stacked batch of 8
    sin requests whose Jacobians take ~0.9 ms."""
    if rows_loop:
        return True
    checked = engine.profiles[call.spec.name].vmap_checked
    key = ("per example", call.signature(batched=True), call.chunk_size)
    if checked.get(key):
        return True
    args, in_dims = engine.tensors(call), _dims.dims(call)
    batch = _dims.batch_size(args, in_dims)
    if engine.guard(lambda: _vjp_misses(engine, call, args, in_dims, value, batch, first)):
        return False
    nonzero = torch.zeros(batch, dtype=torch.bool)
    for leaf in pytree.tree_leaves(value):
        if leaf.numel():
            nonzero |= leaf.reshape(batch, -1).ne(0).any(dim=1).cpu()
    if bool(nonzero.all()):
        checked[key] = True
    return True


def _vjp_misses(engine: "Engine", call: Call, args: list[torch.Tensor], in_dims: Sequence[int | None], value: Any,
                batch: int, first: Any) -> bool:
    """Whether an example's Jacobian in ``value`` is not ``v^T J`` of one VJP of its
    own (random positive ``v`` per example, shaped like ``first``, one example's output)."""
    outs, out_spec = pytree.tree_flatten(first)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = [(torch.rand((batch, *o.shape), generator=gen, dtype=torch.float64) + 0.5).to(o.device, o.dtype) for o in outs]

    def pulled(example: list[torch.Tensor], v_b: list[torch.Tensor]) -> Any:
        g, primals = differentiable(AuxBox(call.spec), example, call)
        _, pullback, _ = torch.func.vjp(g, *primals, has_aux=True)
        return pullback(pytree.tree_unflatten(v_b, out_spec))

    try:
        rev = pytree.tree_leaves(torch.func.vmap(pulled, in_dims=(list(in_dims), 0))(args, v))  # (fresh copies)
    except Exception as exc:  # vmap cannot run it: each example alone
        if is_oom(exc) or isinstance(exc, ServiceError):
            raise
        values = [pytree.tree_map(lambda t: t[b], value) for b in range(batch)]
        for b in range(batch):
            call.check_alive()
            g, primals = differentiable(AuxBox(call.spec), _dims.example(engine.tensors(call), in_dims, b), call)
            if not agrees_with_reverse(g, primals, values[b]):
                return True
        return False
    blocks, n = pytree.tree_leaves(value), len(rev)
    if len(blocks) != len(outs) * n or any(tuple(blocks[i * n + j].shape) != (batch, *outs[i].shape, *rev[j].shape[1:])
                                           for i in range(len(outs)) for j in range(n)):
        raise changed_between_calls("output")  # (a function whose output follows a call count)
    # the coarsest output's round-off: every output's VJP adds into each gradient (a float32
    # or float16 output beside float64 ones, whose products round in their dtype, was the
    # first's float64 round-off away, and every batched Jacobian of it ran example by example)
    eps = max((torch.finfo(o.dtype).eps for o in outs if o.is_floating_point() or o.is_complex()), default=0.0)
    if not bool(reverse_misses(v, blocks, rev, eps, batch).any()):
        return False
    measured = _round_off(call, engine.tensors(call), in_dims, v, outs, out_spec, batch) if eps else None
    return measured is None or bool(reverse_misses(v, blocks, rev, eps, batch, measured).any())


def _round_off(call: Call, args: list[torch.Tensor], in_dims: Sequence[int | None], v: list[torch.Tensor],
               outs: list[torch.Tensor], out_spec: Any, batch: int) -> torch.Tensor | None:
    """Per example, the relative difference that is the function's own round-off there
    (sparsity.verify: how far its VJPs of ``v``, a mixed-sign ``v2`` and ``v + v2`` are
    from additive), or None where that cannot be measured. Large float32 terms that
    cancel inside f (``(x * 1e4 + x) - x * 1e4``) put one VJP 1e4 |v| ulps from ``v^T J``
    of right vmapped rows: every batched=true request of such a function (8 x 400) was
    computed again example by example, 0.4-0.8 s where the vmapped rows took 0.05 s.
    Paid only where the first check failed: one more forward pass and three backward."""
    # (the engine's sparsity package, imported where first needed as run_batch's is)
    from ..sparsity.verify import noise_tolerance, round_off

    gen = torch.Generator(device="cpu").manual_seed(4321)
    v2 = [(torch.rand((batch, *o.shape), generator=gen, dtype=torch.float64) - 0.5).to(o.device, o.dtype) for o in outs]

    def pulled(example: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        g, primals = differentiable(AuxBox(call.spec), example, call)
        _, pullback, _ = torch.func.vjp(g, *primals, has_aux=True)
        seeds = (a, b, [x + y for x, y in zip(a, b)])
        return torch.stack([torch.cat([r.reshape(-1).to(torch.float64) for r in pytree.tree_leaves(
            pullback(pytree.tree_unflatten(list(s), out_spec)))]) for s in seeds])

    try:
        products = torch.func.vmap(pulled, in_dims=(list(in_dims), 0, 0))(args, v, v2)
    except Exception as exc:
        if is_oom(exc) or isinstance(exc, ServiceError):
            raise
        return None
    dtype = outs[0].dtype
    return torch.tensor([noise_tolerance(round_off(products[b]), dtype) for b in range(batch)], dtype=torch.float64)


def _hessian_agrees_with_hvp(engine: "Engine", call: Call, value: Any) -> bool:
    """The first example's Hessian against one HVP (hessian.agrees_with_hvp), once per
    signature, as a plain Hessian's strategies are checked when measured."""
    checked = engine.profiles[call.spec.name].vmap_checked
    key = ("hessian", call.signature(batched=True))
    if key not in checked:
        g, primals = differentiable(AuxBox(call.spec), _dims.example(engine.tensors(call), _dims.dims(call), 0), call)
        argnums: int | tuple[int, ...] = tuple(range(len(primals))) if call.as_tuple else 0
        checked[key] = engine.guard(lambda: agrees_with_hvp(g, primals, argnums, pytree.tree_map(lambda t: t[0], value),
                                                            alive=call.check_alive, measure=True))
    return bool(checked.get(key))


def _examples_as_torchs(engine: "Engine", call: Call, value: Any, argnums: Any) -> Any:
    """``value`` (per-example Hessians, batch first) with each example whose Hessian
    disagrees with one HVP at its own inputs (hessian.agrees_with_hvp) replaced by
    torch's own strategy's for it, as a plain Hessian is checked (hessian.py). Where f
    is not twice differentiable (``fmax`` at a tie) each mode takes its own side, and
    the first example's check (once per signature) said nothing of the others: an
    example at a tie was answered jacrev(grad)'s Hessian, 2 off what
    ``vmap(torch.func.hessian(f))`` and torch.func.hessian of it answer (a plain
    request at the tie too, when request batching stacked it behind another). Every
    example's HVP runs in one ``vmap`` (a loop of them cost several times the batched
    Hessian); an example it flags is checked again alone, without ``vmap``, before its
    Hessian is replaced (torch's forward mode under a ``vmap`` over examples can be the
    wrong one: then, for this signature, the check is left off)."""
    checked = engine.profiles[call.spec.name].vmap_checked
    key = ("hessian hvp under vmap", call.signature(batched=True))
    if checked.get(key) is False or sum(leaf.numel() for leaf in pytree.tree_leaves(value)) > CHECK_ELEMENTS:
        return value  # (read in float64: as a plain Hessian, a large one is not checked)
    args, in_dims = engine.tensors(call), _dims.dims(call)
    batch = _dims.batch_size(args, in_dims)
    flagged = engine.guard(lambda: _hvp_misses(call, args, in_dims, argnums, value, batch))
    if not flagged:
        return value
    leaves, spec = pytree.tree_flatten(value)
    leaves = [leaf.clone() for leaf in leaves]
    for b in flagged:
        call.check_alive()
        g, primals = differentiable(AuxBox(call.spec), _dims.example(engine.tensors(call), in_dims, b), call)
        mine = [leaf[b] for leaf in leaves]
        if engine.guard(lambda: agrees_with_hvp(g, primals, argnums, pytree.tree_unflatten(mine, spec), measure=True)):
            checked[key] = False  # vmap's HVP was the one off, not the answer
            continue
        own = engine.guard(lambda: STRATEGIES[TORCHS](with_output(g), argnums)(*fresh(primals))[0])
        for leaf, block in zip(leaves, pytree.tree_leaves(as_input_dtypes(own, primals, depth=2))):
            leaf[b] = block
    return pytree.tree_unflatten(leaves, spec)


def _hvp_misses(call: Call, args: list[torch.Tensor], in_dims: Sequence[int | None], argnums: Any, value: Any,
                batch: int) -> list[int]:
    """The examples whose Hessian in ``value`` is not ``w^T H v`` of one HVP each (random
    ``w``, ``v``; the tolerance of hessian.agrees_with_hvp), all HVPs in one ``vmap``.
    Where that ``vmap`` cannot run, every example, to be checked alone."""
    g0, p0 = differentiable(AuxBox(call.spec), _dims.example(args, in_dims, 0), call)
    # (its output's sizes, as reverse mode calls it where a plain call fails: calling.look)
    outs, leaves = pytree.tree_leaves(look(g0, lambda: fresh(p0))[0]), pytree.tree_leaves(p0)
    spec = pytree.tree_structure(p0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = [(torch.rand((batch, *o.shape), generator=gen, dtype=torch.float64) - 0.5).to(o.device, o.dtype) for o in outs]
    v = [(torch.rand((batch, *p.shape), generator=gen, dtype=torch.float64) - 0.5).to(p.device, p.dtype) for p in leaves]

    def hvp(example: list[torch.Tensor], w_b: list[torch.Tensor], v_b: list[torch.Tensor]) -> Any:
        g, primals = differentiable(AuxBox(call.spec), example, call)

        def weighted(*p: Any) -> torch.Tensor:
            return sum((wi * oi).sum() for wi, oi in zip(w_b, pytree.tree_leaves(g(*p)[0])))

        return torch.func.jvp(gradient(weighted, argnums), primals, pytree.tree_unflatten(v_b, spec))[1]

    try:
        hv = pytree.tree_leaves(torch.func.vmap(hvp, in_dims=(list(in_dims), 0, 0))(list(fresh(args)), w, v))
    except Exception as exc:  # vmap cannot run it: each example alone
        if is_oom(exc):
            raise
        return list(range(batch))
    blocks = pytree.tree_leaves(value)
    n = len(leaves)
    if len(hv) != n or len(blocks) != len(outs) * n * n:
        return list(range(batch))
    dtypes = [p.dtype for p in leaves]
    off = hvp_misses(blocks, w, v, hv, dtypes, batch)
    if bool(off.any()) and all(d.is_floating_point for d in dtypes):
        # the function's own round-off at each example (as _round_off measures a
        # Jacobian's): cancelling float32 terms flagged every example, each checked alone
        from ..sparsity.verify import noise_tolerance, round_off

        gen2 = torch.Generator(device="cpu").manual_seed(4321)
        v2 = [(torch.rand((batch, *p.shape), generator=gen2, dtype=torch.float64) - 0.5).to(p.device, p.dtype)
              for p in leaves]
        try:
            more = [pytree.tree_leaves(torch.func.vmap(hvp, in_dims=(list(in_dims), 0, 0))(list(fresh(args)), w, t))
                    for t in (v2, [a + b for a, b in zip(v, v2)])]
        except Exception as exc:
            if is_oom(exc):
                raise
            more = None
        if more is not None:
            products = torch.stack([torch.cat([t.detach().reshape(batch, -1).to(torch.float64) for t in h], 1)
                                    for h in (hv, *more)], 1)  # (batch, 3, width)
            coarsest = max(dtypes, key=lambda d: torch.finfo(d).eps)
            measured = torch.tensor([noise_tolerance(round_off(products[b]), coarsest) for b in range(batch)])
            off = hvp_misses(blocks, w, v, hv, dtypes, batch, measured)
    return [int(b) for b in off.nonzero().flatten()]


# Copies of a row of reverse over reverse's outer pullback held per example (its basis
# row, the cotangents vmap stacks, their pullback), measured on sin: 32 examples of 63
# inputs in rows of 88 (a 256 MiB budget at 6) peaked at +240 MB; unchunked, 8 of them
# at +1.4 GB, ~3 x their bases' 504 MB.
_OUTER_ROW_COPIES = 6


def _outer_rows(engine: Engine, batch: int, inner_numel: int, itemsize: int, rows: int | None = None) -> int | None:
    """Rows of reverse over reverse's outer pullback per chunk for ``batch`` examples,
    each with an inner Jacobian of ``inner_numel`` entries, within the memory budget;
    None where every row fits at once. Unchunked, the outer ``jacrev`` pulls back an
    identity of ``inner_numel`` rows of ``inner_numel`` entries at once, per example:
    (outputs x inputs)^2, where the Hessian itself is outputs x inputs^2. One
    ``batched=true`` Hessian of 32 examples of ``sin`` on 63 inputs (8 KB in, a 32 MB
    answer) held its engine 14 s at 6.1 GB, its memory budget 256 MiB (each example
    alone: 10 ms); so did 32 clients' single Hessians, batched across requests.
    ``rows``: how many rows there are (``inner_numel`` unless given); jacrev_rows asks
    it of its output rows, each ``inner_numel`` (inputs^2) entries per example."""
    if not inner_numel:
        # an empty output or input: no rows to chunk (per_row 0 divided the budget by 0,
        # a 500 where torch answers vmap(hessian(f)) an empty Hessian)
        return None
    per_row = max(1, batch) * inner_numel * itemsize * _OUTER_ROW_COPIES
    fit = max(1, engine.memory_budget // per_row)
    return None if fit >= (inner_numel if rows is None else rows) else fit


def _hessian_order(known: str | None, scalar: bool) -> list[str]:
    """Strategies for per-example Hessians, the one that ran last time first: reverse
    over reverse under ``vmap`` (forward mode under a ``vmap`` over examples is wrong in
    torch for some ops, see :func:`batched`), then torch's own example by example."""
    order = ["jacrev_grad", "jacrev_jacrev", TORCHS] if scalar else ["jacrev_rows", "jacrev_jacrev", TORCHS]
    return [known] + [s for s in order if s != known] if known in order else order


def _check_where_torch_fails(engine: "Engine", call: Call, example: list[torch.Tensor], value: Any) -> None:
    """Where torch.func.hessian cannot run (no forward rule; learned on one example, once
    per function and shapes), reverse over reverse answers what torch would not, and
    may miss a part a backward's cut graph hides: checked on one example as the plain
    Hessian is (hessian.agrees_with_differences); torch's error where it fails."""
    errors = engine.profiles[call.spec.name].hessian_torch_error
    key = ("per example", call.signature())
    g, primals = differentiable(AuxBox(call.spec), example, call)
    argnums: int | tuple[int, ...] = tuple(range(len(primals))) if call.as_tuple else 0
    if errors.get(key) is None:
        try:
            STRATEGIES[TORCHS](g, argnums)(*fresh(primals))
            errors[key] = False  # torch's runs: the answer is what it would give
        except BaseException as exc:
            if is_oom(exc) or isinstance(exc, ServiceError) or not isinstance(exc, Exception):
                raise function_error(exc) from None
            errors[key] = function_error(exc)
    failed = errors.get(key)
    if failed and not engine.guard(lambda: agrees_with_differences(g, fresh(primals), argnums, value, call.check_alive)):
        raise type(failed)(failed.detail) from None  # a new one: the kept one keeps no frames


def over_examples(
    engine: "Engine", call: Call, box: AuxBox, fn: Callable[..., Any], args: list[torch.Tensor], allow_loop: bool,
    use_vmap: bool = True, what: str = "evaluate",
) -> tuple[Any, Any]:
    """``vmap(fn)`` over the leading dim of ``args`` -> ``(value, aux)``; when vmap
    cannot run the function (or ``use_vmap`` is False), a loop over examples (unless
    ``allow_loop`` is False: request batching then runs each request alone).

    What vmap refused is remembered for ``what`` ran (the function, its Jacobian, its
    Hessian) and how its inputs were batched: torch refuses a BatchNorm's running stats
    shared by every example (in_dims null) where it runs them given per example, and a
    grid_sample's double backward where it runs its Jacobian. Only the function itself,
    every input batched, refusing says that vmap cannot batch the function at all."""
    in_dims = _dims.dims(call)
    batch = _dims.batch_size(args, in_dims)
    profile = engine.profiles[call.spec.name]
    refused = (what, call.in_dims)
    # An empty batch runs vmap even where a loop was asked for (a Hessian that must be
    # torch's own: a function computing under no_grad): a loop has no example to answer
    # it, and torch's vmap(hessian(f)) answers its (0, n, n) zeros; it was a 422 saying
    # the function "cannot be batched with vmap", one vmap batches.
    use_vmap = (use_vmap or batch == 0) and profile.vmap_function and refused not in profile.vmap_refused
    vmap_error: BaseException | None = None
    if batch == 0 and not use_vmap:  # vmap answers an empty batch; a loop cannot
        raise InvalidInput(f"{call.spec.name} cannot be batched with vmap, so a batch of no examples has no answer")
    if use_vmap:
        # What the function keeps across calls, put back where vmap fails and the
        # examples run one by one: the failed try's writes (a counter's step, a global
        # buffer's add) were made twice, once by it and once by the loop. (A stacked
        # batch, which never loops here, is watched by Engine.run_batch.)
        kept = KeptState(call.spec.fn) if allow_loop else None
        try:
            value, aux_t = torch.func.vmap(fn, in_dims=in_dims)(*args)
            return value, box.restore(aux_t)
        except BaseException as exc:
            if kept is not None and kept.changed():
                kept.restore()
            if is_oom(exc):
                raise OutOfMemory(f"out of memory: {type(exc).__name__}") from None
            if isinstance(exc, (ServiceError, KeyboardInterrupt, SystemExit)) or not isinstance(exc, Exception):
                raise function_error(exc) from None
            vmap_error = exc.with_traceback(None)  # its frames (holding the batch) go now, not at a collection
    # A loop asked for (use_vmap False: a Hessian that must be torch's own, example by
    # example) is no failure of vmap, and a stacked batch runs it as each request alone
    # would: refused, the scheduler took it for one and never batched the function again
    if not allow_loop and (vmap_error is not None or not profile.vmap_function):
        raise function_error(vmap_error) if vmap_error else FunctionError(f"{call.spec.name} cannot be batched with vmap")
    if batch == 0:
        raise InvalidInput(f"{call.spec.name} cannot be batched with vmap ({type(vmap_error).__name__}), "
                           "so a batch of no examples has no answer")
    if vmap_error is not None:  # vmap may have written into them before it failed
        args = engine.tensors(call)
    # Where vmap cannot run the function, its examples are each a call of their own, as
    # in-process (``[f(x) for x in xs]``): a counter steps once for each, from the state
    # the request began in (kept_state.Replay.restart). A loop the engine chose (torch's
    # own Hessian, example by example) stands for one vmapped call: its calls replayed.
    replay = kept_state.active.replay
    if replay is not None and (replay.fn is not call.spec.fn or not (
            vmap_error is not None or not profile.vmap_function or refused in profile.vmap_refused)):
        replay = None
    if replay is not None:
        replay.restart(keep=False)
        replay.looped = True
    per: list[tuple[Any, Any]] = []
    for b in range(batch):
        call.check_alive()
        if replay is not None and b:
            replay.restart(keep=True)
        # each example gets the shared inputs as sent, as it would alone: a function that
        # writes into one (y.add_(x), which vmap refuses) must not hand its write on
        example = [a.clone() if d is None else a for a, d in zip(_dims.example(args, in_dims, b), in_dims)]
        value_b, aux_t = engine.guard(lambda: fn(*example))
        per.append((value_b, box.restore(aux_t)))
    if vmap_error is not None:  # every example works alone: vmap itself is what fails
        # (every input batched over its first dim, as request batching stacks them: torch's
        # vmap of x.view(-1) over dim 1 fails where it runs over dim 0, and that request
        # turned request batching off for the function)
        whole = what == "evaluate" and all(d == 0 for d in call.in_dims or ())
        engine.mark_unbatchable(call.spec.name, vmap_error, None if whole else refused)
    try:
        value = pytree.tree_map(lambda *xs: torch.stack(xs), *[p[0] for p in per])
        return value, _stack_aux([p[1] for p in per], per_request=not allow_loop)
    except (RuntimeError, ValueError, TypeError):  # x[x > 0], or results that follow a call count
        raise FunctionError("the function's results for the examples differ in shape or structure, so they cannot be "
                            "stacked into one batched answer") from None


class UnbatchedOutputs:
    """A function under ``vmap`` over examples (an AuxBox) that notes which of its output
    leaves, and aux leaves, torch's vmap leaves unbatched: those that depend on no batched
    input (an output of shared weights alone, a constant), which ``vmap(f, out_dims=None)``
    takes and the answer carries expanded over the examples (``flags`` and ``aux_flags``,
    a plain aux value never: ``meta.unbatched`` and ``meta.aux_unbatched``). A remote
    function under torch's vmap (the SDK's adapter) answers them unbatched, as torch
    does f: it said every output was batched, and ``vmap(remote(f), in_dims=(0, None),
    out_dims=(0, None))`` raised torch's "can not return a BatchedTensor when out_dim is
    None" where ``vmap(f, ...)`` answers. Only what vmap ran says so: where the examples
    run one by one (the inputs are plain tensors then), ``flags`` stays None."""

    def __init__(self, fn: AuxBox) -> None:
        self.fn = fn
        self.flags: list[bool] | None = None
        self.aux_flags: list[bool] | None = None

    def __call__(self, *example: Any) -> Any:
        out, aux = self.fn(*example)
        if any(_batched(x) for x in example):
            self.flags = [isinstance(leaf, torch.Tensor) and not _batched(leaf) for leaf in pytree.tree_leaves(out)]
            self.aux_flags = [isinstance(leaf, torch.Tensor) and not _batched(leaf) for leaf in self.fn.leaves]
        else:  # the loop over examples, after a vmap that failed once f had returned: no word
            self.flags = self.aux_flags = None
        return out, aux

    def meta(self) -> dict[str, list[bool]] | None:
        if self.flags is None:
            return None
        return {"unbatched": self.flags, **({"aux_unbatched": self.aux_flags} if self.fn.spec.has_aux else {})}


def _batched(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and torch._C._functorch.is_batchedtensor(x)


def run_batch(engine: "Engine", kind: str, calls: Sequence[Call]) -> list[Result]:
    """Several requests with equal options and shapes as one ``vmap`` call, split back.

    Raises when the stacked call fails for any reason; the scheduler then runs each
    request alone, so one bad request cannot fail its batch-mates. It stops only once
    no request can use it (``stacked_liveness``): the scheduler answers those past their
    deadlines 504 and the others from this one run.
    """
    first = calls[0]
    if first.sparsity != "dense":
        from .sparse import run_batch as sparse_batch

        return sparse_batch(engine, kind, list(calls))
    stacked = replace(
        first,
        args=[np.stack([c.args[i] for c in calls]) for i in range(len(first.args))],
        batched=True,
        max_result_bytes=None if first.max_result_bytes is None else first.max_result_bytes * len(calls),
        **stacked_liveness(list(calls)),  # (stops once no member can use it)
    )
    if kind == "evaluate":
        result = engine.evaluate(stacked, allow_loop=False)
    else:
        result = batched(engine, stacked, kind, allow_loop=False)
    return [
        Result(
            value=take(result.value, i),
            aux=take(result.aux, i),
            has_aux=result.has_aux,
            output=take(result.output, i) if c.return_output else None,
            chunk_size=result.chunk_size,
            mode=result.mode,
            # an evaluate's bfloat16 leaves, the same for every request (equal dtypes)
            batch_meta={k: v for k, v in (result.batch_meta or {}).items() if k.endswith("bfloat16")} or None,
        )
        for i, c in enumerate(calls)
    ]


class SharedDraws(FunctionError):
    """A stacked batch whose one call drew from a global random generator that torch's
    vmap does not see (numpy's, Python's), or changed state the function keeps across
    calls (engine.kept_state: a counter, a global buffer): its members' draws (or steps)
    were one another's, so none is answered from it; each runs alone (never a client's
    answer: the scheduler's)."""


def deterministic_failure(exc: BaseException) -> bool:
    """Whether a stacked batch's failure says vmap cannot run the function, rather than
    something passing (memory, a deadline, a cancelled caller) or a function whose
    requests only must not share one call (:class:`SharedDraws`: vmap runs it, and a
    ``batched: true`` request keeps it)."""
    return not isinstance(exc, (OutOfMemory, Timeout, MemoryError, SharedDraws)) and not is_oom(exc)


def take(tree: Any, i: int) -> Any:
    """Example ``i`` of a batched numpy tree; non-array leaves were computed once for all."""
    # leaf[i, ...] keeps a 0-d result an array (leaf[i] would be a numpy scalar)
    if type(tree) is np.ndarray:  # a plain Jacobian (most batches): no pytree walk per request
        return tree[i, ...]
    if tree is None:  # no aux, no output
        return None
    return pytree.tree_map(lambda leaf: leaf[i, ...] if isinstance(leaf, np.ndarray) else
                           leaf[i] if type(leaf) is PerRequest else leaf, tree)


class PerRequest(list):  # type: ignore[type-arg]
    """A plain aux leaf's values, one per member of a stacked batch (request batching's
    loop over its members): one leaf to torch's pytree (a list subclass is no node of
    it), which :func:`take` splits back, each request its own value. Listed as a plain
    list, every member was answered the whole list: a grad-off function's Hessians,
    which a stacked batch runs example by example, answered each client
    ``{"first": [1.0, 3.0, 5.0]}``, its batch-mates' aux beside its own."""


def _stack_aux(auxes: list[Any], per_request: bool = False) -> Any:
    """Per-example aux -> one tree: tensors stacked, other values listed (``per_request``:
    each request's own, as :class:`PerRequest`)."""
    if not auxes or auxes[0] is None:
        return None
    leaves0, spec = pytree.tree_flatten(auxes[0])
    columns = zip(*[pytree.tree_flatten(a)[0] for a in auxes])
    listed = PerRequest if per_request else list
    stacked = [torch.stack(col) if isinstance(col[0], torch.Tensor) else listed(col) for col in columns]
    return pytree.tree_unflatten(stacked, spec) if leaves0 else auxes[0]
