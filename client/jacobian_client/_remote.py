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

An input every example shares (``vmap``'s ``in_dims=None``: a model's weights beside a
batch of examples) carries none of the batch dimensions (``shared``): it is sent once,
with the request's ``in_dims`` saying so, not copied per example. Every other input
carries all of them (an input batched at some ``vmap`` levels only is expanded over the
rest by the adapter: the service takes one batch dimension per input).

Plain (non-array) aux values under a batch: the service runs a batch with ``vmap`` when it
can, and then a plain value was computed once for the whole batch; otherwise it loops over
the examples and lists each plain leaf's values, one per example. Only the structure of
one example's aux tells the two apart (a tuple of two numbers may be either), so a batched
evaluate reads the aux against that structure, learned from an unbatched call with the
same per-example input shapes (remembered per signature) or, failing that, from one
unbatched ``evaluate`` of the batch's first example. Numbers (bool, int, float) then come
back as arrays of the batch's shape, whichever way the service ran; other plain values
(strings, None) as one value when every example agrees, else as a tuple of them.

An empty batch (a dimension of size 0) is answered here without a request (nothing to
compute), from the output shapes remembered for that per-example signature; when
there are none, one ``evaluate`` at zeros of one example's shapes learns them.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import wire
from ._errors import (
    APIError,
    FunctionError,
    InvalidInput,
    JacobianServiceError,
    PayloadTooLarge,
)
from ._protocol import bind_inputs

__all__ = ["LEAF", "MAX_SIGNATURES", "Evaluated", "Remade", "RemoteOps", "Tree", "check_sync_client", "flatten",
           "float32_stands_for", "is_number", "lacks_forward_mode", "leaves_like", "no_forward_mode", "per_argnum", "same_arrays", "service_capabilities",
           "shape_mismatch", "unflatten", "with_hint"]


def check_sync_client(client: Any) -> None:
    """The adapters call the service from inside a framework's synchronous call (a
    forward, a callback, a solver's ``fun``): an AsyncClient's coroutines would never be
    awaited there, so it is refused up front rather than failing later."""
    if not hasattr(client, "_parts") or _is_coroutine(client._parts):
        raise TypeError("pass a jacobian_client.Client (autodiff adapters are synchronous; "
                        "an AsyncClient cannot be called from inside a framework's computation)")


def is_number(value: Any) -> bool:
    """A plain number that can travel as a 0-d array (complex cannot come over the wire)."""
    return isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating))


def with_hint(exc: APIError, hint: str) -> APIError:
    """The same error (class, status, code, request id) with ``hint`` before its detail,
    for failures of a request the caller did not ask for (a probe)."""
    problem = dict(exc.problem)
    problem["detail"] = f"{hint}: {exc.detail}"
    return type(exc)(exc.response, problem)


def shape_mismatch(name: str, what: str, got: Sequence[int], expected: Sequence[int]) -> ValueError:
    """A result the service sent in another shape than the output shapes learned for
    these input shapes: an error, never reshaped into place (a transposed result would
    pass silently, and did: a per-example Jacobian read in the learned output's order)."""
    return ValueError(
        f"remote function {name!r} returned {what} of shape {list(got)}, expected {list(expected)}, from the output shapes "
        "learned for these input shapes (at an earlier call, from jax's out_shape=, or under jax.jit from the "
        "evaluate at zeros); an output whose shape follows the input values cannot be traced by jax.jit (as "
        "x[x > 0] cannot in-process: call it outside jit); if the function changed on the service (a restart with "
        "another registry), make the remote function again")


class Remade:
    """A callable that pickles as the call that made it (``make(*args, **kwargs)``, e.g.
    ``remote(client, name)``), not as its closure, which cannot be pickled: so a remote
    function can go to a spawned DataLoader worker or a process pool, or be saved with
    the model that holds it. What it learned (shapes, templates) is learned again there."""

    def __init__(self, fn: Any, make: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._fn = fn
        self._made = (make, args, kwargs)
        functools.update_wrapper(self, fn)

    def __call__(self, *inputs: Any, **named: Any) -> Any:
        return self._fn(*inputs, **named)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_remake, self._made)

    def __repr__(self) -> str:
        return f"<{self.__name__}>"


def _remake(make: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return make(*args, **kwargs)


# --------------------------------------------------------------------------- trees


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


def leaves_like(tree: Any, spec: Tree) -> list[Any] | None:
    """The leaves of ``tree`` in the order of ``spec`` (a dict's children by key, lists
    and tuples alike), or None when the structures differ. A structure given by the
    caller (jax's ``out_shape=``) may list a dict's keys in another order than the
    function returns them; flat leaf lists must not be zipped across the two."""
    if spec.kind == "leaf":
        return None if isinstance(tree, (tuple, list, dict)) else [tree]
    if spec.kind == "dict":
        if not isinstance(tree, dict) or set(tree) != set(spec.keys):
            return None
        children = [tree[k] for k in spec.keys]
    elif not isinstance(tree, (tuple, list)) or len(tree) != len(spec.children):
        return None
    else:
        children = list(tree)
    leaves: list[Any] = []
    for child, sub in zip(children, spec.children):
        got = leaves_like(child, sub)
        if got is None:
            return None
        leaves.extend(got)
    return leaves


def _in_order(tree: Any, spec: Tree) -> list[Any]:
    """``tree``'s leaves in ``spec``'s order where the structures match, else as they come."""
    leaves = leaves_like(tree, spec)
    return leaves if leaves is not None else flatten(tree)[0]


def per_argnum(out_tree: Tree, n_arg: int, children: tuple[Tree, ...] | None = None) -> Tree:
    """A Jacobian's structure: ``out_tree`` with a tuple over the argnums at each leaf,
    each entry ``children[a]`` (the argnum's own structure: a pytree parameter's) or a leaf."""
    if out_tree.kind == "leaf":
        return Tree("tuple", children if children is not None else (LEAF,) * n_arg)
    return Tree(out_tree.kind, tuple(per_argnum(c, n_arg, children) for c in out_tree.children), out_tree.keys)


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, np.ndarray)


# --------------------------------------------------------------------------- ops


@dataclass
class Evaluated:
    outputs: list[np.ndarray]  # leaves of the output tree
    out_tree: Tree
    aux: list[Any]  # leaves of one example's aux tree: arrays and plain values (numbers are arrays when batched)
    aux_tree: Tree | None  # None: the function has no aux
    # per output leaf, whether the batch left it unbatched: it depends on no batched input, as
    # the service's vmap found (meta.unbatched; its examples are equal). None: not known (no
    # batch, the examples ran one by one, an empty batch); every output batched then
    unbatched: list[bool] | None = None
    aux_unbatched: list[bool] | None = None  # the same per aux leaf (meta.aux_unbatched)
    # per output (aux) leaf, whether the service computed it in bfloat16 (it comes as float32:
    # meta.bfloat16, meta.aux_bfloat16); None: not said (no half precision there, or an older
    # service), see float32_stands_for
    bfloat16: list[bool] | None = None
    aux_bfloat16: list[bool] | None = None


def float32_stands_for(flags: list[bool] | None, i: int, low: Any, bfloat16: Any) -> Any:
    """The dtype a float32 leaf ``i`` of an evaluate answer (``flags``: its
    ``Evaluated.bfloat16`` or ``aux_bfloat16``) is given back as, None for float32 itself.
    Said by the service: bfloat16 where it computed bfloat16 (``bfloat16``: the adapter's
    dtype object), else float32, a float32 the function returned (``x.float()`` of a
    float16 ``x``), which was rounded to the inputs' half precision. Not said (the service
    computed in float32: a bfloat16 sent as float32 without ml_dtypes, a declared
    float32): ``low``, the inputs' one half precision, as torch would compute in it."""
    if flags is None:
        return low
    return bfloat16 if flags[i] else None


def _flags(value: Any, n: int) -> list[bool] | None:
    """A meta.unbatched list of ``n`` booleans, else None (not said: every leaf batched)."""
    return [bool(f) for f in value] if isinstance(value, list) and len(value) == n else None


