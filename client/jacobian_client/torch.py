"""Remote functions inside PyTorch autograd and ``torch.func`` (the ``torch`` extra).

::

    from jacobian_client import Client
    from jacobian_client.torch import remote

    client = Client("http://localhost:8000")
    arm = remote(client, "planar_arm")
    xy = arm(angles)              # one evaluate request
    xy.sum().backward()           # one vjp request: angles.grad

``remote(client, name)`` is a callable on torch tensors whose derivatives come from the
service. Request cost per operation (details in ``docs/remote.md``):

=========================================  ==============================================
operation                                  requests
=========================================  ==============================================
``f(x)``                                   1 evaluate
``f(x)`` then ``.backward()``              1 evaluate + 1 vjp (all cotangents of the pass)
``torch.func.jacrev(f)(x)``                1 evaluate + 1 vjp (``batched_vectors``)
``torch.func.jvp(f, (x,), (t,))``          1 evaluate + 1 jvp
``torch.func.jacfwd(f)(x)``                1 evaluate + 1 jvp (``batched_vectors``)
``torch.func.vmap(f)(xs)``                 1 evaluate (``batched``)
``vmap(grad(f))`` / ``vmap(jacrev(f))``    1 evaluate (``batched``) + 1 jacobian (``batched``)
``vmap(torch.func.hessian(f))``            1 evaluate + 1 jacobian + 1 hessian (each ``batched``)
``torch.func.hessian(f)(x)``               1 evaluate + 1 jvp + 1 vjp + 1 hvp (scalar f) or hessian
double backward (``create_graph=True``)    + 1 hvp (+ 1 jvp when the cotangent depends on x)
=========================================  ==============================================

How: the function is a :class:`torch.autograd.Function` with ``setup_context``, whose
backward and jvp call a second Function, the remote linear map (vjp or jvp). Both have a
``vmap`` staticmethod, so ``torch.func`` transforms reach the service's batched endpoints
instead of running one request per row or example: vmap over the vectors becomes
``batched_vectors``; vmap over the inputs becomes ``batched`` (for derivatives, a batched
Jacobian contracted with the vectors on the client: the service has no batched vjp).
An input ``vmap`` leaves unbatched (``in_dims=(0, None)``: weights every example shares)
is sent once, the request's ``in_dims`` saying so, as ``vmap`` itself does not copy it;
its gradient is the examples' sum, as torch gives it.

A pytree parameter (a dict or tuple of tensors, declared with ``tree=``) is taken as the
function takes it, ``layer({"w": w, "b": b}, x)``: each leaf is a tensor of its own to
autograd and ``torch.func`` (``vmap``'s ``in_dims`` nested in the dict too), and requests
carry the parameter nested (see ``jacobian_client._params``).

Outputs keep the function's structure (a tensor, tuple or dict); has_aux functions return
``(output, aux)`` and aux is not differentiated. Outputs land on the inputs' device (a
CUDA tensor in gives a CUDA tensor out; a CPU 0-d tensor beside CUDA ones decides
nothing, as in torch's ops) with the dtype the service computed in (float64 in, float64
out; bfloat16 / float16 inputs alone get their dtype back, mixed with other floating
inputs the promoted dtype, as torch gives it: a 0-d tensor beside dimensioned ones takes
no part; an output the function returns in another dtype, a float32 of a float16 input
or a bfloat16 of a float32 one, keeps it: the evaluate's ``meta.bfloat16`` says which
float32 arrays stand for bfloat16). Derivatives take the dtype and device of what they
differentiate.

Plain aux values (numbers, strings) come back as they are, computed at every call. Under
``torch.func.vmap``, whose function may return tensors only, numbers come back as tensors
(one value per example: 0-d inside the vmapped function); strings and None stay as they
are (one value when every example agrees), so vmap accepts them only if the vmapped
function does not return them. An empty batch (``vmap`` over 0 examples) is answered
without a request (see ``jacobian_client._remote``).

``torch.compile``: each call of the remote function, and each of its derivatives'
requests (a backward pass inside a compiled function), runs outside the compiled graph
(a graph break around it), since a request cannot be traced; the code around it
compiles. ``fullgraph=True`` allows no graph break, so it cannot hold a remote
function: dynamo's error then says so. Tracing into a graph (``make_fx``,
``torch.export``, ``torch.func.linearize``) raises instead: the graph would replay one
answer as a constant. ``torch.fx.symbolic_trace`` records each call as a node of its
graph, which calls the service when the GraphModule runs (see ``_fx_tracer``).

Second derivatives through the remote function (double backward with
``create_graph=True``, ``torch.func.hessian``, ``jacrev(jacrev(f))``, ``gradgradcheck``,
``torch.autograd.functional.hvp`` / ``hessian``, a backward pass inside a ``forward_ad``
dual level) come from the service's ``hvp`` (at unbatched inputs: a scalar function's
``H u``, any other's ``c . H u`` with cotangents; the vectors stacked into one request) or
``hessian`` (contracted on the client: under ``vmap``, ``batched``; where the vectors would
carry more than the Hessian; a function whose hvp fails for want of a forward-mode rule,
see ``RemoteOps.second``): the backward of a vjp ``J(x)^T c`` is ``J u`` in ``c`` and
``c . H u`` in ``x``. Each second-order product is one request. Third derivatives (a
derivative of a second-order product in the inputs) raise a clear error.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ._params import split_params
from ._remote import Remade, RemoteOps, Tree, float32_stands_for, unflatten

__all__ = ["remote"]


def remote(client: Any, name: str) -> Callable[..., Any]:
    """A callable on torch tensors that evaluates and differentiates the remote function
    ``name`` through ``client`` (a :class:`jacobian_client.Client`).

    Call it with the function's inputs, positionally or by their names (the first
    keyword call asks the service for the names, once). Tensors are sent (floating ones are
    differentiable); Python numbers pass through as plain numbers (a float that float32
    would round goes as float64 beside float64 tensors, exact as torch uses it in-process).
    """
    ops = RemoteOps(client, name)

    def call(inputs: tuple[Any, ...], named: dict[str, Any]) -> Any:
        inputs = ops.bind(inputs, named)  # inside _eagerly: a keyword call's names may need a request
        # a pytree parameter (a dict of tensors) goes in leaf by leaf: autograd differentiates tensors
        leaves, layout = split_params(inputs)
        # a keyword call goes by name: the service places the inputs (the names asked once
        # may be stale, a restart with a changed registry: a wrong answer by position)
        spec = _Spec(ops.for_layout(layout, ops.names_of(named)))
        flat = _RemoteFunction.apply(spec, *leaves)
        return spec.rebuild(flat)

    def fn(*inputs: Any, **named: Any) -> Any:
        tracer = _fx_tracer((inputs, named))
        if tracer is not None:  # torch.fx.symbolic_trace: one node of the graph, called when it runs
            return tracer.create_proxy("call_function", made, inputs, named)
        return _eagerly(call, inputs, named)

    fn.__name__ = fn.__qualname__ = f"remote_{name}"
    fn.__doc__ = f"The remote function {name!r}, differentiable by torch autograd and torch.func."
    made = Remade(fn, remote, (client, name), {})
    return made


def _fx_tracer(tree: Any) -> Any:
    """The ``torch.fx`` tracer whose Proxy is among the inputs (a tree of them), or None.

    ``torch.fx.symbolic_trace`` (FX graph mode quantization, torchvision's feature
    extraction) calls a model with Proxies, which hold no values: the remote function
    read one as an array and failed with numpy's "ValueError: invalid __array_struct__".
    The call is recorded instead, as ``torch.fx.wrap`` records a function, and the traced
    GraphModule calls the remote function when it runs, with that run's tensors: the
    requests are made then, never baked into the graph (which make_fx would do, and is
    refused for: see ``_refuse_tracing``). Without torch.fx loaded there is no Proxy."""
    fx = sys.modules.get("torch.fx")
    proxy = getattr(fx, "Proxy", None)
    if proxy is None:
        return None
    if isinstance(tree, proxy):
        return tree.tracer
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (tuple, list)) else ()
    for child in children:
        tracer = _fx_tracer(child)
        if tracer is not None:
            return tracer
    return None


# --------------------------------------------------------------------------- outside torch.compile


_disabled: list[Callable[..., Any]] = []


def remote_call_runs_eagerly(fn: Callable[..., Any], *args: Any) -> Any:
    """The call dynamo skips (its name shows in dynamo's message)."""
    return fn(*args)


def _eagerly(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, run outside any graph dynamo is tracing: a graph break around it.
    dynamo would trace into the request (the wire decoding) and fail. Not only the call
    itself: a backward pass that runs inside a compiled function (``loss.backward()`` in a
    compiled training step, ``torch.autograd.grad``, ``jacrev``) has dynamo trace the
    Functions' backward and forward too, hence this wraps each of them.

    Not only while dynamo traces this very frame (``is_compiling()``): a frame of a
    compiled function that runs eagerly after a graph break (torch.func's transforms,
    under which dynamo does not trace) still has dynamo's frame hook set, so every Python
    frame it calls is compiled on its own, the SDK's request and wire code included:
    ``torch.compile(lambda x: jacrev(remote)(x), backend="aot_eager")`` (and inductor, the
    default) failed inside the SDK's .npy reader with dynamo's "AssertionError: Expected
    np.nditer base, got <class 'bytes'>". So wherever torch._dynamo is loaded the call
    runs disabled. The disabled wrapper is made on first need: ``torch.compiler.disable``
    imports torch._dynamo (seconds), which only a caller that compiles has paid for
    already; without it loaded nothing can be compiling."""
    if torch.compiler.is_compiling():
        if not _disabled:
            # Made here, under dynamo, the wrapper's own making is a graph break (dynamo does not
            # trace torch.compiler.disable): with fullgraph=True, dynamo's error named only
            # `disable` ("Avoid calling the function `disable`"). This break comes first and
            # says why (torch._dynamo is imported: it is tracing this).
            torch._dynamo.graph_break(msg=_NO_FULLGRAPH)
            _disabled.append(_make_disabled())
        return _disabled[0](fn, *args)
    if "torch._dynamo" not in sys.modules:
        return fn(*args)
    if not _disabled:
        _disabled.append(_make_disabled())
    return _disabled[0](fn, *args)


def _make_disabled() -> Callable[..., Any]:
    # the reason is what dynamo prints once the wrapper exists: without one it said
    # "Skip calling `torch.compiler.disable()`d function ... (reason: None)"
    return torch.compiler.disable(remote_call_runs_eagerly, reason=_NO_FULLGRAPH)


_NO_FULLGRAPH = (
    "a jacobian_client remote function's value (and its derivatives') comes from a request to the "
    "service, which cannot be part of a compiled graph: it runs eagerly, a graph break around the call, "
    "and torch.compile(fullgraph=True) allows none. Compile with fullgraph=False (the code around the "
    "remote call still compiles), or compile only the code before and after it")


# --------------------------------------------------------------------------- specs


@dataclass
class _Spec:
    """One call of the remote function; filled in by the forward (output structure)."""

    ops: RemoteOps
    batch_ndim: int = 0
    shared: tuple[bool, ...] = ()  # per input, under a batch: it carries no batch dims (see _add_level)
    out_tree: Tree | None = None
    n_out: int = 0
    aux_tree: Tree | None = None
    aux_plain: list[Any] = field(default_factory=list)  # aux leaves: None where a tensor output holds it
    out_dtypes: list[torch.dtype] = field(default_factory=list)
    unbatched: tuple[bool, ...] = ()  # per output, under a batch: it depends on no batched input (vmap)
    # The batched Jacobians this call's per-example products asked for (RemoteOps.linear's
    # memo), shared by the copies vmap makes (dataclasses.replace passes it on): under
    # vmap(torch.func.hessian(f)) jacrev's vjp and jacfwd's jvp each asked the service for
    # the same Jacobian at the same inputs, one request where the products of one call need one
    jacobians: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def learn(self, other: _Spec) -> None:
        self.out_tree, self.n_out, self.aux_tree = other.out_tree, other.n_out, other.aux_tree
        self.aux_plain, self.out_dtypes, self.unbatched = other.aux_plain, other.out_dtypes, other.unbatched

    def rebuild(self, flat: Sequence[torch.Tensor]) -> Any:
        assert self.out_tree is not None
        out = unflatten(self.out_tree, list(flat[: self.n_out]))
        if self.aux_tree is None:
            return out
        tensors = iter(flat[self.n_out:])
        aux = [next(tensors) if plain is None else plain for plain in self.aux_plain]
        return out, unflatten(self.aux_tree, aux)


@dataclass(frozen=True)
class _Linear:
    """The remote vjp (``mode="vjp"``) or jvp at some inputs."""

    ops: RemoteOps
    mode: str
    argnums: tuple[int, ...]
    n_inputs: int
    out_tree: Tree
    result_dtypes: tuple[torch.dtype, ...]
    device: torch.device
    batch_ndim: int = 0
    tags: tuple[str, ...] = ()
    shared: tuple[bool, ...] = ()
    unbatched: tuple[bool, ...] = ()  # per output: it depends on no batched input (_Spec's; see _vmapped)
    idle: tuple[bool, ...] = ()  # vjp, per output: no cotangent came for it (zeros sent)
    memo: dict[Any, Any] | None = field(default=None, compare=False, repr=False)  # the call's _Spec.jacobians


# --------------------------------------------------------------------------- host <-> torch


def _host(x: Any) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    t = x.detach()
    if t._is_zerotensor():
        # forward AD's symbolic zero (the tangent of a tangent that is constant in the
        # input: 2 * e_i under jacfwd(jacfwd(lambda r: f(2 * r)))), which numpy cannot read
        # ("Cannot convert a ZeroTensor to numpy"): the zeros it stands for
        t = torch.zeros(t.shape, dtype=t.dtype)
    elif t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg()  # lazy conj / neg views (z.conj().imag): numpy reads neither
    if t.dtype == torch.bfloat16:
        bfloat16 = _numpy_bfloat16()
        if bfloat16 is None:
            return t.float().numpy()  # computed in float32 on the service, rounded back (see _numpy_bfloat16)
        return t.contiguous().view(torch.int16).numpy().view(bfloat16)
    return t.numpy()


@functools.cache
def _numpy_bfloat16() -> Any:
    """numpy's bfloat16 (ml_dtypes', what JAX's arrays are), or None without ml_dtypes.

    A bfloat16 tensor went to the service as float32 (numpy has no bfloat16 of its own),
    so the function computed in float32 and its answers were rounded to bfloat16 after:
    ``planar_arm`` of a bfloat16 ``x`` gave 2.5469 where the function in-process (and
    ``client.evaluate``, and the JAX adapter, which send bfloat16 as bfloat16) gives
    2.5625, and its Jacobian differed alike. As ml_dtypes' arrays the inputs go on the
    wire as bfloat16 (``_arrays``), the service computes in bfloat16 as torch does, and
    the host side handles them as it does JAX's. Without ml_dtypes (``pip install
    ml_dtypes``; JAX brings it) the float32 route stays."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def _refuse_tracing(name: str) -> None:
    """A request cannot be recorded in a graph: under make_fx (``torch.func.linearize``,
    ``torch.export``, AOT tracing) the answer to the tracing call would be baked in as a
    constant, and the graph would return it for every later input or tangent, silently
    (``linearize``'s ``jvp_fn`` answered garbage). torch.compile is unaffected: dynamo
    breaks the graph around the call (see ``remote``), which then runs eagerly."""
    get_mode = getattr(torch._C, "_get_dispatch_mode", None)
    keys = getattr(torch._C, "_TorchDispatchModeKey", None)
    if get_mode is None or keys is None:
        return
    if get_mode(keys.PROXY) is not None or get_mode(keys.FAKE) is not None:
        raise RuntimeError(
            f"the remote function {name!r} cannot be traced into a graph (make_fx, torch.export, "
            "torch.func.linearize): its values come from requests, which a graph would replay as constants; "
            "call it eagerly (torch.func.jvp in place of linearize; torch.compile runs it outside the graph)")


def _refuse_unsendable(name: str, inputs: Sequence[Any]) -> None:
    """A tensor on the 'meta' device has a shape and no values, and the service computes
    from values: torch's own "Cannot copy out of meta tensor; no data!" (NotImplementedError,
    from inside the SDK's conversion) did not say which call or why. A tensor of another
    layout than strided (sparse, nested) has no array a request can carry: its conversion
    said "can't convert Sparse layout tensor to numpy" or, for a nested tensor, torch's
    "Internal error: NestedTensorImpl doesn't support sizes. Please file an issue"."""
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            continue
        if x.is_nested or x.layout != torch.strided:
            dense = "torch.nested.to_padded_tensor(x, 0.0)" if x.is_nested else "x.to_dense()"
            raise TypeError(
                f"the remote function {name!r} got a {'nested' if x.is_nested else str(x.layout)} tensor (input "
                f"{i}): requests carry dense arrays; pass it dense ({dense})")
        if x.device.type == "meta":
            raise ValueError(
                f"the remote function {name!r} got a tensor on the 'meta' device (input {i}, shape "
                f"{tuple(x.shape)}): it has no values to send, and the service computes from values; call it "
                "on real tensors (its output shapes: one call on zeros of these shapes)")


def _refuse_legacy_batching(name: str, tensors: Sequence[Any]) -> None:
    """torch.autograd's older vectorized paths (``autograd.grad(is_grads_batched=True)``,
    ``autograd.functional.jacobian(vectorize=True)``, ``gradcheck(check_batched_grad=True)``)
    batch with legacy batched tensors, which reach a Function's forward as they are (its
    ``vmap`` rule serves ``torch.func.vmap`` only) and hide their batch dimension: no value
    can be read from them (torch's "Batching rule not implemented for aten::detach")."""
    is_legacy = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    if is_legacy is not None and any(isinstance(t, torch.Tensor) and is_legacy(t) for t in tensors):
        raise RuntimeError(
            f"the remote function {name!r} cannot run under torch.autograd's legacy batching "
            "(autograd.grad(is_grads_batched=True), autograd.functional.jacobian/hessian(vectorize=True), "
            "gradcheck(check_batched_grad=True)): use torch.func.jacrev / jacfwd / vmap, which batch into one "
            "request, or vectorize=False")


def _device(inputs: Sequence[Any]) -> torch.device:
    """Where results go: the inputs' device, as torch decides it for its ops, where a CPU
    0-d tensor (a scale, a temperature) goes with tensors on any device and decides
    nothing. The first tensor decided: ``f(torch.tensor(2.0), x_cuda)`` answered on the
    CPU where ``f`` in-process answers on CUDA, and its backward failed ("invalid gradient
    ... expected device cuda:0 but got cpu") for the CUDA input's gradient."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    chosen = next((t for t in tensors if t.ndim > 0 or t.device.type != "cpu"), tensors[0] if tensors else None)
    return chosen.device if chosen is not None else torch.device("cpu")


def _low_precision(inputs: Sequence[Any]) -> torch.dtype | None:
    """The dtype float32 results are given back as: the service answers bfloat16's values
    as float32 (numpy has no bfloat16; without ml_dtypes it also computes in float32, see
    ``_host``) where torch would answer bfloat16 (float16 likewise wherever it comes back
    float32). Only when every floating input that
    takes part in torch's promotion has that one dtype: beside an input of another floating
    dtype, torch's promotion decides (a bfloat16 x times a float64 w is float64), and the
    service's dtype is the answer; casting it down lost precision (1e-3 off in float16),
    silently. A 0-d tensor beside dimensioned floating ones takes no part (torch: a
    bfloat16 x times a float64 0-d scale is bfloat16), where it was counted, and the
    service's float32 answered for torch's bfloat16."""
    floating = [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    dtypes = {x.dtype for x in ([x for x in floating if x.ndim > 0] or floating)}
    low = dtypes.pop() if len(dtypes) == 1 else None
    return low if low in (torch.bfloat16, torch.float16) else None


def _tensor(arr: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    arr = np.asarray(arr)
    if arr.dtype.kind == "V" and arr.dtype.name == "bfloat16":  # an input's (_host) taken into a result
        t = torch.from_numpy(np.array(arr).view(np.int16)).view(torch.bfloat16)
        return t.to(device=device, dtype=dtype)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)


def _result(arr: Any, device: torch.device, low: torch.dtype | None, flags: list[bool] | None = None,
            i: int = 0) -> torch.Tensor:
    """An output or aux array (leaf ``i``; ``flags``: the evaluate's ``bfloat16`` or
    ``aux_bfloat16``): a float32 one in the dtype it stands for (``float32_stands_for``:
    bfloat16 where the service computed it so, else the inputs' low precision where the
    service did not say); any other dtype is the one the function computed in."""
    t = _tensor(arr, device)
    as_dtype = float32_stands_for(flags, i, low, torch.bfloat16) if t.dtype == torch.float32 else None
    return t.to(as_dtype) if as_dtype is not None else t


def _batched_input(x: Any, dim: int | None, size: int) -> Any:
    """A vector with this vmap level's dimension in front (expanded when unbatched)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if dim is None:
        return x.unsqueeze(0).expand(size, *x.shape)
    return x.movedim(dim, 0)


def _is_shared(shared: Sequence[bool], i: int) -> bool:
    return i < len(shared) and shared[i]


def _add_level(xs: Sequence[Any], dims: Sequence[Any], size: int, batch_ndim: int,
               shared: Sequence[bool]) -> tuple[list[Any], tuple[bool, ...]]:
    """The inputs of a request once this vmap level's dimension is put in front of the
    ``batch_ndim`` it has already, and which are shared. An input no level so far maps
    (every one before the first level) stays as it is, sent once: ``vmap`` does not copy
    an ``in_dims=None`` input per example, and neither does the request (its ``in_dims``).
    The service takes one batch dimension per input, so an input mapped at some levels
    only is expanded over the others (a view here; nested vmaps that map different inputs)."""
    was_shared = [batch_ndim == 0 or _is_shared(shared, i) for i in range(len(xs))]
    # The inner levels' batch shape, read from an input they map once this level's
    # dimension is out of the way: that dimension may sit anywhere, in front too (an
    # outer in_dims of 0), where x.shape[:batch_ndim] read this level's size for the
    # inner levels' and an input mapped by this level alone was expanded to the wrong
    # shape (a reshape error; vmap over models of vmap over data, its weights per model)
    # (the shape without that dimension, not x.movedim(d, 0)[0]: an empty outer batch has
    # no first example)
    inner = next((tuple(n for k, n in enumerate(x.shape) if d is None or k != d % x.dim())[:batch_ndim]
                  for x, d, s in zip(xs, dims, was_shared) if not s), ())
    out, flags = [], []
    for x, d, s in zip(xs, dims, was_shared):
        if d is None and s:
            out.append(x)
            flags.append(True)
            continue
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if d is None:
            x = x.unsqueeze(0).expand(size, *x.shape)
        else:
            x = x.movedim(d, 0)
            if s:  # mapped here, shared by the inner levels
                rest = x.shape[1:]
                x = x.reshape(size, *(1,) * batch_ndim, *rest).expand(size, *inner, *rest)
        out.append(x)
        flags.append(False)
    return out, tuple(flags)


def _unused_inputs(ctx: Any) -> set[int]:
    """Inputs (by position) whose gradient this backward pass will not use, though they
    require grad: ``torch.autograd.grad(loss, x)`` or ``backward(inputs=[x])`` with the
    function's other inputs (weights) requiring grad too. ``needs_input_grad`` is fixed at
    the forward, so without this the vjp request asked for every such input's gradient:
    the service's work and the answer's bytes for gradients thrown away. The engine
    knows which nodes it will run (``torch._C._will_engine_execute_node``, what torch's
    own ``register_multi_grad_hook`` asks); it will not say for a leaf under
    ``autograd.grad``, and then the gradient is computed, as before. Any failure of this
    (internal) API means the same."""
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    positions = [i for i, is_tensor in enumerate(ctx.is_tensor) if is_tensor]
    try:
        edges = ctx.next_functions  # one per tensor input, in order
    except Exception:
        return set()
    if will_run is None or len(edges) != len(positions):
        return set()
    unused = set()
    for i, (node, _) in zip(positions, edges):
        if node is None:
            continue
        try:
            if not will_run(node):
                unused.add(i)
        except Exception:  # a leaf under autograd.grad: torch does not tell
            pass
    return unused


# --------------------------------------------------------------------------- the function


class _RemoteFunction(torch.autograd.Function):
    """Outputs (then aux tensors) of the remote function; one evaluate request."""

    @staticmethod
    def forward(spec: _Spec, *inputs: Any) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return _eagerly(_RemoteFunction._evaluate, spec, inputs)

    @staticmethod
    def _evaluate(spec: _Spec, inputs: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        _refuse_tracing(spec.ops.name)
        _refuse_legacy_batching(spec.ops.name, inputs)
        _refuse_unsendable(spec.ops.name, inputs)
        ev = spec.ops.evaluate([_host(x) for x in inputs], spec.batch_ndim, shared=spec.shared)
        device, low = _device(inputs), _low_precision(inputs)
        outputs = [_result(o, device, low, ev.bfloat16, i) for i, o in enumerate(ev.outputs)]
        spec.out_tree, spec.n_out = ev.out_tree, len(outputs)
        spec.out_dtypes = [o.dtype for o in outputs]
        # per output, then per aux array (aux plain values are no outputs of the Function)
        spec.unbatched = (*(ev.unbatched or [False] * len(outputs)),
                          *[bool(f) for a, f in zip(ev.aux, ev.aux_unbatched or [False] * len(ev.aux))
                            if isinstance(a, np.ndarray)])
        spec.aux_tree = ev.aux_tree
        spec.aux_plain = [None if isinstance(a, np.ndarray) else a for a in ev.aux]
        aux = [_result(a, device, low, ev.aux_bfloat16, i) for i, a in enumerate(ev.aux) if isinstance(a, np.ndarray)]
        return tuple(outputs + aux)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        spec, *xs = inputs
        ctx.spec = spec
        ctx.is_tensor = [isinstance(x, torch.Tensor) for x in xs]
        ctx.plain = [None if isinstance(x, torch.Tensor) else x for x in xs]
        tensors = [x for x in xs if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        if len(output) > spec.n_out:
            ctx.mark_non_differentiable(*output[spec.n_out:])
        # None, not zeros, for the tangent of an input forward mode does not differentiate (a
        # model's weights beside the x of jvp / jacfwd): materialized, every floating input
        # looked differentiated, and the jvp (a batched jacobian under vmap) was asked for
        # them all, zero tangents sent (jacfwd in x of a 32 x 64 layer: 1.1 MB for 50 KB),
        # and a parameter beside them holding an integer leaf refused with a 422
        ctx.set_materialize_grads(False)
        ctx.out_meta = [(o.shape, o.dtype) for o in output[: spec.n_out]]

    @staticmethod
    def _inputs(ctx: Any) -> list[Any]:
        tensors = iter(ctx.saved_tensors)
        return [next(tensors) if is_t else plain for is_t, plain in zip(ctx.is_tensor, ctx.plain)]

    @staticmethod
    def _linear(ctx: Any, mode: str, argnums: list[int], xs: list[Any]) -> _Linear:
        spec: _Spec = ctx.spec
        assert spec.out_tree is not None
        dtypes = tuple(xs[i].dtype for i in argnums) if mode == "vjp" else tuple(spec.out_dtypes)
        return _Linear(spec.ops, mode, tuple(argnums), len(xs), spec.out_tree, dtypes, _device(xs),
                       spec.batch_ndim, ("p",) * spec.batch_ndim, spec.shared, tuple(spec.unbatched[: spec.n_out]),
                       memo=spec.jacobians if _in_transform() else None)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return _eagerly(_RemoteFunction._backward, ctx, grads)

    @staticmethod
    def _backward(ctx: Any, grads: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        xs = _RemoteFunction._inputs(ctx)
        unused = _unused_inputs(ctx)
        argnums = [i for i, x in enumerate(xs)
                   if _differentiable(x) and ctx.needs_input_grad[i + 1]
                   and i not in unused]
        if not argnums:
            return (None,) * (1 + len(xs))
        spec: _Spec = ctx.spec
        if all(g is None for g in grads[: spec.n_out]):
            return (None,) * (1 + len(xs))
        device = _device(xs)  # an unused output's cotangent: zeros (the vjp takes one per output)
        cotangents = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                      for g, (shape, dtype) in zip(grads, ctx.out_meta)]
        lin = replace(_RemoteFunction._linear(ctx, "vjp", argnums, xs), idle=tuple(g is None for g in grads[: spec.n_out]))
        results = _RemoteLinear.apply(lin, *xs, *cotangents)
        # a shared input's gradient is its examples' sum (vmap's own expand would have summed it)
        by_input = {i: r.sum(dim=tuple(range(spec.batch_ndim))) if spec.batch_ndim and _is_shared(spec.shared, i) else r
                    for i, r in zip(argnums, results)}
        return (None, *[by_input.get(i) for i in range(len(xs))])

    @staticmethod
    def jvp(ctx: Any, _spec_tangent: Any, *tangents: Any) -> tuple[Any, ...]:  # type: ignore[override]
        return _eagerly(_RemoteFunction._jvp, ctx, tangents)

    @staticmethod
    def _jvp(ctx: Any, tangents: tuple[Any, ...]) -> tuple[Any, ...]:
        xs = _RemoteFunction._inputs(ctx)
        spec: _Spec = ctx.spec
        argnums = [i for i, (x, t) in enumerate(zip(xs, tangents))
                   if t is not None and _differentiable(x)]
        n_aux = sum(p is None for p in spec.aux_plain)
        if not argnums:
            return (None,) * (spec.n_out + n_aux)
        lin = _RemoteFunction._linear(ctx, "jvp", argnums, xs)
        results = _RemoteLinear.apply(lin, *xs, *[_spread_shared(tangents[i], spec, xs, i) for i in argnums])
        # an integer output (indices, counts) has no tangent: torch refuses one (the service
        # answers zeros for it)
        results = [r if dtype.is_floating_point or dtype.is_complex else None
                   for r, dtype in zip(results, spec.out_dtypes)]
        return (*results, *[None] * n_aux)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], spec: _Spec, *inputs: Any) -> tuple[Any, Any]:
        batched, shared = _add_level(inputs, in_dims[1:], info.batch_size, spec.batch_ndim, spec.shared)
        inner = replace(spec, batch_ndim=spec.batch_ndim + 1, shared=shared)
        out = _RemoteFunction.apply(inner, *batched)
        spec.learn(inner)
        # An output that depends on no batched input (shared weights' alone, a constant) is
        # unbatched, as torch's vmap leaves it for f in-process: vmap(f, in_dims=(0, None),
        # out_dims=(0, None)) takes it. Said batched, torch raised "can not return a
        # BatchedTensor when out_dim is None" for the remote f. The service's vmap says
        # which (meta.unbatched: depending on no input batched at any level, so at this one);
        # the examples are equal, and this level's dimension, in front, goes.
        flags = inner.unbatched
        dims = tuple(None if k < len(flags) and flags[k] else 0 for k in range(len(out)))
        return tuple(o[0] if d is None else o for o, d in zip(out, dims)), dims


class _RemoteLinear(torch.autograd.Function):
    """The remote vjp or jvp: inputs then vectors in, products out; one request. Its own
    derivatives (a backward of the backward, ``torch.func.hessian``'s jvp of a vjp) are
    first-order products in the vectors (another ``_RemoteLinear``) and second-order ones
    in the inputs (``_RemoteSecond``: an hvp or a Hessian on the service)."""

    @staticmethod
    def forward(lin: _Linear, *args: Any) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return _eagerly(_RemoteLinear._apply, lin, args)

    @staticmethod
    def _apply(lin: _Linear, args: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        _refuse_tracing(lin.ops.name)
        _refuse_legacy_batching(lin.ops.name, args)
        xs, vectors = args[: lin.n_inputs], args[lin.n_inputs:]
        vecs = [_host(v) if isinstance(v, torch.Tensor) else np.asarray(v) for v in vectors]
        results = lin.ops.linear(lin.mode, [_host(x) for x in xs], lin.argnums, vecs, lin.out_tree,
                                 lin.batch_ndim, lin.tags, lin.shared, memo=lin.memo)
        return tuple(_tensor(r, lin.device, d) for r, d in zip(results, lin.result_dtypes))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        lin, *args = inputs
        ctx.lin = lin
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.plain = [None if isinstance(a, torch.Tensor) else a for a in args]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        # None for a vector's tangent that is not there (jacrev's cotangents under jacfwd in
        # torch.func.hessian): its product would be a request for zeros
        ctx.set_materialize_grads(False)
        ctx.out_meta = [(o.shape, o.dtype) for o in output]

    @staticmethod
    def _args(ctx: Any) -> tuple[list[Any], list[Any]]:
        tensors = iter(ctx.saved_tensors)
        args = [next(tensors) if is_t else plain for is_t, plain in zip(ctx.is_tensor, ctx.plain)]
        return args[: ctx.lin.n_inputs], args[ctx.lin.n_inputs:]

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        return _eagerly(_RemoteLinear._backward, ctx, grads)

    @staticmethod
    def _backward(ctx: Any, grads: tuple[Any, ...]) -> tuple[Any, ...]:
        """vjp mode, ``g = J(x)^T c``: ``c``'s gradient is ``J u`` (a jvp), ``x``'s the
        second-order ``c . H u``. jvp mode, ``h = J(x) t``: ``t``'s is ``J^T c`` (a vjp),
        ``x``'s ``c . H t``. Leading vector dimensions ("v") that ``x`` lacks are summed."""
        lin: _Linear = ctx.lin
        if all(g is None for g in grads):
            return (None,) * len(ctx.needs_input_grad)
        grads = tuple(torch.zeros(shape, dtype=dtype, device=lin.device) if g is None else g
                      for g, (shape, dtype) in zip(grads, ctx.out_meta))
        xs, vecs = _RemoteLinear._args(ctx)
        unused = _unused_inputs(ctx)  # autograd.grad(g, cotangents) asks for no second derivative
        needs = [n and i not in unused for i, n in enumerate(ctx.needs_input_grad[1:])]
        x_needs = [j for j, x in enumerate(xs) if needs[j] and _differentiable(x)]
        v_needs = [needs[lin.n_inputs + m] for m in range(len(vecs))]
        out: list[Any] = [None] * (len(xs) + len(vecs))
        if lin.mode == "vjp":
            cots, us = vecs, list(grads)
        else:
            us, cots = vecs, list(grads)
        if any(v_needs):
            if lin.mode == "vjp":  # c's gradient: J u, shaped (and typed) like the cotangents
                other = replace(lin, mode="jvp", result_dtypes=tuple(c.dtype for c in cots))
            else:  # t's gradient: J^T c, like the tangents
                other = replace(lin, mode="vjp", result_dtypes=tuple(t.dtype for t in us))
            products = _RemoteLinear.apply(other, *xs, *grads)
            for m, g in enumerate(products):
                if v_needs[m]:
                    out[lin.n_inputs + m] = g
        if x_needs:
            sec = _Second(lin.ops, "input", lin.argnums, tuple(x_needs), lin.n_inputs, lin.out_tree,
                          tuple(xs[j].dtype for j in x_needs), lin.device, lin.batch_ndim, lin.tags, lin.shared,
                          lin.unbatched, lin.idle if lin.mode == "vjp" else ())
            for j, g in zip(x_needs, _RemoteSecond.apply(sec, *xs, *cots, *us)):
                out[j] = _sum_vector_dims(g, lin.tags, _is_shared(lin.shared, j))
        return (None, *out)

    @staticmethod
    def jvp(ctx: Any, _lin_tangent: Any, *tangents: Any) -> Any:  # type: ignore[override]
        return _eagerly(_RemoteLinear._jvp, ctx, tangents)

    @staticmethod
    def _jvp(ctx: Any, tangents: tuple[Any, ...]) -> tuple[Any, ...]:
        """vjp mode: ``d(J^T c) = J^T dc + (c . H dx)``; jvp mode: ``d(J t) = J dt + H[t, dx]``."""
        lin: _Linear = ctx.lin
        xs, vecs = _RemoteLinear._args(ctx)
        x_tangents, v_tangents = tangents[: lin.n_inputs], tangents[lin.n_inputs:]
        moved = [j for j, (x, t) in enumerate(zip(xs, x_tangents)) if t is not None and _differentiable(x)]
        total: list[Any] = [None] * len(lin.result_dtypes)
        if any(t is not None for t in v_tangents):
            dvecs = [torch.zeros_like(v) if t is None else t for v, t in zip(vecs, v_tangents)]
            total = list(_RemoteLinear.apply(lin, *xs, *dvecs))
        if moved:
            lead = vecs[0].shape[: len(lin.tags)]
            dxs = [_spread(x_tangents[j], lin.tags, lead, _is_shared(lin.shared, j)) for j in moved]
            if lin.mode == "vjp":
                sec = _Second(lin.ops, "input", tuple(moved), lin.argnums, lin.n_inputs, lin.out_tree,
                              lin.result_dtypes, lin.device, lin.batch_ndim, lin.tags, lin.shared, lin.unbatched,
                              lin.idle)
                second = _RemoteSecond.apply(sec, *xs, *vecs, *dxs)
            else:
                sec = _Second(lin.ops, "output", lin.argnums, tuple(moved), lin.n_inputs, lin.out_tree,
                              lin.result_dtypes, lin.device, lin.batch_ndim, lin.tags, lin.shared, lin.unbatched)
                second = _RemoteSecond.apply(sec, *xs, *vecs, *dxs)
            total = [s if t is None else t + s for t, s in zip(total, second)]
        return tuple(total)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], lin: _Linear, *args: Any) -> tuple[Any, Any]:
        return _vmapped(_RemoteLinear.apply, info, in_dims, lin, args)


