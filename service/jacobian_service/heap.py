"""The cyclic garbage collector in the served processes.

Python's collector runs a full collection whenever the objects that survived earlier
ones have grown by a quarter, and a full collection walks every tracked object: in an
engine that has imported torch and warmed up its functions, that is ~190 ms, during
which no batch runs (measured on the 2-core VM under wrk: 3 full collections in 15 s,
562 ms of the engine's time; 12 of ~47 ms each in a front end). What exists once a
process has started is there for good (modules, the registry, torch's own objects), so
it is moved out of the collector's sight; the collector then walks only what requests
made since.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_heap", "thawed"]

_frozen = 0  # objects frozen by freeze_heap


def freeze_heap() -> None:
    """Collect what start-up left as garbage, then exclude every object alive now from
    later collections (``gc.freeze``). Call once, when start-up is done. Frozen objects
    are still freed by reference counting; only a cycle among them would stay."""
    global _frozen
    gc.collect()
    gc.freeze()
    _frozen = gc.get_freeze_count()


def thawed() -> bool:
    """Whether a function called ``gc.unfreeze()``: every later full collection walks the
    whole heap again (~0.2 s of the engine's time each, under every function's
    requests). ``gc.freeze()`` puts it back out of sight, with whatever the batch left
    alive (freed by reference counting as ever).

    Frozen objects that reference counting frees leave the count too (a few hundred at
    a first request), so fewer than ``freeze_heap`` froze is no sign; an unfreeze takes
    it to 0 (or to what the function froze since), under half."""
    return gc.get_freeze_count() < _frozen // 2
