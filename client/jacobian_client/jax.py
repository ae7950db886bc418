"""Remote functions inside JAX transformations (the ``jax`` extra).

::

    import jax
    from jacobian_client import Client
    from jacobian_client.jax import remote

    arm = remote(Client("http://localhost:8000"), "planar_arm")
    loss = lambda q: jnp.sum((arm(q) - target) ** 2)
    jax.jit(jax.grad(loss))(q)      # 1 evaluate + 1 vjp request per call

``remote(client, name)`` works under ``jit``, ``grad`` / ``vjp``, ``jvp`` / ``jacfwd`` /
``jacrev``, ``hessian`` and ``vmap``, composed in any order (up to second derivatives).

Why primitives, not ``custom_vjp`` / ``custom_jvp``: a ``custom_vjp`` function cannot be
differentiated in forward mode (``jax.jvp`` raises), and a ``custom_jvp`` whose tangent is
computed by a ``pure_callback`` cannot be transposed, so ``grad`` fails. Two primitives
(as tesseract-jax does) give all of them:

* ``remote_eval``: the outputs. Its JVP rule binds ``remote_linear`` (mode ``jvp``),
  which is linear in the tangents;
* ``remote_linear``'s transpose rule binds ``remote_linear`` in mode ``vjp``. So
  ``jax.jvp`` costs one jvp request and ``jax.grad`` one vjp request, each on top of the
  evaluate request;
* batching rules send ``vmap`` to the service's batched endpoints: ``vmap(f)`` is one
  ``evaluate`` with ``batched=true``; vmap over tangents / cotangents (``jacfwd``,
  ``jacrev``) is one jvp / vjp request with ``batched_vectors=true``; vmap over the
  inputs of a derivative (``vmap(grad(f))``) is one batched ``jacobian`` request,
  contracted on the client. An input ``vmap`` leaves unbatched (``in_axes=(0, None)``:
  weights every example shares) is sent once, the request's ``in_dims`` saying so, not
  copied per example; an output of such inputs alone (and a derivative of such outputs
  in them) comes back unbatched, as jax's
  (see ``_unbatched``);
* second derivatives (``jax.hessian``, ``grad`` of ``grad``): ``remote_linear``'s JVP in
  the inputs binds ``remote_second`` (``c . H dx`` for a vjp, ``H[t, dx]`` for a jvp), one
  ``hvp`` request (``c . H dx`` at unbatched inputs, cotangents with the tangents for a
  vector output) or ``hessian`` request (contracted on the client; see ``RemoteOps.second``); it is bilinear in its two vector groups, and its
  transpose in either is ``remote_second`` again. Third derivatives raise;
* each primitive lowers to ``jax.pure_callback``, so ``jit`` works.

A pytree parameter (a dict of arrays, declared with ``tree=``) is taken as the function
takes it (``jax.grad(loss)(params, x)``: the gradient a dict like ``params``): each leaf is
one operand of the primitives, and requests carry the parameter nested (see
``jacobian_client._params``).

JAX needs output shapes before it runs anything. The first call with a new input
signature (shapes and dtypes) learns them with one ``evaluate``: at the caller's own
values whenever they are known (plain calls, ``grad`` / ``jvp`` / ``vmap`` outside
``jit``: under ``vmap`` the batch's first example), and then a ``grad`` reuses that answer
for its forward; only under ``jit``, where inputs are abstract, at zeros of those shapes
(a *probe*; pass ``out_shape=`` to skip it, or make one call outside ``jit`` first). A
function that cannot take zeros (``1/x``, a Cholesky factor) then fails with its own error
class, the message saying it was the probe. Outputs come back in the dtype the service
computed in, canonicalised for JAX as the call is traced (float64 needs ``jax_enable_x64``, as it
is then: not when ``remote()`` was made), except that inputs
all bfloat16 (which the service computes in float32) or all float16 get their dtype back,
as jax would give it (a Python float beside them, weakly typed, takes no part); a result whose shape is not the one learned raises rather than
being reshaped.

Aux (``has_aux`` functions): arrays and plain numbers (bool, int, float) are live values,
computed at every call and traced like outputs; numbers come back as 0-d arrays (``float(a)``
makes one a Python number again), under a batch as arrays of the batch's shape. Other plain
values (strings, None) cannot be traced: they are fixed per input signature, as learned,
and each call checks that the function still returns the same, raising if it does not.

Errors: outside ``jit`` a failed request raises the SDK's own error (``InvalidInput``,
``FunctionError``...). Under ``jit`` the request runs inside a ``pure_callback`` and XLA
turns any exception there into ``jax.errors.JaxRuntimeError`` (``INTERNAL: CpuCallback
error``), whose message ends with the SDK error's class and text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax.extend.core import Primitive
from jax.experimental import io_callback
from jax.interpreters import ad, batching, mlir

from ._errors import (APIError, Forbidden, FunctionNotFound, FunctionQuarantined, InvalidInput, Overloaded,
                      Unauthorized, Unavailable)
from ._params import split_params
from ._remote import (MAX_SIGNATURES, Evaluated, Remade, RemoteOps, Tree, flatten, float32_stands_for, is_number,
                      leaves_like, same_arrays, shape_mismatch, unflatten, with_hint)

__all__ = ["remote"]


def remote(client: Any, name: str, *, out_shape: Any = None) -> Callable[..., Any]:
    """A JAX-traceable callable for the remote function ``name`` (``client``: a
    :class:`jacobian_client.Client`). ``out_shape``: the output's structure with
    ``jax.ShapeDtypeStruct`` leaves, to skip the shape probe (functions without aux; it
    applies to every input signature)."""
    base_ops = _Ops(client, name)
    known: dict[Any, _Shapes] = {}
    # out_shape's dtypes, and the shapes learned, as JAX canonicalizes them when the call is
    # traced (float64 is float32 without x64), not when remote() was made: a module-level
    # remote(..., out_shape=float64) made before jax_enable_x64 was switched on cut every
    # later result to float32, silently (and shapes learned with x64 off held after it)
    given: dict[bool, _Shapes] = {}

    def fn(*inputs: Any, **named: Any) -> Any:
        inputs = base_ops.bind(inputs, named)  # by name too: the names asked once, on the first keyword call
        # a pytree parameter (a dict of arrays, what jax.grad differentiates as one) goes in
        # leaf by leaf: a primitive takes arrays
        leaves, layout = split_params(inputs)
        ops = base_ops.for_layout(layout, base_ops.names_of(named))  # a keyword call goes by name (torch's remote)
        arrays = [jnp.asarray(x) if not isinstance(x, jax_core.Tracer) else x for x in leaves]
        x64 = bool(jax.config.jax_enable_x64)
        key = (layout, x64, *((tuple(a.shape), jnp.dtype(a.dtype).name, _is_weak(a)) for a in arrays))
        traced = any(isinstance(a, jax_core.Tracer) for a in arrays)
        if out_shape is not None and x64 not in given:
            given[x64] = _shapes_from_struct(out_shape)
        shapes = given.get(x64) or known.get(key)
        if shapes is None:
            values, whole = _values_of(arrays)
            if values is not None:
                ev = ops.evaluate(values)
                shapes = known[key] = _Shapes.from_evaluated(ev, _low_precision(arrays))
                if not traced:  # concrete inputs: this evaluation is the answer
                    return shapes.rebuild([jnp.asarray(v) for v in shapes.host_values(ev, ops.name)])
                if whole:  # grad / jvp outside jit: their forward asks for these very values next
                    ops.stash = (values, 0, (), ev)
            else:
                shapes = known[key] = _probe(ops, arrays)
        flat = remote_eval_p.bind(*arrays, ops=ops, shapes=shapes, batch_ndim=0, shared=())
        return shapes.rebuild(flat)

    fn.__name__ = fn.__qualname__ = f"remote_{name}"
    fn.__doc__ = f"The remote function {name!r}, traceable by jax.jit, grad, jvp and vmap."
    return Remade(fn, remote, (client, name), {"out_shape": out_shape})


class _Ops(RemoteOps):
    """RemoteOps with a one-shot answer kept for the forward that follows a request made
    at the caller's own values (the shapes learned, or which outputs a batch leaves
    unbatched), so it costs no extra request."""

    stash: tuple[list[np.ndarray], int, tuple[bool, ...], Evaluated] | None = None

    def evaluate_cached(self, inputs: Sequence[np.ndarray], batch_ndim: int, aux_tree: Tree | None,
                        shared: tuple[bool, ...] = ()) -> Evaluated:
        stash, self.stash = self.stash, None  # one use at most: never an answer for later values
        if stash is not None and (stash[1], stash[2]) == (batch_ndim, tuple(shared)) and same_arrays(stash[0], inputs):
            return stash[3]
        return self.evaluate(inputs, batch_ndim, aux_tree, shared)

    def last_jacobian(self) -> _LastJacobian:
        """The batched Jacobian the last per-example product asked for, for the next one
        (``RemoteOps.linear``'s memo). Outside ``jit``, ``vmap(hessian(f))`` binds
        jacfwd's jvp of the forward and jacrev's vjp, one after the other at the same
        inputs, and each asked the service for the same Jacobian (torch's adapter keeps
        it per call; a JAX primitive has no call to keep it on: its function is pure, as
        a ``pure_callback``'s must be, so equal inputs are the same Jacobian). Any other
        request of these ops drops it."""
        memo = vars(self).get("_last_jacobian")
        if memo is None:
            memo = vars(self).setdefault("_last_jacobian", _LastJacobian())
        return memo

    def _request(self, kind: str, inputs: Sequence[Any], options: dict[str, Any], vectors: Any = None,
                 out_tree: Tree | None = None) -> dict[str, Any]:
        if kind != "jacobian":  # the products that share a Jacobian come one after the other
            vars(self).get("_last_jacobian", {}).clear()
        return super()._request(kind, inputs, options, vectors, out_tree)

    def unbatched_of(self, key: Any) -> tuple[bool, ...] | None:
        """The flags ``_unbatched`` learned for ``key`` (a per-example signature), if any."""
        return vars(self).get("_unbatched", {}).get(key)

    def note_unbatched(self, key: Any, flags: tuple[bool, ...]) -> None:
        """Remember ``_unbatched``'s flags, as many signatures as the templates (oldest
        dropped first: a caller cycling through shapes does not grow it without end), one
        writer at a time (threads sharing a remote function)."""
        with self._templates_lock:
            learned = vars(self).setdefault("_unbatched", {})
            learned.pop(key, None)
            learned[key] = flags
            while len(learned) > MAX_SIGNATURES:
                del learned[next(iter(learned))]


class _LastJacobian(dict):
    """At most one batched Jacobian (``RemoteOps._batched_jacobian``'s memo: ``get`` and
    ``[key] =``), given back once: the second product of a pair takes it, and nothing
    holds it after (a remote function keeps no Jacobian past its next request)."""

    def get(self, key: Any, default: Any = None) -> Any:
        kept = self.pop(key, default)
        self.clear()
        return kept

    def __setitem__(self, key: Any, value: Any) -> None:
        self.clear()
        super().__setitem__(key, value)


def _values_of(arrays: Sequence[Any]) -> tuple[list[np.ndarray] | None, bool]:
    """Real input values for learning the output shapes: ``(values, whole)``, ``whole``
    False when they are one example of a ``vmap`` batch; ``(None, False)`` when any input
    is abstract (``jit``) or the batch is empty."""
    values, whole = [], True
    for a in arrays:
        v, w = _value_of(a)
        if v is None:
            return None, False
        values.append(v)
        whole = whole and w
    return values, whole


def _value_of(x: Any) -> tuple[np.ndarray | None, bool]:
    if not isinstance(x, jax_core.Tracer):
        return np.asarray(x), True
    # JAX's own notion of a concrete tracer (grad's and jvp's over concrete values); these
    # are internal APIs, so any failure here only means falling back to the probe at zeros
    try:
        from jax._src import core as _core
        from jax._src.interpreters import batching as _batching

        concrete = _core.to_concrete_value(x)
        if concrete is not None:
            return np.asarray(concrete), True
        if isinstance(x, _batching.BatchTracer):
            inner, whole = _value_of(x.val)
            dim = x.batch_dim
            if inner is None or dim is None:
                return inner, whole
            if not isinstance(dim, int) or inner.shape[dim] == 0:
                return None, False
            return np.take(inner, 0, axis=dim), False
        primal = getattr(x, "primal", None)
        if primal is not None:
            return _value_of(primal)
    except Exception:
        pass
    return None, False


def _low_precision(arrays: Sequence[Any]) -> Any:
    """bfloat16 comes back float32 (the service computes it so), float16 wherever the
    service upcasts: when every floating input that takes part in jax's promotion has one
    such dtype, float32 results are given it back, as jax would compute them; beside
    another floating dtype, jax's promotion decides and the service's dtype stands. A
    weakly typed input (a Python float: ``f(1.5, x)``, traced or not) takes no part, as in
    jax (``1.5 * x`` of a bfloat16 ``x`` is bfloat16), where it was counted, and the
    service's float32 answered for jax's bfloat16."""
    floating = {jnp.dtype(a.dtype) for a in arrays if jnp.issubdtype(a.dtype, jnp.floating) and not _is_weak(a)}
    low = floating.pop() if len(floating) == 1 else None
    return low if low in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else None


def _is_weak(a: Any) -> bool:
    """Whether jax holds ``a`` weakly typed (made from a Python scalar), traced or not."""
    return bool(getattr(getattr(a, "aval", a), "weak_type", False))


# Failures of the probe that say nothing of the function at zeros: no such function, the
# service busy or restarting (429, a 503 other than a quarantine, which a crash at zeros
# may have earned), a key refused. The probe's hint (pass out_shape=, call it outside jit
# first) sent a caller whose service was restarting off to change working code.
_NOT_THE_ZEROS = (FunctionNotFound, Overloaded, Unauthorized, Forbidden)


def _not_the_zeros(exc: APIError) -> bool:
    return isinstance(exc, _NOT_THE_ZEROS) or (isinstance(exc, Unavailable) and not isinstance(exc, FunctionQuarantined))


def _probe(ops: RemoteOps, arrays: Sequence[Any]) -> _Shapes:
    """The output shapes under ``jit``: one evaluate at zeros of the input shapes."""
    try:
        ev = ops.evaluate([np.zeros(a.shape, a.dtype) for a in arrays])
    except APIError as exc:
        if _not_the_zeros(exc):  # no probe could help: say only that
            raise
        shapes = ", ".join(f"{jnp.dtype(a.dtype).name}{list(a.shape)}" for a in arrays)
        raise with_hint(exc, f"jacobian_client.jax: {ops.name!r} failed in the shape probe, an evaluate at zeros "
                             f"({shapes}) that learns the output shapes when the inputs have no values yet "
                             "(under jax.jit); pass out_shape= to remote() (functions without aux), or call it "
                             "once outside jit with real inputs of these shapes first") from exc
    return _Shapes.from_evaluated(ev, _low_precision(arrays))


# --------------------------------------------------------------------------- shapes


_LIVE = object()  # an aux leaf held in the primitive's results (an array or a number)


@dataclass(frozen=True)
class _Shapes:
    """Output structure: ``structs`` for the output leaves then the live aux leaves
    (arrays and numbers); ``aux_static`` per aux leaf: ``_LIVE``, or the value of a
    non-numeric one (a string, None), fixed per signature."""

    structs: tuple[jax.ShapeDtypeStruct, ...]
    n_out: int
    out_tree: Tree
    aux_tree: Tree | None
    aux_static: tuple[Any, ...]

    def _key(self) -> tuple[Any, ...]:  # primitive parameters must hash and compare (jit's cache)
        structs = tuple((s.shape, str(s.dtype)) for s in self.structs)
        static = tuple("<live>" if v is _LIVE else repr(v) for v in self.aux_static)
        return (structs, self.n_out, self.out_tree, self.aux_tree, static)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Shapes) and self._key() == other._key()

    @classmethod
    def from_evaluated(cls, ev: Evaluated, low: Any = None) -> _Shapes:
        """``low``: the inputs' one low precision (see _low_precision), which float32
        results are given back as."""
        live = [(a, ev.bfloat16, i) for i, a in enumerate(ev.outputs)] + \
            [(a, ev.aux_bfloat16, i) for i, a in enumerate(ev.aux) if _is_live(a)]

        # the service's bfloat16 (torch's promotion) is jax's only where the inputs are bfloat16
        # alone: jax promotes a strong float32 beside a bfloat16 x to float32, torch keeps bfloat16
        bfloat16 = low if low == jnp.dtype(jnp.bfloat16) else None

        def dtype(a: Any, flags: list[bool] | None, i: int) -> Any:
            got = np.asarray(a).dtype
            as_dtype = float32_stands_for(flags, i, low, bfloat16) if got == np.float32 else None
            return as_dtype if as_dtype is not None else jax.dtypes.canonicalize_dtype(got)

        structs = tuple(jax.ShapeDtypeStruct(np.shape(a), dtype(a, flags, i)) for a, flags, i in live)
        static = tuple(_LIVE if _is_live(a) else a for a in ev.aux)
        return cls(structs, len(ev.outputs), ev.out_tree, ev.aux_tree, static)

    def batched(self, size: int) -> _Shapes:
        structs = tuple(jax.ShapeDtypeStruct((size, *s.shape), s.dtype) for s in self.structs)
        return _Shapes(structs, self.n_out, self.out_tree, self.aux_tree, self.aux_static)

    def host_values(self, ev: Evaluated, name: str) -> list[np.ndarray]:
        """The outputs and live aux of ``ev`` as the arrays ``structs`` promise, checked:
        a result that does not match what was learned raises instead of being reshaped
        or silently replaced."""
        live = list(ev.outputs) if ev.out_tree == self.out_tree else leaves_like(
            unflatten(ev.out_tree, ev.outputs), self.out_tree)  # out_shape= may list a dict's keys in another order
        if live is None:
            raise ValueError(f"remote function {name!r} returned an output of another structure than learned "
                             f"({ev.out_tree} for {self.out_tree})")
        if self.aux_tree is not None:  # out_shape= describes no aux: any aux is not asked for
            if ev.aux_tree != self.aux_tree:
                raise ValueError(f"remote function {name!r} returned an aux of another structure than learned "
                                 f"({ev.aux_tree} for {self.aux_tree})")
            for i, (value, static) in enumerate(zip(ev.aux, self.aux_static)):
                if static is _LIVE:
                    live.append(value)
                elif not _same(value, static):
                    raise ValueError(
                        f"remote function {name!r}: aux leaf {i} is {value!r}, but was {static!r} when its shapes "
                        "were learned; under jax transformations non-numeric aux values (strings, None) are fixed "
                        "per input signature (only arrays and numbers are traced)")
        out = []
        for i, (value, struct) in enumerate(zip(live, self.structs)):
            arr = np.asarray(value)
            if arr.shape != struct.shape:
                what = f"output {i}" if i < self.n_out else f"aux array {i - self.n_out}"
                raise shape_mismatch(name, what, arr.shape, struct.shape)
            if i >= self.n_out and not np.can_cast(arr.dtype, struct.dtype, "same_kind"):
                raise ValueError(f"remote function {name!r} returned aux {i - self.n_out} as {arr.dtype}, "
                                 f"learned as {struct.dtype} (a number that changed kind, e.g. an int then a "
                                 "float?)")
            out.append(arr.astype(struct.dtype, copy=False))
        return out

    def rebuild(self, flat: Sequence[Any]) -> Any:
        out = unflatten(self.out_tree, list(flat[: self.n_out]))
        if self.aux_tree is None:
            return out
        live = iter(flat[self.n_out:])
        aux = [next(live) if static is _LIVE else static for static in self.aux_static]
        return out, unflatten(self.aux_tree, aux)


def _is_live(leaf: Any) -> bool:
    return isinstance(leaf, np.ndarray) or is_number(leaf)


def _same(value: Any, static: Any) -> bool:
    try:
        return type(value) is type(static) and bool(value == static)
    except Exception:  # a comparison that does not give one bool
        return False


def _shapes_from_struct(out_shape: Any) -> _Shapes:
    """``out_shape`` (a pytree of ShapeDtypeStruct) -> _Shapes."""
    def as_numpy(tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree,
                                      is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct))

    outputs, out_tree = flatten(as_numpy(out_shape))
    return _Shapes.from_evaluated(Evaluated(outputs, out_tree, [], None))


# --------------------------------------------------------------------------- primitives


remote_eval_p = Primitive("remote_eval")
remote_eval_p.multiple_results = True
remote_linear_p = Primitive("remote_linear")
remote_linear_p.multiple_results = True


@dataclass(frozen=True)
class _Linear:
    """Parameters of ``remote_linear``: ``mode`` ``"jvp"`` (vectors: one tangent per
    ``argnums`` entry; results: one per output) or ``"vjp"`` (vectors: one cotangent per
    output; results: one per ``argnums`` entry). ``tags``: the vectors' leading dims."""

    mode: str
    argnums: tuple[int, ...]
    n_inputs: int
    result_structs: tuple[jax.ShapeDtypeStruct, ...]
    batch_ndim: int = 0
    tags: tuple[str, ...] = ()
    shared: tuple[bool, ...] = ()  # per input, under a batch: it carries no batch dims (see _add_level)
    idle: tuple[bool, ...] = ()  # vjp, per output: no cotangent came for it (zeros sent; see _result_dims)

    def __hash__(self) -> int:
        return hash((self.mode, self.argnums, self.n_inputs, tuple((s.shape, str(s.dtype)) for s in self.result_structs),
                     self.batch_ndim, self.tags, self.shared, self.idle))


# ---- evaluation


def _eval_host(ops: _Ops, shapes: _Shapes, batch_ndim: int, shared: tuple[bool, ...], *args: Any) -> list[np.ndarray]:
    ev = ops.evaluate_cached([np.asarray(a) for a in args], batch_ndim, shapes.aux_tree, shared)
    return shapes.host_values(ev, ops.name)


def _eval_impl(*args: Any, ops: RemoteOps, shapes: _Shapes, batch_ndim: int, shared: tuple[bool, ...]) -> list[Any]:
    return [jnp.asarray(a) for a in _eval_host(ops, shapes, batch_ndim, shared, *args)]


def _result_avals(structs: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """The avals of a primitive's results: its structs' shapes and dtypes, varying over
    every manual mesh axis (``shard_map``'s, ``check_vma``) any of its operands varies
    over, as jax's own primitives type theirs. Typed invariant, a result of device-varying
    inputs was taken for replicated: ``shard_map(f, in_specs=P("d"), out_specs=P())`` kept
    the first shard's values, silently, where in-process it refuses, and ``grad`` through
    ``shard_map`` failed ("Expected cotangent type float64[3]{V:d} but got float64[3]")."""
    avals = [jax_core.ShapedArray(s.shape, s.dtype) for s in structs]
    varying = [a for a in map(_typeof, args) if _varying(a)]
    if not varying:
        return avals
    axes = frozenset().union(*(_varying(a) for a in varying))
    first = varying[0]
    if hasattr(first, "manual_axis_type"):  # jax >= 0.9: the axes are part of the sharding's type
        from jax.sharding import NamedSharding, PartitionSpec

        mat = first.manual_axis_type.update(varying=axes)
        return [a.update(sharding=NamedSharding(first.sharding.mesh, PartitionSpec()), manual_axis_type=mat)
                for a in avals]
    return [a.update(vma=axes) for a in avals]  # jax 0.6 to 0.8


def _invariant_as(grads: Sequence[Any], targets: Sequence[Any]) -> list[Any]:
    """Cotangents of ``targets`` (undefined primals of a transpose): summed over the mesh
    axes a cotangent varies over and its target does not (a weight every shard shares,
    beside a device-varying input), as the transpose of jax's own ``pvary`` sums them."""
    out = []
    for g, t in zip(grads, targets):
        extra = _varying(_typeof(g)) - _varying(t.aval)
        out.append(jax.lax.psum(g, tuple(sorted(extra))) if extra else g)
    return out


def _varying(aval: Any) -> frozenset[Any]:
    """The manual mesh axes ``aval`` varies over (none before jax tracked them)."""
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def _typeof(x: Any) -> Any:
    """The aval of a value or tracer (an aval is its own): ``jax.typeof`` where jax has it
    (``jax.core.get_aval`` is gone since 0.10)."""
    if isinstance(x, jax_core.AbstractValue):
        return x
    typeof = getattr(jax, "typeof", None)
    return typeof(x) if typeof is not None else jax_core.get_aval(x)


def _zeros_like(outs: Sequence[Any]) -> list[Any]:
    """Symbolic zero tangents of a primitive's results, typed as they are."""
    return [ad.Zero(_typeof(o).to_tangent_aval()) for o in outs]


def _eval_abstract(*args: Any, ops: RemoteOps, shapes: _Shapes, batch_ndim: int, shared: tuple[bool, ...]) -> list[Any]:
    return _result_avals(shapes.structs, args)


def _eval_lowered(*args: Any, ops: RemoteOps, shapes: _Shapes, batch_ndim: int, shared: tuple[bool, ...]) -> Any:
    return _callback(partial(_eval_host, ops, shapes, batch_ndim, shared), shapes.structs, *args)


def _callback(host: Any, structs: Sequence[Any], *args: Any) -> Any:
    """A primitive under ``jit``: a host callback, whose answer is checked against the
    shapes learned (at zeros, or an earlier call) as it comes. XLA runs no pure callback
    for a result without elements (it knows its value) nor for one whose results go
    unused: a function whose output was empty at zeros and is not at the caller's values
    (``x[x > 0]``, which in-process ``jit`` cannot trace) answered ``jit(f)`` with ``[]`` and
    ``jit(vmap(f))`` with ``(2, 0)``, asking nothing. A callback with a result without
    elements is an ``io_callback`` (XLA keeps it), so the check runs: one request. No JAX
    effect is declared (``checkpoint`` and ``vmap`` of ``cond`` refuse effects), so JAX's
    own DCE still drops an unused one (see ``_linear_batch`` for ``jacrev``'s)."""
    if any(0 in s.shape for s in structs):
        return io_callback(host, list(structs), *args)
    return jax.pure_callback(host, list(structs), *args)


def _is_float(x: Any) -> bool:
    """Whether an input is differentiated: floating, or complex (an input the function
    declares complex64 / complex128, whose tangents were taken for zeros: jax.grad of a
    remote complex input answered 0 silently)."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _eval_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
              batch_ndim: int, shared: tuple[bool, ...]) -> tuple[list[Any], list[Any]]:
    out = remote_eval_p.bind(*primals, ops=ops, shapes=shapes, batch_ndim=batch_ndim, shared=shared)
    argnums = tuple(i for i, (p, t) in enumerate(zip(primals, tangents))
                    if not isinstance(t, ad.Zero) and _is_float(p))
    zeros = _zeros_like(out)
    aux_zeros = zeros[shapes.n_out:]
    if not argnums:
        return out, zeros
    lin = _Linear("jvp", argnums, len(primals), shapes.structs[: shapes.n_out], batch_ndim, ("p",) * batch_ndim,
                  shared)
    # a shared input's tangent is shaped like it; the jvp's vectors carry every batch dim
    batch_shape = next((jnp.shape(p)[:batch_ndim] for i, p in enumerate(primals) if not _is_shared(shared, i)), ())
    spread = [jnp.broadcast_to(tangents[i], (*batch_shape, *jnp.shape(tangents[i])))
              if batch_ndim and _is_shared(shared, i) else tangents[i] for i in argnums]
    tangents_out = remote_linear_p.bind(*primals, *spread, ops=ops, shapes=shapes, lin=lin)
    # an integer output (indices, counts) has no tangent: JAX's is a symbolic zero of dtype
    # float0, as jax.jvp gives it in-process (the service answers integer zeros for it)
    tangents_out = [t if jnp.issubdtype(s.dtype, jnp.inexact) else zero
                    for t, s, zero in zip(tangents_out, shapes.structs, zeros)]
    return out, tangents_out + aux_zeros


def _eval_batch(args: Sequence[Any], dims: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
                batch_ndim: int, shared: tuple[bool, ...]) -> tuple[list[Any], list[Any]]:
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if size == 0:  # an empty batch: nothing to ask, and the shapes are known
        return [jnp.zeros(s.shape, s.dtype) for s in shapes.batched(0).structs], [0] * len(shapes.structs)
    moved, now_shared = _add_level(args, dims, size, batch_ndim, shared)
    flags = _unbatched(ops, shapes, moved, batch_ndim + 1, now_shared)
    out = remote_eval_p.bind(*moved, ops=ops, shapes=shapes.batched(size), batch_ndim=batch_ndim + 1, shared=now_shared)
    # an output of no mapped input (shared weights' alone, a constant) is unbatched, as jax's
    # vmap leaves it for f in-process (out_axes=None takes it); its examples are equal
    out_dims: list[Any] = [None if f else 0 for f in flags]
    return [o[0] if d is None else o for o, d in zip(out, out_dims)], out_dims


def _unbatched(ops: _Ops, shapes: _Shapes, xs: Sequence[Any], batch_ndim: int,
               shared: tuple[bool, ...]) -> tuple[bool, ...]:
    """Per output (then live aux) leaf, whether a batch leaves it unbatched: it depends on
    no mapped input, as the service's vmap finds (the batched evaluate's
    ``meta.unbatched``). Said batched, ``jax.vmap(f, in_axes=(0, None), out_axes=(0,
    None))`` of ``(x * w, w ** 2)`` raised "vmap has mapped output but out_axes is None"
    where jax answers for f in-process. JAX needs the answer before the batch runs, so it
    is learned once per per-example signature: at the caller's values when they are known
    (a vmap outside jit: that very request, reused by the evaluate that follows), else
    (under jit) by one batched evaluate of one example (zeros, or the first example of an
    outer batch), and only where some input is shared: with every input mapped only a
    constant output could be unbatched. A failed probe leaves every output batched, as
    do examples the service ran one by one (no ``meta.unbatched``)."""
    n = len(shapes.structs)
    key = _batch_key(ops, shapes, xs, batch_ndim, shared)
    flags = ops.unbatched_of(key)
    if flags is not None:
        return flags
    values, whole = _values_of(xs)
    if values is not None and whole:  # the caller's own batch: this request answers the bind that follows
        ev = ops.evaluate(values, batch_ndim, shapes.aux_tree, shared)
        ops.stash = (values, batch_ndim, shared, ev)
    elif not any(shared):
        return (False,) * n
    else:
        one = [v if _is_shared(shared, i) else v[(slice(0, 1),) * batch_ndim]
               for i, v in enumerate(values)] if values is not None else \
              [np.zeros(s if _is_shared(shared, i) else (1,) * batch_ndim + s, d) for i, (s, d) in enumerate(key[-1])]
        try:
            ev = ops.evaluate(one, batch_ndim, shapes.aux_tree, shared)
        except APIError:  # no word: every output batched, as before
            ev = None
    flags = (False,) * n
    if ev is not None and ev.unbatched is not None:
        aux = ev.aux_unbatched or [False] * len(ev.aux)
        got = (*ev.unbatched, *(f for a, f in zip(ev.aux, aux) if _is_live(a)))
        flags = got if len(got) == n else flags
    ops.note_unbatched(key, flags)
    return flags


def _batch_key(ops: _Ops, shapes: _Shapes, xs: Sequence[Any], batch_ndim: int, shared: tuple[bool, ...]) -> Any:
    """What ``_unbatched`` learns by: the call's kind (layout, names), its output shapes
    per example, the batch's layout, and one example's input shapes and dtypes (last)."""
    example = tuple((tuple(jnp.shape(x))[0 if _is_shared(shared, i) else batch_ndim:],
                     jnp.dtype(jnp.result_type(x)).name) for i, x in enumerate(xs))
    return (ops._layout, ops._wire_names, shapes, batch_ndim, shared, example)


def _front(x: Any, dim: Any, size: int) -> Any:
    if dim is None:
        return jnp.broadcast_to(x, (size, *jnp.shape(x)))
    return jnp.moveaxis(x, dim, 0)


def _is_shared(shared: Sequence[bool], i: int) -> bool:
    return i < len(shared) and shared[i]


def _add_level(xs: Sequence[Any], dims: Sequence[Any], size: int, batch_ndim: int,
               shared: Sequence[bool]) -> tuple[list[Any], tuple[bool, ...]]:
    """The inputs of a request once this vmap level's axis is put in front of the
    ``batch_ndim`` it has already, and which are shared. An input no level so far maps
    (every one before the first level) stays as it is, sent once: the request's
    ``in_dims`` says so, where broadcasting it copied it per example. The service takes
    one batch dimension per input, so an input mapped at some levels only is broadcast
    over the others (nested vmaps that map different inputs)."""
    was_shared = [batch_ndim == 0 or _is_shared(shared, i) for i in range(len(xs))]
    # The inner levels' batch shape, read with this level's axis taken out: jax may hand
    # it anywhere, in front too (an outer in_axes of 0), where jnp.shape(x)[:batch_ndim]
    # read this level's size for the inner levels' (a reshape error on the host)
    inner = next((tuple(n for k, n in enumerate(jnp.shape(x)) if k != d)[:batch_ndim]
                  for x, d, s in zip(xs, dims, was_shared) if not s), ())
    out, flags = [], []
    for x, d, s in zip(xs, dims, was_shared):
        if d is None and s:
            out.append(x)
            flags.append(True)
            continue
        x = _front(x, d, size)
        if d is not None and s:  # mapped here, shared by the inner levels
            rest = jnp.shape(x)[1:]
            x = jnp.broadcast_to(jnp.reshape(x, (size, *(1,) * batch_ndim, *rest)), (size, *inner, *rest))
        out.append(x)
        flags.append(False)
    return out, tuple(flags)


remote_eval_p.def_impl(_eval_impl)
remote_eval_p.def_abstract_eval(_eval_abstract)
mlir.register_lowering(remote_eval_p, mlir.lower_fun(_eval_lowered, multiple_results=True))
ad.primitive_jvps[remote_eval_p] = _eval_jvp
batching.primitive_batchers[remote_eval_p] = _eval_batch


# ---- the linear map (jvp / vjp)


def _linear_host(ops: RemoteOps, shapes: _Shapes, lin: _Linear, *args: Any,
                 memo: dict[Any, Any] | None = None) -> list[np.ndarray]:
    xs, vecs = args[: lin.n_inputs], args[lin.n_inputs:]
    vecs = _as_torchs_cotangents(vecs) if lin.mode == "vjp" else vecs
    results = ops.linear(lin.mode, [np.asarray(x) for x in xs], lin.argnums, [np.asarray(v) for v in vecs],
                         shapes.out_tree, lin.batch_ndim, lin.tags, lin.shared, memo=memo)
    results = _as_jaxs_pullback(results) if lin.mode == "vjp" else results
    return _as_declared(results, lin.result_structs, ops.name, f"a {lin.mode} result")


def _as_torchs_cotangents(vecs: Sequence[Any]) -> list[Any]:
    """JAX's cotangents as the service (torch.func.vjp) takes them. Of a complex output,
    JAX's vjp is the transpose without conjugation, ``Re(ct . J)``, and torch's pullback
    conjugates its cotangent, ``Re(conj(c) . J)``: the service is sent ``conj(ct)``.
    Sent as they were, ``jax.vjp`` of a remote complex output answered torch's (another
    gradient), and ``jax.grad`` of a real loss of it a wrong one."""
    return [np.conj(v) if np.iscomplexobj(v) else v for v in vecs]


def _as_jaxs_pullback(results: Sequence[Any]) -> list[Any]:
    """The service's (torch.func.vjp's) pullback of ``conj(ct)`` as JAX's of ``ct``: of a
    complex input, torch's is the adjoint under ``Re(conj(a) . b)``, JAX's the transpose
    under ``Re(a . b)``, so JAX's is its conjugate (``jax.grad`` of ``|z|^2`` is
    ``2 conj(z)``, torch's ``2 z``); a real input's is real and stays as it is."""
    return [np.conj(r) if np.iscomplexobj(r) else r for r in results]


def _as_declared(results: Sequence[Any], structs: Sequence[Any], name: str, what: str) -> list[np.ndarray]:
    """The service's arrays in the shapes and dtypes JAX was promised; a shape that
    differs is an error, never reshaped: a transposed result would pass silently."""
    out = []
    for r, s in zip(results, structs):
        r = np.asarray(r)
        if r.shape != s.shape:
            raise shape_mismatch(name, what, r.shape, s.shape)
        out.append(r.astype(s.dtype, copy=False))
    return out


def _linear_impl(*args: Any, ops: _Ops, shapes: _Shapes, lin: _Linear) -> list[Any]:
    # outside jit only: there every call's forward asks first (and so drops what the last
    # call kept), where under jit XLA drops the unused products itself, and may drop the
    # forward too (a later call at the same inputs would be answered with no request)
    return [jnp.asarray(a) for a in _linear_host(ops, shapes, lin, *args, memo=ops.last_jacobian())]


def _linear_abstract(*args: Any, ops: RemoteOps, shapes: _Shapes, lin: _Linear) -> list[Any]:
    return _result_avals(lin.result_structs, args)


def _linear_lowered(*args: Any, ops: RemoteOps, shapes: _Shapes, lin: _Linear) -> Any:
    host = partial(_checked, partial(_linear_host, ops, shapes, lin), ops, shapes, lin.n_inputs,
                   lin.batch_ndim, lin.shared, len(lin.tags))
    return _callback(host, lin.result_structs, *args)


def _checked(host: Any, ops: _Ops, shapes: _Shapes, n_inputs: int, batch_ndim: int, shared: tuple[bool, ...],
             n_lead: int, *args: Any) -> list[np.ndarray]:
    """A product under ``jit``, checked against the output shapes learned before anything
    ran (an evaluate at zeros): the one place they meet the caller's values, where the
    forward's evaluate is not (``grad`` of a sum uses no output value, so XLA drops it).

    * Over no vectors at all: ``jacrev`` of an output learned empty (its basis has no
      vectors) asks the service nothing; ``jit(jacrev(f))`` of ``x[x > 0]`` answered
      ``(0, n)``. The shapes are checked by one evaluate at these inputs first.
    * Its cotangents refused for their shape (a 422 whose ``field`` is ``cotangents``):
      they were shaped as learned, and where the output's shape follows the values
      (``r12_turns``: ``3 x 2`` at zeros, ``2 x 3`` here) the service said only
      "cotangents: expected shape [2, 3], got [3, 2]", with nothing on why. One evaluate
      at these inputs then checks the shapes learned, and raises the ``ValueError`` that
      says so (``shape_mismatch``); any other refusal stands, with no request more. The
      problem's fields tell, not its words: a function whose input is named
      ``cotangents`` had its every 422 followed by an evaluate."""
    vecs = args[n_inputs:]
    if vecs and 0 in np.shape(vecs[0])[:n_lead]:
        _eval_host(ops, shapes, batch_ndim, shared, *args[:n_inputs])
    try:
        return host(*args)
    except InvalidInput as exc:
        if exc.problem.get("field") != "cotangents":
            raise
        try:
            _eval_host(ops, shapes, batch_ndim, shared, *args[:n_inputs])
        except APIError:
            raise exc from None  # the check failed on its own: the refusal is the answer
        raise


def _linear_transpose(cts: Sequence[Any], *args: Any, ops: RemoteOps, shapes: _Shapes, lin: _Linear) -> list[Any]:
    """The jvp's transpose is the vjp and the vjp's the jvp (a backward of the backward:
    the cotangent's gradient in grad of grad)."""
    xs, vecs = args[: lin.n_inputs], args[lin.n_inputs:]
    if any(ad.is_undefined_primal(x) for x in xs):
        raise NotImplementedError("remote_linear is linear in its vectors only")
    cotangents = [jnp.zeros(s.shape, s.dtype) if isinstance(c, ad.Zero) else c for c, s in zip(cts, lin.result_structs)]
    grads_structs = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in vecs)
    other = _Linear("vjp" if lin.mode == "jvp" else "jvp", lin.argnums, lin.n_inputs, grads_structs, lin.batch_ndim,
                    lin.tags, lin.shared, tuple(isinstance(c, ad.Zero) for c in cts) if lin.mode == "jvp" else ())
    grads = remote_linear_p.bind(*xs, *cotangents, ops=ops, shapes=shapes, lin=other)
    return [None] * lin.n_inputs + _invariant_as(grads, vecs)


