"""Products many at once, and the checks that they are right.

Stacked vectors (``batched_vectors``) run under ``vmap`` over their leading dimension,
or one at a time where ``vmap`` cannot run the product or gets it wrong. The checks,
each one more product: :func:`vmap_agrees` (vmap's products against one product, by
linearity) and :func:`agrees_with_reverse` (a forward-mode or per-example Jacobian
against one VJP).
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Callable

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..errors import ServiceError
from .calling import changed_between_calls, dense_pullback, fresh, function_error, is_oom

__all__ = ["agrees_with_reverse", "global_replay", "one_agrees", "over_vectors", "reverse_misses", "rng_replay",
           "same_products", "vmap_agrees"]

log = logging.getLogger("jacobian_service.engine")


def rng_replay() -> Callable[[], None]:
    """A function that puts torch's random generators back as they are now (CPU, and
    every CUDA device once CUDA is in use): each call after it then draws what the first
    call did. A request's products run one at a time where ``vmap`` cannot run them, and
    ``vmap`` refuses any random op: a function that draws (dropout in training mode,
    noise) gave each tangent of a stack its own draw, and the output ``return_output``
    answered yet another, products of no one call. Replayed before each, they are the
    products of the call whose output is answered, as ``torch.func.jvp`` under
    ``vmap(randomness="same")`` gives them and as the Jacobian (one call, its VJPs) is."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def replay() -> None:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return replay


def global_replay() -> Callable[[], None]:
    """:func:`rng_replay` of numpy's global generator and Python's ``random`` too, which
    torch's ``vmap`` does not refuse: a function drawing from them ran under ``vmap`` with
    draws of its own, and each product of the loop (and the check) drew anew, so a stack
    of jvp tangents of ``x * (1 + np.random.rand())`` came back scaled 1.88, 1.17 and
    1.45 beside an output scaled 1.81. Taken (~0.15 ms) only for a function seen drawing
    from them (``Engine._first_call``), and replayed before ``vmap`` and the check as well
    (``replay.everything``)."""
    torch_replay = rng_replay()
    state, python = np.random.get_state(), random.getstate()

    def replay() -> None:
        torch_replay()
        np.random.set_state(state)
        random.setstate(python)

    replay.everything = True  # type: ignore[attr-defined]
    return replay


def over_vectors(name: str, product: Callable[..., Any], vectors: tuple[Any, ...], checked: Any, key: Any,
                 again: Callable[[], Callable[..., Any]] | None = None,
                 check: Callable[..., bool] | None = None, replay: Callable[[], None] | None = None,
                 alive: Callable[[], None] | None = None) -> Any:
    """``vmap(product)(*vectors)``; where torch's ``vmap`` cannot run the product (an op
    of the derivative without a batching rule, a custom ``autograd.Function`` without a
    vmap rule), or runs it wrong (:func:`vmap_agrees`, checked at every stack, a failure
    remembered per ``key`` in ``checked``), one vector at a time, stacked: what ``vmap`` should
    answer, as a Jacobian's rows are then (rows.py), so a stack of vectors is answered
    wherever one vector is. ``again()`` gives the product on fresh inputs, for the check
    and the loop: a function that writes into its inputs in forward mode (``x.mul_(2)``:
    torch.func.jvp doubles the primal and the tangent in place) has changed them once
    ``vmap`` ran, and a check or loop on what it left answered for other values (a
    stack of jvp tangents came back 2x torch's, with a 200). So ``vmap`` and each
    product of the loop get copies of the vectors, and the check the product on fresh
    inputs. ``replay`` (:func:`rng_replay`) runs before each product of the loop: the
    generators as they were for the call whose output is answered. ``alive`` (the
    request's ``check_alive``) runs before each product of the loop: a request whose
    client left, or whose deadline passed, stops there, as a Jacobian's rows do (a stack
    of 40 jvp tangents ran all 40 products after its client had gone)."""
    leaves = [v for v in pytree.tree_leaves(vectors) if isinstance(v, torch.Tensor) and v.dim()]
    batch = leaves[0].shape[0] if leaves else 0
    one = again if again is not None else (lambda: product)
    everything = replay is not None and getattr(replay, "everything", False)  # (global_replay's: vmap draws too)
    if everything:
        replay()
    try:
        value = torch.func.vmap(product)(*fresh(vectors))
    except Exception as exc:
        if is_oom(exc) or isinstance(exc, ServiceError) or not batch:
            raise
        # said once the products ran: where the first fails too (no forward-mode rule for
        # a jvp), that is the function's own error, this request's answer, not vmap's
        looped = _one_at_a_time(one(), vectors, batch, replay, alive)
        log.info("vmap of %s's products failed (%s); one vector at a time", name, type(exc).__name__)
        return looped
    if not batch:
        return value
    # Every stack is checked, one more product: torch's vmap of cdist's pullback is
    # right for the one-hot cotangents of rows 1:3 and wrong for rows 0:2 (as a
    # Jacobian's chunks were: rows.py), and, for dense cotangents at the same shapes,
    # right where all points coincide (x = [0, 0, 0]) and wrong where some do
    # ([0, 1, 0]: 6.0 off), so a pass, once per key, said nothing of the next stack.
    # A failure is kept: the key's stacks then go one vector at a time.
    if checked.get(key) is False:  # found wrong before
        return _one_at_a_time(one(), vectors, batch, replay, alive)
    if everything:
        replay()
    if (check or vmap_agrees)(one(), vectors, value):
        return value
    looped = _one_at_a_time(one(), vectors, batch, replay, alive)
    if same_products(looped, value):  # a product not linear in its vector: vmap's are right
        return value
    checked[key] = False
    log.warning("vmap of %s's products disagrees with one product; one vector at a time", name)
    return looped


