"""The in-process layout puts back a function's rebound names before its answer leaves.

In one process the caller's code runs on beside the engine's thread as soon as it is
answered. The put-back ran after the answers left (the engine's tidying), so a name the
caller set in between was taken for the function's change and undone: CI's run of stop
40 failed test_sparse_round18's lattice test, whose monkeypatch of
``sparsity.acyclic.substitution`` was reverted mid-test by the tidying of the request
before it ("segment_energy rebound or deleted names in jacobian_service.sparsity.acyclic").
Each test holds the tidying (``restore_settings``) until it has looked."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from jacobian_service.sparsity import acyclic

from .conftest import ready_app


@pytest.fixture(scope="module")
def app() -> Iterator:
    with ready_app("jacobian_service.examples,tests.names_functions") as c:
        yield c


def _held_tidying(app, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The engine's tidying after a batch, held until ``go`` is set; ``done`` once it ran."""
    engine = app.app.service_state.engines.workers[0].worker.engine
    go, done = threading.Event(), threading.Event()
    real = engine.restore_settings

    def held(function: str) -> None:
        go.wait(30)
        real(function)
        done.set()

    monkeypatch.setattr(engine, "restore_settings", held)
    return go, done


def test_a_name_the_caller_sets_once_answered_is_not_put_back(app, monkeypatch) -> None:
    real = acyclic.substitution
    go, done = _held_tidying(app, monkeypatch)
    r = app.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]})
    assert r.status_code == 200, r.text

    def mine(*args):
        return real(*args)

    monkeypatch.setattr(acyclic, "substitution", mine)  # the caller's, after its answer
    go.set()
    assert done.wait(30)
    assert acyclic.substitution is mine


def test_a_function_s_rebinding_is_put_back_before_its_answer_arrives(app, monkeypatch, caplog) -> None:
    real = acyclic.substitution
    go, done = _held_tidying(app, monkeypatch)
    try:
        r = app.post("/v1/functions/rebinds_substitution/jacobian", json={"inputs": [[0.5, 1.0]]})
        assert r.status_code == 200, r.text
        assert acyclic.substitution is real  # (before: still the function's until the tidying ran)
    finally:
        go.set()
        assert done.wait(30)
        acyclic.substitution = real
    assert acyclic.substitution is real
    assert any("rebinds_substitution rebound or deleted names in jacobian_service.sparsity.acyclic (substitution)"
               in rec.getMessage() for rec in caplog.records)