def _linear_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
                lin: _Linear) -> Any:
    """Linear in the vectors (``J dv`` / ``J^T dv``: the same map); in the inputs a second
    derivative: ``c . H dx`` for a vjp, ``H[t, dx]`` for a jvp (``remote_second``)."""
    xs, vecs = primals[: lin.n_inputs], primals[lin.n_inputs:]
    x_tangents, v_tangents = tangents[: lin.n_inputs], tangents[lin.n_inputs:]
    out = remote_linear_p.bind(*primals, ops=ops, shapes=shapes, lin=lin)
    total: list[Any] = [None] * len(out)
    if not all(isinstance(t, ad.Zero) for t in v_tangents):
        dvecs = [jnp.zeros(jnp.shape(v), jnp.result_type(v)) if isinstance(t, ad.Zero) else t
                 for v, t in zip(vecs, v_tangents)]
        total = list(remote_linear_p.bind(*xs, *dvecs, ops=ops, shapes=shapes, lin=lin))
    moved = tuple(j for j, (x, t) in enumerate(zip(xs, x_tangents)) if not isinstance(t, ad.Zero) and _is_float(x))
    if moved:
        lead = jnp.shape(vecs[0])[: len(lin.tags)]
        dxs = [_spread(x_tangents[j], lin.tags, lead, _is_shared(lin.shared, j)) for j in moved]
        if lin.mode == "vjp":  # d(J^T c) in x: c . H dx, per differentiated input
            sec = _Second("input", moved, lin.argnums, lin.n_inputs, lin.result_structs, lin.batch_ndim, lin.tags,
                          lin.shared, lin.idle)
        else:  # d(J t) in x: H[t, dx], per output
            sec = _Second("output", lin.argnums, moved, lin.n_inputs, lin.result_structs, lin.batch_ndim, lin.tags,
                          lin.shared)
        second = remote_second_p.bind(*xs, *vecs, *dxs, ops=ops, shapes=shapes, sec=sec)
        total = [s if t is None else t + s for t, s in zip(total, second)]
    zeros = _zeros_like(out)
    return out, [z if t is None else t for t, z in zip(total, zeros)]


