"""Red team, round twenty-eight: a thread one function leaves behind ends the engine
while another function runs (``os._exit``, a segfault through ctypes, a SIGKILL of its
own process), and whom the supervisor blames for it.

Each case names what a user saw before. One real server for the file (one engine, no
spare, one strike a quarantine, which every caller of the function sees); the functions
are in tests/hostile33_functions.py, each misbehaving only on the input 666 (round 11's
``_armed``), the second input picking how.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import numpy as np
import pytest

from .conftest import assert_problem, live_server
from .test_hostile_round11 import _armed, _engine_pid, _replaced
from .test_hostile_round15 import _log_until
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)
from .test_hostile_round21 import _evaluated

FUNCTIONS = "tests.hostile33_functions"
X = [0.25, -1.0, 2.0]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # One engine: the thread a function leaves runs beside the next function's batch.
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false",
                     QUARANTINE_AFTER=1, REQUEST_TIMEOUT_S=30) as served:
        yield served


def test_a_thread_another_function_left_does_not_strike_the_function_it_ends(server, client) -> None:
    """leaves_a_killer33 returned, leaving a thread that waited for slow33 (an innocent
    function) to run, then ended the engine: slow33's caller got 500 "the engine process
    exited with status 3 while running this request", slow33 was struck, and (one strike
    here, three in a row by default) quarantined: 503 ``function_quarantined`` to every
    caller of it, while leaves_a_killer33 went on answering 200. Now a death with another
    function's threads alive, the running function having left none, strikes no one the
    first time: slow33's request runs again on the next engine (its caller gets its 200);
    the second time within the window, the threads' owner is struck (quarantined here),
    slow33 never. Round one ends the engine by ``os._exit``, round two by a segfault."""
    url, proc = server
    for case, how in ((0, r"exited with status 3"), (1, r"killed by SIGSEGV")):
        pid, start = _engine_pid(client, url), len(proc.read_log())
        assert _armed(client, url, "leaves_a_killer33", case).status_code == 200
        np.testing.assert_allclose(_evaluated(client, url, "slow33", X), np.sin(X), rtol=1e-12)
        assert _engine_pid(client, url) != pid  # (it ended the engine slow33 ran in)
        log = _log_until(proc, start, r"engine 0 died: .*" + how)
        assert "threads left running by leaves_a_killer33 were alive, and slow33 left none" in log, log
        assert ("no one is struck the first time" if case == 0 else "leaves_a_killer33 struck") in log, log
    np.testing.assert_allclose(_evaluated(client, url, "slow33", X), np.sin(X), rtol=1e-12)
    assert_problem(client.post(f"{url}/v1/functions/leaves_a_killer33/evaluate",
                               json={"inputs": [{"dtype": "float64", "shape": [3], "data": X}]}),
                   503, "function_quarantined")


def test_a_function_that_ends_its_engine_itself_is_struck_beside_another_functions_thread(server, client) -> None:
    """The other side of the rule: crashes33 ends its engine itself while a thread
    leaves_a_waiter33 left waits (harmlessly, as a library's idle pool). Its request runs
    again on the next engine, where no other function's thread is alive, and crashes it
    again: its caller gets the 500 that names it, and crashes33 is struck (quarantined
    here). That death was its own, so the one beside the waiting thread is forgotten: when
    crashes33b does the same after leaves_a_waiter33 ran again, the waiter, alive at two
    such deaths, is still not struck (else an idle pool was struck for every crash beside
    it, and quarantined)."""
    url, proc = server
    for crashes in ("crashes33", "crashes33b"):
        start = len(proc.read_log())
        _replaced(client, url, None, 30, "no engine up")
        assert _armed(client, url, "leaves_a_waiter33", 0).status_code == 200
        body = assert_problem(_armed(client, url, crashes, 0), 500, "function_error")
        assert "exited with status 7" in body["detail"], body
        log = _log_until(proc, start, rf"function {crashes} quarantined")
        assert f"threads left running by leaves_a_waiter33 were alive, and {crashes} left none: no one is struck" \
            in log, log
        assert "leaves_a_waiter33 struck" not in log, log
        assert_problem(_armed(client, url, crashes, 0), 503, "function_quarantined")
    _replaced(client, url, None, 30, "no engine up")
    np.testing.assert_allclose(_evaluated(client, url, "leaves_a_waiter33", X), np.sin(X), rtol=1e-12)


def test_a_function_whose_own_thread_ends_its_engine_is_struck_beside_another_functions_thread(server,
                                                                                               client) -> None:
    """The rule spares only a function that left no thread of its own: kills_itself_later33
    left one that ends the engine (``os._exit``) when it runs again, and a thread
    leaves_a_waiter33 left waits beside it. Its next request is its 500 at once (not run
    again on the next engine, where its thread is not, as an innocent function's is), and
    it is struck (quarantined here)."""
    url, proc = server
    _replaced(client, url, None, 30, "no engine up")
    start = len(proc.read_log())
    assert _armed(client, url, "leaves_a_waiter33", 0).status_code == 200
    assert _armed(client, url, "kills_itself_later33", 0).status_code == 200
    body = assert_problem(client.post(f"{url}/v1/functions/kills_itself_later33/evaluate",
                                      json={"inputs": [{"dtype": "float64", "shape": [3], "data": X}]}),
                          500, "function_error")
    assert "exited with status 3" in body["detail"], body
    log = _log_until(proc, start, r"function kills_itself_later33 quarantined")
    assert ("(running kills_itself_later33 for 1 requests; threads left running by leaves_a_waiter33 were alive)"
            in log), log
    assert_problem(_armed(client, url, "kills_itself_later33", 0), 503, "function_quarantined")