def _vmapped(apply: Any, info: Any, in_dims: tuple[Any, ...], op: Any, args: tuple[Any, ...]) -> tuple[Any, Any]:
    """The vmap rule of the remote products (first and second order): the mapped
    dimension becomes one more leading dimension of a single request, "p" (per-example
    inputs) where an input is mapped, else "v" (several vectors at the same inputs)."""
    size = info.batch_size
    dims = in_dims[1:]
    xs, vecs = list(args[: op.n_inputs]), list(args[op.n_inputs:])
    x_dims, v_dims = dims[: op.n_inputs], dims[op.n_inputs:]
    vecs = [_batched_input(v, d, size) for v, d in zip(vecs, v_dims)]
    if any(d is not None for d in x_dims):
        xs, shared = _add_level(xs, x_dims, size, op.batch_ndim, op.shared)
        inner = replace(op, batch_ndim=op.batch_ndim + 1, tags=("p", *op.tags), shared=shared)
    else:
        inner = replace(op, tags=("v", *op.tags))
    out = apply(inner, *xs, *vecs)
    dims = _result_dims(op, x_dims, v_dims, size)
    return tuple(o[0] if d is None else o for o, d in zip(out, dims)), dims


def _result_dims(op: Any, x_dims: Sequence[Any], v_dims: Sequence[Any], size: int) -> tuple[int | None, ...]:
    """This vmap level's dimension for each result of a remote product: None where torch's
    vmap leaves it unbatched for the function in-process, as the function's own outputs
    are (``_RemoteFunction.vmap``). That is where no vector is mapped at this level and
    the result follows from outputs that depend on no batched input (``op.unbatched``, the
    batched evaluate's ``meta.unbatched``) and from inputs this level does not map: the
    gradient in a shared ``w`` of ``sum(w**2)`` under ``vmap(grad(f, argnums=1),
    in_dims=(0, None))``, its jvp, its Hessian. Said batched, ``out_dims=None`` raised
    "can not return a BatchedTensor" where torch answers. An output with no cotangent
    (``op.idle``) adds nothing. The examples' rows are then equal: the first is kept."""
    per_input = op.mode == "vjp" or (isinstance(op, _Second) and op.mode == "input")
    results = op.argnums if isinstance(op, _Linear) and per_input else \
        op.other_argnums if per_input else range(op.out_tree.num_leaves)
    flags = op.unbatched
    if not size or len(flags) != op.out_tree.num_leaves or any(d is not None for d in v_dims):
        return (0,) * len(results)
    if per_input:
        quiet = all(f or (k < len(op.idle) and op.idle[k]) for k, f in enumerate(flags))
        return tuple(None if quiet and x_dims[j] is None else 0 for j in results)
    return tuple(None if flags[k] else 0 for k in results)