def _spread(t: Any, tags: tuple[str, ...], lead: Sequence[int], shared: bool = False) -> Any:
    """An input-shaped tangent ("p" leading dims only; none for an input the examples
    share) given every leading dim of the vectors: the ones the input is shared across,
    broadcast (transposed: summed)."""
    for pos, tag in enumerate(tags):
        if tag == "v" or shared:
            t = jnp.expand_dims(t, pos)
    return jnp.broadcast_to(t, (*lead, *jnp.shape(t)[len(tags):]))


def _linear_batch(args: Sequence[Any], dims: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
                  lin: _Linear) -> tuple[list[Any], list[int]]:
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    structs = tuple(jax.ShapeDtypeStruct((size, *s.shape), s.dtype) for s in lin.result_structs)
    xs, vecs = list(args[: lin.n_inputs]), list(args[lin.n_inputs:])
    x_dims, v_dims = dims[: lin.n_inputs], dims[lin.n_inputs:]
    if size == 0 and any(d is not None for d in x_dims):  # no examples: nothing to ask, nothing learned to check
        return [jnp.zeros(s.shape, s.dtype) for s in structs], [0] * len(structs)
    # no vectors (jacrev of an output learned empty) is bound all the same: nothing to ask
    # either, but under jit the shapes learned are checked (_checked)
    vecs = [_front(v, d, size) for v, d in zip(vecs, v_dims)]
    if any(d is not None for d in x_dims):
        xs, shared = _add_level(xs, x_dims, size, lin.batch_ndim, lin.shared)
        inner = replace(lin, result_structs=structs, batch_ndim=lin.batch_ndim + 1, tags=("p", *lin.tags),
                        shared=shared)
        inner_shapes = shapes.batched(size)
        out_dims = _result_dims(ops, shapes, lin, xs, shared, x_dims, v_dims)
    else:
        inner = replace(lin, result_structs=structs, tags=("v", *lin.tags))
        inner_shapes = shapes
        out_dims = [0] * len(structs)
    out = remote_linear_p.bind(*xs, *vecs, ops=ops, shapes=inner_shapes, lin=inner)
    return [o[0] if d is None else o for o, d in zip(out, out_dims)], out_dims


