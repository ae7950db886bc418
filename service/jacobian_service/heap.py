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

import functools
import gc

__all__ = ["freeze_heap", "refreeze", "thawed"]

_thawed = False  # gc.unfreeze() called since freeze_heap (or the last refreeze)


def _watch_unfreeze() -> None:
    """``gc.unfreeze`` replaced by one that notes the call. Counting what is frozen
    instead (``gc.get_freeze_count``) walks the whole frozen list: ~30 ms with torch
    loaded, after every batch (it took a small request from 2 to 30 ms)."""
    original = gc.unfreeze
    if getattr(original, "_jacobian_service_watch", False):
        return

    @functools.wraps(original)
    def unfreeze() -> None:
        global _thawed
        _thawed = True
        original()

    unfreeze._jacobian_service_watch = True  # type: ignore[attr-defined]
    gc.unfreeze = unfreeze


def freeze_heap() -> None:
    """Collect what start-up left as garbage, then exclude every object alive now from
    later collections (``gc.freeze``). Call once, when start-up is done. Frozen objects
    are still freed by reference counting; only a cycle among them would stay."""
    global _thawed
    _watch_unfreeze()
    gc.collect()
    gc.freeze()
    _thawed = False


def thawed() -> bool:
    """Whether a function called ``gc.unfreeze()`` since the heap was frozen: every
    later full collection then walks the whole heap again (~0.2 s of the engine's time
    each, under every function's requests)."""
    return _thawed


def refreeze() -> None:
    """After a function's ``gc.unfreeze()``: out of the collector's sight again, with
    whatever the batch left alive (freed by reference counting as ever)."""
    global _thawed
    gc.freeze()
    _thawed = False
