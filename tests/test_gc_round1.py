"""The garbage collector switched by the service's own colouring on another thread.

The colourings' passes turn the cyclic collector off (``coloring.no_gc``) and
``gc.disable()`` is process-wide. In the in-process layout (an engine per GPU, or several
apps in one process) a colouring on one thread turned it off under another engine's
batch: that engine's settings watch logged "sum_sin changed the garbage collector
(disabled) ... and left it so" for an innocent hvp and turned the collector back on under
the colouring; an engine made during a colouring took "disabled" for its start-up state
and turned the collector off after each of its batches, for good. The colouring here is
held open on its own thread by its ``check_alive`` callback, which waits on an event, so
the interleaving is fixed, not timed.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from jacobian_client import wire

from .conftest import decode

_BLAME = "changed the garbage collector (disabled)"


class _HeldColouring:
    """An acyclic colouring of the path 0-1-2 on a thread of its own, held inside its
    collector pause until ``release``."""

    def __init__(self) -> None:
        self.inside, self.release = threading.Event(), threading.Event()
        self.colors: Any = None
        self.thread = threading.Thread(target=self._run, name="test-colouring", daemon=True)

    def _check_alive(self) -> None:
        self.inside.set()
        assert self.release.wait(60), "the test never released the colouring"

    def _run(self) -> None:
        from jacobian_service.sparsity.acyclic import acyclic_colors

        indptr, nbr = np.array([0, 1, 3, 4]), np.array([1, 0, 2, 1])
        self.colors = acyclic_colors(3, indptr, nbr, np.ones(3, bool), np.arange(3), self._check_alive)

    def __enter__(self) -> "_HeldColouring":
        assert gc.isenabled()
        self.thread.start()
        assert self.inside.wait(30), "the colouring did not start"
        assert not gc.isenabled()  # its pause is on: what the other thread's batch runs under
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(autouse=True)
def _collector_on_after() -> Iterator[None]:
    """A failing test's collector left off is not the next test's (nor the session's)."""
    yield
    gc.enable()


@pytest.fixture
def held() -> Iterator[_HeldColouring]:
    with _HeldColouring() as h:
        yield h
    assert gc.isenabled()  # the pause over: on again, whatever ran beside it
    assert h.colors is not None and h.colors[0] != h.colors[1] != h.colors[2]


def _hvp(app: Any, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    body = {"inputs": [wire.encode_tree(x)], "tangents": wire.encode_tree(t)}
    got, _ = decode(app.post("/v1/functions/sum_sin/hvp", content=wire.dumps(body)), "hvp")
    return got


def _hvp_reference(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    fn = lambda v: torch.sin(v).sum()  # noqa: E731  (sum_sin)
    return torch.func.jvp(torch.func.grad(fn), (torch.from_numpy(x),), (torch.from_numpy(t),))[1].numpy()


X, T = np.linspace(-1.0, 1.0, 5), np.linspace(0.5, 2.5, 5)


def test_a_batch_beside_another_threads_colouring_is_not_blamed_for_its_pause(client, held, caplog):
    """Before: the hvp's batch ended with "sum_sin changed the garbage collector (disabled)
    (to False) and left it so; put back to True", and the collector was on again under the
    colouring. Now the watch reads the collector as it is beneath the service's pause."""
    with caplog.at_level(logging.WARNING, logger="jacobian_service"):
        np.testing.assert_allclose(_hvp(client, X, T), _hvp_reference(X, T), rtol=1e-12, atol=0)
    assert _BLAME not in caplog.text
    assert not gc.isenabled()  # the colouring's pause left as it was


def test_an_engine_made_during_another_threads_colouring_keeps_the_collector_on(make_client, caplog):
    """Before: the engine took the collector off for its start-up state, and after each
    batch (once the colouring was over) turned it off again, naming sum_sin for turning
    it on."""
    with _HeldColouring():
        app = make_client()
    assert gc.isenabled()
    with caplog.at_level(logging.WARNING, logger="jacobian_service"):
        np.testing.assert_allclose(_hvp(app, X, T), _hvp_reference(X, T), rtol=1e-12, atol=0)
    assert _BLAME not in caplog.text
    assert gc.isenabled()


def test_a_functions_own_disable_during_a_pause_is_still_named_and_put_back(held, caplog):
    """A function's ``gc.disable()`` while the service's pause holds the collector off
    shows nothing in ``gc.isenabled()``; the watch still names it, and the collector is on
    once the pause ends (the fixture's check)."""
    from jacobian_service.engine.process_settings import ProcessSettings

    settings = ProcessSettings()
    gc.disable()  # as the function's call on this (the engine's) thread
    with caplog.at_level(logging.WARNING, logger="jacobian_service"):
        settings.restore("disables_gc")
        settings.restore("disables_gc")
    assert caplog.text.count(f"disables_gc {_BLAME} (to False) and left it so; put back to True") == 1
    assert not gc.isenabled()  # still the colouring's to turn on, as its pause ends


def test_a_child_forked_during_another_threads_pause_has_its_collector_on(held):
    """Before: a function's ``os.fork()`` beside a colouring made a child whose collector
    stayed off for its whole life (the pause's end is the parent's thread's, which the
    child has not): its cycles never collected."""
    pid = os.fork()
    if pid == 0:  # the child: only this thread; reports through its exit status
        os._exit(0 if gc.isenabled() else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not gc.isenabled()  # the parent's pause is the colouring's still
