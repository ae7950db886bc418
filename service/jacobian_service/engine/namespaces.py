"""The shared namespaces a function may rebind names in, put back after each batch.

Every function runs in the process that serves every other function, against the same
module objects. A function that rebinds a name in one of them changed every later
request of every function, and the engine's own computations, for as long as the
engine lived (measured): ``torch.autograd.grad = ...`` (or ``torch.func.vmap``) made
every later Jacobian of every function a 500 carrying the patch's error, with ``/readyz``
still 200; ``torch.sin = torch.cos`` or ``torch.Tensor.sin = ...`` would have made
every later ``sin`` silently ``cos``; ``sys.modules["orjson"] = None`` made a later
``import orjson`` fail.

:class:`Namespaces` takes the names of the modules the engine and the functions share
(torch and the parts of it the engine calls, numpy, builtins, orjson, the service's
own modules) and of ``sys.modules`` as the engine starts, and after each batch puts
back what a function rebound or deleted, naming it in the log once per function.
Names added to a module stay (torch and numpy bind submodules and caches as they are
lazily imported, legitimately); a name added to a class (``torch.Tensor``,
``torch.nn.Module``) shadows the method its base defines, and is taken away again.

The check after a batch costs about 15 us (ProcessSettings: ~0.6 ms): each dict's version tag (CPython's
``ma_version_tag``, which every change of the dict bumps) is compared with the one
taken, and only a dict that changed is compared name by name. Where the tag cannot be
read (another Python), every dict is compared (~0.6 ms).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger("jacobian_service.engine")

__all__ = ["Namespaces"]

# The modules guarded, where imported: torch and the parts of it whose functions the
# engine calls by attribute (torch.func.jacrev, torch.autograd.grad, pytree.tree_map...),
# and what the engine encodes answers with.
_MODULES = (
    "builtins", "numpy", "orjson", "torch", "torch.func", "torch.autograd", "torch.autograd.forward_ad",
    "torch.autograd.functional", "torch.autograd.graph", "torch.nn.functional", "torch.linalg", "torch.fft",
    "torch.special", "torch.utils._pytree", "torch._functorch.apis", "torch._functorch.eager_transforms",
    "torch._functorch.vmap", "torch._C", "torch._C._functorch",
)
_SERVICE = "jacobian_service"  # the service's own modules: every one imported when the engine starts
_CLASSES = ("torch.Tensor", "torch.nn.Module")  # a name added shadows a base's method

_MISSING = object()


def _version_reader() -> Any:
    """A function giving a view of a dict's version tag, or None where it cannot be trusted:
    CPython lays a dict out as its header, ``ma_used``, then the 64-bit tag (3.11-3.13);
    checked here on a dict of our own that every change bumps it."""
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return None
    offset = object.__basicsize__ + ctypes.sizeof(ctypes.c_ssize_t)

    def version(d: dict) -> Any:
        """A view of the tag, read by its ``value`` (~60 ns; making the view takes ~3 us,
        once per dict: each guarded dict lives as long as the process)."""
        return ctypes.c_uint64.from_address(id(d) + offset)

    probe: dict[str, Any] = {"a": 1}
    tag = version(probe)
    seen = tag.value
    for change in (lambda: probe.__setitem__("a", 2), lambda: probe.__setitem__("b", 1), lambda: probe.pop("a")):
        change()
        if tag.value == seen:
            return None
        seen = tag.value
    return version


def _watched(value: Any) -> bool:
    return isinstance(value, ModuleType) or callable(value)


def _owner_watches(owner: Any, value: Any) -> bool:
    return owner is sys.modules or _watched(value)


def _class_dict(cls: type) -> dict:
    """The dict behind a class's read-only ``__dict__`` proxy (the one its attributes are
    set in)."""
    return next(r for r in gc.get_referents(cls.__dict__) if isinstance(r, dict))


class _Guarded:
    """One namespace: its dict as taken, and the dict's version then."""

    def __init__(self, label: str, owner: Any, d: dict, is_class: bool, version: Any) -> None:
        self.label, self.owner, self.d, self.is_class = label, owner, d, is_class
        # A module's own state (a flag, a counter, a cache it rebinds as it runs) is not
        # watched: only what code calls or imports by name, functions, classes, modules.
        self.taken = dict(d) if is_class or owner is sys.modules else {k: v for k, v in d.items() if _watched(v)}
        self.tag = version(d) if version is not None else None
        self.version = self.tag.value if self.tag is not None else None

    def changed(self) -> list[tuple[str, Any]]:
        """(name, value taken or _MISSING) of each name a function rebound, deleted or
        (in a class) added; new names of a module become part of what is taken."""
        d, taken = self.d, self.taken
        found = [(k, v) for k, v in taken.items() if d.get(k, _MISSING) is not v]
        added = [k for k in d if k not in taken]  # (a module's unwatched names among them: cheap, and rare)
        if self.is_class:
            found += [(k, _MISSING) for k in added]
        else:
            taken.update((k, d[k]) for k in added if _owner_watches(self.owner, d[k]))
        return found

    def put_back(self, name: str, value: Any) -> None:
        if self.owner is sys.modules:
            if value is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
        elif value is _MISSING:
            delattr(self.owner, name)
        else:
            setattr(self.owner, name, value)  # through the class: its method cache is told