def _in_transform() -> bool:
    """Whether a ``torch.func`` transform is running. Only there may a call's products
    share its batched Jacobian (``_Spec.jacobians``): the call's graph goes when the
    transform returns. A plain backward through ``vmap(f)`` runs outside any, and a graph
    the caller keeps (``losses.append(loss)``, whose saved tensors the backward freed)
    kept the Jacobian with it, one per step."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _differentiable(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _spread(t: torch.Tensor, tags: tuple[str, ...], lead: Sequence[int], shared: bool = False) -> torch.Tensor:
    """An input-shaped tangent (leading dims for the "p" tags only; none for an input
    the examples share) given every leading dimension of the vectors: the ones the input
    is shared across, expanded."""
    for pos, tag in enumerate(tags):
        if tag == "v" or shared:
            t = t.unsqueeze(pos)
    return t.expand(*lead, *t.shape[len(tags):])


def _spread_shared(t: torch.Tensor, spec: _Spec, xs: Sequence[Any], i: int) -> torch.Tensor:
    """A tangent of input ``i`` given every batch dimension: a shared input's tangent
    has none (it is shaped like the input), and the jvp's vectors carry them all."""
    if not spec.batch_ndim or not _is_shared(spec.shared, i):
        return t
    batch_shape = next(x.shape[: spec.batch_ndim] for j, x in enumerate(xs)
                       if isinstance(x, torch.Tensor) and not _is_shared(spec.shared, j))
    return t.expand(*batch_shape, *t.shape)


