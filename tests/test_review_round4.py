"""Review, round four: a fourth pair of eyes on the session's later merges, as an outside
red team would read them. Each test names what a user saw before.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jacobian_service import supervisor
from jacobian_service.engine_client import _client_marks

from .conftest import ready_app


def test_a_front_ends_client_marks_travel_with_its_oldest_job_and_go_with_it() -> None:
    """The supervisor keeps each front end's client marks in its ``oldest`` entry (one
    map, not two kept in step by hand): the marks a word brought are weighed while its
    report is fresh, and go with it when the front end says it holds nothing more."""
    held = {"innocent", "hangs"}  # (the functions the front ends held there: ``held`` words)
    sup = SimpleNamespace(engines=[None], _oldest=collections.defaultdict(dict), _confirmed=lambda index: held)
    told, hung_in = supervisor.Supervisor._told_oldest, supervisor.Supervisor._hung_in
    now = time.monotonic()
    a, b = _client_marks({"key-a"}), _client_marks({"key-b"})
    # Front end 111 holds client A's job of ``innocent``, sent first.
    assert told(sup, {"engine": 0, "from": 111, "pid": 4242, "sent": now - 6.0, "tag": "a:1",
                      "function": "innocent", "clients": a})
    word = {"t": "overdue", "from": 222, "engine": 0, "pid": 4242, "since": now - 2.0, "function": "hangs",
            "sent": now - 3.0, "tag": "b:2", "hung": "hangs", "clients": b}
    # Two clients, two functions: the engine took them in turns, so no one is blamed.
    assert hung_in(sup, 0, 4242, word) == {"function": "", "tags": []}
    # Front end 111 has had its job answered (a word with "sent": None): its marks go too,
    # and the hang is the word's own oldest job's, of one client.
    assert told(sup, {"engine": 0, "from": 111, "sent": None})
    assert sup._oldest[0] == {}
    assert hung_in(sup, 0, 4242, word) == {"function": "hangs", "tags": ["b:2"]}
    # A report of the same client as the word's: one client, FIFO, the oldest is the hang's.
    assert told(sup, {"engine": 0, "from": 111, "pid": 4242, "sent": now - 6.0, "tag": "b:1",
                      "function": "earlier", "clients": b})
    assert hung_in(sup, 0, 4242, word) == {"function": "earlier", "tags": ["b:1"]}


# ------------------------------------------------ in-process: the caller's settings are its own


@pytest.fixture(scope="module")
def app() -> Iterator:
    with ready_app("jacobian_service.examples,tests.review4_functions") as c:
        yield c


def _held_tidying(app, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The engine's tidying after a batch (``restore_settings``), held until ``go`` is
    set; ``done`` once it ran (as tests/test_names_in_process.py holds it)."""
    engine = app.app.service_state.engines.workers[0].worker.engine
    go, done = threading.Event(), threading.Event()
    real = engine.restore_settings

    def held(function: str) -> None:
        go.wait(30)
        real(function)
        done.set()

    monkeypatch.setattr(engine, "restore_settings", held)
    return go, done


def test_a_setting_the_caller_changes_once_answered_is_not_put_back_in_process(app, monkeypatch, caplog) -> None:
    """76703c0 put a function's rebound names back before its answers leave, in-process,
    where the caller's code runs on in the same process as soon as it is answered; the
    process-wide settings (torch's default dtype, the warning filters, the recursion
    limit...) were still put back in the tidying after. A setting the caller changed in
    between was taken for the function's and undone, and the function named for it:
    ``torch.set_default_dtype(torch.float64)`` set by the caller right after a ``sin``
    Jacobian was float32 again once the tidying ran, and the log said "sin changed torch's
    default dtype". Now both are put back before the answers leave."""
    go, done = _held_tidying(app, monkeypatch)
    try:
        r = app.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["jacobian"]["data"], np.float32),
                                   torch.func.jacrev(torch.sin)(torch.tensor([0.5, 1.0])).numpy(), rtol=1e-6)
        torch.set_default_dtype(torch.float64)  # the caller's own, after its answer
        go.set()
        assert done.wait(30)
        assert torch.get_default_dtype() == torch.float64
    finally:
        go.set()
        torch.set_default_dtype(torch.float32)
    assert not [rec.getMessage() for rec in caplog.records if "sin changed" in rec.getMessage()]


def test_a_functions_setting_is_put_back_before_its_answer_arrives_in_process(app, monkeypatch, caplog) -> None:
    """The other side: what a function changes of the process's settings is put back (and
    said) before its caller has its answer, not left for the caller's code to run under."""
    go, done = _held_tidying(app, monkeypatch)
    try:
        r = app.post("/v1/functions/sets_float64/evaluate", json={"inputs": [[0.5, 1.0]]})
        assert r.status_code == 200, r.text
        assert torch.get_default_dtype() == torch.float32  # (before: float64 until the tidying ran)
    finally:
        go.set()
        assert done.wait(30)
        torch.set_default_dtype(torch.float32)
    assert any("sets_float64 changed torch's default dtype" in rec.getMessage() for rec in caplog.records)
