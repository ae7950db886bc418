"""Calling a registered function under torch.func: aux handling, fixed inputs, failures.

Everything that touches the user's function directly lives here, so the rules about
what a function may return, and how its failures are named, are in one place.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from jacobian_client import wire

from ..errors import FunctionError, InvalidInput, OutOfMemory, ServiceError, exception_text
from ..registry import FunctionSpec
from ..types import Call
from . import kept_state

__all__ = [
    "AuxBox",
    "GradOffWatch",
    "as_input_dtypes",
    "changed_between_calls",
    "check_floating",
    "dense_pullback",
    "differentiable",
    "fresh",
    "function_error",
    "is_oom",
    "lacks_forward_ad",
    "look",
    "partial",
    "serving",
]

_INT64 = (-(1 << 63), (1 << 63) - 1)
# How deep and how large aux may be. Deeper than a request's JSON may be (MAX_JSON_DEPTH's
# default) would not travel back either; a list that holds itself is infinitely deep,
# and a list holding the same list twice, nested, has exponentially many items: walked
# without these bounds, either kept the engine in our own loop until it was killed.
_AUX_MAX_DEPTH = 64
_AUX_MAX_ITEMS = 1_000_000
# The dtypes the wire carries (tensors in aux and outputs); torch's names. Complex ones
# too (answers only): torch.func.jvp and a plain call answer a complex output, which was
# the function's 500 "which the wire does not carry"; its derivatives are refused first
# (check_floating), as jacrev refuses them. complex32 has no numpy dtype: still refused.
_WIRE_DTYPES = frozenset(getattr(torch, name) for name in wire.DTYPES | wire.COMPLEX_DTYPES
                         if isinstance(getattr(torch, name, None), torch.dtype))


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    # (torch's words need no user code to make: a __str__ of the function's own is not read)
    return isinstance(exc, RuntimeError) and "can't allocate memory" in exception_text(exc, user_code=False)




_CAUSE = BaseException.__dict__["__cause__"].__get__
_CONTEXT = BaseException.__dict__["__context__"].__get__


def lacks_forward_ad(exc: BaseException) -> bool:
    """Whether ``exc``, or one it was raised from, says the function has no forward-mode
    AD: what a profile may remember (forward mode skipped from then on). Any other
    failure of a forward-mode transform (vmap of a custom Function without a vmap rule,
    the function's own error at these inputs) says nothing of the next request's, and
    marking it steered every later request, on every route, to reverse mode.

    Torch's words need no user code to make: a __str__ of the function's own along the
    chain is not read (each one could take ``errors._WORDS_WITHIN_S``), and the chain is walked
    through BaseException's own descriptors (a class's ``__getattribute__`` or ``__bool__``
    is the function's code)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and len(seen) < 16:
        seen.add(id(cause))
        if any(marker in exception_text(cause, user_code=False) for marker in wire.NO_FORWARD_AD_WORDS):
            return True
        following = _CAUSE(cause)
        cause = _CONTEXT(cause) if following is None else following
    return False


def function_error(exc: BaseException, *, forward_mode: bool = False) -> ServiceError:
    """A failure inside the user's function (or a transform of it) as a problem.

    ``BaseException`` on purpose: a function that raises ``SystemExit`` or
    ``KeyboardInterrupt`` has failed its request, not the engine.

    ``forward_mode``: ``exc`` came from a forward-mode product (jvp, hvp) of a function
    whose plain call had just run. Torch raises ``NotImplementedError`` there for an op
    or a custom ``autograd.Function`` without a forward-mode rule ("Trying to use forward
    AD with igamma ...", "You must implement the jvp function ..."); the problem then says
    so in a member of its own, ``"unsupported": "forward_mode"``, which the SDK's
    adapters read to switch to reverse mode: they read the detail's words ("forward",
    "jvp") before, and any function error saying them (a ``ValueError("bad jvp
    input")``) cost a reverse-mode request and a warning that the function lacked a
    rule it has."""
    if isinstance(exc, ServiceError):
        return exc
    if is_oom(exc):
        return OutOfMemory(f"out of memory: {type(exc).__name__}")
    text = exception_text(exc).strip()
    message = text.splitlines()[0] if text else ""
    # (NotImplementedError: torch's type for it; lacks_forward_ad: its words, where another
    # type carries them, as the profiles read them)
    missing = forward_mode and (isinstance(exc, NotImplementedError) or lacks_forward_ad(exc))
    fields = {"unsupported": "forward_mode"} if missing else None
    hint = next((h for words, h in _HINTS if words in message), "")
    return FunctionError(f"{type(exc).__name__}: {message}{hint}"[:2000], fields=fields)


# Torch's words for a function that leaves torch for NumPy, which torch.func's transforms
# cannot follow. The first sends the author to .detach().numpy(), which only gives the
# second, whose words name neither the cause nor the cure: the detail adds both.
_NUMPY_HINT = ("; torch.func's transforms hand the function tensors with no memory of their own to read, so it "
               "cannot take an input to NumPy (.numpy(), np.asarray), .tolist() or a C extension: compute with "
               "torch ops on the tensors it receives")
_HINTS = (("Can't call numpy() on Tensor that requires grad", _NUMPY_HINT),
          ("Cannot access data pointer of Tensor that doesn't have storage", _NUMPY_HINT))


def dense_pullback(pullback: Callable[..., Any]) -> Callable[..., Any]:
    """A ``torch.func.vjp`` pullback whose gradients are strided tensors. An op asked for
    sparse gradients (``embedding(..., sparse=True)``, ``nn.EmbeddingBag(sparse=True)``)
    has its backward answer in COO layout: ``torch.func.vjp`` gives that, whose values are
    the gradient, but the host copy (``.numpy()``), the checks' reshapes and the row
    loop's stacks refuse it, and a ``vjp`` (one cotangent or a stack), a Jacobian (its
    rows one at a time, as ``vmap`` cannot batch it) and a forward-mode Jacobian's check
    were each a 500 ``internal_error``. Its dense form is the same gradient. (Not for the
    pullback ``vmap`` batches: sparse layouts fail there first, and the row loop follows.)"""
    def dense(*cotangents: Any) -> Any:
        return pytree.tree_map(lambda g: g.to_dense() if isinstance(g, torch.Tensor) and g.layout != torch.strided
                               else g, pullback(*cotangents))
    return dense


def _check_tensor(leaf: torch.Tensor, what: str) -> None:
    """A tensor the wire can carry: dense (strided), of a dtype it knows."""
    if leaf.is_nested:  # (of layout strided too: copied to the host, torch's "Internal error", as our 500)
        raise FunctionError(f"{what} holds a nested tensor; return it padded (torch.nested.to_padded_tensor) or as "
                            "a list of tensors")
    if leaf.layout != torch.strided:
        raise FunctionError(f"{what} holds a tensor of layout {leaf.layout}; return it dense (.to_dense())")
    if leaf.dtype not in _WIRE_DTYPES:
        raise FunctionError(f"{what} holds a {str(leaf.dtype).removeprefix('torch.')} tensor, which the wire does not carry")
    if leaf.device.type == "meta":  # shapes without values: copying one to the host failed, as our 500
        raise FunctionError(f"{what} holds a tensor on the meta device, which has no values")


def _aux_leaf(leaf: Any) -> Any:
    """One leaf of aux as the wire carries it (JSON, or an array), else the function's
    fault, named. Numbers and strings come back as exactly Python's own types: numpy's
    scalars (``np.float64(x)``, common in aux) and subclasses are not JSON to orjson,
    whose refusal, deep in sending the reply, lost the answer (the request waited for its
    deadline, 504). A string must be UTF-8: ``os.fsdecode`` of an undecodable file name
    holds lone surrogates."""
    if isinstance(leaf, torch.Tensor):
        leaf = _plain(leaf)
        _check_tensor(leaf, "aux")
        return leaf
    if leaf is None:
        return None
    if isinstance(leaf, (bool, np.bool_)):
        return bool(leaf)
    if isinstance(leaf, (int, np.integer)):
        value = int.__int__(leaf) if isinstance(leaf, int) else int(leaf)
        if not _INT64[0] <= value <= _INT64[1]:
            raise FunctionError(f"aux holds an integer outside 64 bits ({str(value)[:40]}...)")
        return value
    if isinstance(leaf, (float, np.floating)):
        return float.__float__(leaf) if isinstance(leaf, float) else float(leaf)
    if isinstance(leaf, str):
        return _utf8(str.__str__(leaf), "a string")
    raise FunctionError(
        f"aux holds a {type(leaf).__name__}; aux may hold tensors, numbers, strings, None, lists and dicts"
    )


def _utf8(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FunctionError(f"aux holds {what} that is not valid UTF-8 (lone surrogates, as os.fsdecode makes of "
                            "an undecodable file name)") from None
    return text


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
            # Counted before they are looked at: a list of 30 million numbers put 30
            # million pairs on the stack before the count said no (seconds, gigabytes,
            # then a 504 and the engine killed as hung, where a 500 saying why was due).
            if items + len(stack) + len(node) > _AUX_MAX_ITEMS:
                raise FunctionError(f"aux holds more than {_AUX_MAX_ITEMS:,} items; return large data as a tensor")
            if isinstance(node, dict):
                # Any key torch's pytree takes (jacrev's aux {0: h0, 1: h1}) is written as
                # its text, as an output's keys are; an int key was the function's 500
                # ("aux dict keys must be strings") where torch.func answered.
                texts: set[str] = set()
                for key in node:
                    text = _utf8(str.__str__(key) if isinstance(key, str) else str(key), "a dict key")
                    if text in texts:
                        raise FunctionError(f"aux has two keys of one dict written {text!r} on the wire (dict keys "
                                            "travel as their text; the answer would keep one of them): give them "
                                            "distinct text")
                    texts.add(text)
                node = node.values()
            stack.extend((child, depth + 1) for child in node)
        else:
            _aux_leaf(node)


def _check_output(out: Any, differentiated: bool, complex_ok: bool = False) -> Any:
    """``out`` if the wire can carry it, its tensor subclasses made plain tensors; if it
    is to be ``differentiated``, first that it has a derivative (:func:`check_floating`:
    a complex output, which the wire does not carry, is then the request's 422 in
    jacrev's words, as an integer one is, not the function's 500)."""
    if type(out) is torch.Tensor:  # one plain tensor (nearly every function): no pytree walk
        if differentiated:
            check_floating(out, complex_ok=complex_ok)
        _check_tensor(out, "the output")
        return out
    leaves, treespec = pytree.tree_flatten(out)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise _not_tensors(out)
    if any(type(leaf) is not torch.Tensor for leaf in leaves):
        leaves = [_plain(leaf) for leaf in leaves]
        out = pytree.tree_unflatten(leaves, treespec)
    if differentiated:
        check_floating(out, leaves, complex_ok)
    for leaf in leaves:
        _check_tensor(leaf, "the output")
    _check_keys(out)
    return out


def _check_keys(out: Any) -> None:
    """A dict output's keys are written as their text (JSON's and ``.npz``'s only kind of
    key): two keys of one dict written alike (``1`` and ``"1"``, ``True`` and
    ``"True"``), which torch's pytree keeps apart, would be one key on the wire. The
    answer kept the later one's array and dropped the other's without a word (a 200 with
    half of ``torch.func.jacrev``'s result, in JSON and ``.npz`` alike)."""
    stack: list[tuple[Any, str]] = [(out, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            texts: dict[str, Any] = {}
            for key, child in node.items():
                text = str.__str__(key) if isinstance(key, str) else str(key)
                if text in texts:
                    raise FunctionError(f"the output{path} has keys {texts[text]!r} and {key!r}, both written "
                                        f"{text!r} on the wire (dict keys travel as their text; the answer would "
                                        "keep one of them): give them distinct text")
                texts[text] = key
                stack.append((child, f"{path}[{key!r}]"))
        elif isinstance(node, (list, tuple)):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node))


_TENSORS = "return a tensor, or a tuple, list or dict of tensors"


def _not_tensors(out: Any) -> FunctionError:
    """What is wrong with an output that is not all tensors, where it is, in torch.func's
    words. "the function returned tuple; expected a tensor or a tuple/dict of tensors"
    said of ``(y, None)``, ``(y, 3)`` or ``()`` (a tuple, as it asked), and of ``{}`` (a
    dict) and ``[]`` (lists are served): neither which leaf nor that nothing was there."""
    paths = pytree.tree_flatten_with_path(out)[0]
    if out is None or not paths:  # empty containers: no leaf at all (a None inside is a leaf)
        what = "None" if out is None else f"{_a(type(out).__name__)}, empty or of empty containers"
        return FunctionError(f"the output is {what}: no tensor to answer; {_TENSORS} (torch.func: Expected f to be a "
                             "function that has non-empty output)")
    path, leaf = next((path, leaf) for path, leaf in paths if not isinstance(leaf, torch.Tensor))
    what = "None" if leaf is None else _a(type(leaf).__name__)
    return FunctionError(f"{_output_at(path)} is {what}, not a tensor: {_TENSORS} (torch.func: expected f(*primals) "
                         f"to return only tensors, got unsupported type {type(leaf)})")


def _a(name: str) -> str:
    return f"an {name}" if name[:1] in ("a", "e", "i", "o", "u") else f"a {name}"


def _plain(leaf: torch.Tensor) -> torch.Tensor:
    """A tensor subclass (its own ``__torch_function__``) as a plain tensor, with its
    data and its place in the autograd graph, made here while the function's errors are
    its own: left a subclass, it reached the engine's copy to the host, where one whose
    ``detach`` or ``numpy`` raised (or hung) was our 500 ``internal_error``, with a
    logged traceback."""
    if type(leaf) is torch.Tensor:
        return leaf
    with torch._C.DisableTorchFunctionSubclass():
        return torch.Tensor.as_subclass(leaf, torch.Tensor)


# The engine may call a function more than once for one request (to learn the output's
# size, to check forward mode against reverse, example by example): one whose results
# follow a call count or global state cannot be given one answer.
_CHANGED = ("the function's {what} changed between its calls for this one request (the service may call it "
            "more than once: to learn sizes, to check forward mode, example by example)")


def changed_between_calls(what: str) -> FunctionError:
    return FunctionError(_CHANGED.format(what=what))


def check_floating(out: Any, leaves: Sequence[Any] | None = None, complex_ok: bool = False) -> None:
    """Only real floating outputs have derivatives: jacrev refuses the rest, so every
    mode does (forward mode would answer zeros of the output's integer dtype), and
    torch.func.hessian (it runs jacrev) too. The function did not fail: the request asked
    for a derivative its output does not have, so this is the request's 422, as for an
    integer input to differentiate (the function's 500 ``function_error`` said so
    before, though its evaluate and jvp answer an integer output), naming the output and
    quoting torch: an integer or boolean output is refused by jacrev's vjp, a complex
    one by jacrev. ``complex_ok``: a pullback's route (vjp, hvp's ``c . H t``), whose
    cotangents may be complex as torch.func.vjp's are: only integer outputs refused."""
    if type(out) is torch.Tensor:  # one tensor (nearly every function): no pytree walk
        if out.is_floating_point():
            return
        paths: Any = (((), out),)
    else:
        # ``leaves``: out's, where the caller has them (the box checks at every call: no
        # second walk); the paths only for the refusal's words
        if all(leaf.is_floating_point() for leaf in (pytree.tree_leaves(out) if leaves is None else leaves)
               if isinstance(leaf, torch.Tensor)):
            return
        paths = pytree.tree_flatten_with_path(out)[0]
    for path, leaf in paths:
        if isinstance(leaf, torch.Tensor) and not (leaf.is_floating_point() or leaf.is_complex()):
            raise InvalidInput(f"{_output_at(path)} is {str(leaf.dtype).removeprefix('torch.')}, which has no "
                               "derivative: only floating-point outputs can be differentiated (torch.func.jacrev: "
                               "vjp(f, ...): All outputs of f must be floating-point or complex Tensors, got Tensor "
                               f"with dtype {leaf.dtype}); evaluate and jvp answer it",
                               # a member, for the SDK's adapters: their reverse mode of the
                               # floating outputs goes by forward mode instead (the detail's
                               # words are for people)
                               fields={"unsupported": "integer_output"})
    for i, (path, leaf) in enumerate(paths):
        if not complex_ok and isinstance(leaf, torch.Tensor) and leaf.is_complex():
            raise InvalidInput(f"{_output_at(path)} is {str(leaf.dtype).removeprefix('torch.')}, which has no "
                               "real derivative (torch.func.jacrev: Expected all outputs to be real but received "
                               f"complex tensor at flattened input idx: {i})",
                               # for the SDK's adapters: per-example products they contract from
                               # a batched Jacobian go example by example instead (vjp and jvp
                               # answer a complex output)
                               fields={"unsupported": "complex_output"})


def _output_at(path: tuple[Any, ...]) -> str:
    """``the output`` or ``the output[1]`` / ``the output['k']``, as pytree spells a leaf's path."""
    return f"the output{pytree.keystr(path)}" if path else "the output"


def fresh(tree: Any) -> Any:
    """Copies of the tensors in ``tree``, for a call made only to look (sizes, grad
    switches, a strategy's timing): a function may write into its inputs in place
    (under ``no_grad``, or in forward mode), and the call that answers must see the
    request's values, as the only call jacrev makes does, not ones a look changed."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def look(fn: Callable[..., Any], inputs: Callable[[], Sequence[Any]]) -> Any:
    """``fn(*inputs())``, the plain call a derivative's route makes first to learn its
    output's sizes; where that raises, ``fn`` called again (on new ``inputs()``) as
    reverse mode calls it, inside ``torch.func.vjp``, whose output or error is the answer.

    Under ``jacrev``, ``torch.func.hessian``, ``vmap(jacrev)`` and the HVP's gradient the
    function's floating inputs require grad and build a graph, and code may count on that:
    a gradient hook (``y.register_hook``), ``assert x.requires_grad``. A plain call refuses
    both ("cannot register a hook on a tensor that doesn't require gradient"), so the
    Hessian, the batched Jacobian, the HVP and the sparse routes of such a function were
    that 500 where torch answers; and a function torch refuses under its transforms was
    refused in the plain call's words, not torch's (``y.retain_grad()``: "can't retain_grad
    on Tensor that has requires_grad=False" where torch says it is "inside of a function
    being transformed by a functorch transform"). A function that fails however it is
    called fails again, in the words reverse mode gets. Outputs of any kind come back as
    the function returned them (its tensors unwrapped from the transform)."""
    start = time.monotonic()
    try:
        return fn(*inputs())
    except Exception as exc:
        if isinstance(exc, ServiceError) or is_oom(exc):
            raise
        failed = exc
    try:
        leaves, spec = pytree.tree_flatten(list(inputs()))
        where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point()
                                                                                          or leaf.is_complex())]
        # The plain call's error stands, the function not called again: where nothing is
        # differentiated (a second call was the same call, its side effects twice), and where
        # a second call as long as the first would end past the request's deadline (serving):
        # a function that took 40 s to raise was called again, its 500 a 504 at the front
        # end and, past the deadline's grace, the engine killed as hung, its batch-mates 503.
        now = time.monotonic()
        if not where or now + (now - start) > _serving_deadline():
            raise failed
    finally:
        del failed
    held: list[tuple[list[Any], Any, list[int]]] = []

    def reverse(*diff: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        full = list(leaves)
        for i, d in zip(where, diff):
            full[i] = d
        out_leaves, out_spec = pytree.tree_flatten(fn(*pytree.tree_unflatten(full, spec)))
        tensors = [j for j, leaf in enumerate(out_leaves) if isinstance(leaf, torch.Tensor)]
        held.append((out_leaves, out_spec, tensors))
        # Its tensors as vjp's aux, which vjp unwraps whatever their dtype (its output
        # must be floating: a zero stands there)
        return diff[0].new_zeros(()), tuple(out_leaves[j] for j in tensors)

    _, _, outs = torch.func.vjp(reverse, *(leaves[i] for i in where), has_aux=True)
    out_leaves, out_spec, tensors = held[-1]
    out_leaves = list(out_leaves)
    for j, t in zip(tensors, outs):
        out_leaves[j] = t
    return pytree.tree_unflatten(out_leaves, out_spec)


class _Serving(threading.local):
    deadline: Callable[[], float] | None = None


_serving = _Serving()


def _serving_deadline() -> float:
    deadline = _serving.deadline
    return math.inf if deadline is None else deadline()


class serving:
    """The deadline (``time.monotonic()`` seconds, read when needed) of the request this
    thread computes, for :func:`look` to decide whether a second call fits; a context
    manager (a class, not a generator: entered once a request). Outside any (in-process
    use), none."""

    __slots__ = ("deadline", "before")

    def __init__(self, deadline: Callable[[], float]) -> None:
        self.deadline = deadline

    def __enter__(self) -> None:
        self.before = _serving.deadline
        _serving.deadline = self.deadline

    def __exit__(self, *exc: Any) -> None:
        _serving.deadline = self.before


class AuxBox:
    """Wraps a function so that only tensors cross torch.func transforms.

    jacrev/vjp refuse non-tensor aux ("Expected tensors, got unsupported type"), so the
    non-tensor leaves of aux are kept here, beside the call, and put back afterwards.
    """

    def __init__(self, spec: FunctionSpec, differentiated: bool = True, complex_ok: bool = False) -> None:
        self.spec = spec
        # A pullback of given cotangents (vjp, hvp's c . H t) takes a complex output, as
        # torch.func.vjp does with a complex cotangent; only jacrev's rows (real unit
        # cotangents) and grad need a real one
        self.complex_ok = complex_ok
        # The output is differentiated in reverse mode (every route but evaluate, jvp and
        # a scalar's hvp): an integer or complex output is refused at the call
        # (check_floating), not left to torch.func.vjp, whose RuntimeError was the
        # function's 500 function_error, or to the wire (complex: 500 too)
        self.differentiated = differentiated
        self.leaves: list[Any] = []
        self.treespec: Any = None
        self.pid = os.getpid()

    def __call__(self, *args: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, ...]]:
        # one tensor per leaf in; pytree parameters rebuilt (dicts, tuples) for the function
        try:
            replay = kept_state.active.replay
            if replay is not None and replay.fn is self.spec.fn:  # (kept_state.Replay)
                result = replay.call(self.spec.parameters(args))
            else:
                result = self.spec.fn(*self.spec.parameters(args))
        finally:
            if os.getpid() != self.pid:
                # The function forked, and the child came back here instead of exec or
                # _exit: it would go on as a second engine, on copies of this one's
                # sockets (or in-process, a second server on its port). It ends here.
                os._exit(0)
        if not self.spec.has_aux:
            try:
                return _check_output(result, self.differentiated, self.complex_ok), ()
            except FunctionError as exc:
                # `return y, {"note": "hi"}` registered without has_aux=True was refused "the
                # output[1]['note'] is a str, not a tensor": not that aux is declared.
                # (torch's words stay last, as for every output it refuses)
                text = str(exc)
                if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.Tensor)
                        and result[1] is not None and text.startswith("the output[1]") and ", not a tensor" in text):
                    head, torch_says, tail = text.partition(" (torch.func:")
                    raise FunctionError(f"{head}; if output[1] is aux, register {self.spec.name} with has_aux=True"
                                        f"{torch_says and ' (torch.func:' + tail}") from None
                raise
        if not (isinstance(result, tuple) and len(result) == 2):
            # (it said only what was expected: a user who forgot aux was not told what came back)
            got = (f"a tuple of {len(result)}" if isinstance(result, tuple)
                   else "a tensor" if isinstance(result, torch.Tensor) else _a(type(result).__name__))
            raise FunctionError(f"{self.spec.name} has has_aux=True but did not return (output, aux): it returned "
                                f"{got}; return both, or register it without has_aux")
        out, aux = result
        out = _check_output(out, self.differentiated, self.complex_ok)
        _check_aux(aux)
        leaves, self.treespec = pytree.tree_flatten(aux)
        self.leaves = [_aux_leaf(leaf) for leaf in leaves]
        return out, tuple(leaf for leaf in self.leaves if isinstance(leaf, torch.Tensor))

    def restore(self, tensors: Sequence[torch.Tensor]) -> Any:
        if not self.spec.has_aux:
            return None
        tensors = list(tensors)
        if len(tensors) != sum(isinstance(leaf, torch.Tensor) for leaf in self.leaves):
            raise FunctionError(_CHANGED.format(what="aux"))
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


class GradOffWatch:
    """Whether a function switches grad off (``torch.no_grad``, ``torch.set_grad_enabled(False)``)
    in one plain call.

    ``no_grad`` stops reverse mode only: forward mode sees through it. So for such a
    function ``jacfwd`` is not ``jacrev`` (``x * c`` with ``c = x**2`` under ``no_grad``:
    jacrev's derivative is ``c``, jacfwd's ``3 x**2``), and Hessian strategies differ
    from ``torch.func.hessian``'s own (jacfwd over jacrev). Both go through
    ``set_grad_enabled.__init__``, which is watched (:func:`_watch_grad_switch`); the grad
    state itself is not, since a custom ``autograd.Function`` runs its ``forward`` with
    grad off too, and that one is fine: both modes use its own derivative rules. Any
    switch counts, even around a constant: the price of a false alarm is reverse mode,
    which is always jacrev's answer.

    Watched around a derivative, it also sees a backward pass that switches grad off: a
    custom ``autograd.Function`` whose backward is ``@once_differentiable`` (which runs
    it under ``no_grad``) or uses ``no_grad`` itself. Reverse over reverse then
    differentiates a gradient computed without a graph, and answers 0 where the Hessian
    is not 0; forward over reverse (torch's own) sees through it."""

    def __init__(self, active: bool = True) -> None:
        self.active = active  # inactive: calls pass straight through, unwatched
        self.seen = False

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.active:
            return fn(*args)
        _watch_grad_switch()
        _WATCHING.append((threading.get_ident(), self))
        try:
            return fn(*args)
        finally:
            _WATCHING.pop()


# (thread, watch) while a watched call runs: the in-process layout's worker is a thread
# beside others that may switch grad off for their own reasons.
_WATCHING: list[tuple[int, GradOffWatch]] = []


def _watch_grad_switch() -> None:
    """Wrap ``torch.set_grad_enabled.__init__`` (once per process) to tell the watch of
    the running call when grad is switched off; one list check per switch otherwise."""
    cls = torch.autograd.grad_mode.set_grad_enabled
    original = cls.__init__
    if getattr(original, "_watched", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, mode: bool) -> None:
        # On the watched call's thread; or in a backward pass, which autograd runs on a
        # device thread of its own for CUDA tensors (a false alarm costs torch's strategy).
        if not mode and _WATCHING and (
                _WATCHING[-1][0] == threading.get_ident() or torch._C._current_graph_task_id() != -1):
            _WATCHING[-1][1].seen = True
        original(self, mode)

    __init__._watched = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


def as_input_dtypes(value: Any, primals: Sequence[Any], depth: int) -> Any:
    """``value`` (a Jacobian or Hessian tree, nested outputs, then parameters) with each
    block in the dtype reverse mode gives it: a Jacobian block is a gradient, in its
    parameter leaf's dtype; a Hessian block ``[i][j]`` is jacfwd's derivative of
    gradient ``i``, in leaf ``i``'s dtype (``depth`` 1 and 2). Forward mode and other
    Hessian strategies type blocks by the output, or by leaf ``j``: with mixed dtypes,
    a float32 output of a float64 input came back float32 where jacrev says float64."""
    dtypes = [leaf.dtype for leaf in pytree.tree_leaves(primals)]
    leaves, spec = pytree.tree_flatten(value)
    n = len(dtypes)
    if not n or not leaves or (all(d == dtypes[0] for d in dtypes) and all(leaf.dtype == dtypes[0] for leaf in leaves)):
        return value
    step = n ** (depth - 1)  # leaves of one (output, leaf i) block row
    cast = [leaf.to(dtypes[(k // step) % n]) for k, leaf in enumerate(leaves)]
    return pytree.tree_unflatten(cast, spec)