@dataclass(frozen=True)
class _Template:
    """What one example's evaluation looks like: enough to answer an empty batch."""

    outputs: tuple[tuple[tuple[int, ...], np.dtype], ...]
    out_tree: Tree
    aux: tuple[Any, ...]  # per aux leaf: (shape, dtype) of an array or number, else ("plain", value)
    aux_tree: Tree | None
    bfloat16: tuple[list[bool] | None, list[bool] | None] = (None, None)  # Evaluated's (outputs, aux)

    @classmethod
    def of(cls, ev: Evaluated, batch_ndim: int) -> _Template:
        def spec(a: Any) -> Any:
            if isinstance(a, np.ndarray):
                return a.shape[batch_ndim:], a.dtype
            if is_number(a):
                return (), np.asarray(a).dtype
            return "plain", a

        return cls(tuple((o.shape[batch_ndim:], o.dtype) for o in ev.outputs), ev.out_tree,
                   tuple(spec(a) for a in ev.aux), ev.aux_tree, (ev.bfloat16, ev.aux_bfloat16))

    def empty(self, batch_shape: tuple[int, ...]) -> Evaluated:
        outputs = [np.zeros((*batch_shape, *shape), dtype) for shape, dtype in self.outputs]
        aux = [spec[1] if spec[0] == "plain" else np.zeros((*batch_shape, *spec[0]), spec[1]) for spec in self.aux]
        return Evaluated(outputs, self.out_tree, aux, self.aux_tree, bfloat16=self.bfloat16[0],
                         aux_bfloat16=self.bfloat16[1])


def _per_example(batch: _Batch, vecs: list[np.ndarray], batch_ndim: int, p_shape: tuple[int, ...],
                 one: Callable[[list[Any], list[np.ndarray]], list[np.ndarray]]) -> list[np.ndarray]:
    """``one(example, its vectors)`` of each example of ``batch`` at unbatched inputs (shared
    inputs as they are), its results stacked over the examples: (p..., what ``one`` gives).
    ``vecs`` lead with the batch's dims (p...)."""
    P = math.prod(p_shape)
    flat_vecs = [v.reshape((P, *v.shape[batch_ndim:])) for v in vecs]
    per_example = [one([x if batch.is_shared(i) else np.asarray(x)[p] for i, x in enumerate(batch.flat)],
                       [v[p] for v in flat_vecs]) for p in range(P)]
    return [np.stack([rs[k] for rs in per_example]).reshape((*p_shape, *per_example[0][k].shape))
            for k in range(len(per_example[0]))]


# Per-example signatures remembered per remote function (oldest dropped first): a caller
# cycling through more input shapes than this pays a request to relearn one.
MAX_SIGNATURES = 64


# The most numbers _vjp_by_jvp's basis tangents may hold (n x n for n differentiated
# input elements; 128 MiB in float64): past it the integer output's refusal stands
MAX_BASIS_NUMBERS = 1 << 24


def _basis_fits(inputs: Sequence[Any], argnums: Sequence[int]) -> bool:
    """Whether the basis tangents of the differentiated inputs fit MAX_BASIS_NUMBERS."""
    n = sum(math.prod(np.shape(inputs[a])) for a in argnums)
    return n * n <= MAX_BASIS_NUMBERS


