"""What a function carries besides its source, for the pattern cache's key.

The key holds a registered function's name, or, without one (the library's
``sparse_jacobian(fn, args)``), its qualified name and source fingerprint
(:func:`.patterns.function_fingerprint`). Two functions may share both: the closures of
one factory, lambdas written on one line. Their state tells them apart.
"""

from __future__ import annotations

import hashlib
import inspect
import marshal
from typing import Any, Callable

import torch

__all__ = ["function_state"]


def function_state(fn: Callable[..., Any]) -> str:
    """A hash of what a function carries besides its source: its code object (two
    lambdas on one line share their source), closure cells, defaults and bound
    ``self``. ``make(k)`` returning ``lambda x: torch.roll(x, k)`` gives functions with
    one source and one code: by source alone, ``make(5)``'s Jacobian reused
    ``make(1)``'s pattern (exact, so unchecked: wrong values). Tensors count by value
    (by identity and version past a million elements), numbers and strings by value,
    functions by their own state, other objects by type and identity."""
    h = hashlib.sha256()
    _state_into(h, inspect.unwrap(fn), 0)
    return h.hexdigest()[:16]


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
    else:
        h.update(f"{type(v).__qualname__}:{id(v)}".encode())
