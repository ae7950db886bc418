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

import contextlib
import functools
import gc
import os
import threading
from typing import Callable, Iterator

__all__ = ["FRONT_END_YOUNG", "collector_enabled", "collector_paused", "freeze_heap", "put_collector", "refreeze",
           "thawed"]

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


def freeze_heap(young: int | None = None) -> None:
    """Collect what start-up left as garbage, then exclude every object alive now from
    later collections (``gc.freeze``). Call once, when start-up is done. Frozen objects
    are still freed by reference counting; only a cycle among them would stay.
    ``young``: the youngest generation's threshold from then on (Python's is 700)."""
    global _thawed
    _watch_unfreeze()
    gc.collect()
    gc.freeze()
    _thawed = False
    if young is not None:
        gc.set_threshold(young, *gc.get_threshold()[1:])


# A front end's youngest generation is collected after this many more container objects
# made than freed, not Python's 700. Under load its young objects are mostly the state of
# the requests in flight (64 connections: their tasks, scopes, headers, futures, timers),
# alive, not garbage: Python resets its count at each collection, and the frees of those
# survivors after it no longer count down, so at 700 the collector ran every ~7 requests
# and walked the same live requests each time (~0.2 ms a collection, 1.3 ms each tenth;
# 3-6 % of a front end's CPU under wrk -c64, gc.callbacks' thread time). At 10,000 it ran
# 3 times in ~2,000 requests. What a front end's requests leave in cycles is small (a few
# hundred objects in ~4,000 requests of wrk; a rejected large body's parse no longer
# leaves one: routes._outcome), so the longer wait holds little.
FRONT_END_YOUNG = 10_000


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


# The service's own pauses of the collector (``collector_paused``: the colourings' passes
# over lists of millions of ints). ``gc.disable()`` is process-wide: a colouring on one
# engine's thread (the in-process layout: an engine per GPU, or several apps in one
# process) turned it off under another engine's batch, whose settings watch
# (``engine.process_settings``) then named that batch's innocent function for "the garbage
# collector (disabled)" and turned the collector back on under the colouring; an engine
# made during a pause took "disabled" for its start-up state, and turned the collector
# off after every later batch, for good. So pauses are counted here, on every thread,
# and the watch reads and puts back the collector as it is beneath them: the state the
# last pause leaves it in.
_lock = threading.RLock()  # (re-entrant: a __del__ that switches the collector may run inside a section)
_pauses = 0  # sections in progress, on any thread
_beneath = True  # the collector's state under them (while _pauses > 0)


def _watched(original: Callable[[], None], enabled: bool) -> Callable[[], None]:
    """``gc.enable`` / ``gc.disable`` replaced by one that, during a pause, also sets the
    state beneath it: a function's own ``gc.disable()`` then, invisible in
    ``gc.isenabled()`` (already off), is still seen by the watch and put back."""
    @functools.wraps(original)
    def switch() -> None:
        global _beneath
        with _lock:
            if _pauses:
                _beneath = enabled
            original()

    switch._jacobian_service_watch = True  # type: ignore[attr-defined]
    return switch


def _original(switch: Callable[[], None]) -> Callable[[], None]:
    return switch.__wrapped__ if getattr(switch, "_jacobian_service_watch", False) else switch  # type: ignore[attr-defined]


_enable, _disable = _original(gc.enable), _original(gc.disable)  # (a reload wraps the originals, not the wrappers)
gc.enable, gc.disable = _watched(_enable, True), _watched(_disable, False)


def _after_fork() -> None:
    """In a child forked during a pause (a function's ``os.fork``, ``multiprocessing``'s
    fork, beside another thread's colouring): the thread that held it is not there to end
    it, nor to release the lock if it held it then. The collector as it was beneath; the
    child's collector had stayed off for its whole life."""
    global _lock, _pauses
    _lock = threading.RLock()
    if _pauses:
        _pauses = 0
        _enable() if _beneath else _disable()


os.register_at_fork(after_in_child=_after_fork)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off for the service's own section, on any thread: on again
    when the last section in progress ends, if it was on beneath them."""
    global _pauses, _beneath
    with _lock:
        if not _pauses:
            _beneath = gc.isenabled()
            _disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if not _pauses and _beneath:
                _enable()


def collector_enabled() -> bool:
    """``gc.isenabled()`` as it would read without the service's pauses."""
    with _lock:
        return _beneath if _pauses else gc.isenabled()


def put_collector(enabled: bool) -> None:
    """The collector on or off beneath the service's pauses (now, where none is in progress)."""
    global _beneath
    with _lock:
        if _pauses:
            _beneath = enabled
        else:
            _enable() if enabled else _disable()