def _one_at_a_time(one: Callable[..., Any], vectors: tuple[Any, ...], batch: int,
                   replay: Callable[[], None] | None, alive: Callable[[], None] | None) -> Any:
    """``one``'s products, a vector at a time, stacked (see :func:`over_vectors`)."""
    per = []
    for k in range(batch):
        if alive is not None:
            alive()
        if replay is not None:
            replay()
        per.append(one(*fresh(_take(vectors, k))))
    return pytree.tree_map(lambda *xs: torch.stack(xs), *per)


def _take(vectors: tuple[Any, ...], k: int) -> Any:
    return pytree.tree_map(lambda v: v[k], vectors)


def vmap_agrees(product: Callable[..., Any], vectors: tuple[Any, ...], value: Any, eps: float = 0.0) -> bool:
    """Whether ``value``, ``vmap(product)(*vectors)``, holds the products, by linearity:
    ``sum_k w_k value[k]`` against one product of ``sum_k w_k vectors[k]``, random ``w``.

    torch's ``vmap`` can be silently wrong: the batching rule of ``masked_select``'s
    backward with a mask broadcast over its input mixes the vectors with the mask's
    rows when there are as many of both (two cotangents of a ``(2, 3)`` mask: 2.4 off;
    ``torch.func.jacrev(chunk_size=2)`` is wrong the same way), while a product alone
    is right. It depends on shapes, not values, so one check per request signature and
    number of vectors covers it: one more product, once. A check that cannot run (a
    product of combined vectors fails) says nothing against ``vmap``.

    The combined vectors are in the vectors' own dtype, which may be coarser than the
    products' (a bfloat16 output's cotangents, whose products take a float32 input's
    dtype): ``w`` holds multiples of 1/16, exact in every float dtype (bfloat16 keeps 8
    significant bits), so combining basis vectors rounds nothing, and the tolerance is
    the coarser dtype's. With a random float ``w`` rounded to bfloat16, every Jacobian
    of a function with a bfloat16 output failed the check (2^-9 off against a float32
    tolerance): its rows then ran one VJP at a time, for every later request too.

    ``eps``: a coarser round-off the products may carry inside (a float16 energy's
    Hessian-vector products of float64 vectors, rounded in float16 arithmetic: at float64's
    they were taken for a wrong vmap, and its products ran one at a time)."""
    results = [r.detach() for r in pytree.tree_leaves(value)]
    try:
        tensors = [v for v in pytree.tree_leaves(vectors) if isinstance(v, torch.Tensor)]
        gen = torch.Generator(device="cpu").manual_seed(0)
        w = torch.randint(8, 25, (tensors[0].shape[0],), generator=gen).to(torch.float64) / 16
        # (complex cotangents too: complex64 ones were weighed at float64's eps, and vmap's
        # right products failed the check, each then run alone)
        coarsest = max((torch.finfo(v.dtype).eps for v in tensors if v.is_floating_point() or v.is_complex()),
                       default=0.0)
        coarsest = max(coarsest, eps)

        def mix(t: torch.Tensor, absolute: bool = False) -> torch.Tensor:
            t = t.abs() if absolute else t
            return torch.tensordot(w.to(t.device, t.dtype), t, dims=1)

        direct = [_wide(d.detach()) for d in pytree.tree_leaves(product(*pytree.tree_map(mix, vectors)))]
    except Exception as exc:
        if is_oom(exc):
            raise
        return True
    if len(direct) != len(results):
        return False
    for d, r in zip(direct, results):
        mixed, scale = mix(_wide(r)), mix(_wide(r), absolute=True)
        if d.shape != mixed.shape:
            return False
        eps = max(torch.finfo(r.dtype).eps, coarsest) if r.is_floating_point() or r.is_complex() else 0.0
        tol = min(256 * eps, 1e-2) * (scale + d.abs()) + torch.finfo(torch.float64).tiny
        same = (d - mixed).abs() <= tol
        # no verdict where either is not finite: linearity fails there in floating point
        # (log at 0: one row's 0/0 is NaN where the mixed product's w/0 is infinite)
        same |= ~(d.isfinite() & mixed.isfinite())
        if not bool(same.all()):
            return False
    return True