def _result_dims(ops: _Ops, shapes: _Shapes, op: Any, xs: Sequence[Any], shared: tuple[bool, ...],
                 x_dims: Sequence[Any], v_dims: Sequence[Any]) -> list[Any]:
    """This vmap level's dimension for each result of a product (``op``: a ``_Linear`` or
    ``_Second``) at batched inputs: None where jax's vmap leaves it unbatched in-process,
    as the outputs of shared inputs alone are (``_unbatched``, learned by the forward's
    batch). That is where no vector is mapped at this level and the result follows from
    such outputs and from inputs this level does not map: the gradient in a shared ``w``
    of ``sum(w ** 2)`` under ``vmap(grad(f, argnums=1), in_axes=(0, None))``, its vjp, jvp,
    ``jacrev``, ``jacfwd``, Hessian. Said batched, ``out_axes=None`` raised "vmap has
    mapped output" where jax answers. An output with no cotangent (``op.idle``) adds
    nothing; the examples' rows are equal, the first is kept."""
    n = len(op.result_structs)
    if any(d is not None for d in v_dims):
        return [0] * n
    flags = ops.unbatched_of(_batch_key(ops, shapes, xs, op.batch_ndim + 1, shared))
    if flags is None:
        return [0] * n
    flags = flags[: shapes.n_out]
    per_input = op.mode in ("vjp", "input")
    if not per_input:
        return [None if f else 0 for f in flags]
    quiet = all(f or (k < len(op.idle) and op.idle[k]) for k, f in enumerate(flags))
    results = op.argnums if isinstance(op, _Linear) else op.other_argnums
    return [None if quiet and x_dims[j] is None else 0 for j in results]


