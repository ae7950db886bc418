"""What a traced function asks of its tensors' type, which jacrev's tensors answer otherwise.

(Every pattern is now checked against a random product at every request, whatever this
watch finds (``compute._proven_wrong``): no reading of code sees every way to tell the
tracer's tensors from jacrev's (a name built at run time, ``operator.attrgetter``'s
dotted string, code compiled under a library's file name). What it finds is the note
that says why a pattern may differ.)

The tracer's tensors are a subclass of ``torch.Tensor`` (``detect._Traced``); jacrev's are
``torch.Tensor`` itself to Python (functorch wraps them in C++), and functorch's own
queries (``torch._C._functorch.is_functorch_wrapped_tensor``, ``current_level``, ...)
say they are wrapped; their computed tensors have a ``grad_fn`` and are no leaves. A
function that branches on ``type(x) is torch.Tensor``, ``x.__class__``,
``type(x).__name__``, functorch's state or ``y.grad_fn`` takes another arm under the
tracer than under jacrev; where both arms compute the same values but not the same
derivative (``x * x[0].detach()`` against ``x * x[0]``), nothing in the values tells
(``detect._diverged``), and the trace's pattern missed jacrev's entries: an exact,
unchecked, wrong 200.

``type`` cannot be hooked (no Python hook changes what it says of an object), so the
trace is watched instead: while the function runs, ``sys.setprofile`` collects the Python
code it runs (its own, its helpers', other libraries'; not torch's, numpy's, the
standard library's nor this service's), the functorch queries it calls and its reads
of ``grad_fn`` and ``is_leaf`` (``detect._Traced``'s properties); each code
object is then read (its bytecode, once) for a use of ``type`` or ``__class__`` (by name,
as ``builtins.type``, or under another name: a global, closure variable or argument
bound to the builtin ``type`` when the code is called), of ``vars`` or ``dir``, or of an
attribute the tracer's tensors have otherwise than jacrev's (their own ``value``, ``root``,
``tracer``, ``__dict__``, ``__torch_dispatch__``, ...: ``getattr(x, "value", x)``, an
unwrapping idiom, took the tracer's plain value). A
function that reads either gets a pattern checked against its products at every request
(``detect.TYPE_NOTE``): a branch that took another arm is proven wrong there and the
answer is computed densely. ``isinstance(x, torch.Tensor)``, ``torch.is_tensor`` and
``torch.overrides.is_tensor_like`` answer the same for both, and are not watched.

What the watch cannot see makes the pattern checked just the same (never trusted): another
profiler holding the hook, the function taking the hook down or replacing it
(``sys.setprofile``: its calls are seen), a thread it starts (``sys.setprofile`` watches
one thread; a worker thread started before the call is not seen, but there jacrev's
transforms, which are the calling thread's, do not differentiate either). Code named ``<string>``
(``exec``'s, ``python -c``'s) is the user's too. A ``__del__`` run in the middle of the
function (a dropped reference, the collector) is no part of it and is not watched.
"""

from __future__ import annotations

import _thread
import dis
import functools
import os
import sys
import sysconfig
import types
from typing import Any

__all__ = ["TypeWatch", "library_dirs"]


def _library_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Folders whose code is not the user's: torch, numpy and scipy (they branch on types
    for their own dispatch, the same under jacrev as far as a derivative goes) and this
    service (the tracer itself); and the standard library's."""
    import numpy
    import scipy
    import torch

    dirs = {os.path.dirname(m.__file__ or "") for m in (torch, numpy, scipy)}
    dirs.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # jacobian_service/
    stdlib = {sysconfig.get_paths().get(key) or "" for key in ("stdlib", "platstdlib")}
    return tuple(os.path.join(d, "") for d in dirs if d), tuple(os.path.join(d, "") for d in stdlib if d)


_LIBRARIES: tuple[tuple[str, ...], tuple[str, ...]] | None = None


