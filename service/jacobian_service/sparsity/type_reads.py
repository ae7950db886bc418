"""What a traced function asks of its tensors' type, which jacrev's tensors answer otherwise.

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
object is then read (its bytecode, once) for a use of ``type`` or ``__class__``. A
function that reads either gets a pattern checked against its products at every request
(``detect.TYPE_NOTE``): a branch that took another arm is proven wrong there and the
answer is computed densely. ``isinstance(x, torch.Tensor)``, ``torch.is_tensor`` and
``torch.overrides.is_tensor_like`` answer the same for both, and are not watched.
"""

from __future__ import annotations

import dis
import functools
import os
import sys
import sysconfig
import types
from typing import Any

__all__ = ["TypeWatch"]


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
# Installed packages (the user's own among them): a system Python keeps them under the
# standard library's folder (/usr/lib/python3/dist-packages, .../python3.11/site-packages).
_INSTALLED = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")

# Names whose load is a type read: the builtin ``type`` (a global), ``__class__`` (an
# attribute, or getattr's string).
_TYPE_LOADS = {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF"}
_ATTR_LOADS = {"LOAD_ATTR", "LOAD_METHOD", "LOAD_CONST"}

# torch._C's queries of the functorch transform state outside its _functorch module.
_FUNCTORCH_QUERIES = {"_are_functorch_transforms_active"}


@functools.lru_cache(maxsize=4096)
def _reads_type(code: types.CodeType) -> bool:
    """Whether ``code`` (not the functions nested in it: they run as their own calls)
    loads the builtin ``type`` or a ``__class__``."""
    for ins in dis.get_instructions(code):
        if ins.opname in _TYPE_LOADS and ins.argval == "type":
            return True
        if ins.opname in _ATTR_LOADS and ins.argval == "__class__":
            return True
    return False


class TypeWatch:
    """Watches one trace (a context manager around the function's call); ``paused``
    around the tracer's own dispatch, which need not be watched (and is most of the
    calls). ``reads()`` says afterwards what the function read of its types."""

    def __init__(self) -> None:
        self.codes: set[types.CodeType] = set()
        self.queries: set[tuple[types.CodeType, str]] = set()  # (caller, functorch query or autograd attribute)
        self.blind = False  # another profiler holds the hook: nothing was watched
        self._watching = False  # inside the function's call
        self._paused = 0

    def __enter__(self) -> "TypeWatch":
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
            self._watching = False
            sys.setprofile(None)

    def _event(self, frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "call":
            self.codes.add(frame.f_code)
        elif event == "c_call":
            module = getattr(arg, "__module__", None)
            if module == "torch._C._functorch" or getattr(arg, "__name__", None) in _FUNCTORCH_QUERIES:
                self.queries.add((frame.f_code, arg.__name__))

    def autograd(self, attribute: str, caller: types.CodeType) -> None:
        """``caller`` read a traced tensor's autograd state (``grad_fn``, ``is_leaf``):
        jacrev's computed tensors have a ``grad_fn`` node and are no leaves, the
        tracer's record nothing (``detect._Traced`` says what it can, not a node)."""
        self.queries.add((caller, attribute))

    def pause(self) -> None:
        """The tracer's own dispatch starts: not the function's code (most of the calls
        a trace makes; a plain pair of calls, not a context manager, since it runs at
        every op). Nested pauses resume at the outermost ``resume``."""
        self._paused += 1
        if self._paused == 1 and self._watching:  # (never another profiler's hook)
            sys.setprofile(None)

    def resume(self) -> None:
        self._paused -= 1
        if self._paused == 0 and self._watching:
            sys.setprofile(self._event)

    def reads(self) -> list[str]:
        """Where the function read a type (``type``/``__class__`` in a function of its
        own or of a library it calls; functorch's queries), or that it could not be
        watched; empty when it read none."""
        global _LIBRARIES
        if self.blind:
            return ["another profiler was installed: not watched"]
        if _LIBRARIES is None:
            _LIBRARIES = _library_dirs()
        found = {_where(c) for c in self.codes if _users(c) and _reads_type(c)}
        return sorted(found) + sorted({f"{name} in {_where(c)}" for c, name in self.queries if _users(c)})


def _users(code: types.CodeType) -> bool:
    """Code of the user's (or of a library it calls), not of torch's, numpy's, scipy's,
    this service's or the standard library's (see _library_dirs)."""
    assert _LIBRARIES is not None
    libraries, stdlib = _LIBRARIES
    name = code.co_filename
    if name.startswith(libraries):
        return False
    if any(part in name for part in _INSTALLED):
        return True
    # ("<string>": code a library generates, dataclasses' __eq__, namedtuple's __new__)
    return not name.startswith(stdlib + ("<frozen", "<string>"))


def _where(code: types.CodeType) -> str:
    return f"{code.co_name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"
