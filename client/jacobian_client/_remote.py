"""What the autodiff adapters (:mod:`.torch`, :mod:`.jax`, :mod:`.scipy`) share: numpy
only, no framework.

A remote function is seen by an autodiff framework as three host operations, each one
HTTP request:

* ``evaluate``: the outputs (and aux) at inputs that may carry leading batch
  dimensions (``vmap``): one ``evaluate`` request, ``batched=true`` when batched;
* ``linear("vjp" | "jvp")``: the pullback or pushforward at those inputs, applied to
  vectors that may carry more leading dimensions than the inputs (``jacrev`` /
  ``jacfwd`` vmap the vectors). With unbatched inputs this is one ``vjp`` / ``jvp``
  request, ``batched_vectors=true`` when there are several vectors. With batched inputs
  (``vmap(grad(f))``: per-example derivatives) the service has no batched vjp/jvp, so it
  is one batched ``jacobian`` request, contracted with the vectors here.

Leading dimensions are described by *tags*, outermost first: ``"p"`` for a dimension
the inputs have too (the k-th ``"p"`` is the inputs' k-th leading dimension) and ``"v"``
for one only the vectors have. Each transform level puts its dimension in front, so
this is enough to describe any nesting of ``vmap`` over inputs and vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ._protocol import _is_input_node

__all__ = ["RemoteOps", "Tree", "flatten", "refuse_pytree_parameters", "unflatten"]


# --------------------------------------------------------------------------- trees


def refuse_pytree_parameters(name: str, inputs: Sequence[Any]) -> None:
    """The adapters take one array per parameter: a pytree parameter (what the client
    would send as one, a dict or a list/tuple of arrays) is refused by name."""
    if any(_is_input_node(x) for x in inputs):
        raise TypeError(f"remote({name!r}) takes one array per parameter; pytree parameters (dicts, "
                        "tuples of arrays) are not supported here: use Client.jacobian/vjp/jvp, which nest over them")


@dataclass(frozen=True)
class Tree:
    """The structure of a numpy result tree: ``kind`` is ``"leaf"``, ``"tuple"``,
    ``"list"`` or ``"dict"``; ``keys`` name a dict's children."""

    kind: str
    children: tuple[Tree, ...] = ()
    keys: tuple[str, ...] = ()

    @property
    def num_leaves(self) -> int:
        return 1 if self.kind == "leaf" else sum(c.num_leaves for c in self.children)


LEAF = Tree("leaf")


def flatten(tree: Any) -> tuple[list[Any], Tree]:
    """Leaves (anything but a tuple, list or dict) in order, and the structure."""
    if isinstance(tree, (tuple, list)):
        leaves: list[Any] = []
        children = []
        for t in tree:
            sub, spec = flatten(t)
            leaves.extend(sub)
            children.append(spec)
        return leaves, Tree("tuple" if isinstance(tree, tuple) else "list", tuple(children))
    if isinstance(tree, dict):
        leaves = []
        children = []
        for k in tree:
            sub, spec = flatten(tree[k])
            leaves.extend(sub)
            children.append(spec)
        return leaves, Tree("dict", tuple(children), tuple(tree))
    return [tree], LEAF


def unflatten(spec: Tree, leaves: Sequence[Any]) -> Any:
    it = iter(leaves)

    def build(s: Tree) -> Any:
        if s.kind == "leaf":
            return next(it)
        kids = [build(c) for c in s.children]
        if s.kind == "dict":
            return dict(zip(s.keys, kids))
        return tuple(kids) if s.kind == "tuple" else list(kids)

    return build(spec)


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, np.ndarray)


# --------------------------------------------------------------------------- ops


@dataclass
class Evaluated:
    outputs: list[np.ndarray]  # leaves of the output tree
    out_tree: Tree
    aux: list[Any]  # leaves of the aux tree (arrays and plain values)
    aux_tree: Tree | None  # None: the function has no aux


