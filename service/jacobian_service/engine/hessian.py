"""Hessians: ``torch.func.hessian``'s result by whichever equal strategy is fastest.

Which strategy wins depends on the function (DESIGN: ``jacrev(grad)`` beat
``jacfwd(jacrev)`` 50x on one function, not on all), so the first small call per
function and shapes measures them and the engine's profile remembers the winner.

They are equal only where nothing is computed under ``torch.no_grad``: forward mode sees
through it, reverse mode does not, so ``jacrev(jacrev)`` of ``x * c`` with ``c = x**2``
under ``no_grad`` is 0 where torch's ``jacfwd(jacrev)`` is ``2 x``. A function seen doing
that (``calling.GradOffWatch``) gets torch's own strategy only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from ..errors import ServiceError
from ..types import Call, Result
from .calling import AuxBox, GradOffWatch, as_input_dtypes, differentiable, function_error, is_oom

if TYPE_CHECKING:
    from .core import Engine

__all__ = ["STRATEGIES", "candidates", "hessian", "hessian_fn"]

# Equal ways to compute torch.func.hessian.
STRATEGIES: dict[str, Callable[[Callable[..., Any], Any], Callable[..., Any]]] = {
    "jacrev_grad": lambda g, a: torch.func.jacrev(torch.func.grad(g, argnums=a, has_aux=True), argnums=a, has_aux=True),
    "jacfwd_jacrev": lambda g, a: torch.func.jacfwd(torch.func.jacrev(g, argnums=a, has_aux=True), argnums=a, has_aux=True),
    "jacrev_jacrev": lambda g, a: torch.func.jacrev(torch.func.jacrev(g, argnums=a, has_aux=True), argnums=a, has_aux=True),
}
_TORCHS = "jacfwd_jacrev"  # torch.func.hessian's own
_MEASURE_ELEMENTS = 1 << 20  # measure strategies only where running each is cheap


def candidates(scalar_output: bool) -> tuple[str, ...]:
    """Strategies in the order usually fastest; grad needs a 0-d output."""
    return ("jacrev_grad", "jacfwd_jacrev", "jacrev_jacrev") if scalar_output else ("jacfwd_jacrev", "jacrev_jacrev")


def hessian_fn(engine: "Engine", call: Call, g: Callable[..., Any], argnums: Any, primals: Sequence[Any], key: Any) -> Callable[..., Any]:
    """The strategy remembered for ``key``, else the usual winner (per-example Hessians)."""
    profile = engine.profiles[call.spec.name]
    choice = _TORCHS if profile.grad_off else profile.hessian.get(key)
    if choice is None:
        out, _ = g(*primals)
        choice = candidates(isinstance(out, torch.Tensor) and out.dim() == 0)[0]
    return STRATEGIES[choice](g, argnums)


def hessian(engine: "Engine", call: Call) -> Result:
    args = engine.tensors(call)
    box = AuxBox(call.spec)
    g, primals = differentiable(box, args, call)
    argnums: int | tuple[int, ...] = tuple(range(len(primals))) if call.as_tuple else 0
    watch = GradOffWatch()
    out, _ = engine.guard(lambda: watch.call(g, *primals))
    profile = engine.profiles[call.spec.name]
    profile.grad_off = profile.grad_off or watch.seen
    out_numel = sum(leaf.numel() for leaf in pytree.tree_leaves(out))
    leaves = pytree.tree_leaves(primals)
    in_numel = sum(p.numel() for p in leaves)
    engine.check_result_size(call, out_numel * in_numel * in_numel * engine.wire_itemsize(leaves[0].dtype))
    table = profile.hessian
    key = call.signature()
    known = table.get(key)
    order = (known, "jacrev_jacrev") if known else candidates(isinstance(out, torch.Tensor) and out.dim() == 0)
    measure = known is None and out_numel * in_numel * in_numel <= _MEASURE_ELEMENTS
    if profile.grad_off:  # the strategies differ for it: torch's own, or torch's failure
        order, measure, known = (_TORCHS,), False, _TORCHS
    found: Any = None
    used = ""
    timings: dict[str, float] = {}
    failure: BaseException | None = None
    for name in order:
        fn = STRATEGIES[name](g, argnums)
        try:
            fn(*primals) if measure else None  # warm: the first call of a transform pays extra
            start = time.perf_counter()
            value = fn(*primals)
            engine.synchronize()
            timings[name] = time.perf_counter() - start
        except BaseException as exc:
            if is_oom(exc) or isinstance(exc, ServiceError) or not isinstance(exc, Exception):
                raise function_error(exc) from None
            failure = exc  # e.g. no forward-AD rule for an op: try the next strategy
            continue
        if found is None or measure and timings[name] < timings[used]:
            # measuring, the winner's own value: the one every later call will answer
            # (strategies may differ where the function is not smooth: NaN against 0)
            found, used = value, name
        if not measure:
            break
    if found is None:
        raise function_error(failure or RuntimeError("no Hessian strategy ran"))
    if known is None:
        table[key] = used
    value, aux_t = found
    value = as_input_dtypes(value, primals, depth=2)  # torch.func.hessian's block dtypes
    output = engine.host(out) if call.return_output else None
    return Result(engine.host(value), engine.host(box.restore(aux_t)), call.spec.has_aux, output, mode=used)