remote_linear_p.def_impl(_linear_impl)
remote_linear_p.def_abstract_eval(_linear_abstract)
mlir.register_lowering(remote_linear_p, mlir.lower_fun(_linear_lowered, multiple_results=True))
ad.primitive_jvps[remote_linear_p] = _linear_jvp
ad.primitive_transposes[remote_linear_p] = _linear_transpose
batching.primitive_batchers[remote_linear_p] = _linear_batch


# ---- second-order products (a derivative of the vjp / jvp in the inputs)


remote_second_p = Primitive("remote_second")
remote_second_p.multiple_results = True


@dataclass(frozen=True)
class _Second:
    """Parameters of ``remote_second`` (see ``RemoteOps.second``): ``mode="input"``: args
    ``xs``, one cotangent per output, one vector per ``vec_argnums``; results per
    ``other_argnums``. ``mode="output"``: args ``xs``, one vector per ``vec_argnums``, one
    per ``other_argnums``; results per output. Bilinear in the two vector groups."""

    mode: str
    vec_argnums: tuple[int, ...]
    other_argnums: tuple[int, ...]
    n_inputs: int
    result_structs: tuple[jax.ShapeDtypeStruct, ...]
    batch_ndim: int = 0
    tags: tuple[str, ...] = ()
    shared: tuple[bool, ...] = ()
    idle: tuple[bool, ...] = ()  # mode "input": per output, no cotangent came for it (see _result_dims)

    def __hash__(self) -> int:
        return hash((self.mode, self.vec_argnums, self.other_argnums, self.n_inputs,
                     tuple((s.shape, str(s.dtype)) for s in self.result_structs), self.batch_ndim, self.tags,
                     self.shared, self.idle))

    def n_first(self, shapes: _Shapes) -> int:
        return shapes.n_out if self.mode == "input" else len(self.vec_argnums)