def _sum_vector_dims(g: torch.Tensor, tags: tuple[str, ...], shared: bool = False) -> torch.Tensor:
    """The gradient of an input shared across the vectors ("v" dims), or across the
    examples too (an input the examples share): their sum."""
    dims = [pos for pos, tag in enumerate(tags) if tag == "v" or shared]
    return g.sum(dim=dims) if dims else g


@dataclass(frozen=True)
class _Second:
    """A second-order product of the remote function (see ``RemoteOps.second``):
    ``mode="input"``: args ``xs``, one cotangent per output leaf, one vector per
    ``vec_argnums``; results per ``other_argnums``. ``mode="output"``: args ``xs``, one
    vector per ``vec_argnums``, one per ``other_argnums``; results per output leaf."""

    ops: RemoteOps
    mode: str
    vec_argnums: tuple[int, ...]
    other_argnums: tuple[int, ...]
    n_inputs: int
    out_tree: Tree
    result_dtypes: tuple[torch.dtype, ...]
    device: torch.device
    batch_ndim: int = 0
    tags: tuple[str, ...] = ()
    shared: tuple[bool, ...] = ()
    unbatched: tuple[bool, ...] = ()  # as _Linear's
    idle: tuple[bool, ...] = ()  # mode "input": per output, no cotangent came for it


