"""Hessians: ``torch.func.hessian``'s result by whichever equal strategy is fastest.

Which strategy wins depends on the function (measured on the CPU: ``jacrev(grad)`` beat
``jacfwd(jacrev)`` 50x at n = 1024 on one function, not on all), so the first small call per
function and shapes measures them and the engine's profile remembers the winner.

They are equal only where the function is smooth and nothing is computed under
``torch.no_grad``. Forward mode sees through ``no_grad``, reverse mode does not, so
``jacrev(jacrev)`` of ``x * c`` with ``c = x**2`` under ``no_grad`` is 0 where torch's
``jacfwd(jacrev)`` is ``2 x``: a function seen doing that (``calling.GradOffWatch``) gets
torch's own strategy only. So does one whose backward switches grad off (a custom
``autograd.Function`` with a ``@once_differentiable`` backward): reverse over reverse
answers 0 for it, so every other strategy's run is watched, and one seen doing that
is replaced by torch's, or torch's error (no ``jvp`` rule) where it cannot run. Where it is not smooth (``x.norm() ** 3`` at 0) another
strategy answers NaN where torch's answers 0: a result with a NaN or an infinity is
computed again torch's way, and that is the answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..errors import ServiceError
from ..types import Call, Result
from .shapes import span
from .calling import (AuxBox, GradOffWatch, as_input_dtypes, differentiable, fresh, function_error, is_oom,
                      lacks_forward_ad, look)

if TYPE_CHECKING:
    from .core import Engine

__all__ = ["CHECK_ELEMENTS", "STRATEGIES", "TORCHS", "agrees_with_differences", "agrees_with_hvp", "candidates", "finite",
           "gradient", "half_precision", "hessian", "hvp_misses", "jacrev_rows", "refusal", "with_output"]

def jacrev_rows(g: Callable[..., Any], argnums: Any, chunk_size: int | None = None) -> Callable[..., Any]:
    """``jacrev(jacrev(g, argnums, has_aux=True), argnums, has_aux=True)``, reverse over
    reverse, one output element at a time: for each output element ``i`` (a ``vmap``
    over a unit basis of the output, ``chunk_size`` of them at once), the ``jacrev`` of
    its gradient ``J(x)^T e_i``. The same products, the same answer (bit for bit on the
    built-ins), in a fraction of the work: ``jacrev(jacrev)``'s outer pullback takes one
    row per entry of the inner Jacobian, (outputs x inputs) of them, each carrying a
    cotangent of all (outputs x inputs) entries back through every output's pullback:
    (outputs x inputs)^2 per example, where the Hessian has outputs x inputs^2. Here
    each row carries one output's gradient, inputs entries. Under a ``vmap`` over
    examples (per-example Hessians, which run reverse mode only: batched.py) 32
    examples of ``sin`` on 63 inputs took 7.1 s as ``jacrev(jacrev)``, 0.08 s so
    (``vmap(torch.func.hessian)``: 0.17 s; each example alone: 0.9 s). ``g`` returns
    ``(output, aux)``; so does the Hessian: ``(H, aux)``, ``H`` nested as jacrev nests it."""
    positions = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    outer = 1 + argnums if isinstance(argnums, int) else tuple(1 + a for a in argnums)

    def hessian_of(*primals: Any) -> Any:
        out_leaves, out_spec = pytree.tree_flatten(g(*primals)[0])  # (shapes and dtypes only)
        sizes = [leaf.numel() for leaf in out_leaves]
        total = sum(sizes)
        if not total:  # no rows (vmap takes no empty batch): jacrev's own, as cheap
            return STRATEGIES["jacrev_jacrev"](g, argnums)(*primals)
        basis, start = [], 0
        for leaf, size in zip(out_leaves, sizes):  # (jacrev's: unit rows, each leaf's block of them)
            b = torch.zeros(total, size, dtype=leaf.dtype, device=leaf.device)
            b[start:start + size].copy_(torch.eye(size, dtype=leaf.dtype, device=leaf.device))
            basis.append(b.reshape(total, *leaf.shape))
            start += size

        def along(v: list[torch.Tensor], *p: Any) -> Any:
            def of(*diff: Any) -> Any:
                full = list(p)
                for i, d in zip(positions, diff):
                    full[i] = d
                return g(*full)

            _, pullback, aux = torch.func.vjp(of, *[p[i] for i in positions], has_aux=True)
            grads = pullback(pytree.tree_unflatten(v, out_spec))
            return (grads[0] if isinstance(argnums, int) else grads), aux

        rows, aux = torch.func.vmap(torch.func.jacrev(along, argnums=outer, has_aux=True),
                                    in_dims=(0,) + (None,) * len(primals), chunk_size=chunk_size)(basis, *primals)
        aux = pytree.tree_map(lambda t: t[0], aux)  # (the same for every row: vmap stacked it)
        blocks, start = [], 0
        for leaf, size in zip(out_leaves, sizes):
            blocks.append(pytree.tree_map(lambda t: t[start:start + size].reshape(*leaf.shape, *t.shape[1:]), rows))
            start += size
        return pytree.tree_unflatten(blocks, out_spec), aux

    return hessian_of


# Equal ways to compute torch.func.hessian (read-only, as core.TORCH_DTYPES: one a
# function replaced in place computed every later Hessian its way).
STRATEGIES: Mapping[str, Callable[[Callable[..., Any], Any], Callable[..., Any]]] = MappingProxyType({
    "jacrev_grad": lambda g, a: torch.func.jacrev(torch.func.grad(g, argnums=a, has_aux=True), argnums=a, has_aux=True),
    "jacfwd_jacrev": lambda g, a: torch.func.jacfwd(torch.func.jacrev(g, argnums=a, has_aux=True), argnums=a, has_aux=True),
    "jacrev_jacrev": lambda g, a: torch.func.jacrev(torch.func.jacrev(g, argnums=a, has_aux=True), argnums=a, has_aux=True),
    "jacrev_rows": jacrev_rows,  # reverse over reverse as jacrev_jacrev, one output row at a time
})
TORCHS = "jacfwd_jacrev"  # torch.func.hessian's own
_MEASURE_ELEMENTS = 1 << 20  # measure strategies only where running each is cheap
# Check an answer against one HVP only up to this many entries: the check reads the
# Hessian in float64, a copy twice a float32 one's size (larger ones were never checked)
CHECK_ELEMENTS = _MEASURE_ELEMENTS
# Reverse over reverse pulls back one row per output element and input element, forward
# over reverse pushes one tangent per input element: past a few outputs it cannot win,
# and timing it was most of a first Hessian (mlp, 64 outputs: 3.6 s of 4 s measuring a
# strategy 10x slower). It stays the fallback where forward mode fails.
_REV_REV_MAX_OUTPUTS = 16


_HALF = (torch.float16, torch.bfloat16)


def half_precision(*trees: Any) -> bool:
    """Whether a Hessian's inputs or outputs (``trees``) hold a 16-bit float. There the
    strategies are not equal: each rounds its own way, an ulp of float16 (1e-3) apart,
    past torch's own float16 tolerance (assert_close: rtol 1e-3, atol 1e-5), so the
    Hessian is torch.func.hessian's own strategy's, as torch rounds it (a strategy
    measured faster answered 1.666 of a float16 sum(sin(x)**3) where torch says 1.664)."""
    return any(isinstance(t, torch.Tensor) and t.dtype in _HALF for tree in trees for t in pytree.tree_leaves(tree))


def candidates(scalar_output: bool) -> tuple[str, ...]:
    """Strategies in the order usually fastest; grad needs a 0-d output. A vector
    output's are measured with ``jacrev_rows`` too (reverse over reverse one output row
    at a time), which per-example Hessians alone ran: plain ones of lorenz96 on 40
    inputs took 35 ms as torch's ``jacfwd(jacrev)``, 14 ms so; polar on 20, 15 ms and
    1.3 ms; sin on 63, 2.3 and 2.0 ms (float64, one thread, in-process); torch's stays
    first, and wins where it is faster (softmax on 200: 0.63 s, 0.87 s by rows; mlp:
    0.057 s and 0.054 s, but 0.56 and 1.08 GFLOP)."""
    return (("jacrev_grad", "jacfwd_jacrev", "jacrev_jacrev") if scalar_output
            else ("jacfwd_jacrev", "jacrev_rows", "jacrev_jacrev"))


class _NotRealScalar(Exception):
    """The function's output is not a real floating 0-d tensor (see :func:`gradient`)."""