class RemoteOps:
    """The host side of one remote function: numpy in, numpy out, requests counted by
    the client. ``client`` is a :class:`jacobian_client.Client`."""

    def __init__(self, client: Any, name: str) -> None:
        check_sync_client(client)
        self.client = client
        self.name = name
        self._templates: dict[tuple[Any, ...], _Template] = {}
        # one writer at a time: threads sharing a remote function (a thread pool, DDP-like
        # training) each remember signatures, and two evicting at once raised KeyError (both
        # deleting the oldest) or "dictionary changed size during iteration" from a forward
        self._templates_lock = threading.Lock()
        # False once an hvp (a jvp) failed where the Hessian (the Jacobian) answered: no
        # forward-mode rule (no_forward_mode)
        # False once a vjp was refused for an integer output where the jvp answered (_vjp_by_jvp)
        # False once a vjp's cotangents were too many arrays for the service (_vjp_by_jacobian)
        self._works = {"hvp": True, "jvp": True, "vjp": True, "cotangents": True}  # shared with the layouts' views
        self._names: tuple[str, ...] | None = None  # the inputs' names, asked on the first keyword call
        self._layout: Any = None  # a _params.Layout: pytree parameters, translated at the wire (for_layout)
        self._wire_names: tuple[str, ...] | None = None  # a keyword call's view: inputs by name (for_layout)
        self._views: dict[Any, RemoteOps] = {}

    def for_layout(self, layout: Any, names: tuple[str, ...] | None = None) -> RemoteOps:
        """These ops for one call's inputs. ``layout`` (a ``_params.Layout``): pytree
        parameters, one input per leaf here, nested by parameter on the wire. ``names``:
        a keyword call, whose inputs go by name on the wire (``bind``). None for both:
        these very ops. One view per kind of call, kept (a JAX primitive's parameter, by
        identity), with its own signatures (the leaves' shapes alone do not say which
        parameter holds them) and the forward-mode findings of these."""
        if layout is None and names is None:
            return self
        with self._templates_lock:
            view = self._views.get((layout, names))
            if view is None:
                view = copy.copy(self)  # shares the client, the names and _works
                view._layout, view._wire_names, view._views = layout, names, {}
                view._templates, view._templates_lock = {}, threading.Lock()
                # a subclass's answers for one call, and what it learned (jax's)
                for own in ("stash", "_unbatched", "_last_jacobian"):
                    vars(view).pop(own, None)
                self._views[(layout, names)] = view
            return view

    def _request(self, kind: str, inputs: Sequence[Any], options: dict[str, Any], vectors: Any = None,
                 out_tree: Tree | None = None) -> dict[str, Any]:
        """One request of this function, by parameter (and by name) on the wire (see
        ``for_layout``)."""
        try:
            if self._layout is None:
                return self._send(kind, list(inputs), options, vectors)
            return self._layout.request(self._send, kind, inputs, options, vectors, out_tree, name=self.name)
        except InvalidInput as exc:
            hint = self._batch_hint(exc, options)
            if hint is None:
                raise
            raise with_hint(exc, hint) from None

    def _batch_hint(self, exc: InvalidInput, options: dict[str, Any]) -> str | None:
        """What to say of an input refused for one leading dimension more than declared,
        outside ``vmap``: a batch given to a function of one example. The function itself
        often broadcasts in-process (``planar_arm`` of ``(4, 3)`` angles), so a scientist
        calls the remote one as they would it; the 422 said only "expected shape (k,),
        got (4, 3)"."""
        p = exc.problem
        got, expected = p.get("got_shape"), p.get("expected_shape")
        if (p.get("field") != "inputs" or options.get("batched") or not isinstance(got, list)
                or not isinstance(expected, list) or "B" in expected or len(got) != len(expected) + 1):
            return None
        if not all(isinstance(e, str) or e == g for e, g in zip(expected, got[1:])):
            return None  # the rest does not fit either: not a batch of examples
        declared = "(" + ", ".join(map(str, expected)) + ("," if len(expected) == 1 else "") + ")"
        return (f"remote({self.name!r}) takes one example (input {p.get('path')!r} declared {declared}); for a "
                "batch, map it with vmap (torch.func.vmap, jax.vmap): one batched request")

    def _send(self, kind: str, params: list[Any], options: dict[str, Any], vectors: Any) -> dict[str, Any]:
        names = self._wire_names
        if names is None:
            return self.client._parts(kind, self.name, params, options, vectors=vectors)
        # a keyword call: the inputs, argnums and in_dims by name, for the service to place
        options = dict(options)
        if "argnums" in options:
            options["argnums"] = tuple(names[a] for a in options["argnums"])
        if isinstance(options.get("in_dims"), (tuple, list)):
            options["in_dims"] = dict(zip(names, options["in_dims"]))
        return self.client._parts(kind, self.name, params, options, vectors=vectors, names=names)

    # ----------------------------------------------------------------- keyword inputs

    def bind(self, inputs: Sequence[Any], named: dict[str, Any]) -> tuple[Any, ...]:
        """The inputs in the function's order, keyword ones placed by the names it
        declares (``arm(angles=q)``, as the function itself is called in-process), checked
        as Python checks a call. The names come from ``GET /v1/functions/{name}``, once, on
        the first keyword call; without keywords nothing is asked. Without this a keyword
        call failed with "Remade.__call__() got an unexpected keyword argument", a name the
        caller never wrote."""
        if not named:
            return tuple(inputs)
        if self._names is None:
            self._names = tuple(i.name for i in self.client.function(self.name).inputs)
        return bind_inputs(f"remote({self.name!r})", self._names, inputs, named)

    def names_of(self, named: dict[str, Any]) -> tuple[str, ...] | None:
        """The names a call's inputs go by on the wire: the function's, for a keyword call
        (after ``bind``), else None (by position). The names were asked once; the service
        may have restarted with a changed registry since (the same names in another
        order): by position, the inputs went to the wrong parameters, a wrong answer with a
        200; by name the service places them, or says which name it does not know (422)."""
        return self._names if named else None

    # ----------------------------------------------------------------- evaluate

    def evaluate(self, inputs: Sequence[Any], batch_ndim: int = 0, aux_tree: Tree | None = None,
                 shared: Sequence[bool] = ()) -> Evaluated:
        """Outputs at ``inputs`` whose first ``batch_ndim`` dimensions are batch
        dimensions (every array input has them but the ``shared`` ones, see the module
        docstring; flattened into one for the request). ``aux_tree``: one example's aux
        structure, when the caller knows it (see the module docstring; else it is looked
        up or learned)."""
        batch = _merge_batch(inputs, batch_ndim, shared)
        batch_shape, flat, batched = batch.shape, batch.flat, batch.batched
        signature = batch.signature()
        if batched and math.prod(batch_shape) == 0:
            return self._template(signature).empty(batch_shape)
        parts = self._request("evaluate", flat, batch.options())
        outputs, out_tree = flatten(parts["value"])
        outputs = [_split_batch(np.asarray(o), batch_shape) for o in outputs]
        aux: list[Any] = []
        if "aux" in parts:
            if not batched:
                aux, aux_tree = flatten(parts["aux"])
            else:
                if aux_tree is None:
                    aux_tree = self._aux_tree(signature, parts["aux"], batch)
                aux = _example_leaves(parts["aux"], aux_tree, batch_shape, self.name)
        else:
            aux_tree = None
        meta = parts.get("meta") or {}
        said = meta if batched else {}  # (unbatched: of a batch only)
        ev = Evaluated(outputs, out_tree, aux, aux_tree, _flags(said.get("unbatched"), len(outputs)),
                       _flags(said.get("aux_unbatched"), len(aux)), _flags(meta.get("bfloat16"), len(outputs)),
                       _flags(meta.get("aux_bfloat16"), len(aux)))
        self._remember(signature, _Template.of(ev, batch_ndim))
        return ev

    def _remember(self, signature: tuple[Any, ...], template: _Template) -> None:
        with self._templates_lock:
            self._templates.pop(signature, None)
            self._templates[signature] = template
            while len(self._templates) > MAX_SIGNATURES:
                del self._templates[next(iter(self._templates))]

    def _aux_tree(self, signature: tuple[Any, ...], batched_aux: Any, batch: _Batch) -> Tree:
        """One example's aux structure, for reading a batched aux."""
        known = self._templates.get(signature)
        if known is not None and known.aux_tree is not None:
            return known.aux_tree
        leaves, tree = flatten(batched_aux)
        if all(_is_array(a) for a in leaves):  # arrays are stacked either way: nothing to tell apart
            return tree
        # one example at the caller's own values (not zeros: a function may refuse those)
        example = self.evaluate(batch.first_example())
        assert example.aux_tree is not None
        return example.aux_tree

    def _template(self, signature: tuple[Any, ...]) -> _Template:
        known = self._templates.get(signature)
        if known is not None:
            return known
        try:
            ev = self.evaluate([np.zeros(shape, np.dtype(dtype)) for shape, dtype in signature])
        except APIError as exc:
            raise with_hint(exc, f"an empty batch of {self.name!r} is answered without the service, from the "
                                 "output shapes of an earlier call with the same per-example input shapes; there "
                                 "was none, and the evaluate at zeros that learns them failed (make one call "
                                 "with real inputs of these shapes first)") from exc
        return _Template.of(ev, 0)  # not read back: another thread may have evicted it already

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
        shared: Sequence[bool] = (),
        memo: dict[Any, Any] | None = None,
    ) -> list[np.ndarray]:
        """``mode="vjp"``: ``vectors`` are cotangents, one per output leaf; returns one
        gradient per ``argnums`` entry. ``mode="jvp"``: ``vectors`` are tangents, one per
        ``argnums`` entry; returns one tangent per output leaf. Inputs carry
        ``batch_ndim`` leading dimensions (but the ``shared`` ones); vectors carry
        ``len(tags)`` (see the module docstring), and so do the results: a shared
        input's gradient too, one per example (summing them is the adapter's part).
        ``memo``: one call's batched Jacobians, kept for its next product at the same
        inputs (see ``_batched_jacobian``)."""
        if mode not in ("vjp", "jvp"):
            raise ValueError(mode)
        tags = tuple(tags)
        if tags.count("p") != batch_ndim:
            raise ValueError(f"tags {tags} do not match {batch_ndim} batch dimensions of the inputs")
        lead = len(tags)
        lead_shape = np.shape(vectors[0])[:lead] if len(vectors) else ()
        if 0 in lead_shape:  # no vectors or no examples: nothing to ask
            return self._empty_linear(mode, inputs, argnums, lead_shape, batch_ndim, shared)
        # vectors' leading dims -> (p..., v...)
        order = [i for i, t in enumerate(tags) if t == "p"] + [i for i, t in enumerate(tags) if t == "v"]
        vecs = [np.asarray(v) for v in vectors]
        vecs = [np.transpose(v, order + list(range(lead, v.ndim))) for v in vecs]
        p_shape = vecs[0].shape[:batch_ndim] if vecs else ()
        v_shape = vecs[0].shape[batch_ndim:lead] if vecs else ()
        if batch_ndim == 0 and mode == "jvp" and not self._works["jvp"]:
            results = self._jvp_by_jacobian(inputs, argnums, vecs, out_tree, v_shape)
        elif batch_ndim == 0 and mode == "vjp" and not self._works["cotangents"]:
            results = self._vjp_by_jacobian(inputs, argnums, vecs, out_tree, v_shape)
        elif batch_ndim == 0 and mode == "vjp" and not self._works["vjp"] and _basis_fits(inputs, argnums):
            results = self._vjp_by_jvp(inputs, argnums, vecs, out_tree, v_shape)
        elif batch_ndim == 0:
            try:
                results = self._linear_request(mode, inputs, argnums, vecs, out_tree, v_shape)
            except InvalidInput as exc:
                if mode != "vjp" or exc.problem.get("unsupported") != "integer_output":
                    raise
                if not _basis_fits(inputs, argnums):
                    raise with_hint(exc, f"{self.name!r} has an integer output, which the service's reverse mode "
                                         "refuses; forward mode would send the basis tangents of every input "
                                         "element, too many here: return the integer output in aux (has_aux) "
                                         "instead") from None
                try:
                    results = self._vjp_by_jvp(inputs, argnums, vecs, out_tree, v_shape)
                except APIError:
                    raise exc from None  # forward mode fails too: the refusal stands
                self._works["vjp"] = False
            except PayloadTooLarge as exc:
                # more output arrays than the service takes cotangents (MAX_NPZ_MEMBERS): the
                # Jacobian needs none, contracted here (a backward through a function of 100
                # outputs was the 413 where in-process autograd answers); once per function
                if mode != "vjp" or exc.problem.get("field") != "cotangents":
                    raise
                try:
                    results = self._vjp_by_jacobian(inputs, argnums, vecs, out_tree, v_shape)
                except APIError:
                    raise exc from None
                self._works["cotangents"] = False  # the function's outputs stay as many: from now on
            except FunctionError as exc:
                if mode != "jvp" or not lacks_forward_mode(self.client, exc):
                    raise
                try:
                    results = self._jvp_by_jacobian(inputs, argnums, vecs, out_tree, v_shape)
                except APIError:
                    raise exc from None  # the function fails here whatever the mode: its own error
                self._works["jvp"] = False
                no_forward_mode(self.name, "jvp", exc, "Jacobian (reverse mode), contracted on the client")
        else:
            try:
                results = self._linear_by_jacobian(mode, inputs, argnums, vecs, out_tree, batch_ndim, p_shape,
                                                   v_shape, shared, memo)
            except InvalidInput as exc:
                results = self._refused_linear(exc, mode, inputs, argnums, vecs, out_tree, batch_ndim, p_shape,
                                               v_shape, shared)
        inverse = list(np.argsort(order))
        return [np.transpose(r, inverse + list(range(lead, r.ndim))) for r in results]

    def _refused_linear(self, exc: InvalidInput, mode: str, inputs: Sequence[Any], argnums: Sequence[int],
                        vecs: list[np.ndarray], out_tree: Tree, batch_ndim: int, p_shape: tuple[int, ...],
                        v_shape: tuple[int, ...], shared: Sequence[bool]) -> list[np.ndarray]:
        """Per-example products of a function with an integer (or boolean) output, which
        the batched Jacobian they are contracted from refuses (jacrev's refusal), where
        torch answers. Outputs all integer: torch's answers are zeros, a jvp's of the
        outputs' integer dtypes (torch.func.jvp's integer zero tangents), a vjp's of the
        inputs' (no output carries a gradient), and no request. An integer output beside
        floating ones (an index, a count): example by example, as the unbatched products
        are answered (a jvp with integer zero tangents; a vjp of the floating outputs by
        forward mode, see ``_vjp_by_jvp``), one request per example since one Jacobian
        request cannot leave the integer leaves out. So ``vmap(jacfwd(f))``, a vmapped
        ``jvp``, and ``vmap(grad(lambda x: f(x)[0]))`` were the service's 422 where torch
        answers. A complex output likewise (the batched Jacobian refuses it as jacrev
        does; the unbatched jvp and vjp, with complex cotangents, answer it), and a complex
        input (jacrev refuses any: ``vmap(grad(f))`` of a complex ``z`` was that 422)."""
        unsupported = exc.problem.get("unsupported")
        if unsupported not in ("integer_output", "complex_output", "complex_input"):
            raise exc
        batch = _merge_batch(inputs, batch_ndim, shared)
        template = self._template(batch.signature())
        lead_shape = (*p_shape, *v_shape)
        if unsupported in ("complex_output", "complex_input") or any(
                np.dtype(dtype).kind not in "biu" for _, dtype in template.outputs):
            return self._linear_per_example(mode, batch, argnums, vecs, out_tree, batch_ndim, p_shape, v_shape)
        if mode == "jvp":
            return [np.zeros((*lead_shape, *shape), dtype) for shape, dtype in template.outputs]
        return [np.zeros((*lead_shape, *batch.in_shape(a)), np.result_type(np.asarray(inputs[a]))) for a in argnums]

    def _linear_per_example(self, mode: str, batch: _Batch, argnums: Sequence[int], vecs: list[np.ndarray],
                            out_tree: Tree, batch_ndim: int, p_shape: tuple[int, ...],
                            v_shape: tuple[int, ...]) -> list[np.ndarray]:
        """``linear`` of each example at unbatched inputs (shared inputs as they are),
        stacked: results (p..., v..., shape), as ``_linear_by_jacobian`` gives them."""
        return _per_example(batch, vecs, batch_ndim, p_shape, lambda example, vs: self.linear(
            mode, example, argnums, vs, out_tree, 0, ("v",) * len(v_shape)))

    def _second_per_example(self, mode: str, batch: _Batch, vec_argnums: Sequence[int],
                            other_argnums: Sequence[int], vecs: list[np.ndarray], out_tree: Tree, batch_ndim: int,
                            p_shape: tuple[int, ...], v_shape: tuple[int, ...],
                            order: Sequence[int]) -> list[np.ndarray]:
        """``second`` of each example at unbatched inputs (shared inputs as they are),
        stacked, for a complex output: the batched Hessian it would be contracted from
        refuses it (torch.func.hessian's jacrev refuses a complex output), while each
        example's hvp (with cotangents) answers. ``vecs`` are in (p..., v...) order;
        the results go back to the caller's (``order``), as ``second`` returns them."""
        results = _per_example(batch, vecs, batch_ndim, p_shape, lambda example, vs: self.second(
            mode, example, vec_argnums, other_argnums, vs, out_tree, 0, ("v",) * len(v_shape)))
        lead = batch_ndim + len(v_shape)
        inverse = list(np.argsort(order))
        return [np.transpose(r, inverse + list(range(lead, r.ndim))) for r in results]

    def _empty_linear(self, mode: str, inputs: Sequence[Any], argnums: Sequence[int], lead_shape: tuple[int, ...],
                      batch_ndim: int, shared: Sequence[bool]) -> list[np.ndarray]:
        batch = _merge_batch(inputs, batch_ndim, shared)
        if mode == "vjp":
            return [np.zeros((*lead_shape, *batch.in_shape(a)), np.result_type(np.asarray(inputs[a]))) for a in argnums]
        template = self._template(batch.signature())
        return [np.zeros((*lead_shape, *shape), dtype) for shape, dtype in template.outputs]

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
        parts = self._request(mode, list(inputs), options, vectors=(key, vec_tree))
        leaves = _in_order(parts["value"], out_tree) if mode == "jvp" else flatten(parts["value"])[0]
        leaves = [np.asarray(r) for r in leaves]
        return [r.reshape((*v_shape, *r.shape[1:])) if many else r for r in leaves]

    def _jvp_by_jacobian(self, inputs: Sequence[Any], argnums: Sequence[int], vecs: list[np.ndarray],
                         out_tree: Tree, v_shape: tuple[int, ...]) -> list[np.ndarray]:
        """``J t`` from the Jacobian (reverse mode), for a function whose jvp fails for
        want of a forward-mode rule (a custom ``autograd.Function`` without ``jvp``): a
        double backward needs ``J u`` for its cotangent's gradient, which in-process
        reverse over reverse computes without forward mode. One example of a batched
        ``jacobian``, as per-example products are computed."""
        one = [np.asarray(x)[None] for x in inputs]
        results = self._linear_by_jacobian("jvp", one, argnums, [v[None] for v in vecs], out_tree, 1, (1,), v_shape)
        return [r[0] for r in results]

    def _vjp_by_jacobian(self, inputs: Sequence[Any], argnums: Sequence[int], vecs: list[np.ndarray],
                         out_tree: Tree, v_shape: tuple[int, ...]) -> list[np.ndarray]:
        """``c^T J`` from the Jacobian, for a function with more output arrays than a
        request may carry cotangents (``MAX_NPZ_MEMBERS``): one example of a batched
        ``jacobian``, contracted here, as ``_jvp_by_jacobian`` does for ``J t``."""
        one = [np.asarray(x)[None] for x in inputs]
        results = self._linear_by_jacobian("vjp", one, argnums, [v[None] for v in vecs], out_tree, 1, (1,), v_shape)
        return [r[0] for r in results]

    def _vjp_by_jvp(self, inputs: Sequence[Any], argnums: Sequence[int], vecs: list[np.ndarray], out_tree: Tree,
                    v_shape: tuple[int, ...]) -> list[np.ndarray]:
        """``c^T J`` from forward mode, for a function with an integer output beside its
        floating ones (an index, a count, a mask). The service's reverse mode refuses
        such a function whatever the cotangents, as ``torch.func.vjp`` does, so
        ``loss.backward()``, ``grad`` and ``jacrev`` through ``f(x)[0]`` failed with its
        422 where in-process autograd (and JAX) differentiate the floating outputs and
        leave the integer ones be. Its ``jvp`` answers (zero tangents for integer
        outputs): one request with the ``n`` basis tangents of the differentiated inputs
        (the Jacobian, ``n`` vectors of ``n`` numbers), contracted here with the
        cotangents of the floating outputs."""
        in_shapes = [tuple(np.shape(inputs[a])) for a in argnums]
        sizes = [math.prod(shape) for shape in in_shapes]
        n = sum(sizes)
        eye, starts = np.eye(n), np.cumsum([0, *sizes])
        tangents = [eye[:, start:start + size].reshape(n, *shape)
                    for start, size, shape in zip(starts, sizes, in_shapes)]
        columns = self._linear_request("jvp", inputs, argnums, tangents, out_tree, (n,))
        V = math.prod(v_shape)
        total = np.zeros((V, n))
        for c, J in zip(vecs, columns):
            J = np.asarray(J)
            if J.dtype.kind in "biu":  # an integer output: no derivative, its cotangent unused (as autograd's)
                continue
            m = math.prod(J.shape[1:])
            total = total + np.asarray(c, dtype=np.float64).reshape(V, m) @ J.reshape(n, m).astype(np.float64).T
        results = []
        for a, start, size, shape in zip(argnums, starts, sizes, in_shapes):
            dtype = np.asarray(inputs[a]).dtype
            r = total[:, start:start + size].reshape((*v_shape, *shape))
            results.append(r.astype(dtype) if dtype.kind == "f" or dtype.name == "bfloat16" else r)
        return results

    def _linear_by_jacobian(
        self, mode: str, inputs: Sequence[Any], argnums: Sequence[int], vecs: list[np.ndarray], out_tree: Tree,
        batch_ndim: int, p_shape: tuple[int, ...], v_shape: tuple[int, ...], shared: Sequence[bool] = (),
        memo: dict[Any, Any] | None = None,
    ) -> list[np.ndarray]:
        """Per-example products with batched inputs: one batched Jacobian request,
        contracted here with each example's vectors."""
        batch = _merge_batch(inputs, batch_ndim, shared)
        parts = self._batched_jacobian(batch.flat, {"argnums": tuple(argnums), **batch.options()}, out_tree, memo)
        n_out, n_arg = out_tree.num_leaves, len(argnums)
        leaves = _in_order(parts["value"], per_argnum(out_tree, n_arg))  # outputs outer, argnums inner
        if len(leaves) != n_out * n_arg:
            raise ValueError(f"unexpected Jacobian structure: {len(leaves)} blocks for {n_out} x {n_arg}")
        P = math.prod(p_shape)
        V = math.prod(v_shape)
        nb = batch_ndim + len(v_shape)
        blocks = [[np.asarray(leaves[k * n_arg + i]) for i in range(n_arg)] for k in range(n_out)]
        in_shapes = [batch.in_shape(a) for a in argnums]
        results = []
        if mode == "vjp":
            out_shapes = [v.shape[nb:] for v in vecs]
            for k in range(n_out):
                for i in range(n_arg):
                    self._check_block(blocks[k][i], (P, *out_shapes[k], *in_shapes[i]), "the Jacobian")
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
                for i in range(n_arg):  # the output's shape is the service's; the jvp's result is checked by its caller
                    self._check_block(blocks[k][i], (P, *out_shape, *in_shapes[i]), "the Jacobian")
                total = None
                for i in range(n_arg):
                    J = blocks[k][i].reshape(P, math.prod(out_shape), math.prod(in_shapes[i]))
                    t = vecs[i].reshape(P, V, math.prod(in_shapes[i])).astype(J.dtype, copy=False)
                    term = np.einsum("poi,pvi->pvo", J, t)
                    total = term if total is None else total + term
                results.append(total.reshape((*p_shape, *v_shape, *out_shape)))
        return results

    def _batched_jacobian(self, flat: Sequence[Any], options: dict[str, Any], out_tree: Tree,
                          memo: dict[Any, Any] | None) -> dict[str, Any]:
        """The batched Jacobian request's answer, or the one ``memo`` kept for the same
        options at equal inputs. One call's products share it: ``vmap(hessian(f))`` is
        ``jacfwd(jacrev(f))`` per example, whose jacrev (a vjp) and jacfwd (a jvp) each
        need this Jacobian, and asked for it twice. Kept per call, not per function, as
        in-process both are of the one call of f (a function that draws random numbers
        gets one draw), and only while the call's autograd graph holds it."""
        key = repr(sorted(options.items()))
        kept = memo.get(key) if memo is not None else None
        if kept is not None and same_arrays(kept[0], flat):
            return kept[1]
        parts = self._request("jacobian", flat, options, out_tree=out_tree)
        if memo is not None:
            memo[key] = ([np.array(x, copy=True) for x in flat], parts)
        return parts

    def _check_block(self, block: np.ndarray, expected: tuple[int, ...], what: str) -> None:
        """A block of the service's Jacobian or Hessian, before it is reshaped for a
        contraction: its shape must be the one the vectors (the output learned) say."""
        if block.shape != tuple(expected):
            raise shape_mismatch(self.name, f"a block of {what}", block.shape, expected)

    # ----------------------------------------------------------------- second derivatives

    def second(
        self,
        mode: str,
        inputs: Sequence[Any],
        vec_argnums: Sequence[int],
        other_argnums: Sequence[int],
        vectors: Sequence[np.ndarray],
        out_tree: Tree,
        batch_ndim: int = 0,
        tags: Sequence[str] = (),
        shared: Sequence[bool] = (),
    ) -> list[np.ndarray]:
        """Second-order contractions, what a derivative of a ``linear`` (a backward of the
        backward, a jvp of a vjp) needs. With ``H_k[i][j]`` output leaf ``k``'s second
        derivative in inputs ``i`` and ``j``:

        * ``mode="input"``: ``vectors`` are one cotangent ``c_k`` per output leaf, then one
          ``w_i`` per ``vec_argnums`` entry; returns, per ``other_argnums`` entry ``j``,
          ``sum_k sum_i c_k . H_k[j][i] . w_i`` (shaped like input ``j``: the hvp's
          contraction, ``H[j][i]`` the derivative in input ``i`` of the gradient in ``j``);
        * ``mode="output"``: ``vectors`` are one ``w_i`` per ``vec_argnums`` entry, then one
          ``d_j`` per ``other_argnums`` entry; returns, per output leaf ``k``,
          ``sum_i sum_j H_k[i][j] . w_i . d_j`` (shaped like output ``k``).

        Vectors and results carry ``len(tags)`` leading dimensions, as for ``linear``. One
        request: for ``"input"`` at unbatched inputs an ``hvp`` (``batched_vectors`` for
        several; a vector output's cotangents with the tangents) where it pays
        (``_hvp_pays``), else a ``hessian`` (``batched`` for batched inputs: the service has
        no hvp over examples) contracted here; ``"output"`` (``H[w, d]``, output-shaped: a
        jvp's jvp) likewise, its hvp pairing each ``w`` with each output element's basis
        cotangent (``_second_output_by_hvp``; at inputs whose output shapes this function
        has seen). A function whose hvp fails where its Hessian answers (no
        forward-mode rule) costs one more request, once (``no_forward_mode``)."""
        if mode not in ("input", "output"):
            raise ValueError(mode)
        tags = tuple(tags)
        if tags.count("p") != batch_ndim:
            raise ValueError(f"tags {tags} do not match {batch_ndim} batch dimensions of the inputs")
        lead = len(tags)
        order = [i for i, t in enumerate(tags) if t == "p"] + [i for i, t in enumerate(tags) if t == "v"]
        vecs = [np.transpose(np.asarray(v), order + list(range(lead, np.ndim(v)))) for v in vectors]
        lead_shape = vecs[0].shape[:lead]
        p_shape, v_shape = lead_shape[:batch_ndim], lead_shape[batch_ndim:]
        batch = _merge_batch(inputs, batch_ndim, shared)
        flat = batch.flat
        in_shapes = {a: batch.in_shape(a) for a in (*vec_argnums, *other_argnums)}
        n_out = out_tree.num_leaves
        P, V = math.prod(p_shape), math.prod(v_shape)
        p_lead = (P,) if batch_ndim else ()  # a batched hessian's leading dim (one request dim for every vmap level)
        if 0 in lead_shape:
            results = self._second_shapes(mode, batch, other_argnums, in_shapes)
            return [np.zeros((*lead_shape, *shape), dtype) for shape, dtype in results]
        if mode == "input":
            cots, ws = vecs[:n_out], vecs[n_out:]
            out_shapes = [c.shape[lead:] for c in cots]
            # a complex output (its cotangents complex): the service's Hessian refuses it, as
            # torch.func.hessian (jacrev) does, and its hvp of a scalar (torch's grad) too; its
            # hvp with cotangents (jvp of torch.func.vjp's pullback of them) answers it
            # a complex input likewise: torch.func.hessian refuses any, its hvp answers
            complex_out = any(np.iscomplexobj(c) for c in cots) or _complex_in(flat)
            if complex_out and batch_ndim:
                return self._second_per_example(mode, batch, vec_argnums, other_argnums, vecs, out_tree, batch_ndim,
                                                p_shape, v_shape, order)
            results, hvp_error = None, None
            # (cotangents of more arrays than the service takes: the Hessian, which needs none)
            if batch_ndim == 0 and (complex_out or self._works["cotangents"] and self._hvp_pays(
                    out_shapes, in_shapes, vec_argnums, other_argnums, V)):
                try:
                    results = self._second_by_hvp(flat, vec_argnums, other_argnums, cots, ws, v_shape, in_shapes,
                                                  out_tree)
                except PayloadTooLarge as exc:
                    if complex_out or exc.problem.get("field") != "cotangents":
                        raise
                    self._works["cotangents"] = False
                except FunctionError as exc:
                    if not lacks_forward_mode(self.client, exc):
                        raise
                    hvp_error = exc
            if results is None:
                try:
                    blocks, union = self._hessian_blocks(batch, vec_argnums, other_argnums, out_tree)
                except APIError:
                    if hvp_error is None:
                        raise
                    raise hvp_error from None  # the function fails here whatever the strategy: its own error
                if hvp_error is not None:
                    self._works["hvp"] = False
                    no_forward_mode(self.name, "hvp", hvp_error, "Hessian, contracted on the client")
                results = []
                for j in other_argnums:
                    nj = math.prod(in_shapes[j])
                    total = 0
                    for k in range(n_out):
                        c = cots[k].reshape(P, V, math.prod(out_shapes[k]))
                        for i, w in zip(vec_argnums, ws):
                            # H_k[j][i] w_i, as the hvp contracts (its tangent, the second
                            # index: jvp of the gradient), not H_k[i][j] w_i: they differ
                            # where torch.func.hessian is not symmetric (a custom Function
                            # whose jvp and backward disagree), and vmap(hessian(remote(f)))
                            # came back its transpose, 4.5 off torch's, where hessian alone
                            # (an hvp) was right
                            H = blocks[k][union.index(j)][union.index(i)]
                            self._check_block(H, (*p_lead, *out_shapes[k], *in_shapes[j], *in_shapes[i]), "the Hessian")
                            H = H.reshape(P, math.prod(out_shapes[k]), nj, math.prod(in_shapes[i]))
                            total = total + np.einsum("pvo,poba,pva->pvb", c.astype(H.dtype, copy=False), H,
                                                      w.reshape(P, V, -1).astype(H.dtype, copy=False))
                    results.append(np.asarray(total).reshape((*lead_shape, *in_shapes[j])))
        else:
            ws, ds = vecs[: len(vec_argnums)], vecs[len(vec_argnums):]
            known = self._templates.get(batch.signature())
            # a complex output: the jvp of a jvp is complex (torch.func.jvp's), which the
            # service's Hessian refuses (jacrev's refusal): from the hvp, example by example
            complex_out = known is not None and any(np.dtype(d).kind == "c" for _, d in known.outputs)
            complex_out = complex_out or _complex_in(flat)  # (the Hessian refuses a complex input too)
            if complex_out and batch_ndim:
                return self._second_per_example(mode, batch, vec_argnums, other_argnums, vecs, out_tree, batch_ndim,
                                                p_shape, v_shape, order)
            known = known if batch_ndim == 0 else None
            results, hvp_error = None, None
            out_shapes = [] if known is None else [shape for shape, _ in known.outputs]
            pairs = V * sum(math.prod(shape) for shape in out_shapes)  # each w with each output's basis vector
            if known is not None and (complex_out or self._hvp_pays(out_shapes, in_shapes, vec_argnums,
                                                                     other_argnums, pairs, scalar_always=False)):
                try:
                    results = self._second_output_by_hvp(flat, vec_argnums, other_argnums, ws, ds, v_shape, in_shapes,
                                                         out_tree, out_shapes, [np.dtype(d) for _, d in known.outputs])
                except FunctionError as exc:
                    if not lacks_forward_mode(self.client, exc):
                        raise
                    hvp_error = exc
            if results is not None:
                inverse = list(np.argsort(order))
                return [np.transpose(r, inverse + list(range(lead, r.ndim))) for r in results]
            try:
                blocks, union = self._hessian_blocks(batch, vec_argnums, other_argnums, out_tree)
            except APIError:
                if hvp_error is None:
                    raise
                raise hvp_error from None
            if hvp_error is not None:
                self._works["hvp"] = False
                no_forward_mode(self.name, "hvp", hvp_error, "Hessian, contracted on the client")
            results = []
            for k in range(n_out):
                first = blocks[k][0][0]
                n_in = len(batch.in_shape(union[0]))
                out_shape = first.shape[1 if batch_ndim else 0: first.ndim - 2 * n_in]
                total = 0
                for i, w in zip(vec_argnums, ws):
                    for j, d in zip(other_argnums, ds):
                        H = blocks[k][union.index(i)][union.index(j)]
                        self._check_block(H, (*p_lead, *out_shape, *in_shapes[i], *in_shapes[j]), "the Hessian")
                        H = H.reshape(P, math.prod(out_shape), math.prod(in_shapes[i]), math.prod(in_shapes[j]))
                        total = total + np.einsum("poab,pva,pvb->pvo", H, w.reshape(P, V, -1).astype(H.dtype, copy=False),
                                                  d.reshape(P, V, -1).astype(H.dtype, copy=False))
                results.append(np.asarray(total).reshape((*lead_shape, *out_shape)))
        inverse = list(np.argsort(order))
        return [np.transpose(r, inverse + list(range(lead, r.ndim))) for r in results]

    def _hvp_pays(self, out_shapes: Sequence[tuple[int, ...]], in_shapes: dict[int, tuple[int, ...]],
                  vec_argnums: Sequence[int], other_argnums: Sequence[int], V: int, scalar_always: bool = True) -> bool:
        """Whether ``c . H w`` goes to the service's ``hvp`` (cotangents and tangents, one
        pair per vector) rather than its ``hessian`` (contracted here): always for a
        scalar function (``c`` is a number, applied here); for a vector output, where the
        pairs' numbers on the wire, ``V (m + 2n)``, are fewer than the Hessian's ``m n^2``
        (a double backward, one pair; not ``torch.func.hessian``, whose ``m n`` pairs
        would carry the Hessian over in pieces). ``scalar_always=False`` weighs a scalar's
        pairs too (a jvp's jvp: ``jacfwd(jacfwd(f))``'s ``n^2`` pairs are the Hessian). Never
        once an hvp of this function failed where its Hessian answered (no forward-mode
        rule: see ``no_forward_mode``)."""
        if not self._works["hvp"]:
            return False
        m = sum(math.prod(s) for s in out_shapes)
        n = sum(math.prod(in_shapes[a]) for a in set(vec_argnums) | set(other_argnums))
        scalar = len(out_shapes) == 1 and out_shapes[0] == ()
        return (scalar and scalar_always) or V * (m + 2 * n) < m * n * n

    def _second_by_hvp(
        self, inputs: list[Any], vec_argnums: Sequence[int], other_argnums: Sequence[int], cots: list[np.ndarray],
        ws: list[np.ndarray], v_shape: tuple[int, ...], in_shapes: dict[int, tuple[int, ...]], out_tree: Tree,
    ) -> list[np.ndarray]:
        """``c . H w``: one hvp request (the vectors stacked, ``batched_vectors``), the
        tangents zero at the inputs only differentiated (``other_argnums``). A scalar
        function's ``c`` is a number, applied here to ``H w``; any other's cotangents go
        with the tangents (the service's ``c . H t``, forward over reverse)."""
        union = sorted(set(vec_argnums) | set(other_argnums))
        V = math.prod(v_shape)
        many = len(v_shape) > 0
        by_arg = dict(zip(vec_argnums, ws))
        tangents = []
        for a in union:
            w = by_arg.get(a)
            if w is None:
                w = np.zeros((*v_shape, *in_shapes[a]), np.asarray(inputs[a]).dtype)
            tangents.append(w.reshape((V, *in_shapes[a])) if many else w)
        # (a complex scalar's c is not applied here: its c . H w is Re(conj(c) f)'s, the service's)
        scalar = len(cots) == 1 and cots[0].shape[len(v_shape):] == () and not np.iscomplexobj(cots[0])
        vectors: list[tuple[str, Any]] = [("tangents", tuple(tangents))]
        if not scalar:
            stacked = [c.reshape((V, *c.shape[len(v_shape):])) if many else c for c in cots]
            vectors.append(("cotangents", unflatten(out_tree, stacked)))
        options = {"argnums": tuple(union), "batched_vectors": many}
        parts = self._request("hvp", list(inputs), options, vectors=vectors)
        leaves = [np.asarray(r) for r in flatten(parts["value"])[0]]
        if len(leaves) != len(union):
            raise ValueError(f"unexpected hvp structure: {len(leaves)} results for {len(union)} inputs")
        c = cots[0].reshape(V) if scalar else np.ones(V)
        out = []
        for j in other_argnums:
            r = leaves[union.index(j)].reshape(V, -1)
            out.append((c.astype(r.dtype, copy=False)[:, None] * r).reshape((*v_shape, *in_shapes[j])))
        return out

    def _second_output_by_hvp(
        self, inputs: list[Any], vec_argnums: Sequence[int], other_argnums: Sequence[int], ws: list[np.ndarray],
        ds: list[np.ndarray], v_shape: tuple[int, ...], in_shapes: dict[int, tuple[int, ...]], out_tree: Tree,
        out_shapes: list[tuple[int, ...]], out_dtypes: Sequence[np.dtype] = (),
    ) -> list[np.ndarray]:
        """``H_k[w, d]`` per output element ``k`` (a jvp's jvp: a second directional
        derivative) from one hvp: each output element's basis cotangent ``e_k`` paired with
        each ``w`` gives ``e_k . H w``, contracted here with ``d``: ``V m`` pairs of ``n``
        numbers where the Hessian is ``m n^2``. Of a complex output leaf (``out_dtypes``),
        ``e_k`` pulls back the real part's derivative (torch's pullback of ``c`` is that of
        ``Re(conj(c) f)``) and ``i e_k`` the imaginary part's: ``2 V m`` pairs, one request,
        the leaf's result in its complex dtype (torch.func.jvp's)."""
        complex_leaves = [np.dtype(d).kind == "c" for d in out_dtypes]
        m = sum(math.prod(s) for s in out_shapes)
        V = math.prod(v_shape)
        two = any(complex_leaves)
        eye = np.eye(m)
        cots, start = [], 0
        for k, shape in enumerate(out_shapes):  # the basis, split into the output's leaves: (V, m, *leaf shape)
            size = math.prod(shape)
            basis = eye[:, start:start + size].reshape(m, *shape)
            if two:  # then i e_k (a real leaf's part of it: zero, its cotangents real)
                is_complex = k < len(complex_leaves) and complex_leaves[k]
                basis = np.concatenate([basis, 1j * basis if is_complex else np.zeros_like(basis)])
            cots.append(np.broadcast_to(basis, (V, *basis.shape)))
            start += size
        pairs = 2 * m if two else m
        spread = [np.broadcast_to(w.reshape(V, 1, *w.shape[len(v_shape):]), (V, pairs, *w.shape[len(v_shape):]))
                  for w in ws]
        per = self._second_by_hvp(inputs, vec_argnums, other_argnums, cots, spread, (V, pairs), in_shapes,
                                  out_tree)
        total = 0
        for j, d, g in zip(other_argnums, ds, per):
            g = g.reshape(V, pairs, -1)
            total = total + np.einsum("vmn,vn->vm", g, d.reshape(V, -1).astype(g.dtype, copy=False))
        total = np.asarray(total)
        if two:  # Re f's and Im f's second derivatives, put together
            total = total[:, :m] + 1j * total[:, m:]
        flat_out = total.reshape((*v_shape, m))
        results, start = [], 0
        for k, shape in enumerate(out_shapes):
            size = math.prod(shape)
            r = flat_out[..., start:start + size].reshape((*v_shape, *shape))
            if two:  # a real leaf beside a complex one: real (its imaginary part is no pair's)
                r = r.astype(out_dtypes[k], copy=False) if complex_leaves[k] else r.real
            results.append(r)
            start += size
        return results

    def _hessian_blocks(
        self, batch: _Batch, vec_argnums: Sequence[int], other_argnums: Sequence[int], out_tree: Tree,
    ) -> tuple[list[list[list[np.ndarray]]], list[int]]:
        """``blocks[k][a][b]``: output leaf ``k``'s Hessian block in inputs ``union[a]`` and
        ``union[b]``, from one hessian request (batched: one per example)."""
        union = sorted(set(vec_argnums) | set(other_argnums))
        n = len(union)
        parts = self._request("hessian", batch.flat, {"argnums": tuple(union), **batch.options()}, out_tree=out_tree)
        leaves = [np.asarray(b) for b in _in_order(parts["value"], per_argnum(per_argnum(out_tree, n), n))]
        if len(leaves) != out_tree.num_leaves * n * n:
            raise ValueError(f"unexpected Hessian structure: {len(leaves)} blocks for "
                             f"{out_tree.num_leaves} x {n} x {n}")
        it = iter(leaves)
        return [[[next(it) for _ in range(n)] for _ in range(n)] for _ in range(out_tree.num_leaves)], union

    def _second_shapes(
        self, mode: str, batch: _Batch, other_argnums: Sequence[int], in_shapes: dict[int, tuple[int, ...]],
    ) -> list[tuple[tuple[int, ...], np.dtype]]:
        """Per-result (shape, dtype) without a request, for an empty set of vectors."""
        if mode == "input":
            return [(in_shapes[j], np.asarray(batch.flat[j]).dtype) for j in other_argnums]
        template = self._template(batch.signature())
        return [(shape, dtype) for shape, dtype in template.outputs]


