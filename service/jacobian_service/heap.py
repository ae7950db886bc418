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

__all__ = ["FRONT_END_YOUNG_OBJECTS", "freeze_heap", "front_end_collections", "refreeze", "thawed"]

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


# A front end's young-generation threshold (Python's default is 700 tracked objects).
# Each request in flight holds some tens of them (its scope, task, coroutines, closures,
# arrays' headers) and frees them when it ends; 16 to 32 requests at once went past 700
# every 8 to 10 requests, and each collection walked what they held, only to find it
# alive: measured on the 2-core VM under wrk -c16, one front end, ~400 young
# collections (and ~40 of the middle generation) in 10 s, where at 10,000 there were
# none (what is left to the collector, a few cycles per hundred requests, reaches it
# after ~15,000 requests). Cyclic garbage waits that long for its collection: a few
# thousand small objects. (A cycle through a request's frame, an exception's
# traceback, would hold its arrays as long: the request path breaks those it makes, as
# engine_client._await does. With one request at a time the count never reached 700
# either: such a cycle waited as long before.)
FRONT_END_YOUNG_OBJECTS = 10_000


def front_end_collections() -> None:
    """A front end's collector: the young generation collected every
    ``FRONT_END_YOUNG_OBJECTS`` tracked objects (the older generations' thresholds as
    they are). Engines keep Python's (their batches are torch's objects)."""
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, FRONT_END_YOUNG_OBJECTS), middle, old)
