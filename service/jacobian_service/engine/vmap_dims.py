"""vmap's ``in_dims`` / ``out_dims`` in the engine: an example of the inputs, and the
batch moved where ``out_dims`` puts it in the result, as ``torch.func.vmap`` does.

The front end (``jacobian_service.vmap_dims``) has checked ``in_dims`` against the
declared shapes and made each leaf's dim non-negative; ``out_dims`` is checked here,
against the result, which only now has a structure and ranks. Per-example results are
computed batch first whatever ``out_dims`` says (the checks of a batched result read
its first example there), and laid out last.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from ..errors import InvalidInput
from ..types import Call

__all__ = ["batch_size", "dims", "example", "has_none", "lay_out", "lay_out_extra", "torch_says_unbatched"]


def dims(call: Call) -> tuple[int | None, ...]:
    """One in_dim per leaf of ``call.args``: torch's default, 0, unless given."""
    return call.in_dims if call.in_dims is not None else (0,) * len(call.args)


def batch_size(args: Sequence[torch.Tensor], in_dims: Sequence[int | None]) -> int:
    return next((a.shape[d] for a, d in zip(args, in_dims) if d is not None), 0)


def example(args: Sequence[torch.Tensor], in_dims: Sequence[int | None], b: int) -> list[torch.Tensor]:
    """Example ``b`` of the inputs: a batched leaf's slice, a shared leaf whole.

    Contiguous, as the example sent alone is (a copy only where the batch is not the
    first dim): a slice over ``in_dims=1`` has strides no request's array has, and
    ``x.view(-1)``, which torch's vmap over that dim refuses ("view size is not
    compatible with input tensor's size and stride"), failed the same way in the loop
    over examples meant to answer each as alone (500 where each example alone answers)."""
    return [a if d is None else a.select(d, b).contiguous() for a, d in zip(args, in_dims)]


def first(args: Sequence[torch.Tensor], in_dims: Sequence[int | None]) -> list[torch.Tensor]:
    """The inputs narrowed to their first example, still batched (a batch of one)."""
    return [a if d is None else a.narrow(d, 0, 1) for a, d in zip(args, in_dims)]


def _structure(node: Any) -> str:
    if isinstance(node, (list, tuple)):
        return "[" + ", ".join(_structure(v) for v in node) + "]"
    if isinstance(node, dict):
        return "{" + ", ".join(f"{k}: {_structure(v)}" for k, v in node.items()) + "}"
    return "*"


def _per_leaf(out_dims: Any, node: Any, path: str) -> list[tuple[str, int | None]]:
    """``out_dims`` matched to the result as a prefix of its tree (torch's
    ``_broadcast_to_and_flatten``), JSON's lists standing for tuples and lists alike and
    an object's keys for a dict's keys as the answer writes them (their text)."""
    if out_dims is None or isinstance(out_dims, int):
        return [(p, out_dims) for p, _ in _leaves(node, path)]
    if isinstance(out_dims, list) and isinstance(node, (list, tuple)) and len(out_dims) == len(node):
        return [x for i, (d, n) in enumerate(zip(out_dims, node)) for x in _per_leaf(d, n, f"{path}[{i}]")]
    if isinstance(out_dims, dict) and isinstance(node, dict) and set(out_dims) == {str(k) for k in node}:
        return [x for k, n in node.items() for x in _per_leaf(out_dims[str(k)], n, f"{path}.{k}")]
    raise InvalidInput(f"out_dims: {_structure(out_dims)} does not match the result's structure {_structure(node)} "
                       "(torch's vmap: out_dims is not compatible with the structure of `outputs`)")


def _leaves(node: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(node, (list, tuple)):
        return [x for i, n in enumerate(node) for x in _leaves(n, f"{path}[{i}]")]
    if isinstance(node, dict):
        return [x for k, n in node.items() for x in _leaves(n, f"{path}.{k}")]
    return [(path, node)]


def has_none(call: Call) -> bool:
    return any(d is None for d in pytree.tree_leaves(call.out_dims, is_leaf=lambda x: x is None))


def _move(leaf: torch.Tensor, d: int, path: str) -> torch.Tensor:
    ndim = leaf.dim()
    if not -ndim <= d < ndim:
        raise InvalidInput(f"out_dims: {d} is out of range for {path}, which has {ndim} dimensions with the batch, so it "
                           f"must satisfy {-ndim} <= out_dim < {ndim} (torch: Dimension out of range (expected to be in "
                           f"range of [{-ndim}, {ndim - 1}], but got {d}))")
    return leaf.movedim(0, d).contiguous() if d % ndim else leaf


def lay_out(call: Call, value: Any, what: str, unbatched: Callable[[Any], bool]) -> Any:
    """The batched ``value`` (batch first) with each leaf's batch moved to its out_dim;
    a leaf whose out_dim is None is answered without the batch where ``unbatched``
    says that torch's vmap would, given the full out_dims; else torch's error."""
    if call.out_dims == 0:
        return value
    out_dims = call.out_dims
    if isinstance(value, torch.Tensor) and isinstance(out_dims, list) and len(out_dims) == 1:
        # torch's vmap takes a tuple of one for a result that is one tensor
        # (test_out_dims_edge_case: out_dims=(1,) is out_dims=1), at the top only
        out_dims = out_dims[0]
    per_leaf = _per_leaf(out_dims, value, what)
    if any(d is None for _, d in per_leaf):
        full = pytree.tree_unflatten([d for _, d in per_leaf], pytree.tree_structure(value))
        if not unbatched(full):
            raise InvalidInput("out_dims is null for a result that depends on the batched inputs (torch's vmap: "
                               "can not return a BatchedTensor when out_dim is None)")
    leaves, spec = pytree.tree_flatten(value)
    moved = [leaf if d == 0 else leaf[0] if d is None else _move(leaf, d, path) for leaf, (path, d) in zip(leaves, per_leaf)]
    return pytree.tree_unflatten(moved, spec)


def lay_out_extra(call: Call, tree: Any) -> Any:
    """Aux: an int out_dims moves its batch too, as torch's
    ``vmap(jacrev(f, has_aux=True), out_dims=k)`` applies ``k`` to the aux; a nested
    out_dims is the result's alone, and the aux keeps the batch first."""
    d = call.out_dims
    if d == 0 or d is None or not isinstance(d, int) or tree is None:
        return tree
    return pytree.tree_map(lambda leaf: _move(leaf, d, "aux") if isinstance(leaf, torch.Tensor) and leaf.dim() else leaf, tree)


def torch_says_unbatched(fn: Callable[..., Any], args: Sequence[torch.Tensor], in_dims: Sequence[int | None],
                         value: Any) -> Callable[[Any], bool]:
    """Whether the leaves out_dims makes None are unbatched, as torch's vmap tells it
    (by what depends on the batched inputs, not by values): ``fn`` (the result of one
    example's inputs) run under vmap over the first example alone, with those out_dims.
    Where vmap cannot run ``fn`` at all, the values decide: the same in every example."""

    def check(full: Any) -> bool:
        try:
            torch.func.vmap(fn, in_dims=tuple(in_dims), out_dims=full)(*first(args, in_dims))
            return True
        except Exception as exc:  # noqa: BLE001 - any other failure: vmap cannot run fn, the values decide
            if isinstance(exc, ValueError) and "out_dim is None" in str(exc):
                return False
        flat = pytree.tree_leaves(full, is_leaf=lambda x: x is None)
        return all(d is not None or bool((leaf == leaf[:1]).all())
                   for leaf, d in zip(pytree.tree_leaves(value), flat))

    return check