def lacks_forward_mode(client: Any, exc: APIError) -> bool:
    """Whether a failed ``jvp`` / ``hvp`` says the function has no forward-mode rule
    (torch: "You must implement the jvp function ... forward mode AD", "Trying to use
    forward AD with ..."), the one failure the reverse-mode request is a way round: the
    problem's member ``"unsupported": "forward_mode"``, which the service sets from the
    exception torch raised. Read from the words ("forward", "jvp"), a function's own
    error that said them (``ValueError("bad jvp input")``) cost a reverse-mode request
    and a warning that the function lacked a rule it has; an engine that crashed or hung
    on the request (a ``function_error`` too) is not one either: falling back on it
    switched forward mode off for that function for good.

    A service older than the member answers the same failure without it, with torch's
    exception in the detail ("NotImplementedError: You must implement the jvp function
    ..."): read by the member alone, such a function's ``jvp``, ``hessian`` and SciPy
    ``hessp`` raised where they fell back before. Where the member is missing and the
    detail carries torch's type or words (``wire.NO_FORWARD_AD_WORDS``), the service is
    asked once (per client) whether it sets the member (``/v1/info``'s
    ``capabilities``): if it does, its absence stands; if not, the words decide."""
    if exc.problem.get("unsupported") == "forward_mode":
        return True
    detail = exc.detail
    if not (detail.startswith("NotImplementedError:") or any(w in detail for w in wire.NO_FORWARD_AD_WORDS)):
        return False  # no service would call this a missing rule: no request to ask
    return "unsupported_member" not in service_capabilities(client)