def one_agrees(product: Callable[..., Any], vectors: tuple[Any, ...], value: Any) -> bool:
    """Whether ``value``, ``vmap(product)(*vectors)``, holds the last vectors' product:
    the check of a product bilinear in its vectors (an hvp's ``c . H t``, one per pair),
    which :func:`vmap_agrees`'s mix of vectors cannot make (``B(sum w c, sum w t)`` is no
    sum of the ``B(c_k, t_k)``). One more product a stack, as that check; the last pair, since a batching rule that mixes vectors with another
    dimension's rows (``masked_select``'s) gets more than the first wrong. A check that
    cannot run says nothing against ``vmap``."""
    results = [r.detach() for r in pytree.tree_leaves(value)]
    try:
        k = results[0].shape[0] - 1
        direct = [d.detach() for d in pytree.tree_leaves(product(*_take(vectors, k)))]
    except Exception as exc:
        if is_oom(exc):
            raise
        return True
    return _close(direct, [r[k] for r in results])


def same_products(looped: Any, value: Any, eps: float = 0.0) -> bool:
    """Whether ``value``, ``vmap(product)(*vectors)``, holds ``looped``, the same products
    one vector at a time, to round-off: where :func:`vmap_agrees` said no, whether
    ``vmap`` is wrong or the product is not linear in its vector, which that check takes
    it to be. A custom ``autograd.Function`` may add a term of its own in its backward
    (torch's autograd_function_db's CubeGenVmap: ``g s + 6 s``): ``vmap`` runs it as one
    product at a time does, and jacrev's rows are those, but the linear mix of vectors
    disagreed, so every Jacobian of such a function ran one VJP a row, the profile
    saying ``vmap`` could not run its pullback. ``eps``: as :func:`vmap_agrees` takes it
    (vmap's batched float16 sums round otherwise than one product's: 1 ulp apart)."""
    return _close([d.detach() for d in pytree.tree_leaves(looped)], [r.detach() for r in pytree.tree_leaves(value)], eps)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64, or complex128 where complex (a jvp of a complex output): cast to
    float64, a complex product lost its imaginary part (a ComplexWarning) and the check
    weighed the real parts alone."""
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _close(direct: list[torch.Tensor], results: list[torch.Tensor], floor: float = 0.0) -> bool:
    """Leaf by leaf, the same products to round-off (of ``results``' first dtype, or of
    machine epsilon ``floor`` where coarser)."""
    if len(direct) != len(results):
        return False
    for d, r in zip(direct, results):
        if d.shape != r.shape:
            return False
        if not (r.is_floating_point() or r.is_complex()):
            if not bool((d == r).all()):
                return False
            continue
        d, r = _wide(d), _wide(r)
        eps = torch.finfo(results[0].dtype).eps if results[0].is_floating_point() or results[0].is_complex() else 0.0
        eps = max(eps, floor)
        # loose where the product's terms cancel (a vmap that mixes vectors is off by O(1))
        tol = min(256 * eps, 1e-2) * (d.abs() + r.abs() + d.abs().max()) + torch.finfo(torch.float64).tiny
        same = ((d - r).abs() <= tol) | ~(d.isfinite() & r.isfinite())
        if not bool(same.all()):
            return False
    return True


def agrees_with_reverse(g: Callable[..., Any], primals: tuple[Any, ...], jac: Any) -> bool:
    """Whether a forward-mode Jacobian is jacrev's, by one reverse product: ``v^T J`` for
    a random ``v``, against the same from ``jac``.

    They differ where f is not differentiable (``prelu`` or ``where(x > 0, sqrt(x), 0)``
    at 0, ties of ``fmax``, ``det`` of a singular matrix): each mode makes its own
    one-sided choice there, and the answer must not depend on ``mode`` (SPEC). One VJP
    costs about one forward and one backward pass, little against the several JVPs that
    made forward mode worth it. Where they differ, a random ``v`` sees it (almost surely);
    NaN against a number is a difference, round-off is not. Where reverse mode cannot
    run, forward mode's Jacobian is not taken either (False: the request fails as jacrev
    does): torch's forward mode silently drops the tangents through a ``torch.library``
    custom op (functorch refuses it in reverse mode), answering zeros or a part of the
    Jacobian (``linear_cross_entropy`` with ``options``), and it cannot be told from a
    function only forward mode differentiates (an in-place write into its input)."""
    try:
        out, pullback, _ = torch.func.vjp(g, *fresh(primals), has_aux=True)
        pullback = dense_pullback(pullback)
        outs, out_spec = pytree.tree_flatten(out)
        gen = torch.Generator(device="cpu").manual_seed(0)
        # each v as its output's dtype holds it (the cotangent the VJP gets): v^T J is read
        # in float64 with the inputs' round-off as the bound, below
        v = [(torch.rand(o.shape, generator=gen, dtype=torch.float64) + 0.5).to(o.dtype).to(torch.float64)
             if o.is_floating_point() else torch.rand(o.shape, generator=gen, dtype=torch.float64) + 0.5 for o in outs]
        rev = [r.detach().to("cpu", torch.float64) for r in pytree.tree_leaves(
            pullback(pytree.tree_unflatten([vi.to(o.device, o.dtype) for vi, o in zip(v, outs)], out_spec)))]
    except BaseException as exc:
        if is_oom(exc) or not isinstance(exc, Exception):  # SystemExit is still the function's error
            raise function_error(exc) from None
        return False
    blocks = [b.detach() for b in pytree.tree_leaves(jac)]  # (output, parameter leaf)
    n = len(rev)
    if len(blocks) != len(outs) * n or any(
            tuple(blocks[i * n + j].shape) != (*outs[i].shape, *rev[j].shape) for i in range(len(outs)) for j in range(n)):
        raise changed_between_calls("output")
    # Round-off of jacrev's blocks, each a gradient in its input's dtype (the finest
    # input's), not the output's: forward mode rounds every column to the output's dtype,
    # so f = sin(x).float() of a float64 x, mode=fwd, answered float32-rounded values as
    # float64 (2.5e-8 off jacrev's), within the float32 round-off this took as the bound.
    floating = [p.dtype for p in pytree.tree_leaves(primals) if isinstance(p, torch.Tensor) and p.is_floating_point()]
    eps = min((torch.finfo(d).eps for d in floating), default=0.0)
    return not bool(reverse_misses([vi[None] for vi in v], [b[None] for b in blocks], [r[None] for r in rev], eps, 1).any())


def reverse_misses(v: list[torch.Tensor], blocks: list[torch.Tensor], rev: list[torch.Tensor], eps: float,
                   batch: int, measured: torch.Tensor | None = None) -> torch.Tensor:
    """For each of ``batch`` examples (the first dimension of every tensor): whether
    ``v^T J`` of its Jacobian (``blocks``, output leaf by parameter leaf, as a pytree of
    Jacobians flattens) misses its VJP ``rev`` of the cotangents ``v`` (positive, so
    that ``v^T |J|`` bounds round-off) beyond round-off of ``eps`` (the output dtype's),
    or, per example, ``measured`` (a relative tolerance from the function's own
    round-off at that example, where larger: large terms that cancel inside it).
    NaN against NaN and an infinity against the same agree; NaN against a number does
    not. Read in float64 on the CPU, a block at a time. (agrees_with_reverse's one
    example, batched.py's examples of a per-example Jacobian.)"""
    n = len(rev)
    off = torch.zeros(batch, dtype=torch.bool)
    rel = torch.full((batch, 1), min(256 * eps, 1e-2), dtype=torch.float64)
    if measured is not None:
        rel = torch.maximum(rel, measured.detach().to("cpu", torch.float64).reshape(batch, 1))
    sizes = [math.prod(r.shape[1:]) for r in rev]
    v64 = [x.detach().to("cpu", torch.float64).reshape(batch, 1, math.prod(x.shape[1:])) for x in v]
    for j, r in enumerate(rev):
        want = r.detach().to("cpu", torch.float64).reshape(batch, sizes[j])
        mine, scale = torch.zeros_like(want), torch.zeros_like(want)
        for i, vi in enumerate(v64):
            b = blocks[i * n + j].detach().to("cpu", torch.float64).reshape(batch, vi.shape[2], sizes[j])
            mine += torch.bmm(vi, b).squeeze(1)
            scale += torch.bmm(vi, b.abs()).squeeze(1)
        same = (mine - want).abs() <= rel * (scale + mine.abs()) + torch.finfo(torch.float64).tiny
        if bool(same.all()):  # (the common case: no NaN or infinity to look at)
            continue
        same |= torch.isnan(mine) & torch.isnan(want)
        same |= torch.isinf(mine) & (mine == want)
        off |= ~same.all(dim=1)
    return off
