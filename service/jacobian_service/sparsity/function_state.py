"""What a function carries besides its source, for the pattern cache's key.

The key holds a registered function's name, or, without one (the library's
``sparse_jacobian(fn, args)``), its qualified name and source fingerprint
(:func:`.patterns.function_fingerprint`). Two functions may share both: the closures of
one factory, lambdas written on one line. Their state tells them apart.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import marshal
import types
from typing import Any, Callable

import torch

__all__ = ["function_state"]


def function_state(fn: Callable[..., Any]) -> str:
    """A hash of what a function carries besides its source: its code object (two
    lambdas on one line share their source), closure cells, defaults and bound
    ``self``, the plain values it reads from its globals. ``make(k)`` returning ``lambda x: torch.roll(x, k)`` gives functions with
    one source and one code: by source alone, ``make(5)``'s Jacobian reused
    ``make(1)``'s pattern (exact, so unchecked: wrong values). Tensors count by value
    (by identity and version past a million elements), numbers and strings by value,
    functions (and partials) by their own state, dicts by their items, other objects
    by type, identity and attributes (``__dict__``; not a module's or a class's)."""
    h = hashlib.sha256()
    _state_into(h, inspect.unwrap(fn), 0)
    return h.hexdigest()[:16]


#: Globals a function's key holds by value (modules, functions and classes it names are
#: code: the source fingerprint covers them).
_PLAIN = (bool, int, float, complex, str, bytes, torch.Tensor, tuple, list, dict)


def _state_into(h: Any, v: Any, depth: int) -> None:
    if depth > 3:
        h.update(b"...")
        return
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        h.update(repr(v).encode())
    elif isinstance(v, torch.Tensor):
        h.update(f"T{v.dtype}{tuple(v.shape)}{v.layout}".encode())
        if v.layout == torch.strided and v.numel() <= 1 << 20 and not v.requires_grad:
            t = v.detach().contiguous().cpu().reshape(-1)
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{id(v)}:{v._version}".encode())
    elif isinstance(v, (tuple, list)):
        h.update(f"{type(v).__name__}{len(v)}".encode())
        for item in v[:64]:
            _state_into(h, item, depth + 1)
    elif inspect.ismethod(v):
        _state_into(h, v.__self__, depth + 1)
        _state_into(h, v.__func__, depth + 1)
    elif inspect.isfunction(v):
        h.update(marshal.dumps(v.__code__))
        for cell in v.__closure__ or ():
            try:
                _state_into(h, cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                h.update(b"(empty)")
        _state_into(h, v.__defaults__, depth + 1)
        _state_into(h, tuple(sorted((v.__kwdefaults__ or {}).items())), depth + 1)
        # Plain values it reads from its module's globals (``SHIFT = 2`` run again in a
        # notebook: same code, another stencil), by value as its closure's
        for name in v.__code__.co_names[:64]:
            value = v.__globals__.get(name)
            if isinstance(value, _PLAIN):
                h.update(name.encode())
                _state_into(h, value, depth + 1)
    elif isinstance(v, functools.partial):  # partial(f, k=1) and partial(f, k=2): by what they bind
        h.update(b"partial")
        _state_into(h, v.func, depth + 1)
        _state_into(h, v.args, depth + 1)
        _state_into(h, v.keywords, depth + 1)
    elif isinstance(v, dict):
        h.update(f"dict{len(v)}".encode())
        for key, item in list(v.items())[:64]:
            _state_into(h, key, depth + 1)
            _state_into(h, item, depth + 1)
    else:
        h.update(f"{type(v).__qualname__}:{id(v)}".encode())
        attributes = getattr(v, "__dict__", None)
        if isinstance(attributes, dict) and not isinstance(v, (type, types.ModuleType)):
            # A callable object (or a bound method's self) keyed by identity alone kept
            # its first pattern after ``op.shift = 2``: exact, unchecked, wrong values.
            _state_into(h, attributes, depth + 1)
