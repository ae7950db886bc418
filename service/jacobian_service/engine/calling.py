"""Calling a registered function under torch.func: aux handling, fixed inputs, failures.

Everything that touches the user's function directly lives here, so the rules about
what a function may return, and how its failures are named, are in one place.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from jacobian_client import wire

from ..errors import FunctionError, OutOfMemory, ServiceError, exception_text
from ..registry import FunctionSpec
from ..types import Call

__all__ = ["AuxBox", "differentiable", "function_error", "is_oom", "partial"]

_INT64 = (-(1 << 63), (1 << 63) - 1)
# How deep and how large aux may be. Deeper than a request's JSON may be (MAX_JSON_DEPTH's
# default) would not travel back either; a list that holds itself is infinitely deep,
# and a list holding the same list twice, nested, has exponentially many items: walked
# without these bounds, either kept the engine in our own loop until it was killed.
_AUX_MAX_DEPTH = 64
_AUX_MAX_ITEMS = 1_000_000
# The dtypes the wire carries (tensors in aux and outputs); torch's names.
_WIRE_DTYPES = frozenset(getattr(torch, name) for name in wire.DTYPES if isinstance(getattr(torch, name, None), torch.dtype))


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in exception_text(exc)


def function_error(exc: BaseException) -> ServiceError:
    """A failure inside the user's function (or a transform of it) as a problem.

    ``BaseException`` on purpose: a function that raises ``SystemExit`` or
    ``KeyboardInterrupt`` has failed its request, not the engine."""
    if isinstance(exc, ServiceError):
        return exc
    if is_oom(exc):
        return OutOfMemory(f"out of memory: {type(exc).__name__}")
    text = exception_text(exc).strip()
    message = text.splitlines()[0] if text else ""
    return FunctionError(f"{type(exc).__name__}: {message}"[:2000])


def _check_tensor(leaf: torch.Tensor, what: str) -> None:
    """A tensor the wire can carry: dense (strided), of a dtype it knows."""
    if leaf.layout != torch.strided:
        raise FunctionError(f"{what} holds a tensor of layout {leaf.layout}; return it dense (.to_dense())")
    if leaf.dtype not in _WIRE_DTYPES:
        raise FunctionError(f"{what} holds a {str(leaf.dtype).removeprefix('torch.')} tensor, which the wire does not carry")


def _check_aux_leaf(leaf: Any) -> None:
    """Aux travels as JSON (or arrays): refuse what cannot, naming the function's fault."""
    if isinstance(leaf, torch.Tensor):
        _check_tensor(leaf, "aux")
        return
    if leaf is None or isinstance(leaf, (bool, str)):
        return
    if isinstance(leaf, int):
        if not _INT64[0] <= leaf <= _INT64[1]:
            raise FunctionError(f"aux holds an integer outside 64 bits ({str(leaf)[:40]}...)")
        return
    if isinstance(leaf, float):
        return
    raise FunctionError(
        f"aux holds a {type(leaf).__name__}; aux may hold tensors, numbers, strings, None, lists and dicts"
    )


def _check_aux(aux: Any) -> None:
    stack = [(aux, 0)]
    items = 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > _AUX_MAX_ITEMS:
            raise FunctionError(f"aux holds more than {_AUX_MAX_ITEMS:,} items; return large data as a tensor")
        if isinstance(node, (list, tuple, dict)):
            if depth == _AUX_MAX_DEPTH:
                raise FunctionError(f"aux is nested more than {_AUX_MAX_DEPTH} levels deep (or holds itself)")
            if isinstance(node, dict):
                for key in node:
                    if not isinstance(key, str):
                        raise FunctionError(f"aux dict keys must be strings, got {type(key).__name__}")
                node = node.values()
            stack.extend((child, depth + 1) for child in node)
        else:
            _check_aux_leaf(node)


def _check_output(out: Any) -> None:
    leaves, _ = pytree.tree_flatten(out)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise FunctionError(f"the function returned {type(out).__name__}; expected a tensor or a tuple/dict of tensors")
    for leaf in leaves:
        _check_tensor(leaf, "the output")


class AuxBox:
    """Wraps a function so that only tensors cross torch.func transforms.

    jacrev/vjp refuse non-tensor aux ("Expected tensors, got unsupported type"), so the
    non-tensor leaves of aux are kept here, beside the call, and put back afterwards.
    """

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.leaves: list[Any] = []
        self.treespec: Any = None
        self.pid = os.getpid()

    def __call__(self, *args: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, ...]]:
        # one tensor per leaf in; pytree parameters rebuilt (dicts, tuples) for the function
        try:
            result = self.spec.fn(*self.spec.parameters(args))
        finally:
            if os.getpid() != self.pid:
                # The function forked, and the child came back here instead of exec or
                # _exit: it would go on as a second engine, on copies of this one's
                # sockets (or in-process, a second server on its port). It ends here.
                os._exit(0)
        if not self.spec.has_aux:
            _check_output(result)
            return result, ()
        if not (isinstance(result, tuple) and len(result) == 2):
            raise FunctionError(f"{self.spec.name} has has_aux=True but did not return (output, aux)")
        out, aux = result
        _check_output(out)
        _check_aux(aux)
        self.leaves, self.treespec = pytree.tree_flatten(aux)
        return out, tuple(leaf for leaf in self.leaves if isinstance(leaf, torch.Tensor))

    def restore(self, tensors: Sequence[torch.Tensor]) -> Any:
        if not self.spec.has_aux:
            return None
        it = iter(tensors)
        leaves = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        return pytree.tree_unflatten(leaves, self.treespec)


def partial(fn: Callable[..., Any], args: Sequence[torch.Tensor], argnums: tuple[int, ...]) -> Callable[..., Any]:
    """``fn`` as a function of the differentiated inputs only, the others held fixed.

    The fixed inputs are cloned inside the transform, on every call: jacrev passes every
    input through its transform, so a function may write into the ones it does not
    differentiate (``y.copy_(x)``); a clone made inside the transform is writable there
    (a captured tensor is not), and the write can never reach the request's own arrays,
    which a stacked batch shares with other requests.
    """
    fixed = [i for i in range(len(args)) if i not in argnums]

    def selected(*diff: torch.Tensor) -> Any:
        full = list(args)
        for i in fixed:
            full[i] = args[i].clone()
        for i, value in zip(argnums, diff):
            full[i] = value
        return fn(*full)

    return selected


def differentiable(box: Callable[..., Any], args: Sequence[torch.Tensor], call: Call) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """``(g, primals)``: ``box`` as a function of the differentiated parameters, and
    those parameters, as ``torch.func`` transforms see them in ``jacrev(f, argnums)``.

    A pytree parameter is passed whole (a dict or tuple of tensors), so transforms nest
    their results over it exactly as jacrev does; ``g`` flattens it back to the leaves
    the request carries. Without pytree parameters this is :func:`partial` over
    ``call.argnums``."""
    flat = partial(box, args, call.argnums)
    leaves = [args[i] for i in call.argnums]
    if call.positions is None:
        return flat, tuple(leaves)
    grouped = call.group(leaves)

    def g(*params: Any) -> Any:
        return flat(*pytree.tree_leaves(params))

    return g, (grouped if call.as_tuple else (grouped,))