# The capabilities each client's service lists (GET /v1/info), asked once per client
_capabilities: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


def service_capabilities(client: Any) -> frozenset[str]:
    """``/v1/info``'s ``capabilities`` (``wire.CAPABILITIES``), asked once per client: none
    for a service older than the list, or one without ``/v1/info`` (404). A failure of
    the request itself (the service overloaded, a dropped connection) says nothing of
    the service: none, but asked again next time."""
    known = _capabilities.get(client)
    if known is None:
        try:
            listed = client.info().get("capabilities")
        except APIError as exc:
            if exc.status_code != 404:
                return frozenset()
            listed = None
        except JacobianServiceError:
            return frozenset()
        known = frozenset(c for c in listed if isinstance(c, str)) if isinstance(listed, list) else frozenset()
        _capabilities[client] = known
    return known


def no_forward_mode(name: str, kind: str, exc: APIError, instead: str) -> None:
    """Say once (per remote function and kind) that its ``hvp`` or ``jvp`` failed where the
    reverse-mode request answered, which takes over from now on. The service's ``hvp``
    (forward over reverse) and ``jvp`` need a forward-mode rule for every op, which a
    custom ``autograd.Function`` without ``jvp`` lacks; its ``hessian`` picks a strategy
    that runs (reverse over reverse, checked against finite differences) and its
    ``jacobian`` is reverse mode. Where that fails too, the first error is raised and
    nothing changes."""
    warnings.warn(
        f"the service's {kind} of {name!r} failed ({exc.detail}); it is computed from the service's {instead} "
        "from now on: forward mode needs a forward-mode rule for every op of the function", RuntimeWarning,
        stacklevel=3)