def _third_derivatives(name: str) -> str:
    return (f"third derivatives through the remote function {name!r} are not supported (a derivative of a second "
            "derivative in the inputs: jacfwd(hessian(f)), grad of a Hessian); second derivatives (jax.hessian, "
            "grad of grad) are, each one hvp or hessian request")


def _second_host(ops: RemoteOps, shapes: _Shapes, sec: _Second, *args: Any) -> list[np.ndarray]:
    xs, vecs = args[: sec.n_inputs], args[sec.n_inputs:]
    if sec.mode == "input":  # one cotangent per output leaf first (see RemoteOps.second)
        n_out = shapes.out_tree.num_leaves
        vecs = (*_as_torchs_cotangents(vecs[:n_out]), *vecs[n_out:])
    results = ops.second(sec.mode, [np.asarray(x) for x in xs], sec.vec_argnums, sec.other_argnums,
                         [np.asarray(v) for v in vecs], shapes.out_tree, sec.batch_ndim, sec.tags, sec.shared)
    if sec.mode == "input":  # a pullback's derivative: JAX's pullback is torch's conjugated
        results = _as_jaxs_pullback(results)
    return _as_declared(results, sec.result_structs, ops.name, "a second-order result")


def _second_impl(*args: Any, ops: RemoteOps, shapes: _Shapes, sec: _Second) -> list[Any]:
    return [jnp.asarray(a) for a in _second_host(ops, shapes, sec, *args)]