def gradient(f: Callable[..., Any], argnums: int | tuple[int, ...] = 0) -> Callable[..., Any]:
    """``torch.func.grad(f, argnums)``, computed as ``torch.func.hessian``'s ``jacrev``
    computes the gradient: a ``torch.func.vjp``, its pullback called with a cotangent of
    one. Every Hessian-vector product (``/hvp``, a sparse Hessian's products, the checks
    of a Hessian against one HVP) is the ``jvp`` of this, so it is the product of
    ``torch.func.hessian``'s Hessian.

    ``torch.func.grad`` runs its backward pass inside its own transform level, where the
    cotangent a custom ``autograd.Function``'s backward gets requires grad: a
    ``@once_differentiable`` backward then detaches what it returns, and forward mode over
    it loses the backward's own derivative. So ``jvp(grad(f))`` of ``sum(F(x) cos x)``
    (F a once-differentiable cube with a jvp) was -0.106 where ``torch.func.hessian``
    (``jacfwd(jacrev(f))``) and the math say 1.534: the /hvp and the sparse Hessian
    answered the one, the dense Hessian the other, each with a 200. A ``vjp``'s pullback
    runs outside the level, as ``jacrev``'s does. An output that is not a real floating
    scalar gets ``torch.func.grad``'s own answer (zeros for an integer one) or error."""
    positions = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def grad(*args: Any) -> Any:
        def of(*diff: Any) -> torch.Tensor:
            full = list(args)
            for i, d in zip(positions, diff):
                full[i] = d
            out = f(*full)
            if not (isinstance(out, torch.Tensor) and out.dim() == 0 and out.is_floating_point()):
                raise _NotRealScalar
            return out

        try:
            out, pullback = torch.func.vjp(of, *[args[i] for i in positions])
        except _NotRealScalar:
            return torch.func.grad(f, argnums=argnums)(*args)
        grads = pullback(torch.ones_like(out))
        return grads[0] if isinstance(argnums, int) else grads

    return grad


