"""Review, round four: a fourth pair of eyes on the session's later merges, as an outside
red team would read them. Each test names what a user saw before.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from jacobian_service import supervisor
from jacobian_service.engine_client import _client_marks

from .conftest import assert_problem, live_server, ready_app
from .test_hostile_round11 import _engine_pid, _replaced
from .test_names_in_process import _held_tidying  # (the engine's tidying held on an event)


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


# ------------------------------------------------ the status board is the functions' to write


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Any]]:
    with live_server(FUNCTIONS="jacobian_service.examples,tests.review4_functions", WORKERS=1, WARMUP="false",
                     ENGINE_STANDBY="false", QUARANTINE_AFTER=10, REQUEST_TIMEOUT_S=30) as served:
        yield served


@pytest.mark.parametrize("case", range(3))  # (review4_functions._SCRAWLS)
def test_an_engine_whose_board_a_function_scrawled_on_is_replaced(server, case: int) -> None:
    """The board is a file the functions can write (6df6ecf: the supervisor reads it, not
    its map, so a truncated one is no SIGBUS), and the supervisor took its document for
    the engine's own: ``[1]`` (not an object) raised in ``StatusBoard.read``, a name that
    is no string in ``_died``'s set of names, ``{"memory": 1}`` in ``recycle_reason``.
    Each raised out of the supervisor's tick before it looked at the engine's process,
    tick after tick ("supervisor tick failed", a traceback each), and the engine the
    function ended was never replaced: every later request a 503, the service down for
    good. Now the board's document is read only as the engine writes it (an object of
    its own fields, each of its type; the fixed fields none can override): the engine is
    replaced, and ``sin`` answers again. The request that ended it is its 500 where the
    death is put down to it, else a retryable 503 (the scrawl can hide what ran: both
    were seen, 2 runs of the suite in 5 giving the 500)."""
    url, proc = server
    with httpx.Client(timeout=60) as client:
        pid, start = _engine_pid(client, url), len(proc.read_log())
        body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, float(case), 0.0]}]}
        r = client.post(f"{url}/v1/functions/scrawls_on_its_board/evaluate", json=body)
        if r.status_code == 500:
            problem = assert_problem(r, 500, "function_error")
            assert problem["detail"].startswith("the engine process exited with status 5 while running this request"), problem
        else:
            assert_problem(r, 503, "unavailable")
        _replaced(client, url, pid, 60, f"no engine up after the crash: {proc.read_log()[start:][-3000:]}")
        x = [0.25, -1.0, 2.0]
        r = client.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [x]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["jacobian"]["data"], torch.func.jacrev(torch.sin)(torch.tensor(x)).numpy(),
                                   rtol=1e-6)
        assert "supervisor tick failed" not in proc.read_log()[start:]


def test_the_boards_document_cannot_say_what_the_engine_does_not_write(tmp_path) -> None:
    """What ``read`` gives: the fixed fields as the engine wrote them (a document's
    ``"deadline"`` or ``"beat"`` no longer replaces them), and of the document only the
    engine's own fields, each of the type it writes them in."""
    from jacobian_service import ipc

    board = ipc.StatusBoard(tmp_path / "engine-0.status", create=True)
    now = time.monotonic()
    board.running(now, now + 5, "sin", ["1:1"], ["other"])
    assert board.read() == {"beat": now, "ready": False, "deadline": now + 5, "served": 0, "function": "sin",
                            "tags": ["1:1"], "left": ["other"]}
    for doc in (b"[1]", b'"text"', b'{"deadline": null, "beat": "x", "ready": 1, "served": []}',
                (b'{"function": 3, "tags": "1:1", "left": [1], "stray": [], "answered": "yes", "memory": 1, '
                 b'"threads": {"count": "9", "limit": 1}, "descriptors": {"open": 1, "limit": 2, "grown": [[1, 2]]}}')):
        board._doc = doc
        board._write()
        assert board.read() == {"beat": now, "ready": False, "deadline": now + 5, "served": 0}, doc
    leak = {"held": 3 << 20, "limit": 1 << 20, "setting": "ENGINE_MAX_RSS_BYTES", "grown": [["sin", 2 << 20]]}
    board.leave(now, {"memory": leak})
    assert board.read()["memory"] == leak
    assert ipc.recycle_reason(board.read()) is not None
    board.leave(now, {"stray": "sin", "left": "the engine's own checks failed (OSError)"})
    assert board.read()["left"] == "the engine's own checks failed (OSError)"


# ------------------------------------------------ nor are its other files, as files


@pytest.fixture(scope="module")
def warmed_server() -> Iterator[tuple[str, Any]]:
    """A server that warms its functions up: before the fix it never became ready (the
    supervisor's thread waited on plants_fifos's FIFO for ever)."""
    with live_server(FUNCTIONS="tests.review4_functions", WORKERS=1, WARMUP="true", ENGINE_STANDBY="false",
                     REQUEST_TIMEOUT_S=30) as served:
        yield served


def test_a_fifo_a_function_puts_in_the_run_directory_blocks_no_reader(warmed_server) -> None:
    """The run directory's files are the functions' to replace, and ``serve`` and the front
    ends read some by name, waiting for their bytes: a FIFO there (``os.mkfifo``) has
    ``open`` wait for a writer for ever. plants_fifos put one in place of its engine's
    warm-up note at its warm-up: the supervisor's thread, reading the note at its next
    tick (``_warm_up_hung``), waited for ever, the engine's ready never seen, the server
    never ready (nor any engine watched or replaced again); armed, in place of the
    engine's memory budget file: ``GET /v1/info`` blocked its front end's event loop for
    ever, every client of it with it (``/healthz`` too). Now those files are opened
    without waiting and read only as regular files, a few bytes at most."""
    url, _ = warmed_server  # (ready: the supervisor read past the warm-up's FIFO)
    with httpx.Client(timeout=20) as client:
        assert client.get(f"{url}/v1/info").json()["limits"]["memory_budget_bytes"][0] > 0
        body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, 0.0, 0.0]}]}
        r = client.post(f"{url}/v1/functions/plants_fifos/evaluate", json=body)
        assert r.status_code == 200, r.text
        info = client.get(f"{url}/v1/info")  # (before: no answer, the front end blocked)
        assert info.status_code == 200 and info.json()["limits"]["memory_budget_bytes"] == [None], info.text
        assert client.get(f"{url}/healthz").status_code == 200
        x = [0.25, -1.0, 2.0]
        r = client.post(f"{url}/v1/functions/plants_fifos/jacobian", json={"inputs": [x]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["jacobian"]["data"], torch.func.jacrev(torch.sin)(torch.tensor(x)).numpy(),
                                   rtol=1e-6)


def test_serve_starts_past_a_fifo_in_place_of_the_registry() -> None:
    """serve waits for engine 0's ``registry.json`` and reads it: a module that, as it was
    imported, put a FIFO there (the engine's argv names the run directory) had serve
    take the FIFO for the file and wait on it for a writer for ever, engine 0's file
    written over it unseen: serve never started, and said nothing. Now it waits for a
    regular file, and reads it as one."""
    with live_server(FUNCTIONS="tests.review4_import_functions", WORKERS=1, WARMUP="false",
                     ENGINE_STANDBY="false") as (url, _):
        x = [0.25, -1.0]
        r = httpx.post(f"{url}/v1/functions/plain_sin/jacobian", json={"inputs": [x]}, timeout=30)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["jacobian"]["data"], torch.func.jacrev(torch.sin)(torch.tensor(x)).numpy(),
                                   rtol=1e-6)