class Namespaces:
    """The names of the shared namespaces as they are when made; :meth:`restore` puts
    back what a function changed."""

    def __init__(self) -> None:
        if "torch" in sys.modules:
            # Imported by torch at the first backward pass of every jacrev (its
            # compiled_autograd), and then it rebinds torch.manual_seed (wrapped): imported
            # before the names are taken, not blamed on the first function to run.
            import torch._dynamo  # noqa: F401
        self._version = _version_reader()
        self._modules = sys.modules
        guarded: list[_Guarded] = []
        names = [n for n in _MODULES if n in sys.modules]
        names += sorted(n for n in sys.modules if n == _SERVICE or n.startswith(_SERVICE + "."))
        for name in names:
            module = sys.modules[name]
            if isinstance(module, ModuleType):
                guarded.append(_Guarded(name, module, vars(module), False, self._version))
        for path in _CLASSES:
            module, _, attr = path.rpartition(".")
            cls = getattr(sys.modules.get(module), attr, None)
            if isinstance(cls, type):
                guarded.append(_Guarded(path, cls, _class_dict(cls), True, self._version))
        guarded.append(_Guarded("sys.modules", sys.modules, sys.modules, False, self._version))
        self._guarded = guarded
        self._versions = [g.version for g in guarded]
        self._named: set[tuple[str, str]] = set()  # (function, namespace) already logged

    def restore(self, function: str) -> None:
        """Put back what differs now (nothing, nearly always: a version tag read each)."""
        if sys.modules is not self._modules:  # the whole table rebound: the import system keeps the old one
            sys.modules = self._modules
            self._log(function, "sys", ["modules"])
        if self._version is not None and [g.tag.value for g in self._guarded] == self._versions:
            return  # nothing changed (~0.3 us a dict)
        for guarded in self._guarded:
            if guarded.tag is not None and guarded.tag.value == guarded.version:
                continue
            found = guarded.changed()
            for name, value in found:
                try:
                    guarded.put_back(name, value)
                except Exception as exc:  # a read-only attribute: nothing was changed there after all
                    log.debug("could not put back %s.%s: %s", guarded.label, name, exc)
            if found:
                self._log(function, guarded.label, [name for name, _ in found])
            if guarded.tag is not None:
                guarded.version = guarded.tag.value
        self._versions = [g.version for g in self._guarded]

    def _log(self, function: str, label: str, names: list[str]) -> None:
        if (function, label) in self._named:
            return
        self._named.add((function, label))
        shown = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        where = "sys.modules entries" if label == "sys.modules" else f"names in {label}"
        log.warning("%s rebound or deleted %s (%s) and left them so; put back for the other functions (they are "
                    "put back after each of its calls)", function or "a function", where, shown)