def with_output(g: Callable[..., Any]) -> Callable[..., Any]:
    """``g`` (returning ``(out, aux)``) with its output in the aux as well: the output of
    the very call differentiated, not of another call (a function that draws random
    numbers draws anew at each call)."""

    def h(*p: Any) -> Any:
        out, aux_t = g(*p)
        return out, (out, aux_t)

    return h


# What a refusal adds to torch.func.hessian's error where another strategy ran but
# disagrees with the HVP (see refusal)
_DISAGREES = ("; the service's reverse-over-reverse Hessian, which torch.func.hessian does not compute, disagrees "
              "here with forward over reverse (its Hessian-vector products): a custom autograd.Function whose jvp "
              "and backward disagree?")


def refusal(torch_failed: BaseException) -> ServiceError:
    """torch.func.hessian's error (``torch_failed``: the exception or its problem), as the
    answer where torch's own strategy cannot run (a custom ``autograd.Function`` without a
    vmap rule) and reverse over reverse, which can, disagrees with forward over reverse.

    A Function whose ``jvp`` and ``backward`` disagree has two Hessians: torch.func.hessian
    differentiates its backward in forward mode, through its jvp, and so do the service's
    ``/hvp`` and sparse Hessians; reverse over reverse differentiates the backward alone.
    Where torch's own runs it is the answer on every route; where it cannot, neither is
    torch's, and the dense and sparse routes answered one each (both 200, 4.5 apart)."""
    problem = function_error(torch_failed)
    return type(problem)(f"{problem.detail}{_DISAGREES}"[:2000])


def finite(value: Any) -> bool:
    return all(bool(torch.isfinite(leaf).all()) for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor))


def _nothing() -> None:
    pass


