"""Red team, round twenty-nine: the engine's status board is the functions' to write
(a file in the run directory, mapped by the engine), and the supervisor read from it
whom to blame for a death.

Each case names what a user saw before. One real server for the file (one engine, no
spare, one strike a quarantine, which every caller of the function sees); the functions
are in tests/hostile34_functions.py, each misbehaving only on the input 666 (round 11's
``_armed``).
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jacobian_service.settings import Settings

from ._fault_support import supervisor_of_a_dead_engine
from .conftest import assert_problem, live_server
from .test_hostile_round11 import _armed, _engine_pid, _replaced
from .test_hostile_round15 import _log_until
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)
from .test_hostile_round21 import _evaluated

FUNCTIONS = "tests.hostile34_functions"
X = [0.25, -1.0, 2.0]
_REGISTRY = {"functions": [], "devices": ["cpu"]}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false",
                     QUARANTINE_AFTER=1, REQUEST_TIMEOUT_S=30) as served:
        yield served


def test_a_function_that_names_another_as_leaving_a_thread_is_struck_itself(server, client) -> None:
    """strays34 wrote on its engine's board what an engine leaving for a stray thread
    writes, naming bystander34 (which had never run), and exited as such an engine does
    (75): the supervisor took it as a planned leave, struck bystander34 and skipped its
    warm-up for good, quarantined it (one strike here): 503 ``function_quarantined`` to
    its callers; strays34's own request went on to the next engine, did it again there,
    and again: each time the same. Now, with no warm-ups (which run every function), a
    stray is believed only of a function a front end sent that engine; not believed, the
    death is a crash, put down to the one function the front end held there: strays34's
    caller gets a retryable 503, strays34 is quarantined, bystander34 answers."""
    url, proc = server
    _replaced(client, url, None, 30, "no engine up")
    pid, start = _engine_pid(client, url), len(proc.read_log())
    assert_problem(_armed(client, url, "strays34", 0), 503, "unavailable")
    log = _log_until(proc, start, r"function strays34 quarantined")
    assert "status board said bystander34 left a thread running, but no front end had sent it a job of " \
           "bystander34: a function wrote the board; not believed" in log, log
    assert "(they held strays34): a function wrote the board; strays34 is blamed" in log, log
    assert "bystander34 quarantined" not in log, log
    _replaced(client, url, pid, 30, "no engine up after the crash")
    assert_problem(_armed(client, url, "strays34", 0), 503, "function_quarantined")
    # (bystander34 answers: the next test's end, as no innocent function may be held
    # unanswered here as its forger dies, 2 s after an answer at least: see
    # Supervisor._confirmed)


def test_a_function_that_writes_anothers_name_on_the_board_is_struck_itself(server, client) -> None:
    """forges34 wrote innocent34's name on its engine's status board as the function
    running (its own requests' tags kept) and ended the engine (``os._exit(5)``): the
    supervisor struck innocent34 ("engine 0 died: the engine process exited with status
    5 (running innocent34 for 1 requests)"), quarantined it (one strike here, three by
    default): 503 ``function_quarantined`` to every caller of innocent34, which had not
    run at all, while forges34 went on answering 200. Now the board's name is believed
    only where a front end had sent that engine a job of the function, unanswered: here
    the front end held only forges34's, so forges34 is struck, and says so in the log."""
    url, proc = server
    pid, start = _engine_pid(client, url), len(proc.read_log())
    body = assert_problem(_armed(client, url, "forges34", 0), 500, "function_error")
    assert "exited with status 5" in body["detail"] and "named innocent34" in body["detail"], body
    log = _log_until(proc, start, r"function forges34 quarantined")
    assert "engine 0's status board named innocent34 as running when it died, but no front end had sent it a job " \
           "of innocent34 unanswered (they held forges34): a function wrote the board; forges34 is blamed" in log, log
    assert "function innocent34 quarantined" not in log, log
    _replaced(client, url, pid, 30, "no engine up after the crash")
    for innocent in ("innocent34", "bystander34"):  # (bystander34: the test before)
        np.testing.assert_allclose(_evaluated(client, url, innocent, X), np.sin(X), rtol=1e-12)
    assert_problem(client.post(f"{url}/v1/functions/forges34/evaluate",
                               json={"inputs": [{"dtype": "float64", "shape": [3], "data": X}]}),
                   503, "function_quarantined")


def test_a_function_that_names_one_answered_a_moment_before_is_struck_in_its_place(server, client) -> None:
    """forges34b did what forges34 did just after innocent34 was answered: innocent34 was
    still held (the front end tells what it answered once a second, and an answer stays
    held 2 s: a ``__del__`` crash as the batch is put away), so the board's name passed
    the check, and innocent34 was struck and quarantined. Now the front ends also say
    what they still held as they read of the death, and that decides: innocent34 is let
    off (released), forges34b struck in its place (quarantined)."""
    url, proc = server
    _replaced(client, url, None, 30, "no engine up")
    start = len(proc.read_log())
    np.testing.assert_allclose(_evaluated(client, url, "innocent34", X), np.sin(X), rtol=1e-12)
    # (its caller: a retryable 503, as the board named its request as another function's)
    assert_problem(_armed(client, url, "forges34b", 0), 503, "unavailable")
    log = _log_until(proc, start, r"function forges34b quarantined")
    assert "the front ends held forges34b unanswered as it died, not innocent34, which its status board named: " \
           "forges34b struck in place of innocent34" in log, log
    _replaced(client, url, None, 30, "no engine up after the crash")
    np.testing.assert_allclose(_evaluated(client, url, "innocent34", X), np.sin(X), rtol=1e-12)
    assert_problem(_armed(client, url, "forges34b", 0), 503, "function_quarantined")


def test_threads_the_board_names_are_believed_only_of_functions_sent_to_that_engine(tmp_path) -> None:
    """An engine that died idle: its board names the functions whose threads were alive
    (``left``), which are struck. A function that wrote another's name there had it
    struck and its warm-up skipped for good. Now, with no warm-ups, only those a front
    end sent that engine are (here: ran34, not never_ran34)."""
    with supervisor_of_a_dead_engine(tmp_path) as (sup, engine, _):
        sup._control(sup.channel.sign({"t": "held", "from": 1, "engine": 0, "functions": ["ran34"]}))
        sup._control(sup.channel.sign({"t": "held", "from": 1, "engine": 0, "functions": []}))  # answered
        sup._died(engine, 3, {"beat": 1.0, "ready": True, "deadline": 0.0, "left": ["ran34", "never_ran34"]})
        assert (set(sup.strikes), sup.skip_warmup) == ({"ran34"}, {"ran34"})


def test_the_verdict_waits_for_every_front_end_that_held_and_no_longer(tmp_path) -> None:
    """The death's verdict (``_judge``) waited a fixed second for the front ends'
    ``held_at_death`` words: a front end slower than that on a busy machine (CI's) left
    an innocent function struck. Now it waits until each front end that held any there
    has told (at most ``_VERDICT_S``), and is given as soon as the last has."""
    import time

    with supervisor_of_a_dead_engine(tmp_path, quarantine_after=3) as (sup, engine, proc):
        sign = sup.channel.sign
        sup._control(sign({"t": "held", "from": 1, "engine": 0, "functions": ["innocent34"]}))
        sup._control(sign({"t": "held", "from": 1, "engine": 0, "functions": []}))  # answered (within the grace)
        sup._control(sign({"t": "held", "from": 2, "engine": 0, "functions": ["forges34b"]}))
        sup._died(engine, 5, {"beat": 1.0, "ready": True, "deadline": 0.0, "function": "innocent34",
                              "tags": ["t1"]})
        assert set(sup.strikes) == {"innocent34"}
        sup._control(sign({"t": "held_at_death", "from": 1, "engine": 0, "pid": proc.pid, "functions": []}))
        sup._judge(time.monotonic())  # front end 2 has not told yet: no verdict
        assert (len(sup.strikes["innocent34"]), len(sup.strikes.get("forges34b", ()))) == (1, 0)
        sup._control(sign({"t": "held_at_death", "from": 2, "engine": 0, "pid": proc.pid,
                           "functions": ["forges34b"]}))
        sup._judge(time.monotonic())  # all told: judged now, well before the bound
        assert (len(sup.strikes["innocent34"]), len(sup.strikes["forges34b"])) == (0, 1)
        assert sup._verdicts == {}


def test_a_crash_before_the_front_ends_word_arrives_is_still_its_functions(tmp_path) -> None:
    """A front end's ``held`` word goes out through its zmq I/O thread while the job goes
    straight to the engine: on a busy machine the engine ran the job and crashed before
    the word reached the supervisor, which then took the board's (true) name for a lie:
    the crashing function went unstruck and its caller got a retryable 503, not its 500.
    The supervisor now waits a moment (``_HELD_WAIT_S``) for the front ends' word of a
    function the board names before it judges the board."""
    import threading

    import zmq

    with supervisor_of_a_dead_engine(tmp_path, quarantine_after=3) as (sup, engine, _):
        push = sup.ctx.socket(zmq.PUSH)
        try:
            push.connect(sup.channel.control)
            word = sup.channel.sign({"t": "held", "from": 1, "engine": 0, "functions": ["crashes34"]})
            late = threading.Timer(0.1, push.send, (word,))  # the word trails the crash by 0.1 s
            late.start()
            sup._died(engine, 5, {"beat": 1.0, "ready": True, "deadline": 0.0, "function": "crashes34",
                                  "tags": ["t1"]})
            late.join()
            assert set(sup.strikes) == {"crashes34"}
        finally:
            push.close(linger=0)


def test_a_front_end_tells_what_it_holds_a_few_times_a_second_not_per_request() -> None:
    """What the check costs: a front end tells the supervisor the functions it holds on an
    engine as a new one is sent there, and once a second as they are answered; a
    thousand requests of one function cost one word, their answers one more, and after
    the engine's death (the supervisor forgets what was held there) the next job is told
    again."""
    from jacobian_service.engine_client import RemoteEngines, _Pending
    from jacobian_service.supervision import Channel

    sent: list[bytes] = []
    front_end = RemoteEngines(Settings(), Path("."), Channel("", "", b"k" * 32), registry=_REGISTRY)
    front_end._control = SimpleNamespace(send=sent.append)
    front_end._pids = {0: 4242}
    pending = concurrent.futures.Future()
    for i in range(1000):
        front_end._tell_held((0, "sin"))
        front_end._pending[i] = _Pending(pending, 0, f"fe:{i}", time.monotonic(), True, "sin", None)
    front_end._tell_held((0, "cos"))
    front_end._tell_held(None)  # the second's look: cos was answered
    front_end._pending.clear()
    front_end._tell_held(None)  # all answered
    front_end._tell_held(None)  # nothing new
    front_end._tell_held((0, "sin"))  # held: told at once
    front_end._pending[0] = _Pending(pending, 0, "fe:0", time.monotonic(), True, "sin", None)
    front_end._fail_engine(0, set(), "", hang=False, ready_in=1.0, pid=4242)  # the engine died (its word read)
    front_end._tell_held((0, "sin"))
    words = [front_end.channel.verify(raw) for raw in sent]
    word = {"t": "held", "from": os.getpid(), "engine": 0}
    assert words == [{**word, "functions": ["sin"]}, {**word, "functions": ["cos", "sin"]},
                     {**word, "functions": ["sin"]}, {**word, "functions": []}, {**word, "functions": ["sin"]},
                     {**word, "t": "held_at_death", "pid": 4242, "functions": ["sin"]},
                     {**word, "functions": ["sin"]}], words