def _is_coroutine(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def _example_leaves(batched_aux: Any, tree: Tree, batch_shape: tuple[int, ...], name: str) -> list[Any]:
    """The leaves of a batched aux, read against one example's structure ``tree`` (see
    the module docstring)."""
    n = math.prod(batch_shape)
    leaves: list[Any] = []

    def mismatch() -> ValueError:
        return ValueError(f"the batched aux of {name!r} does not have the structure of one example's aux "
                          "(does the function return a differently shaped aux for different values?)")

    def leaf(node: Any) -> Any:
        if isinstance(node, np.ndarray):
            if node.ndim == 0 or node.shape[0] != n:
                raise mismatch()
            return _split_batch(node, batch_shape)
        if isinstance(node, (tuple, list)):  # the service looped: one value per example
            if len(node) != n or any(isinstance(v, (tuple, list, dict, np.ndarray)) for v in node):
                raise mismatch()
            if all(is_number(v) for v in node):
                return np.asarray(node).reshape(batch_shape)
            return node[0] if all(v == node[0] for v in node) else tuple(node)
        if isinstance(node, dict):
            raise mismatch()
        if is_number(node):  # computed once for the whole batch
            return np.full(batch_shape, node)
        return node

    def walk(node: Any, spec: Tree) -> None:
        if spec.kind == "leaf":
            leaves.append(leaf(node))
        elif spec.kind == "dict":
            if not isinstance(node, dict) or set(node) != set(spec.keys):
                raise mismatch()
            for key, child in zip(spec.keys, spec.children):
                walk(node[key], child)
        else:
            if not isinstance(node, (tuple, list)) or len(node) != len(spec.children):
                raise mismatch()
            for sub, child in zip(node, spec.children):
                walk(sub, child)

    walk(batched_aux, tree)
    return leaves


@dataclass(frozen=True)
class _Batch:
    """A request's inputs: ``flat`` with one leading batch dimension (the ``shape`` of
    the adapter's batch dimensions, merged), but the ``shared`` ones, sent once."""

    shape: tuple[int, ...]  # () unbatched
    flat: list[Any]
    shared: tuple[bool, ...]
    batched: bool

    def is_shared(self, i: int) -> bool:
        return i < len(self.shared) and self.shared[i]

    def in_shape(self, i: int) -> tuple[int, ...]:
        """One example's shape of input ``i``."""
        return np.shape(self.flat[i])[1 if self.batched and not self.is_shared(i) else 0:]

    def signature(self) -> tuple[Any, ...]:
        """One example's input shapes and dtypes."""
        # the dtype itself, not its .str: ml_dtypes' bfloat16 (JAX's, and torch's, see
        # torch._host) is '<V2' there, which np.dtype reads back as void, not bfloat16
        return tuple((self.in_shape(i), np.asarray(a).dtype) for i, a in enumerate(self.flat))

    def options(self) -> dict[str, Any]:
        """``batched``, and vmap's ``in_dims`` where an input is shared (0 is the default)."""
        if not self.batched:
            return {"batched": False}
        if not any(self.is_shared(i) for i in range(len(self.flat))):
            return {"batched": True}
        return {"batched": True, "in_dims": tuple(None if self.is_shared(i) else 0 for i in range(len(self.flat)))}

    def first_example(self) -> list[Any]:
        return [np.asarray(a) if self.is_shared(i) else np.asarray(a)[0] for i, a in enumerate(self.flat)]


def same_arrays(kept: Sequence[np.ndarray], flat: Sequence[Any]) -> bool:
    """The inputs a kept answer was for, equal to these (shapes, dtypes, values; a NaN
    equal to a NaN where it stands)."""
    if len(kept) != len(flat):
        return False
    for a, b in zip(kept, flat):
        b = np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
            return False
    return True


def _merge_batch(inputs: Sequence[Any], batch_ndim: int, shared: Sequence[bool] = ()) -> _Batch:
    """Inputs with ``batch_ndim`` leading batch dims (none where ``shared``) -> one
    leading batch dim."""
    if batch_ndim == 0:
        return _Batch((), list(inputs), (), False)
    shared = tuple(bool(s) for s in shared) + (False,) * (len(inputs) - len(shared))
    arrays = [np.asarray(x) for x in inputs]
    carried = [a for a, s in zip(arrays, shared) if not s]
    if not carried:
        raise ValueError("a batch needs one input that is not shared (vmap: at least one input mapped)")
    batch_shape = carried[0].shape[:batch_ndim]
    # a shared input goes as it came (a plain number stays one)
    flat = [x if s else a.reshape((math.prod(batch_shape), *a.shape[batch_ndim:]))
            for x, a, s in zip(inputs, arrays, shared)]
    return _Batch(batch_shape, flat, shared, True)


def _split_batch(arr: Any, batch_shape: tuple[int, ...]) -> Any:
    if not batch_shape:
        return arr
    arr = np.asarray(arr)
    return arr.reshape((*batch_shape, *arr.shape[1:]))


def _complex_in(flat: Sequence[Any]) -> bool:
    """Whether any input array is complex: the service's ``jacobian`` and ``hessian``
    refuse the function then (torch.func's jacrev and jacfwd check every argument), its
    ``vjp``, ``jvp`` and ``hvp`` answer."""
    return any(isinstance(x, np.ndarray) and x.dtype.kind == "c" for x in flat)