class RemoteOps:
    """The host side of one remote function: numpy in, numpy out, requests counted by
    the client. ``client`` is a :class:`jacobian_client.Client`."""

    def __init__(self, client: Any, name: str) -> None:
        if not hasattr(client, "_parts") or _is_coroutine(client._parts):
            raise TypeError("pass a jacobian_client.Client (autodiff adapters are synchronous)")
        self.client = client
        self.name = name

    # ----------------------------------------------------------------- evaluate

    def evaluate(self, inputs: Sequence[Any], batch_ndim: int = 0) -> Evaluated:
        """Outputs at ``inputs`` whose first ``batch_ndim`` dimensions are batch
        dimensions (every array input has them; flattened into one for the request)."""
        batch_shape, flat = _merge_batch(inputs, batch_ndim)
        parts = self.client._parts("evaluate", self.name, flat, {"batched": batch_ndim > 0})
        outputs, out_tree = flatten(parts["value"])
        outputs = [_split_batch(np.asarray(o), batch_shape) for o in outputs]
        aux_tree = None
        aux: list[Any] = []
        if "aux" in parts:
            aux, aux_tree = flatten(parts["aux"])
            aux = [_split_batch(a, batch_shape) if _is_array(a) else a for a in aux]
        return Evaluated(outputs, out_tree, aux, aux_tree)

    # ----------------------------------------------------------------- vjp / jvp

    def linear(
        self,
        mode: str,
        inputs: Sequence[Any],
        argnums: Sequence[int],
        vectors: Sequence[np.ndarray],
        out_tree: Tree,
        batch_ndim: int = 0,
        tags: Sequence[str] = (),
    ) -> list[np.ndarray]:
        """``mode="vjp"``: ``vectors`` are cotangents, one per output leaf; returns one
        gradient per ``argnums`` entry. ``mode="jvp"``: ``vectors`` are tangents, one per
        ``argnums`` entry; returns one tangent per output leaf. Inputs carry
        ``batch_ndim`` leading dimensions; vectors carry ``len(tags)`` (see the module
        docstring), and so do the results."""
        if mode not in ("vjp", "jvp"):
            raise ValueError(mode)
        tags = tuple(tags)
        if tags.count("p") != batch_ndim:
            raise ValueError(f"tags {tags} do not match {batch_ndim} batch dimensions of the inputs")
        lead = len(tags)
        # vectors' leading dims -> (p..., v...)
        order = [i for i, t in enumerate(tags) if t == "p"] + [i for i, t in enumerate(tags) if t == "v"]
        vecs = [np.asarray(v) for v in vectors]
        vecs = [np.transpose(v, order + list(range(lead, v.ndim))) for v in vecs]
        p_shape = vecs[0].shape[:batch_ndim] if vecs else ()
        v_shape = vecs[0].shape[batch_ndim:lead] if vecs else ()
        if batch_ndim == 0:
            results = self._linear_request(mode, inputs, argnums, vecs, out_tree, v_shape)
        else:
            results = self._linear_by_jacobian(mode, inputs, argnums, vecs, out_tree, batch_ndim, p_shape, v_shape)
        inverse = list(np.argsort(order))
        return [np.transpose(r, inverse + list(range(lead, r.ndim))) for r in results]

    def _linear_request(
        self, mode: str, inputs: Sequence[Any], argnums: Sequence[int], vecs: list[np.ndarray], out_tree: Tree,
        v_shape: tuple[int, ...],
    ) -> list[np.ndarray]:
        """One vjp / jvp request; several vectors go as one stack (``batched_vectors``)."""
        nv = len(v_shape)
        many = nv > 0
        stacked = [v.reshape((math.prod(v_shape), *v.shape[nv:])) if many else v for v in vecs]
        if mode == "vjp":
            vec_tree = unflatten(out_tree, stacked)
            key = "cotangents"
        else:
            vec_tree = tuple(stacked)
            key = "tangents"
        options = {"argnums": tuple(argnums), "batched_vectors": many}
        parts = self.client._parts(mode, self.name, list(inputs), options, vectors=(key, vec_tree))
        leaves, _ = flatten(parts["value"])
        leaves = [np.asarray(r) for r in leaves]
        return [r.reshape((*v_shape, *r.shape[1:])) if many else r for r in leaves]

    def _linear_by_jacobian(
        self, mode: str, inputs: Sequence[Any], argnums: Sequence[int], vecs: list[np.ndarray], out_tree: Tree,
        batch_ndim: int, p_shape: tuple[int, ...], v_shape: tuple[int, ...],
    ) -> list[np.ndarray]:
        """Per-example products with batched inputs: one batched Jacobian request,
        contracted here with each example's vectors."""
        _, flat = _merge_batch(inputs, batch_ndim)
        parts = self.client._parts("jacobian", self.name, flat, {"argnums": tuple(argnums), "batched": True})
        leaves, _ = flatten(parts["value"])  # outputs outer, argnums inner
        n_out, n_arg = out_tree.num_leaves, len(argnums)
        if len(leaves) != n_out * n_arg:
            raise ValueError(f"unexpected Jacobian structure: {len(leaves)} blocks for {n_out} x {n_arg}")
        P = math.prod(p_shape)
        V = math.prod(v_shape)
        nb = batch_ndim + len(v_shape)
        blocks = [[np.asarray(leaves[k * n_arg + i]) for i in range(n_arg)] for k in range(n_out)]
        in_shapes = [np.shape(flat[a])[1:] for a in argnums]
        results = []
        if mode == "vjp":
            out_shapes = [v.shape[nb:] for v in vecs]
            for i in range(n_arg):
                total = None
                for k in range(n_out):
                    J = blocks[k][i].reshape(P, math.prod(out_shapes[k]), math.prod(in_shapes[i]))
                    c = vecs[k].reshape(P, V, math.prod(out_shapes[k])).astype(J.dtype, copy=False)
                    term = np.einsum("pvo,poi->pvi", c, J)
                    total = term if total is None else total + term
                results.append(total.reshape((*p_shape, *v_shape, *in_shapes[i])))
        else:
            for k in range(n_out):
                out_shape = blocks[k][0].shape[1:len(blocks[k][0].shape) - len(in_shapes[0])]
                total = None
                for i in range(n_arg):
                    J = blocks[k][i].reshape(P, math.prod(out_shape), math.prod(in_shapes[i]))
                    t = vecs[i].reshape(P, V, math.prod(in_shapes[i])).astype(J.dtype, copy=False)
                    term = np.einsum("poi,pvi->pvo", J, t)
                    total = term if total is None else total + term
                results.append(total.reshape((*p_shape, *v_shape, *out_shape)))
        return results


def _is_coroutine(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def _merge_batch(inputs: Sequence[Any], batch_ndim: int) -> tuple[tuple[int, ...], list[Any]]:
    """Inputs with ``batch_ndim`` leading batch dims -> one leading batch dim."""
    if batch_ndim == 0:
        return (), list(inputs)
    arrays = [np.asarray(x) for x in inputs]
    batch_shape = arrays[0].shape[:batch_ndim]
    return batch_shape, [a.reshape((math.prod(batch_shape), *a.shape[batch_ndim:])) for a in arrays]


def _split_batch(arr: Any, batch_shape: tuple[int, ...]) -> Any:
    if not batch_shape:
        return arr
    arr = np.asarray(arr)
    return arr.reshape((*batch_shape, *arr.shape[1:]))