def agrees_with_differences(g: Callable[..., Any], primals: tuple[Any, ...], argnums: Any, value: Any,
                            alive: Callable[[], None] = _nothing) -> bool:
    """Whether a Hessian that torch's own strategy could not compute (no forward rule)
    is the derivative of jacrev's Jacobian: one random direction ``v``, ``H v`` against
    central differences of jacrev at ``x +- h v``.

    Reverse over reverse differentiates the backward pass as autograd recorded it: a
    custom ``autograd.Function`` whose backward cuts its graph (``x.detach()``, a value
    from numpy) gives 0 there, silently, and that is not torch's answer, since torch
    raises. The test is loose (5 % of the scale, plus the differences' round-off): what
    it must see is a part of the Hessian missing; where it fails the request fails as
    torch's strategy did. A kink of the gradient within the step (grid_sample's cell
    edges: a grid coordinate 1.5e-3 from one, float32's step 1e-2) puts the central
    difference off a right Hessian: one-sided differences, then a smaller step, are
    tried before refusing (a part missing misses them all); float32 grid_sample answered
    torch's 500 at a few inputs in a hundred, by where the (random) inputs fell. A
    function whose output changes between calls (it draws random numbers) has no
    differences to check against: its answer stands.

    ``alive`` (``Call.check_alive``) runs before each call of the function: a request
    whose client left, or whose deadline passed, stops here too. ``value``: the
    Hessian's blocks, or a function of the direction (one tensor per input) giving
    ``H v`` (one per gradient leaf): a sparse Hessian's, never made dense."""
    twice = [_called(alive, g, primals) for _ in range(2)]
    if not all(torch.equal(a, b) for a, b in zip(*twice)):
        return True
    leaves, spec = pytree.tree_flatten(primals)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = [torch.rand(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype) - 0.5 for p in leaves]
    eps = torch.finfo(leaves[0].dtype).eps
    h = eps ** (1 / 3) * (1 + max((float(p.detach().abs().max()) for p in leaves if p.numel()), default=0.0))

    def at(step: float) -> list[torch.Tensor]:
        alive()
        moved = pytree.tree_unflatten([p.detach() + step * d for p, d in zip(leaves, v)], spec)
        return [j.detach().to(torch.float64) for j in pytree.tree_leaves(jac(*moved)[0])]

    for rows in (None, 1):
        # Row by row (chunk_size=1) where torch's vmap of the pullback fails (masked_select's
        # backward with a broadcast mask): the check must not give up there, since such a
        # function's strategies under vmap can be wrong (jacrev(grad) 36 off, torch's raising)
        jac = torch.func.jacrev(g, argnums=argnums, has_aux=True, chunk_size=rows)
        try:
            plus, minus = at(h), at(-h)
            break
        except ServiceError:  # (alive's: the request stops)
            raise
        except Exception as exc:  # undefined nearby (a Cholesky factor): no verdict, the answer stands
            if is_oom(exc):
                raise
            if rows == 1:
                return True
    if callable(value):
        products = [p.detach().to(torch.float64) for p in value(v)]
    else:
        blocks = [b.detach().to(torch.float64) for b in pytree.tree_leaves(value)]
        n = len(leaves)
        if len(plus) * n != len(blocks):
            return False
        products = [sum(torch.tensordot(blocks[ij * n + k], d.to(torch.float64), dims=d.dim()) for k, d in enumerate(v))
                    for ij in range(len(plus))]
    if len(products) != len(plus):
        return False

    def close(a: list[torch.Tensor], b: list[torch.Tensor], step: float) -> bool:
        """H v against (J(a) - J(b)) / step: within 5 % plus the round-off of J over step."""
        for hv, ja, jb in zip(products, a, b):
            fd = (ja - jb) / step
            scale = float(hv.abs().max()) + float(fd.abs().max()) if hv.numel() else 0.0
            noise = 128 * eps * (float(ja.abs().max()) + float(jb.abs().max())) / step if ja.numel() else 0.0
            if hv.numel() and float((hv - fd).abs().max()) > 0.05 * scale + noise:
                return False
        return True

    if close(plus, minus, 2 * h):
        return True
    # A kink within the step (see above): one side of it, or a step clear of it, agrees
    try:
        here = at(0.0)
        for step in (h, h / 16):
            if step != h:
                plus, minus = at(step), at(-step)
            if close(plus, here, step) or close(here, minus, step) or close(plus, minus, 2 * step):
                return True
    except ServiceError:
        raise
    except Exception as exc:  # (as above: no verdict)
        if is_oom(exc):
            raise
        return True
    return False