def library_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``_library_dirs()``, made once: at the engine's preload (``engine.sparse.preload``),
    where this module is imported before the engine takes its namespaces' names (the
    zygote's imports), so that the first watch does not rebind a name the engine guards
    (it answered the first sparse request's function a 500, "rebound or deleted names in
    jacobian_service.sparsity.type_reads (_LIBRARIES)")."""
    global _LIBRARIES
    if _LIBRARIES is None:
        _LIBRARIES = _library_dirs()
    return _LIBRARIES


# Installed packages (the user's own among them): a system Python keeps them under the
# standard library's folder (/usr/lib/python3/dist-packages, .../python3.11/site-packages).
_INSTALLED = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")

# Names whose load is a type read: the builtin ``type`` (a global), ``__class__`` or
# ``type`` as an attribute (``builtins.type``; torch's own ``x.type()`` too, at the cost of a
# check) or getattr's string.
_TYPE_LOADS = {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF"}
_ATTR_LOADS = {"LOAD_ATTR", "LOAD_METHOD", "LOAD_CONST"}
# Loads of other names, whose binding is looked at when the code is called: the globals'
# (``kind = type`` at module level), the closure's and the arguments' (``t=type``).
_LOCAL_LOADS = {"LOAD_FAST", "LOAD_DEREF", "LOAD_CLASSDEREF", "LOAD_CLOSURE"}

# Builtins whose call from the user's code leaves it unwatched: the hook replaced, a thread
# started (the hook is the calling thread's alone).
_UNWATCHING = {id(sys.setprofile): "replaced the profiler (sys.setprofile)",
               id(_thread.start_new_thread): "started a thread"}
if hasattr(_thread, "start_joinable_thread"):  # (3.13's)
    _UNWATCHING[id(_thread.start_joinable_thread)] = "started a thread"

# torch._C's queries of the functorch transform state outside its _functorch module.
_FUNCTORCH_QUERIES = {"_are_functorch_transforms_active"}


# Builtins that list an object's own attributes, the tracer's tensors' among them.
_LISTINGS = {"type", "vars", "dir"}
# Attributes read by name (or getattr's string): ``__class__``, ``builtins.type``, and
# ``sys.setprofile``, which can take the watch's hook down and put it back from C
# (``map(sys.setprofile, ...)``: no call event) around a type read.
_ATTRIBUTES = {"__class__", "type", "setprofile"}
# What a name bound otherwise (``kind = type``, ``t=type``) may stand for.
_BOUND = (type, sys.setprofile)


@functools.lru_cache(maxsize=4096)
def _reads_type(code: types.CodeType, own: frozenset[str]) -> bool:
    """Whether ``code`` (not the functions nested in it: they run as their own calls)
    loads the builtin ``type`` (``vars``, ``dir``), a ``__class__`` or one of ``own``, the
    attributes the tracer's tensors have otherwise than jacrev's (their ``value``, their
    ``__dict__``, ...: ``getattr(x, "value", x)`` unwrapped the traced tensor)."""
    for ins in dis.get_instructions(code):
        if ins.opname in _TYPE_LOADS and ins.argval in _LISTINGS:
            return True
        if ins.opname in _ATTR_LOADS and (ins.argval in _ATTRIBUTES or ins.argval in own):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _names(code: types.CodeType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The global names and the local (argument, closure) names ``code`` loads, each of
    which may be bound to ``type`` under another name."""
    globals_, locals_ = set(), set()
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(ins.argval, str):
            globals_.add(ins.argval)
        elif ins.opname in _LOCAL_LOADS and isinstance(ins.argval, str):
            locals_.add(ins.argval)
    return tuple(sorted(globals_)), tuple(sorted(locals_))


class TypeWatch:
    """Watches one trace (a context manager around the function's call); ``paused``
    around the tracer's own dispatch, which need not be watched (and is most of the
    calls). ``reads()`` says afterwards what the function read of its types."""

    def __init__(self, own: frozenset[str] = frozenset()) -> None:
        self.own = own  # the traced tensors' attributes that jacrev's have not, or otherwise
        self.codes: set[types.CodeType] = set()
        self.queries: set[tuple[types.CodeType, str]] = set()  # (caller, functorch query or autograd attribute)
        self.blind = False  # another profiler holds the hook: nothing was watched
        self.unwatched: set[str] = set()  # what the function did that the watch cannot see past
        self.aliased: set[types.CodeType] = set()  # code that called type under another name
        self._seen_globals: set[tuple[types.CodeType, int]] = set()
        self._watching = False  # inside the function's call
        self._finalizer: types.FrameType | None = None  # the __del__ running now, not watched
        self._paused = 0

    def __enter__(self) -> "TypeWatch":
        library_dirs()
        if sys.getprofile() is not None:
            # (cProfile, a debugger's profiler: not chained, since the hook it holds may be
            # no Python callable; the pattern is checked all the same, see reads)
            self.blind = True
        else:
            self._watching = True
            sys.setprofile(self._event)
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.blind:
            self._still_held()
            self._watching = False
            sys.setprofile(None)

    def _event(self, frame: types.FrameType, event: str, arg: Any) -> None:
        if self._finalizer is not None:
            # (a finalizer the collector or a dropped reference ran in the middle of the
            # function: anyio's stream __del__ reads __class__; it computes nothing the
            # function returns)
            if event == "return" and frame is self._finalizer:
                self._finalizer = None
            return
        if event == "call":
            code = frame.f_code
            if code.co_name == "__del__":
                self._finalizer = frame
                return
            self.codes.add(code)
            if code not in self.aliased and _users(code):
                self._aliases(frame, code)
        elif event == "c_call":
            why = _UNWATCHING.get(id(arg))
            if why is not None and frame.f_code.co_filename != __file__:
                self.unwatched.add(f"{why} in {_where(frame.f_code)}")
            module = getattr(arg, "__module__", None)
            if module == "torch._C._functorch" or getattr(arg, "__name__", None) in _FUNCTORCH_QUERIES:
                self.queries.add((frame.f_code, arg.__name__))

    def _aliases(self, frame: types.FrameType, code: types.CodeType) -> None:
        """Whether ``code``, as called now, loads ``type`` under another name: a global
        (looked at once per globals), an argument or a closure variable (at each call)."""
        globals_, locals_ = _names(code)
        key = (code, id(frame.f_globals))
        if globals_ and key not in self._seen_globals:
            self._seen_globals.add(key)
            builtins = frame.f_builtins
            if any(_bound(frame.f_globals.get(n, builtins.get(n))) for n in globals_):
                self.aliased.add(code)
                return
        if locals_:
            bound = frame.f_locals  # (at the call: arguments and closure cells)
            if any(_bound(bound.get(n)) for n in locals_):
                self.aliased.add(code)

    def autograd(self, attribute: str, caller: types.CodeType) -> None:
        """``caller`` read a traced tensor's autograd state (``grad_fn``, ``is_leaf``):
        jacrev's computed tensors have a ``grad_fn`` node and are no leaves, the
        tracer's record nothing (``detect._Traced`` says what it can, not a node)."""
        self.queries.add((caller, attribute))

    def _still_held(self) -> None:
        """At each op and at the end: the hook is still this watch's, unless the function
        took it down in a way no call event shows (from C: ``map(sys.setprofile, ...)``)."""
        if sys.getprofile() != self._event:
            self.unwatched.add("the profiler was taken down or replaced")

    def pause(self) -> None:
        """The tracer's own dispatch starts: not the function's code (most of the calls
        a trace makes; a plain pair of calls, not a context manager, since it runs at
        every op). Nested pauses resume at the outermost ``resume``."""
        self._paused += 1
        if self._paused == 1 and self._watching:  # (never another profiler's hook)
            self._still_held()
            sys.setprofile(None)

    def resume(self) -> None:
        self._paused -= 1
        if self._paused == 0 and self._watching:
            sys.setprofile(self._event)

    def reads(self) -> list[str]:
        """Where the function read a type (``type``/``__class__`` in a function of its
        own or of a library it calls; functorch's queries), or that it could not be
        watched; empty when it read none."""
        if self.blind:
            return ["another profiler was installed: not watched"]
        unseen = [f"{why}: not watched" for why in sorted(self.unwatched)]
        found = {_where(c) for c in self.codes if _users(c) and (_reads_type(c, self.own) or c in self.aliased)}
        return unseen + sorted(found) + sorted({f"{name} in {_where(c)}" for c, name in self.queries if _users(c)})


def _bound(value: Any) -> bool:
    return any(value is b for b in _BOUND)


@functools.lru_cache(maxsize=4096)
def _users(code: types.CodeType) -> bool:
    """Code of the user's (or of a library it calls), not of torch's, numpy's, scipy's,
    this service's or the standard library's (see _library_dirs)."""
    libraries, stdlib = library_dirs()
    name = code.co_filename
    if name.startswith(libraries):
        return False
    if any(part in name for part in _INSTALLED):
        return True
    # ("<string>" is exec's and python -c's, the user's as much as a library's: watched,
    # though a dataclass's generated __eq__ or __repr__, which reads __class__, then costs
    # a check; "<frozen ...>" is the standard library's)
    return not name.startswith(stdlib + ("<frozen",))


def _where(code: types.CodeType) -> str:
    return f"{code.co_name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"
