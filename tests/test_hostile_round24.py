"""Red team, round twenty-four: hostile functions against what the supervisor believes
(a warm-up note, a spare's ready flag, both in the run directory, which the functions
write; a status board that still names a function whose answers have left).

Each case names what a user saw before. One real server for the module (a spare, and
warm-ups on: a spare's warm-up is what is attacked; one strike quarantines); the
functions are in tests/hostile27_functions.py, each misbehaving only on the input 666
(round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from jacobian_service.supervisor import _STATE_EVERY_S

from .conftest import live_server
from .test_hostile_round11 import _armed, _engine_pid, _replaced, supervisor  # noqa: F401 (a fixture)
from .test_hostile_round15 import _log_until
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)
from .test_hostile_round21 import _evaluated  # an evaluate's 200 output

FUNCTIONS = "tests.hostile27_functions"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # QUARANTINE_AFTER=1: a strike is a quarantine, which every caller of the function sees.
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, QUARANTINE_AFTER=1, REQUEST_TIMEOUT_S=20,
                     HANG_GRACE_S=0.5) as served:
        yield served


def _spares(client: httpx.Client, url: str) -> list[bool]:
    return client.get(f"{url}/v1/info").json()["spares"]


def _until(what: str, done, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_spares_ready_flag_and_warm_up_note_a_function_makes_are_not_believed(server, client) -> None:
    """A spare said it was warm with a flag file in the run directory, which the
    functions write: a running function that made it for the spare still warming up
    had it counted warm (``/v1/info``'s ``spares`` said [true]; a 503's Retry-After while
    it took over said it would serve at once). A warm-up note it wrote there for that
    spare (its warm-up of victim27 begun long ago) had the spare killed as hung in it
    ("the spare's warm-up of victim27 did not return"), and every later engine skip
    victim27's warm-up. Now a spare says both on its stdin, a socket only the supervisor
    holds the other end of: the flag and the note change nothing, and the spare counts
    warm once it is."""
    url, proc = server
    start = len(proc.read_log())
    _until("no warm spare at first", lambda: _spares(client, url) == [True])
    assert _armed(client, url, "slow_spare27", 0).status_code == 200  # the next spare's warm-up waits
    try:
        pid = _engine_pid(client, url)
        os.kill(pid, signal.SIGKILL)  # the spare takes over; the next one warms up (slowly)
        _replaced(client, url, pid, 30, "no engine after the kill")
        flagged = []

        def forged() -> bool:
            r = _armed(client, url, "slow_spare27", 1)
            assert r.status_code == 200, r.text
            flagged.append(r.json()["output"]["data"][0])
            return flagged[-1] > 0

        _until("no spare started", forged)
        # Believed, the flag counts the spare warm in the supervisor's next state to the
        # front ends (one at least every _STATE_EVERY_S) and the note has it killed at
        # its next tick (0.1 s): each /v1/info read over three states' time says not
        # warm. (A state carries no count to wait for; the 0.3 s sleep this replaces,
        # under one state's time, could see neither.) Then the note, once more below, at
        # an event: the spare's own word that it is warm, heard at a tick after the note.
        until = time.monotonic() + 3 * _STATE_EVERY_S
        while time.monotonic() < until:
            assert _spares(client, url) == [False]
        assert "victim27" not in proc.read_log()[start:], proc.read_log()[start:][-3000:]
    finally:
        assert _armed(client, url, "slow_spare27", 2).status_code == 200
    _until("the spare never counted warm", lambda: _spares(client, url) == [True])
    assert "victim27" not in proc.read_log()[start:], proc.read_log()[start:][-3000:]  # (nor killed meanwhile)


def test_a_kill_from_outside_after_a_functions_answers_strikes_it_not(server, client) -> None:
    """An engine killed by SIGKILL (the OOM killer, an operator's ``kill -9``) just after
    a function's 200, while it still tidied after the batch (its settings put back, its
    garbage collected), had its status board still naming that function and its
    request: the function was struck as if it had crashed its engine (here, one strike:
    quarantined, every caller's request a 503 ``function_quarantined`` for 600 s),
    though its caller held its answer. Now the board says the answers have left; a
    SIGKILL the supervisor did not send then strikes no one (as while idle; a crash or a
    hang there, a ``__del__``'s, is still the function's)."""
    url, proc = server
    start, pid = len(proc.read_log()), _engine_pid(client, url)
    r = _armed(client, url, "lingers27", 0)  # (its garbage's collection then takes 2 s)
    assert r.status_code == 200, r.text
    os.kill(pid, signal.SIGKILL)
    log = _log_until(proc, start, "engine 0 died")
    assert "engine 0 died: the engine process was killed by SIGKILL (out of memory?) after lingers27 had answered " \
           "its requests (not blamed) (running nothing for 0 requests)" in log, log[-3000:]
    assert "quarantined" not in log, log[-3000:]
    _replaced(client, url, pid, 30, "no engine after the kill")
    np.testing.assert_allclose(_evaluated(client, url, "lingers27", [0.5]), np.sin([0.5]), rtol=1e-12)


def test_a_warm_up_note_a_ready_engine_writes_shifts_no_blame(server, client) -> None:
    """A function wrote a warm-up note under its own engine's pid (``warming-PID``,
    naming victim27) and left a timer that ended the engine (``os._exit``) after its
    request was answered. The engine died idle, ready long since, yet the supervisor
    believed the note: "the warm-up of victim27 ended the engine", victim27 struck
    (quarantined: every caller's request a 503 ``function_quarantined``) and its warm-up
    skipped for good, the planter free. Now a note under the pid of a process that has
    said it is ready is a function's, taken away unread: the function whose thread was
    alive is blamed, victim27 answers."""
    url, proc = server
    start, pid = len(proc.read_log()), _engine_pid(client, url)
    r = _armed(client, url, "shifts_blame27", 0)
    assert r.status_code == 200, r.text
    log = _log_until(proc, start, "engine 0 died")
    assert "engine 0 died: the engine process exited with status 1; shifts_blame27 left threads running, which are " \
           "blamed" in log and "warm-up of victim27" not in log, log[-3000:]
    _replaced(client, url, pid, 30, "no engine after the timer")
    np.testing.assert_allclose(_evaluated(client, url, "victim27", [0.5]), np.sin([0.5]), rtol=1e-12)


def test_sigkills_from_outside_after_one_functions_answers_strike_it_from_the_second(supervisor, tmp_path) -> None:
    """One SIGKILL the supervisor did not send, after a function's answers left, strikes
    no one (the test above: the OOM killer, an operator). The same again within the
    quarantine window is the function's doing (a ``__del__`` that kills its engine after
    each answer, or allocates until the OOM killer does): without a strike it replaced
    engines for ever, a torch start-up each, and was never quarantined. The supervisor
    alone, its engine a stand-in whose board says a function's answers have left."""
    from jacobian_service import ipc
    from jacobian_service.supervisor import _Engine

    sup, _ = supervisor
    sup.settings = sup.settings.model_copy(update={"quarantine_after": 1})
    board = ipc.StatusBoard(tmp_path / "engine-0.status", create=True)

    def killed_after(function: str) -> None:
        now = time.monotonic()
        board.running(now, now + 600, function, ["1:7"])
        board.answered(now)
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        engine = _Engine(0, "cpu", proc=proc, board=board)
        sup.engines = [engine]
        proc.kill()  # (from outside: not the supervisor's kill)
        sup._died(engine, proc.wait(5), board.read())

    killed_after("lingers")
    killed_after("other")  # another function's: lingers still once
    assert not sup.strikes.get("lingers") and not sup.strikes.get("other") and not sup.quarantined
    killed_after("lingers")
    assert len(sup.strikes["lingers"]) == 1 and "lingers" in sup.quarantined and "other" not in sup.quarantined