def _called(alive: Callable[[], None], g: Callable[..., Any], primals: tuple[Any, ...]) -> list[torch.Tensor]:
    alive()
    return pytree.tree_leaves(look(g, lambda: fresh(primals))[0])  # (as reverse mode calls it, where a plain call fails)


def _same_leaves(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _steady(g: Callable[..., Any], primals: tuple[Any, ...], output: Any,
            alive: Callable[[], None]) -> list[torch.Tensor] | None:
    """The function's output leaves, or None where they change between calls (it draws
    random numbers). ``output`` (a strategy's, computed inside its transform) may differ from a plain
    call's in its last bits without any draw: ``linalg.eigvalsh`` under autograd computes
    the eigenvectors too (another LAPACK path), and so did every Hessian of it, 1e-16
    apart. Taken for a draw, that gave no verdict, and reverse over reverse, which
    torch.func.hessian's HVP disagrees with (eigvalsh reads one triangle), was answered
    where measured fastest. So where it differs, two plain calls decide."""
    first = pytree.tree_leaves(output) if output is not None else _called(alive, g, primals)
    second = _called(alive, g, primals)
    if _same_leaves(first, second):
        return first
    if output is None or not _same_leaves(second, _called(alive, g, primals)):
        return None
    return second


def agrees_with_hvp(g: Callable[..., Any], primals: tuple[Any, ...], argnums: Any, value: Any,
                    output: Any = None, alive: Callable[[], None] = _nothing,
                    no_forward_ad: Callable[[], None] = _nothing, measure: bool = False) -> bool:
    """Whether a strategy's Hessian is the derivative of the gradient: ``w^T H v`` against
    one Hessian-vector product of ``w^T f`` (forward over reverse, no ``vmap``), random
    ``w`` and ``v``; checked once per function and shapes, as strategies are measured.

    torch's ``vmap`` of ``layer_norm``'s backward with a weight and a bias is wrong in
    its double backward: ``torch.func.hessian`` and ``jacrev(jacrev)`` of a layer norm's
    weighted sum are 209 off where finite differences, ``jacrev(grad)`` and the HVP say
    0, so the answer depended on which strategy was measured fastest. A strategy that
    disagrees is not chosen. No verdict where the HVP cannot run (no forward rule) or
    the output changes between calls (random draws). ``output``: that of the call whose
    Hessian ``value`` is, where known (one call fewer). ``alive``: as for
    :func:`agrees_with_differences` (its three calls of the function ran on for a client
    gone: 0.45 s of a function of 150 ms a call). ``no_forward_ad``: called where the HVP
    failed for want of forward AD (the caller's profile keeps it: no verdict next time either).
    ``measure``: a difference within the function's own round-off there agrees (below)."""
    outs = _steady(g, primals, output, alive)
    if outs is None:
        return True
    gen = torch.Generator(device="cpu").manual_seed(0)
    leaves = pytree.tree_leaves(primals)
    w = [(torch.rand(o.shape, generator=gen, dtype=torch.float64) - 0.5).to(o.device, o.dtype) for o in outs]
    v = [(torch.rand(p.shape, generator=gen, dtype=torch.float64) - 0.5).to(p.device, p.dtype) for p in leaves]

    def weighted(*p: Any) -> torch.Tensor:
        return sum((wi * oi).sum() for wi, oi in zip(w, pytree.tree_leaves(g(*p)[0])))

    alive()
    try:
        _, hv = torch.func.jvp(gradient(weighted, argnums),
                               fresh(primals), pytree.tree_unflatten(v, pytree.tree_structure(primals)))
    except Exception as exc:
        if is_oom(exc):
            raise
        if lacks_forward_ad(exc):
            no_forward_ad()
        return True
    hv = pytree.tree_leaves(hv)
    blocks = pytree.tree_leaves(value)
    n = len(leaves)
    if len(hv) != n or len(blocks) != len(outs) * n * n:
        return False
    one = [[t.unsqueeze(0) for t in ts] for ts in (blocks, w, v, hv)]  # (a batch of one example)
    dtypes = [p.dtype for p in leaves]
    if not bool(hvp_misses(*one, dtypes, 1).any()):
        return True
    if not measure:
        return False
    # Large float32 terms that cancel inside f (``(x * 1e4 + x) - x * 1e4``) put the HVP
    # 1e4 |v| ulps from a right Hessian's w^T H v: a per-example Hessian's strategy was
    # taken for one torch's vmap gets wrong, and every later batch of it ran example by
    # example. Within the function's own round-off here (sparsity.verify: how far HVPs
    # of v, a v2 and v + v2 are from additive), it is no disagreement. (A plain Hessian
    # then answers torch's own strategy, as right and unchecked: it does not measure.)
    from ..sparsity.verify import noise_tolerance, round_off

    gen2 = torch.Generator(device="cpu").manual_seed(4321)
    v2 = [(torch.rand(p.shape, generator=gen2, dtype=torch.float64) - 0.5).to(p.device, p.dtype) for p in leaves]
    try:
        more = [pytree.tree_leaves(torch.func.jvp(gradient(weighted, argnums), fresh(primals), pytree.tree_unflatten(
            t, pytree.tree_structure(primals)))[1]) for t in (v2, [a + b for a, b in zip(v, v2)])]
    except Exception as exc:
        if is_oom(exc):
            raise
        return False
    products = torch.stack([torch.cat([t.detach().reshape(-1).to(torch.float64) for t in h]) for h in (hv, *more)])
    measured = torch.tensor([noise_tolerance(round_off(products), max(dtypes, key=lambda d: torch.finfo(d).eps))],
                            dtype=torch.float64) if all(d.is_floating_point for d in dtypes) else None
    return measured is not None and not bool(hvp_misses(*one, dtypes, 1, measured).any())


def hvp_misses(blocks: list[torch.Tensor], w: list[torch.Tensor], v: list[torch.Tensor], hv: list[torch.Tensor],
               dtypes: list[torch.dtype], batch: int, measured: torch.Tensor | None = None) -> torch.Tensor:
    """For each of ``batch`` examples (the first dimension of every tensor): whether
    ``w^T H v`` of its Hessian (``blocks``, output by input by input, as a pytree of
    Hessians flattens) misses its Hessian-vector product ``hv`` of ``w^T f`` beyond
    round-off (``dtypes``: the inputs', whose precision bounds it; or, per example and
    where larger, ``measured``: a relative tolerance from the function's own round-off).
    No verdict where either side is not finite: see products.vmap_agrees.
    (agrees_with_hvp's one example, batched.py's examples of a per-example Hessian.)"""
    n = len(hv)
    sizes = [math.prod(h.shape[1:]) for h in hv]  # each input's (v's and hv's alike)
    w64 = [x.detach().to(torch.float64).reshape(batch, math.prod(x.shape[1:])) for x in w]
    v64 = [x.detach().to(torch.float64).reshape(batch, size) for x, size in zip(v, sizes)]
    off = torch.zeros(batch, dtype=torch.bool, device=hv[0].device if hv else None)
    for j in range(n):
        want = hv[j].detach().to(torch.float64).reshape(batch, sizes[j])
        mine, scale = torch.zeros_like(want), torch.zeros_like(want)
        for i, wi in enumerate(w64):
            for k, vk in enumerate(v64):
                b = blocks[(i * n + j) * n + k].detach().to(torch.float64).reshape(batch, wi.shape[1], sizes[j], sizes[k])
                mine = mine + torch.einsum("bo,bojk,bk->bj", wi, b, vk)
                scale = scale + torch.einsum("bo,bojk,bk->bj", wi.abs(), b.abs(), vk.abs())
        eps = torch.finfo(dtypes[j]).eps
        rel = torch.full((batch, 1), min(1024 * eps, 1e-2), dtype=torch.float64, device=want.device)
        if measured is not None:
            rel = torch.maximum(rel, measured.to(want.device, torch.float64).reshape(batch, 1))
        same = (mine - want).abs() <= rel * (scale + want.abs()) + torch.finfo(torch.float64).tiny
        same |= ~(mine.isfinite() & want.isfinite())
        off |= ~same.all(dim=1)
    return off


def hessian(engine: "Engine", call: Call) -> Result:
    args = engine.tensors(call)
    box = AuxBox(call.spec)
    g, primals = differentiable(box, args, call)
    argnums: int | tuple[int, ...] = tuple(range(len(primals))) if call.as_tuple else 0
    watch = GradOffWatch()
    out, _ = engine.guard(lambda: watch.call(look, g, lambda: fresh(primals)))  # (as reverse mode calls it, where a plain call fails)
    profile = engine.profiles[call.spec.name]
    profile.grad_off = profile.grad_off or watch.seen
    out_numel = sum(leaf.numel() for leaf in pytree.tree_leaves(out))
    leaves = pytree.tree_leaves(primals)
    in_numel = sum(p.numel() for p in leaves)
    widest = max(span(p.shape) for p in leaves)
    engine.check_result_size(call, out_numel * in_numel * in_numel * engine.wire_itemsize(leaves[0].dtype), "hessian",
                             max((span(o.shape) for o in pytree.tree_leaves(out)), default=1) * widest * widest
                             * engine.wire_itemsize(leaves[0].dtype))
    table = profile.hessian
    key = call.signature()
    known = table.get(key)
    scalar = isinstance(out, torch.Tensor) and out.dim() == 0
    # The strategy measured fastest first; where it cannot run, or its answer at these
    # inputs disagrees with the HVP (below), torch's own next, then the rest
    order = tuple(dict.fromkeys((known, TORCHS, *candidates(scalar)))) if known else candidates(scalar)
    measure = known is None and out_numel * in_numel * in_numel <= _MEASURE_ELEMENTS
    # No input elements: the Hessian has no entries, which every strategy gives alike, and
    # torch's own cannot (jacfwd over a basis of no vectors fails to take its aux, an
    # IndexError: a 500 for a function that reads a gradient under no_grad, which is
    # held to torch's own strategy below)
    vacuous = in_numel == 0
    if profile.grad_off and not vacuous:  # the strategies differ for it: torch's own, or torch's failure
        order, measure, known = (TORCHS,), False, TORCHS
    elif half_precision(primals, out):  # they round differently: torch's own, the rest where it cannot run
        order, measure = tuple(dict.fromkeys((TORCHS, *candidates(scalar)))), False

    def no_forward_ad() -> None:
        profile.hvp_forward = False
    found: Any = None
    used = ""
    timings: dict[str, float] = {}
    failure: BaseException | None = None
    torch_failed: ServiceError | None = None  # torch.func.hessian's own strategy's error
    rejected: dict[str, Any] = {}  # measured strategies that disagree with one HVP
    g_out = with_output(g)
    for name in order:
        if measure and found is not None and name == "jacrev_jacrev" and out_numel > _REV_REV_MAX_OUTPUTS:
            break  # last in the order: see _REV_REV_MAX_OUTPUTS
        # A request whose client left, or whose deadline passed, stops between steps (each
        # strategy's runs, the checks below): a first Hessian measures up to three
        # strategies, twice each, and ran them all for a client long gone, the engine
        # held from everyone else. (Timeout is a ServiceError: it passes the except below.)
        call.check_alive()
        fn = STRATEGIES[name](g_out, argnums)
        watch = GradOffWatch(active=name != TORCHS)  # a backward under no_grad (see below)
        try:
            # Every run on its own copies of the inputs, for a function that writes
            # into them; measuring runs each twice (a transform's first call pays extra).
            if measure:
                watch.call(fn, *fresh(primals))
                call.check_alive()
            start = time.perf_counter()
            value = watch.call(fn, *fresh(primals))
            engine.synchronize()
            timings[name] = time.perf_counter() - start
        except BaseException as exc:
            if is_oom(exc) or isinstance(exc, ServiceError) or not isinstance(exc, Exception):
                raise function_error(exc) from None
            failure = exc  # e.g. no forward-AD rule for an op: try the next strategy
            torch_failed = function_error(exc) if name == TORCHS else torch_failed
            if name == TORCHS and lacks_forward_ad(exc):
                profile.hvp_forward = False
            continue
        if watch.seen and not vacuous:
            # A backward pass switched grad off (@once_differentiable): this strategy
            # differentiated a gradient computed without a graph and found 0. Only
            # torch's own strategy sees through it; where it cannot run, its error.
            profile.grad_off = True
            call.check_alive()
            found, used = engine.guard(lambda: STRATEGIES[TORCHS](g_out, argnums)(*fresh(primals))), TORCHS
            table[key] = TORCHS
            break
        call.check_alive()
        # Every answer not torch's own is checked at the inputs it is for, not only where
        # the strategies were measured: where f is not twice differentiable (the gradient
        # prelu(x) at 0) each mode takes its own side, so a strategy that agreed with
        # torch's at the point measured answered otherwise at the kink (0.6 where
        # torch.func.hessian says 1), and the same request had two answers, by what had
        # been asked before it.
        # (no check where the HVP, forward over reverse, failed for this function for want
        # of forward AD: it gives no verdict, and failed again at every request)
        check = (measure or (name != TORCHS and out_numel * in_numel * in_numel <= CHECK_ELEMENTS)) and profile.hvp_forward
        if check and not engine.guard(lambda: agrees_with_hvp(g, primals, argnums, value[0], value[1][0],
                                                              alive=call.check_alive, no_forward_ad=no_forward_ad)):
            rejected[name] = value  # torch's vmap got this strategy wrong, or it took another side (agrees_with_hvp)
            continue
        if found is None or measure and timings[name] < timings[used]:
            found, used = value, name  # measuring, the winner's own value
        if not measure:
            break
    if found is None and rejected:  # none agrees: torch.func.hessian's answer, as torch gives it
        if TORCHS not in rejected and torch_failed is not None:
            # torch's own cannot run (a custom Function without a vmap rule), and every
            # other strategy disagrees with the forward-over-reverse HVP: a Function
            # whose jvp and backward disagree, whose reverse-over-reverse Hessian is not
            # torch's math (the /hvp, the sparse Hessian's products). No answer is
            # torch's, so torch's error (see refusal)
            raise refusal(torch_failed)
        used = TORCHS if TORCHS in rejected else next(iter(rejected))
        found = rejected[used]
    if found is None:
        # No strategy ran: the error is torch.func.hessian's (forward over reverse), as
        # torch says it ("Trying to use forward AD with _embedding_bag ..."), not the
        # last fallback's (reverse over reverse: "the derivative for
        # '_embedding_bag_backward' is not implemented"), which torch never runs. This
        # call's own: one kept from another call may be of other inputs
        if torch_failed is not None:
            raise torch_failed from None
        raise function_error(failure or RuntimeError("no Hessian strategy ran"))
    if known is None:
        table[key] = used
    if used != TORCHS and not finite(found[0]):
        call.check_alive()
        try:
            found, used = engine.guard(lambda: STRATEGIES[TORCHS](g_out, argnums)(*fresh(primals))), TORCHS
        except ServiceError as exc:
            torch_failed = exc  # torch's own fails on this function (no forward rule): the answer found
    if torch_failed is not None:
        profile.hessian_torch_error[key] = torch_failed
    torch_failed = torch_failed or profile.hessian_torch_error.get(key)
    if used != TORCHS and torch_failed is not None and finite(found[0]):
        # an answer torch would not give: checked against jacrev's Jacobian nearby
        call.check_alive()
        g_check, _ = differentiable(AuxBox(call.spec), args, call)  # its own aux: the answer's stays whole
        if not engine.guard(lambda: agrees_with_differences(g_check, fresh(primals), argnums, found[0], call.check_alive)):
            raise type(torch_failed)(torch_failed.detail) from None  # a new one: the kept one keeps no frames
    value, (out, aux_t) = found
    value = as_input_dtypes(value, primals, depth=2)  # torch.func.hessian's block dtypes
    output = engine.host(out) if call.return_output else None
    aux = box.restore(aux_t)
    from .core import derivative_half_meta  # (core imports this module)

    return Result(engine.host(value), engine.host(aux), call.spec.has_aux, output, mode=used,
                  batch_meta=derivative_half_meta(call, value, out, aux))
