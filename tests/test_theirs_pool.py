"""A function whose warm-up leaves an idle thread (a library's pool) is in every warmed
engine; a function that ends its engine itself beside it is the culprit, found on the
second engine, not the pool's owner.

One real server for the file (one engine, a spare, warm-ups on: the pool is in the spare
too; one strike a quarantine, which every caller of the function sees); the functions
are in tests/theirs_pool_functions.py.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest

from ._fault_support import supervisor_of_a_dead_engine
from .conftest import assert_problem, live_server
from .test_hostile_round11 import _armed, _replaced
from .test_hostile_round15 import _log_until
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)
from .test_hostile_round21 import _evaluated

X = [0.25, -1.0, 2.0]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    with live_server(FUNCTIONS="tests.theirs_pool_functions", WORKERS=1, QUARANTINE_AFTER=1,
                     REQUEST_TIMEOUT_S=30) as served:
        yield served


def test_a_crash_beside_a_warm_up_pool_is_the_crashing_functions_own(server, client) -> None:
    """pools_at_warm_up's warm-up starts an idle thread, so every warmed engine (the spare
    too) has it alive. exits_pooled ends its engine itself (os._exit; segfaults_pooled by
    a segfault): that death, beside another function's threads, strikes no one the first
    time, and the request is sent again to the next engine, where the pool is alive as
    well. Its caller got a 503 "engines left one after another" after three engines
    ended (or a late 500 from the third), and pools_at_warm_up, whose thread was alive
    at both deaths, was struck (quarantined here, its warm-up skipped for good) for a
    crash that was not its own. Now the request that ended the engine it was sent again
    to is the culprit: its caller gets the 500 naming the crash after two engines,
    exits_pooled is struck (quarantined here), pools_at_warm_up is not, and its warm-up
    is kept."""
    url, proc = server
    for crashes, how in (("exits_pooled", "exited with status 7"), ("segfaults_pooled", "killed by SIGSEGV")):
        _replaced(client, url, None, 60, "no engine up")
        start = len(proc.read_log())
        r = _armed(client, url, crashes, 0 if crashes == "exits_pooled" else 1)
        assert r.status_code == 500, (r.status_code, r.text, _log_until(proc, start, "quarantined", 2.0))
        body = assert_problem(r, 500, "function_error")
        assert how in body["detail"] and body["detail"].endswith("while running this request; the engine was "
                                                                 "restarted"), body
        log = _log_until(proc, start, rf"function {crashes} quarantined")
        assert "threads left running by pools_at_warm_up were alive, and " \
               f"{crashes} left none: no one is struck the first time" in log, log
        assert len(re.findall(r"engine 0 died: ", log)) == 2, log  # the second engine's death is its own
        assert "pools_at_warm_up struck" not in log and "pools_at_warm_up quarantined" not in log, log
        assert f"this request of {crashes} had ended the engine before" in log, log
        assert_problem(_armed(client, url, crashes, 0), 503, "function_quarantined")
        _replaced(client, url, None, 60, "no engine up")
        np.testing.assert_allclose(_evaluated(client, url, "pools_at_warm_up", X), np.sin(X), rtol=1e-12)
    _replaced(client, url, None, 60, "no engine up")
    assert "engines skip the warm-up of pools_at_warm_up" not in proc.read_log()
    assert "warm-up of pools_at_warm_up skipped" not in proc.read_log(), proc.read_log()[-3000:]


def test_a_pools_strike_beside_a_crash_is_taken_back_when_the_crash_proves_its_own(tmp_path) -> None:
    """Two requests of exits_pooled, each ending an engine beside the pool that every
    warm-up starts, each the first on its engine: two such deaths, and the pool's owner,
    alive at both, was struck (quarantined here, one strike; its warm-up skipped for
    good), though the request sent on then ends the next engine too, proving the crash
    exits_pooled's own. Now that strike is taken back as exits_pooled is struck: the
    pool's owner is not quarantined, and engines warm it up again. (In process: a real
    ``Supervisor``, its reading of each death.)"""
    with supervisor_of_a_dead_engine(tmp_path, quarantine_after=1) as (sup, engine, proc):
        def death(tag: str) -> None:
            engine.proc = proc  # (the same exited process, read as each engine in turn)
            sup._control(sup.channel.sign({"t": "held", "from": 1, "engine": 0,
                                           "functions": ["exits_pooled", "pools_at_warm_up"]}))
            sup._died(engine, 7, {"beat": 1.0, "ready": True, "deadline": 5.0, "function": "exits_pooled",
                                  "tags": [tag], "left": ["pools_at_warm_up"]})

        death("fe:1")  # the first such death: no one struck, the request sent on
        assert not any(sup.strikes.values()) and not sup.quarantined
        death("fe:2")  # another request, first on the next engine: the pool's second such death
        assert set(sup.quarantined) == {"pools_at_warm_up"} and "pools_at_warm_up" in sup.skip_warmup
        death("fe:1")  # the request sent on ends that engine too: the crash is its own
        assert set(sup.quarantined) == {"exits_pooled"}, sup.quarantined
        assert not sup.strikes.get("pools_at_warm_up") and "pools_at_warm_up" not in sup.skip_warmup


def test_a_let_off_takes_back_only_the_strike_given_beside_the_crash(tmp_path) -> None:
    """review7: the pool's owner, struck beside exits_pooled's crash, was since released
    (its quarantine over), then crashed on its own and was quarantined for it. When
    exits_pooled later crashed alone (its own crash: the let-off), the owner's latest strike
    was popped, its own, and it was released ("the strike was not its") from a quarantine
    that was. Only the strike given beside that crash, where it still stands, is taken back."""
    with supervisor_of_a_dead_engine(tmp_path, quarantine_after=1) as (sup, engine, proc):
        def death(tag: str, function: str, left: list[str]) -> None:
            engine.proc = proc  # (the same exited process, read as each engine in turn)
            sup._control(sup.channel.sign({"t": "held", "from": 1, "engine": 0,
                                           "functions": ["exits_pooled", "pools_at_warm_up"]}))
            sup._died(engine, 7, {"beat": 1.0, "ready": True, "deadline": 5.0, "function": function,
                                  "tags": [tag], "left": left})

        death("fe:1", "exits_pooled", ["pools_at_warm_up"])
        death("fe:2", "exits_pooled", ["pools_at_warm_up"])  # the pool's owner struck beside it
        assert set(sup.quarantined) == {"pools_at_warm_up"}
        sup.release("pools_at_warm_up")  # its quarantine over: that strike stands no more
        death("fe:3", "pools_at_warm_up", [])  # its own crash: struck, quarantined
        assert set(sup.quarantined) == {"pools_at_warm_up"}
        death("fe:4", "exits_pooled", [])  # exits_pooled's own crash, alone
        assert set(sup.quarantined) == {"pools_at_warm_up", "exits_pooled"}, sup.quarantined  # (before: the owner released)
        assert len(sup.strikes["pools_at_warm_up"]) == 1