def _third_derivatives(name: str) -> str:
    return (f"third derivatives through the remote function {name!r} are not supported (a derivative of a "
            "second derivative: hessian of a gradient, jacfwd(hessian(f))); second derivatives (double "
            "backward, torch.func.hessian) are, each one hvp or hessian request")


class _RemoteSecond(torch.autograd.Function):
    """A second-order product: one hvp or hessian request (``RemoteOps.second``)."""

    @staticmethod
    def forward(sec: _Second, *args: Any) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return _eagerly(_RemoteSecond._apply, sec, args)

    @staticmethod
    def _apply(sec: _Second, args: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        _refuse_tracing(sec.ops.name)
        _refuse_legacy_batching(sec.ops.name, args)
        xs, vectors = args[: sec.n_inputs], args[sec.n_inputs:]
        results = sec.ops.second(sec.mode, [_host(x) for x in xs], sec.vec_argnums, sec.other_argnums,
                                 [_host(v) for v in vectors], sec.out_tree, sec.batch_ndim, sec.tags, sec.shared)
        return tuple(_tensor(r, sec.device, d) for r, d in zip(results, sec.result_dtypes))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _RemoteLinear.setup_context(ctx, inputs, output)
        ctx.sec = ctx.lin = inputs[0]

    @staticmethod
    def _split(ctx: Any) -> tuple[list[Any], list[Any], list[Any]]:
        """``xs``, the first vector group and the second (see ``_Second``)."""
        sec: _Second = ctx.sec
        xs, vecs = _RemoteLinear._args(ctx)
        n_first = sec.out_tree.num_leaves if sec.mode == "input" else len(sec.vec_argnums)
        return xs, vecs[:n_first], vecs[n_first:]

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        return _eagerly(_RemoteSecond._backward, ctx, grads)

    @staticmethod
    def _backward(ctx: Any, grads: tuple[Any, ...]) -> tuple[Any, ...]:
        """Linear in each vector group, so their gradients are second-order products again
        (what torch.autograd.functional.hvp / vhp take by their double-backward trick);
        the inputs' would be third derivatives."""
        sec: _Second = ctx.sec
        if all(g is None for g in grads):
            return (None,) * len(ctx.needs_input_grad)
        grads = tuple(torch.zeros(shape, dtype=dtype, device=sec.device) if g is None else g
                      for g, (shape, dtype) in zip(grads, ctx.out_meta))
        unused = _unused_inputs(ctx)
        needs = [n and i not in unused for i, n in enumerate(ctx.needs_input_grad[1:])]
        xs, first, second = _RemoteSecond._split(ctx)
        if any(needs[j] and _differentiable(x) for j, x in enumerate(xs)):
            raise RuntimeError(_third_derivatives(sec.ops.name))
        n1 = len(first)
        out: list[Any] = [None] * len(xs)
        I, J = sec.vec_argnums, sec.other_argnums
        if sec.mode == "input":  # R_j = c . H[i][j] w_i; grads r_j
            cots, ws = first, second
            first_grads = _RemoteSecond._product(sec, "output", I, J, [c.dtype for c in cots], xs, [*ws, *grads]) \
                if any(needs[len(xs):len(xs) + n1]) else [None] * n1
            second_grads = _RemoteSecond._product(sec, "input", J, I, [w.dtype for w in ws], xs, [*cots, *grads]) \
                if any(needs[len(xs) + n1:]) else [None] * len(ws)
        else:  # R_k = H_k[i][j] w_i d_j; grads c_k
            ws, ds = first, second
            first_grads = _RemoteSecond._product(sec, "input", J, I, [w.dtype for w in ws], xs, [*grads, *ds]) \
                if any(needs[len(xs):len(xs) + n1]) else [None] * n1
            second_grads = _RemoteSecond._product(sec, "input", I, J, [d.dtype for d in ds], xs, [*grads, *ws]) \
                if any(needs[len(xs) + n1:]) else [None] * len(ds)
        return (None, *out, *first_grads, *second_grads)

    @staticmethod
    def _product(sec: _Second, mode: str, vec_argnums: tuple[int, ...], other_argnums: tuple[int, ...],
                 dtypes: Sequence[torch.dtype], xs: list[Any], vectors: list[Any]) -> tuple[Any, ...]:
        other = replace(sec, mode=mode, vec_argnums=vec_argnums, other_argnums=other_argnums,
                        result_dtypes=tuple(dtypes), idle=())  # (its cotangents, if any, are gradients)
        return _RemoteSecond.apply(other, *xs, *vectors)

    @staticmethod
    def jvp(ctx: Any, _sec_tangent: Any, *tangents: Any) -> Any:  # type: ignore[override]
        return _eagerly(_RemoteSecond._jvp, ctx, tangents)

    @staticmethod
    def _jvp(ctx: Any, tangents: tuple[Any, ...]) -> tuple[Any, ...]:
        """Bilinear in the two vector groups: ``d R = R(d first, second) + R(first, d second)``."""
        sec: _Second = ctx.sec
        xs, first, second = _RemoteSecond._split(ctx)
        x_tangents = tangents[: len(xs)]
        if any(t is not None and _differentiable(x) for x, t in zip(xs, x_tangents)):
            raise RuntimeError(_third_derivatives(sec.ops.name))
        d_first, d_second = tangents[len(xs):len(xs) + len(first)], tangents[len(xs) + len(first):]
        total: list[Any] = [None] * len(sec.result_dtypes)
        for group, d, keep in ((0, d_first, second), (1, d_second, first)):
            if all(t is None for t in d):
                continue
            vs = [torch.zeros_like(v) if t is None else t for v, t in zip(first if group == 0 else second, d)]
            part = _RemoteSecond.apply(sec, *xs, *(vs + list(keep) if group == 0 else list(keep) + vs))
            total = [p if t is None else t + p for t, p in zip(total, part)]
        return tuple(total)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], sec: _Second, *args: Any) -> tuple[Any, Any]:
        return _vmapped(_RemoteSecond.apply, info, in_dims, sec, args)