def _second_abstract(*args: Any, ops: RemoteOps, shapes: _Shapes, sec: _Second) -> list[Any]:
    return _result_avals(sec.result_structs, args)


def _second_lowered(*args: Any, ops: RemoteOps, shapes: _Shapes, sec: _Second) -> Any:
    host = partial(_checked, partial(_second_host, ops, shapes, sec), ops, shapes, sec.n_inputs,
                   sec.batch_ndim, sec.shared, len(sec.tags))
    return _callback(host, sec.result_structs, *args)


def _structs_of(vs: Sequence[Any]) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in vs)


def _second_swapped(sec: _Second, group: int, first: Sequence[Any], second: Sequence[Any], cts: Sequence[Any],
                    targets: Sequence[Any]) -> tuple[_Second, list[Any]]:
    """The product that is ``sec``'s transpose in vector group ``group`` (0: the first,
    1: the second), with its arguments: ``cts`` are the cotangents of ``sec``'s results,
    ``targets`` stand for the group's vectors (their shapes and dtypes)."""
    I, J = sec.vec_argnums, sec.other_argnums
    structs = _structs_of(targets)
    if sec.mode == "input":  # R_j = c . H[i][j] w_i
        if group == 1:  # w: c . H[j][i] r_j
            return replace(sec, mode="input", vec_argnums=J, other_argnums=I, result_structs=structs, idle=()), [*first, *cts]
        return replace(sec, mode="output", vec_argnums=I, other_argnums=J, result_structs=structs, idle=()), [*second, *cts]
    # R_k = H_k[w_i, d_j]
    if group == 0:  # w: r . H[j][i] d_j
        return replace(sec, mode="input", vec_argnums=J, other_argnums=I, result_structs=structs, idle=()), [*cts, *second]
    return replace(sec, mode="input", vec_argnums=I, other_argnums=J, result_structs=structs, idle=()), [*cts, *first]


