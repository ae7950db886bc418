"""Pytree parameters (a dict of tensors, a tuple of arrays) in the autodiff adapters:
numpy only, no framework.

A framework differentiates leaves: torch's ``autograd.Function`` takes tensors as its
arguments, a JAX primitive arrays. So each leaf of a pytree parameter is one input of the
adapter's function, and ``RemoteOps`` works on leaves throughout (argnums, vectors,
results, batch dimensions: one per leaf). The service takes the parameter nested as
declared (README "Pytree parameters"), and nests its results by parameter. A
:class:`Layout` maps one onto the other at the wire, request by request: the inputs,
``argnums``, ``in_dims`` and tangents go out by parameter, the results come back by leaf.

A derivative in some leaves of a parameter asks for the whole parameter (``argnums``
names parameters): the other leaves' tangents are zeros, their gradients are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ._arrays import as_plain_node
from ._protocol import is_input_node
from ._errors import InvalidInput
from ._remote import LEAF, Tree, leaves_like, per_argnum, unflatten, with_hint

__all__ = ["Layout", "split_params"]


def split_params(inputs: Sequence[Any]) -> tuple[list[Any], Layout | None]:
    """The inputs' leaves, and their layout (None when every input is one array: nothing
    to translate). A pytree parameter is what the client sends as one: a dict, or a
    list / tuple holding arrays (``is_input_node``); a list of numbers stays one array."""
    leaves: list[Any] = []
    trees = []
    for x in inputs:
        sub, tree = _flatten_param(x)
        leaves.extend(sub)
        trees.append(tree)
    if all(t.kind == "leaf" for t in trees):
        return list(inputs), None
    return leaves, Layout(tuple(trees))


def _flatten_param(x: Any) -> tuple[list[Any], Tree]:
    x = as_plain_node(x)  # a mapping, torch's ParameterDict / ParameterList: the dict / tuple they stand for
    if isinstance(x, dict):
        leaves: list[Any] = []
        children = []
        for k in x:
            sub, tree = _flatten_param(x[k])
            leaves.extend(sub)
            children.append(tree)
        # keys as the wire writes them (and the service answers them): text
        return leaves, Tree("dict", tuple(children), tuple(str(k) for k in x))
    if isinstance(x, (list, tuple)) and is_input_node(x):
        leaves, children = [], []
        for v in x:
            sub, tree = _flatten_param(v)
            leaves.extend(sub)
            children.append(tree)
        return leaves, Tree("tuple" if isinstance(x, tuple) else "list", tuple(children))
    return [x], LEAF


@dataclass(frozen=True)
class Layout:
    """Which leaves make which parameter: ``params[p]`` is parameter ``p``'s structure
    (``LEAF`` for one array); leaves are numbered across the parameters in order."""

    params: tuple[Tree, ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts, at = [], 0
        for tree in self.params:
            starts.append(at)
            at += tree.num_leaves
        object.__setattr__(self, "_starts", (*starts, at))

    def leaves_of(self, p: int) -> range:
        return range(self._starts[p], self._starts[p + 1])

    def owner(self, leaf: int) -> int:
        return next(p for p in range(len(self.params)) if leaf < self._starts[p + 1])

    def nest(self, leaves: Sequence[Any]) -> list[Any]:
        """One value per parameter: its leaves in its structure."""
        return [unflatten(tree, [leaves[i] for i in self.leaves_of(p)]) for p, tree in enumerate(self.params)]

    # ----------------------------------------------------------------- one request

    def request(self, send: Callable[..., dict[str, Any]], kind: str, inputs: Sequence[Any], options: dict[str, Any],
                vectors: Any = None, out_tree: Tree | None = None, name: str = "") -> dict[str, Any]:
        """``send(kind, params, options, vectors)`` with everything by parameter; the
        answer's ``value`` back by leaf, shaped as it is for one array per parameter
        (``out_tree``: the output's structure, for a ``jacobian`` or ``hessian``)."""
        options = dict(options)
        leaf_argnums = tuple(options.get("argnums", ()))
        params = tuple(sorted({self.owner(i) for i in leaf_argnums}))
        if "argnums" in options:
            options["argnums"] = params
        if options.get("in_dims") is not None:
            options["in_dims"] = tuple(self._param_value(p, options["in_dims"]) for p in range(len(self.params)))
        pairs = [vectors] if isinstance(vectors, tuple) and len(vectors) == 2 and isinstance(vectors[0], str) else vectors
        if pairs is not None:
            pairs = [(key, self._tangents(inputs, leaf_argnums, params, tree) if key == "tangents" else tree)
                     for key, tree in pairs]
            vectors = pairs[0] if isinstance(vectors, tuple) else pairs
        try:
            parts = send(kind, self.nest(inputs), options, vectors)
        except InvalidInput as exc:
            # an array refused for its shape (its members say so) is not that refusal
            hint = None if "expected_shape" in exc.problem else self._integer_leaf_hint(inputs, leaf_argnums, params,
                                                                                      name)
            if hint is None:
                raise
            raise with_hint(exc, hint) from exc
        if kind in ("vjp", "hvp"):
            parts["value"] = self._by_leaf_gradients(parts["value"], leaf_argnums, params)
        elif kind in ("jacobian", "hessian"):
            assert out_tree is not None
            parts["value"] = self._by_leaf_blocks(parts["value"], leaf_argnums, params, out_tree, kind == "hessian")
        return parts

    def _integer_leaf_hint(self, inputs: Sequence[Any], leaf_argnums: tuple[int, ...], params: tuple[int, ...],
                           name: str) -> str | None:
        """A derivative in some leaves of a parameter asks for the whole parameter, which
        the service (as torch.func: "only Tensors of floating point dtype can require
        gradients") refuses when it holds an integer leaf. ``grad`` over ``cfg["w"]`` of a
        function of ``{"w": w, "k": 3}``, which in-process closes over ``k``, raised the
        service's 422 alone, naming a leaf the caller never differentiated (``cfg.k``):
        why, and the way out, for the 422 of such a request (None: not one)."""
        for p in params:
            for i, path in zip(self.leaves_of(p), _leaf_paths(self.params[p])):
                dtype = np.asarray(inputs[i]).dtype
                if i not in leaf_argnums and dtype.kind in "biu":
                    return (f"remote({name!r}): a derivative in some leaves of input {p} asks the service for the "
                            f"whole parameter (it differentiates parameters, not leaves), and its leaf {p}{path} is "
                            f"{dtype}, which the service, as torch.func, does not differentiate: pass integer values "
                            "as an input of their own (or as a float leaf)")
        return None

    def _param_value(self, p: int, per_leaf: Sequence[Any]) -> Any:
        """One value per leaf (``in_dims``) -> the parameter's: one value where its leaves
        agree, else nested as the parameter is (the service takes both)."""
        values = [per_leaf[i] for i in self.leaves_of(p)]
        if all(v == values[0] for v in values):
            return values[0]
        return _as_list(unflatten(self.params[p], values))

    def _tangents(self, inputs: Sequence[Any], leaf_argnums: tuple[int, ...], params: tuple[int, ...],
                  given: Sequence[Any]) -> tuple[Any, ...]:
        """One tangent per leaf argnum -> one tree per parameter argnum; a leaf not
        differentiated moves by zeros (stacked as the given tangents are)."""
        by_leaf = dict(zip(leaf_argnums, given))
        first = leaf_argnums[0]
        lead = np.shape(given[0])[: np.ndim(given[0]) - np.ndim(inputs[first])]
        out = []
        for p in params:
            leaves = [by_leaf[i] if i in by_leaf else np.zeros((*lead, *np.shape(inputs[i])), _float_dtype(inputs[i]))
                      for i in self.leaves_of(p)]
            out.append(unflatten(self.params[p], leaves))
        return tuple(out)

    def _param_leaves(self, value: Any, p: int, what: str) -> list[Any]:
        leaves = leaves_like(value, self.params[p])
        if leaves is None:
            raise ValueError(f"unexpected {what} structure for parameter {p}: not the structure it was sent in")
        return leaves

    def _by_leaf_gradients(self, value: Any, leaf_argnums: tuple[int, ...], params: tuple[int, ...]) -> tuple[Any, ...]:
        if not isinstance(value, (tuple, list)) or len(value) != len(params):
            raise ValueError(f"unexpected gradient structure: {len(params)} parameters asked")
        by_leaf = {}
        for p, g in zip(params, value):
            by_leaf.update(zip(self.leaves_of(p), self._param_leaves(g, p, "gradient")))
        return tuple(by_leaf[i] for i in leaf_argnums)

    def _by_leaf_blocks(self, value: Any, leaf_argnums: tuple[int, ...], params: tuple[int, ...], out_tree: Tree,
                        hessian: bool) -> Any:
        """A Jacobian (outputs outer, then parameters, each nested) or a Hessian (outputs,
        parameters, then parameters again) -> the same with one entry per leaf argnum."""
        trees = tuple(self.params[p] for p in params)
        inner = tuple(per_argnum(t, len(trees), trees) for t in trees) if hessian else trees
        spec = per_argnum(out_tree, len(trees), inner)
        flat = leaves_like(value, spec)
        if flat is None:
            raise ValueError(f"unexpected {'Hessian' if hessian else 'Jacobian'} structure for pytree parameters")
        position = {}
        for p in params:
            for i in self.leaves_of(p):
                position[i] = len(position)
        L, n = len(position), len(leaf_argnums)
        per_out = L * L if hessian else L
        picked: list[Any] = []
        for k in range(out_tree.num_leaves):
            block = flat[k * per_out:(k + 1) * per_out]
            for i in leaf_argnums:
                if hessian:
                    picked.extend(block[position[i] * L + position[j]] for j in leaf_argnums)
                else:
                    picked.append(block[position[i]])
        want = per_argnum(out_tree, n)
        return unflatten(per_argnum(want, n) if hessian else want, picked)


def _leaf_paths(tree: Tree, path: str = "") -> list[str]:
    """Each leaf's path below its parameter, in leaf order (``['w']``, ``[1]['scale']``)."""
    if tree.kind == "leaf":
        return [path]
    keys = [repr(k) for k in tree.keys] if tree.kind == "dict" else [str(i) for i in range(len(tree.children))]
    return [p for key, child in zip(keys, tree.children) for p in _leaf_paths(child, f"{path}[{key}]")]


def _float_dtype(x: Any) -> np.dtype:
    dtype = np.asarray(x).dtype
    return dtype if dtype.kind in "fc" else np.dtype(np.float32)


def _as_list(tree: Any) -> Any:
    """in_dims nested for the wire: tuples as lists (JSON has no tuple)."""
    if isinstance(tree, dict):
        return {k: _as_list(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return [_as_list(v) for v in tree]
    return tree