def test_a_spares_stdin_flooded_by_a_warm_up_keeps_the_supervisor_reading_a_bounded_amount(supervisor) -> None:
    """The functions a spare's warm-up runs hold its end of the stdin it says "warm" on.
    One writing without end (no newline) kept the supervisor in its read of that word
    (every engine unwatched meanwhile) and its unfinished line growing with every byte.
    A look reads at most ``HEARD_AT_MOST``, and an unfinished line keeps only its tail;
    the spare's real word still counts after the flood."""
    import socket
    import threading
    from types import SimpleNamespace

    from jacobian_service import ipc

    sup, _ = supervisor
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def flood() -> None:
        theirs.settimeout(0.2)
        while not stop.is_set():
            try:
                theirs.send(b"x" * 65536)
            except (TimeoutError, OSError):
                pass

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    spare = SimpleNamespace(pid=1 << 22, stdin=ours)
    try:
        looked = threading.Thread(target=lambda: [sup._hear(spare, time.monotonic()) for _ in range(20)], daemon=True)
        looked.start()
        looked.join(20)
        assert not looked.is_alive(), "the supervisor never left its read of a flooded stdin"
        assert len(sup._words[spare.pid].rest) <= 4096
    finally:
        stop.set()
        writer.join(5)
    while ipc.heard(ours):  # what the flood left
        pass
    theirs.sendall(b"\n" + ipc.SPARE_WARM)
    assert sup._hear(spare, time.monotonic()).warm
    ours.close()
    theirs.close()