def _second_transpose(cts: Sequence[Any], *args: Any, ops: RemoteOps, shapes: _Shapes, sec: _Second) -> list[Any]:
    xs, vecs = args[: sec.n_inputs], args[sec.n_inputs:]
    if any(ad.is_undefined_primal(x) for x in xs):
        raise NotImplementedError(_third_derivatives(ops.name))
    n1 = sec.n_first(shapes)
    first, second = list(vecs[:n1]), list(vecs[n1:])
    undefined = [ad.is_undefined_primal(v) for v in vecs]
    if any(undefined[:n1]) and any(undefined[n1:]):
        raise NotImplementedError("remote_second is linear in one vector group at a time")
    group = 0 if any(undefined[:n1]) else 1
    targets = first if group == 0 else second
    target_avals = [jnp.zeros(t.aval.shape, t.aval.dtype) for t in targets]
    cts = [jnp.zeros(s.shape, s.dtype) if isinstance(c, ad.Zero) else c for c, s in zip(cts, sec.result_structs)]
    other, vectors = _second_swapped(sec, group, first, second, cts, target_avals)
    grads = _invariant_as(remote_second_p.bind(*xs, *vectors, ops=ops, shapes=shapes, sec=other), targets)
    none_first = [None] * n1 if group == 1 else list(grads)
    none_second = [None] * len(second) if group == 0 else list(grads)
    return [None] * sec.n_inputs + none_first + none_second


def _second_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
                sec: _Second) -> Any:
    xs = primals[: sec.n_inputs]
    if any(not isinstance(t, ad.Zero) and _is_float(x) for x, t in zip(xs, tangents[: sec.n_inputs])):
        raise NotImplementedError(_third_derivatives(ops.name))
    out = remote_second_p.bind(*primals, ops=ops, shapes=shapes, sec=sec)
    n1 = sec.n_first(shapes)
    vecs, dvecs = list(primals[sec.n_inputs:]), list(tangents[sec.n_inputs:])
    total: list[Any] = [None] * len(out)
    for lo, hi in ((0, n1), (n1, len(vecs))):  # bilinear: one group's tangents, the other's values
        if all(isinstance(t, ad.Zero) for t in dvecs[lo:hi]):
            continue
        args = list(vecs)
        args[lo:hi] = [jnp.zeros(jnp.shape(v), jnp.result_type(v)) if isinstance(t, ad.Zero) else t
                       for v, t in zip(vecs[lo:hi], dvecs[lo:hi])]
        part = remote_second_p.bind(*xs, *args, ops=ops, shapes=shapes, sec=sec)
        total = [p if t is None else t + p for t, p in zip(total, part)]
    zeros = _zeros_like(out)
    return out, [z if t is None else t for t, z in zip(total, zeros)]


def _second_batch(args: Sequence[Any], dims: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
                  sec: _Second) -> tuple[list[Any], list[int]]:
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    structs = tuple(jax.ShapeDtypeStruct((size, *s.shape), s.dtype) for s in sec.result_structs)
    xs, vecs = list(args[: sec.n_inputs]), list(args[sec.n_inputs:])
    x_dims, v_dims = dims[: sec.n_inputs], dims[sec.n_inputs:]
    if size == 0 and any(d is not None for d in x_dims):  # as _linear_batch
        return [jnp.zeros(s.shape, s.dtype) for s in structs], [0] * len(structs)
    vecs = [_front(v, d, size) for v, d in zip(vecs, v_dims)]
    if any(d is not None for d in x_dims):
        xs, shared = _add_level(xs, x_dims, size, sec.batch_ndim, sec.shared)
        inner = replace(sec, result_structs=structs, batch_ndim=sec.batch_ndim + 1, tags=("p", *sec.tags),
                        shared=shared)
        inner_shapes = shapes.batched(size)
        out_dims = _result_dims(ops, shapes, sec, xs, shared, x_dims, v_dims)
    else:
        inner = replace(sec, result_structs=structs, tags=("v", *sec.tags))
        inner_shapes = shapes
        out_dims = [0] * len(structs)
    out = remote_second_p.bind(*xs, *vecs, ops=ops, shapes=inner_shapes, sec=inner)
    return [o[0] if d is None else o for o, d in zip(out, out_dims)], out_dims


remote_second_p.def_impl(_second_impl)
remote_second_p.def_abstract_eval(_second_abstract)
mlir.register_lowering(remote_second_p, mlir.lower_fun(_second_lowered, multiple_results=True))
ad.primitive_jvps[remote_second_p] = _second_jvp
ad.primitive_transposes[remote_second_p] = _second_transpose
batching.primitive_batchers[remote_second_p] = _second_batch
