"""Remote functions inside JAX transformations (the ``jax`` extra).

::

    import jax
    from jacobian_client import Client
    from jacobian_client.jax import remote

    arm = remote(Client("http://localhost:8000"), "planar_arm")
    loss = lambda q: jnp.sum((arm(q) - target) ** 2)
    jax.jit(jax.grad(loss))(q)      # 1 evaluate + 1 vjp request per call

``remote(client, name)`` works under ``jit``, ``grad`` / ``vjp``, ``jvp`` / ``jacfwd`` /
``jacrev``, and ``vmap``, composed in any order (first derivatives only).

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
  contracted on the client;
* each primitive lowers to ``jax.pure_callback``, so ``jit`` works.

JAX needs output shapes before it runs anything. The first call with a new input
signature (shapes and dtypes) learns them: from the call itself when the inputs are
concrete (no extra request), else from one ``evaluate`` request at zeros of those shapes
(``probe`` requests; pass ``out_shape=`` to skip it). Outputs come back in the dtype the
service computed in, canonicalised for JAX (float64 needs ``jax_enable_x64``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from ._remote import Evaluated, RemoteOps, Tree, flatten, refuse_pytree_parameters, unflatten

__all__ = ["remote"]


def remote(client: Any, name: str, *, out_shape: Any = None) -> Callable[..., Any]:
    """A JAX-traceable callable for the remote function ``name`` (``client``: a
    :class:`jacobian_client.Client`). ``out_shape``: the output's structure with
    ``jax.ShapeDtypeStruct`` leaves, to skip the shape probe (functions without aux; it
    applies to every input signature)."""
    ops = RemoteOps(client, name)
    known: dict[Any, _Shapes] = {}
    given = None if out_shape is None else _shapes_from_struct(out_shape)

    def fn(*inputs: Any) -> Any:
        refuse_pytree_parameters(name, inputs)
        arrays = [jnp.asarray(x) if not isinstance(x, jax_core.Tracer) else x for x in inputs]
        key = tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in arrays)
        shapes = given or known.get(key)
        if shapes is None and not any(isinstance(a, jax_core.Tracer) for a in arrays):
            # concrete inputs: this evaluation is the answer and teaches the shapes
            ev = ops.evaluate([np.asarray(a) for a in arrays])
            known[key] = _Shapes.from_evaluated(ev)
            return known[key].rebuild([jnp.asarray(v) for v in known[key].cast(ev.outputs + _arrays(ev.aux))])
        if shapes is None:
            ev = ops.evaluate([np.zeros(a.shape, a.dtype) for a in arrays])  # the shape probe
            shapes = known[key] = _Shapes.from_evaluated(ev)
        flat = remote_eval_p.bind(*arrays, ops=ops, shapes=shapes, batch_ndim=0)
        return shapes.rebuild(flat)

    fn.__name__ = fn.__qualname__ = f"remote_{name}"
    fn.__doc__ = f"The remote function {name!r}, traceable by jax.jit, grad, jvp and vmap."
    return fn


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _Shapes:
    """Output structure: ``structs`` for the output leaves then the aux arrays."""

    structs: tuple[jax.ShapeDtypeStruct, ...]
    n_out: int
    out_tree: Tree
    aux_tree: Tree | None
    aux_plain: tuple[Any, ...]  # per aux leaf: None where an array output holds it

    def _key(self) -> tuple[Any, ...]:  # primitive parameters must hash and compare (jit's cache)
        structs = tuple((s.shape, str(s.dtype)) for s in self.structs)
        return (structs, self.n_out, self.out_tree, self.aux_tree, repr(self.aux_plain))

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Shapes) and self._key() == other._key()

    @classmethod
    def from_evaluated(cls, ev: Evaluated) -> _Shapes:
        arrays = ev.outputs + _arrays(ev.aux)
        structs = tuple(jax.ShapeDtypeStruct(np.shape(a), jax.dtypes.canonicalize_dtype(np.asarray(a).dtype))
                        for a in arrays)
        plain = tuple(None if isinstance(a, np.ndarray) else a for a in ev.aux)
        return cls(structs, len(ev.outputs), ev.out_tree, ev.aux_tree, plain)

    def batched(self, size: int) -> _Shapes:
        structs = tuple(jax.ShapeDtypeStruct((size, *s.shape), s.dtype) for s in self.structs)
        return _Shapes(structs, self.n_out, self.out_tree, self.aux_tree, self.aux_plain)

    def cast(self, arrays: Sequence[Any]) -> list[np.ndarray]:
        return [np.asarray(a).astype(s.dtype, copy=False).reshape(s.shape) for a, s in zip(arrays, self.structs)]

    def rebuild(self, flat: Sequence[Any]) -> Any:
        out = unflatten(self.out_tree, list(flat[: self.n_out]))
        if self.aux_tree is None:
            return out
        arrays = iter(flat[self.n_out:])
        aux = [next(arrays) if p is None else p for p in self.aux_plain]
        return out, unflatten(self.aux_tree, aux)


def _arrays(leaves: Sequence[Any]) -> list[np.ndarray]:
    return [a for a in leaves if isinstance(a, np.ndarray)]


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

    def __hash__(self) -> int:
        return hash((self.mode, self.argnums, self.n_inputs, tuple((s.shape, str(s.dtype)) for s in self.result_structs),
                     self.batch_ndim, self.tags))


# ---- evaluation


def _eval_host(ops: RemoteOps, shapes: _Shapes, batch_ndim: int, *args: Any) -> list[np.ndarray]:
    ev = ops.evaluate([np.asarray(a) for a in args], batch_ndim)
    return shapes.cast(ev.outputs + _arrays(ev.aux))


def _eval_impl(*args: Any, ops: RemoteOps, shapes: _Shapes, batch_ndim: int) -> list[Any]:
    return [jnp.asarray(a) for a in _eval_host(ops, shapes, batch_ndim, *args)]


def _eval_abstract(*args: Any, ops: RemoteOps, shapes: _Shapes, batch_ndim: int) -> list[Any]:
    return [jax_core.ShapedArray(s.shape, s.dtype) for s in shapes.structs]


def _eval_lowered(*args: Any, ops: RemoteOps, shapes: _Shapes, batch_ndim: int) -> Any:
    return jax.pure_callback(partial(_eval_host, ops, shapes, batch_ndim), list(shapes.structs), *args)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _eval_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
              batch_ndim: int) -> tuple[list[Any], list[Any]]:
    out = remote_eval_p.bind(*primals, ops=ops, shapes=shapes, batch_ndim=batch_ndim)
    argnums = tuple(i for i, (p, t) in enumerate(zip(primals, tangents))
                    if not isinstance(t, ad.Zero) and _is_float(p))
    zeros = [ad.Zero(jax_core.ShapedArray(s.shape, s.dtype).to_tangent_aval()) for s in shapes.structs]
    aux_zeros = zeros[shapes.n_out:]
    if not argnums:
        return out, zeros
    lin = _Linear("jvp", argnums, len(primals), shapes.structs[: shapes.n_out], batch_ndim, ("p",) * batch_ndim)
    tangents_out = remote_linear_p.bind(*primals, *[tangents[i] for i in argnums], ops=ops, shapes=shapes, lin=lin)
    return out, list(tangents_out) + aux_zeros


def _eval_batch(args: Sequence[Any], dims: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
                batch_ndim: int) -> tuple[list[Any], list[int]]:
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [_front(a, d, size) for a, d in zip(args, dims)]
    out = remote_eval_p.bind(*moved, ops=ops, shapes=shapes.batched(size), batch_ndim=batch_ndim + 1)
    return out, [0] * len(out)


def _front(x: Any, dim: Any, size: int) -> Any:
    if dim is None:
        return jnp.broadcast_to(x, (size, *jnp.shape(x)))
    return jnp.moveaxis(x, dim, 0)


remote_eval_p.def_impl(_eval_impl)
remote_eval_p.def_abstract_eval(_eval_abstract)
mlir.register_lowering(remote_eval_p, mlir.lower_fun(_eval_lowered, multiple_results=True))
ad.primitive_jvps[remote_eval_p] = _eval_jvp
batching.primitive_batchers[remote_eval_p] = _eval_batch


# ---- the linear map (jvp / vjp)


def _linear_host(ops: RemoteOps, shapes: _Shapes, lin: _Linear, *args: Any) -> list[np.ndarray]:
    xs, vecs = args[: lin.n_inputs], args[lin.n_inputs:]
    results = ops.linear(lin.mode, [np.asarray(x) for x in xs], lin.argnums, [np.asarray(v) for v in vecs],
                         shapes.out_tree, lin.batch_ndim, lin.tags)
    return [np.asarray(r).astype(s.dtype, copy=False).reshape(s.shape) for r, s in zip(results, lin.result_structs)]


def _linear_impl(*args: Any, ops: RemoteOps, shapes: _Shapes, lin: _Linear) -> list[Any]:
    return [jnp.asarray(a) for a in _linear_host(ops, shapes, lin, *args)]


def _linear_abstract(*args: Any, ops: RemoteOps, shapes: _Shapes, lin: _Linear) -> list[Any]:
    return [jax_core.ShapedArray(s.shape, s.dtype) for s in lin.result_structs]


def _linear_lowered(*args: Any, ops: RemoteOps, shapes: _Shapes, lin: _Linear) -> Any:
    return jax.pure_callback(partial(_linear_host, ops, shapes, lin), list(lin.result_structs), *args)


def _linear_transpose(cts: Sequence[Any], *args: Any, ops: RemoteOps, shapes: _Shapes, lin: _Linear) -> list[Any]:
    if lin.mode != "jvp":
        raise NotImplementedError(f"second derivatives through the remote function {ops.name!r} are not supported; "
                                  "ask the service: client.hessian or client.hvp")
    xs, vecs = args[: lin.n_inputs], args[lin.n_inputs:]
    if any(ad.is_undefined_primal(x) for x in xs):
        raise NotImplementedError("remote_linear is linear in its vectors only")
    cotangents = [jnp.zeros(s.shape, s.dtype) if isinstance(c, ad.Zero) else c for c, s in zip(cts, lin.result_structs)]
    grads_structs = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in vecs)
    vjp = _Linear("vjp", lin.argnums, lin.n_inputs, grads_structs, lin.batch_ndim, lin.tags)
    grads = remote_linear_p.bind(*xs, *cotangents, ops=ops, shapes=shapes, lin=vjp)
    return [None] * lin.n_inputs + list(grads)


def _linear_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
                lin: _Linear) -> Any:
    if all(isinstance(t, ad.Zero) for t in tangents[: lin.n_inputs]):  # linear in the vectors
        out = remote_linear_p.bind(*primals, ops=ops, shapes=shapes, lin=lin)
        vec_tangents = [jnp.zeros(jnp.shape(p), jnp.result_type(p)) if isinstance(t, ad.Zero) else t
                        for p, t in zip(primals[lin.n_inputs:], tangents[lin.n_inputs:])]
        return out, remote_linear_p.bind(*primals[: lin.n_inputs], *vec_tangents, ops=ops, shapes=shapes, lin=lin)
    raise NotImplementedError(f"second derivatives through the remote function {ops.name!r} are not supported; "
                              "ask the service: client.hessian or client.hvp")


def _linear_batch(args: Sequence[Any], dims: Sequence[Any], *, ops: RemoteOps, shapes: _Shapes,
                  lin: _Linear) -> tuple[list[Any], list[int]]:
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    xs, vecs = list(args[: lin.n_inputs]), list(args[lin.n_inputs:])
    x_dims, v_dims = dims[: lin.n_inputs], dims[lin.n_inputs:]
    vecs = [_front(v, d, size) for v, d in zip(vecs, v_dims)]
    structs = tuple(jax.ShapeDtypeStruct((size, *s.shape), s.dtype) for s in lin.result_structs)
    if any(d is not None for d in x_dims):
        xs = [_front(x, d, size) for x, d in zip(xs, x_dims)]
        inner = _Linear(lin.mode, lin.argnums, lin.n_inputs, structs, lin.batch_ndim + 1, ("p", *lin.tags))
        inner_shapes = shapes.batched(size)
    else:
        inner = _Linear(lin.mode, lin.argnums, lin.n_inputs, structs, lin.batch_ndim, ("v", *lin.tags))
        inner_shapes = shapes
    out = remote_linear_p.bind(*xs, *vecs, ops=ops, shapes=inner_shapes, lin=inner)
    return out, [0] * len(out)


remote_linear_p.def_impl(_linear_impl)
remote_linear_p.def_abstract_eval(_linear_abstract)
mlir.register_lowering(remote_linear_p, mlir.lower_fun(_linear_lowered, multiple_results=True))
ad.primitive_jvps[remote_linear_p] = _linear_jvp
ad.primitive_transposes[remote_linear_p] = _linear_transpose
batching.primitive_batchers[remote_linear_p] = _linear_batch
