"""Kernels a function registers over torch's own operators (``torch.library``).

``torch.library.Library("aten", "IMPL").impl("sin", f, "CPU")`` in a function replaced
torch's ``sin`` on the CPU for the whole process: every later ``evaluate`` of every
function that calls ``sin`` answered ``f``'s values, silently, for as long as the engine
lived. torch keeps no way to take such a kernel back from outside the ``Library``
object that registered it (the function holds it), so the engine leaves instead, for
one whose operators are torch's (``process_settings``: a setting that cannot be put
back).

torch itself registers kernels as it goes (batching rules for ``vmap`` the first time
it runs, from ``torch/_functorch``), and a function may define operators of its own
(``torch.library.custom_op``, a namespace of its own): neither counts. A new kernel
counts when its operator's namespace is torch's (``aten``, ``prims``...) and the
dispatcher says it was registered from a file outside torch's package.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.library

__all__ = ["KERNELS", "watch_direct"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_NAMESPACES = frozenset({"aten", "prims", "prim", "quantized", "_quantized", "sparse"})


class _Kernels:
    """``torch.library``'s registered kernels ("ns/op/dispatch key"), as vetted so far."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.foreign: list[str] = []  # those the last look found
        self._looked: tuple[int, int] | None = None  # ``count`` when the last look found none foreign

    def take(self) -> None:
        """What is registered now is the engine's (torch's, the functions' modules' as
        imported)."""
        self.seen = set(_impls())
        self._looked = self.count()

    def count(self) -> tuple[int, int]:
        """The sizes of the two sets a kernel is noted in, read at every batch: any kernel
        registered grows one of them (``_DIRECT`` never shrinks). Their union's size, read
        before, built a set of ~1,900 names a batch (~12 us, the settings' dearest check)."""
        return len(getattr(torch.library, "_impls", ())), len(_DIRECT)

    def changed(self, now: tuple[int, int], taken: Any) -> bool:
        """Whether a kernel over a torch operator came from outside torch since the
        last look; the new ones that did not are taken as the engine's."""
        if now == self._looked:
            return False
        new = set(_impls()) - self.seen
        foreign = _foreign(new)
        self.seen |= new - foreign
        self.foreign = sorted(foreign)
        if not foreign:  # (foreign ones: looked for again at every pass, until the engine leaves)
            self._looked = now
        return bool(foreign)

    def put(self, taken: Any) -> None:
        raise RuntimeError(f"{', '.join(self.foreign[:5])} registered from outside torch, over torch's own "
                           "operators; torch.library cannot take a kernel back from outside the Library object "
                           "that registered it")


def _impls() -> set[str]:
    found = getattr(torch.library, "_impls", set())
    return found | _DIRECT if _DIRECT else found


# Kernels registered through torch's own ``torch._C._dispatch_library`` (what
# ``torch.library.Library`` wraps), which ``torch.library._impls`` never hears of: one
# over ``aten::sin`` on the CPU had every later function's ``sin`` answer its values, with
# a 200, for the engine's life, no line in any log (measured). In an engine process the
# name is wrapped (``watch_direct``), each ``impl`` it is asked for noted here.
_DIRECT: set[str] = set()


class _Module:
    """A ``_dispatch_library`` module whose ``impl`` is noted; the rest is the module's."""

    def __init__(self, module: Any, namespace: str) -> None:
        self._module, self._namespace = module, namespace

    def impl(self, name: str, dispatch: Any = "", *rest: Any, **kwargs: Any) -> Any:
        result = self._module.impl(name, dispatch, *rest, **kwargs)
        key = str(getattr(dispatch, "name", dispatch) or "")
        _DIRECT.add(f"{self._namespace}/{str(name).split('::')[-1]}/{key}")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def watch_direct() -> None:
    """``torch._C._dispatch_library`` wrapped (an engine process, before its namespaces
    are taken: then a function cannot rebind it back): the kernels of torch's operators
    registered past ``torch.library`` are vetted as those through it are."""
    made = torch._C._dispatch_library
    if getattr(made, "_watched", False):
        return

    def dispatch_library(kind: str, namespace: str, *args: Any, **kwargs: Any) -> Any:
        module = made(kind, namespace, *args, **kwargs)
        return _Module(module, namespace) if namespace in _TORCH_NAMESPACES else module

    dispatch_library._watched = True  # type: ignore[attr-defined]
    torch._C._dispatch_library = dispatch_library


def _foreign(keys: set[str]) -> set[str]:
    found = set()
    for key in keys:
        namespace, _, rest = key.partition("/")
        op, _, dispatch_key = rest.rpartition("/")
        if namespace not in _TORCH_NAMESPACES:
            continue  # an operator of the function's own
        try:
            dump = torch._C._dispatch_dump(f"{namespace}::{op}")
        except Exception:  # an operator of that name torch no longer knows: nothing replaced
            continue
        prefix = f"{dispatch_key or 'CompositeImplicitAutograd'}: "  # a Library's default key
        where = next((line for line in dump.splitlines() if line.startswith(prefix)), "")
        registered_at = where.partition("registered at ")[2].partition(":")[0]
        if registered_at and not registered_at.startswith(_TORCH_DIR):
            found.add(key)
    return found


KERNELS = _Kernels()
