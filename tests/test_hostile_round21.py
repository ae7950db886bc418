"""Red team, round twenty-one: hostile functions that leave torch's state for the next
function (a generator rewound with no seed set; a profiler left running), and what
they write in the run directory (the registry a front end started again reads; notes
for the engines started after their own).

Each case names what a user saw before. One real server for the module (as round
nineteen); the functions are in tests/hostile23_functions.py, each misbehaving only on
the input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from jacobian_service import ipc
from jacobian_service.fork_server import start_engine

from ._fault_support import _log_saying, _log_until
from ._rss import front_end_pid
from .conftest import _metric, assert_problem, live_server
from .hostile23_functions import next_pids
from .test_hostile_round11 import _armed, _engine_pid, _replaced, _seen
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)

FUNCTIONS = "tests.hostile23_functions"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # QUARANTINE_AFTER=1: a strike on the wrong function shows. No spare: nothing here
    # takes an engine down (each case checks it is the same one).
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", QUARANTINE_AFTER=1,
                     REQUEST_TIMEOUT_S=20, HANG_GRACE_S=0.5) as served:
        yield served


def _evaluated(client: httpx.Client, url: str, function: str, x: list[float]) -> np.ndarray:
    r = client.post(f"{url}/v1/functions/{function}/evaluate",
                    json={"inputs": [{"dtype": "float64", "shape": [len(x)], "data": x}]})
    assert r.status_code == 200, r.text
    return np.array(r.json()["output"]["data"])


# ------------------------------------------------------------ torch's random generator


def test_a_generator_a_function_rewinds_is_not_left_for_the_next_draws(server, client) -> None:
    """Round seventeen put back a seed a function set (``torch.manual_seed``), told by
    ``torch.initial_seed()``; a state set with no seed (``torch.set_rng_state`` of a
    state the function kept from its first call) left the seed as it was, and was
    never seen: a function rewinding the generator to its seed's first draws had
    another client's ``x + torch.rand(3)`` (a Monte Carlo step) answer the same draws
    after each of its calls, [0.877, 0.730, 0.786] each time, with a 200, for the
    engine's life: those torch's start seed gives anywhere, known in advance. Now
    the generator's state is read after each batch (its first words and position, as
    Python's and numpy's are), and one a batch moved is re-seeded from the OS's
    entropy: the next draws are unknown, and differ at each time. (The function puts
    back the state it found at its first call: since each engine seeds itself afresh
    once its modules are loaded, its seed's first draws are where any re-seed leaves
    the generator, so going back to them moves nothing.)"""
    url, proc = server
    pid = _engine_pid(client, url)
    zeros = [0.0, 0.0, 0.0]
    drawn = []
    for _ in range(3):
        r = _armed(client, url, "rewinds_torch", 0)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["output"]["data"], np.sin([666.0, 0.0, 0.0]), rtol=1e-12)
        drawn.append(_evaluated(client, url, "torch_noise", zeros))
        assert ((0 <= drawn[-1]) & (drawn[-1] < 1)).all(), drawn
    assert not np.array_equal(drawn[0], drawn[1]) and not np.array_equal(drawn[1], drawn[2]), drawn
    # (the state it kept holds its first call's seed: told by the seed's setting, or the state's)
    log = _log_until(proc, 0, "rewinds_torch changed")
    assert re.search(r"rewinds_torch changed (torch's random seed \(torch.manual_seed\)|the state of torch's random "
                     r"generator \(torch.set_rng_state, or draws\)) \(to [^)]+\) and left it so; put back to a seed "
                     r"drawn afresh", log), log[-3000:]
    assert _engine_pid(client, url) == pid


# ------------------------------------------------------------ torch's profiler


def test_a_profiler_a_function_leaves_running_is_stopped_after_its_batch(server, client) -> None:
    """A function that entered torch's profiler (``torch.profiler.profile(record_shapes=
    True).__enter__()``) and returned had every later request's operators recorded into
    it, for the engine's life: held without end (the engine's memory grown at every
    request of every function), and read by the function at its next call: it stopped
    the profiler and named another client's operators (``seen: [... 'aten::erf', ...]``, the
    victim's ``erf``, with their input shapes to be had). Now the profiler is stopped
    after the batch that left it running, its events dropped, the log naming the
    function: it records nothing of another request."""
    url, proc = server
    pid = _engine_pid(client, url)
    r = _armed(client, url, "profiles", 0)
    assert r.status_code == 200, r.text
    x = [0.5, 1.0, 2.0]
    np.testing.assert_allclose(_evaluated(client, url, "erf_half", x), [math.erf(v) / 2 for v in x], rtol=1e-12)
    seen = _seen(_armed(client, url, "profiles", 1))
    assert "aten::erf" not in seen, seen
    log = _log_until(proc, 0, "profiles changed torch's profiler")
    assert "profiles changed torch's profiler (entered, not exited) (to True) and left it so; put back to False" \
           in log, log[-3000:]
    assert _engine_pid(client, url) == pid


# ------------------------------------------------------------ the run directory


def test_a_front_end_started_again_does_not_read_a_registry_a_function_rewrote(server, client) -> None:
    """Front ends learnt the functions (names, inputs, descriptions) from the run
    directory's ``registry.json``, which engine 0 writes at start-up, and which a
    function can rewrite (its engine's ``--run-dir``): a front end started again later
    (one that died: a function can kill one where no Landlock domain stops it) served
    what the function wrote. Here ``erf_half`` declared as taking 2 numbers: its
    description "forged", and another client's 3 numbers a 422 ``invalid_input``.
    Now ``serve`` hands each front end the registry it read at start-up, as it hands
    the API keys: the file is read once, before any function has run."""
    url, proc = server
    r = _armed(client, url, "rewrites_registry", 0)
    assert r.status_code == 200, r.text
    before = front_end_pid(proc.pid)
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # serve starts it again
        assert time.monotonic() < deadline, "no front end started again"
        try:
            if front_end_pid(proc.pid) != before and client.get(f"{url}/readyz").status_code == 200:
                break
        except (LookupError, httpx.TransportError):
            pass
        time.sleep(0.1)
    described = client.get(f"{url}/v1/functions/erf_half").json()
    assert described["description"] == "erf(x) / 2: an operator nothing else here runs.", described
    x = [0.5, 1.0, 2.0]
    np.testing.assert_allclose(_evaluated(client, url, "erf_half", x), [math.erf(v) / 2 for v in x], rtol=1e-12)


# ------------------------------------------------------------ the run directory's notes (last: it ends the engine)


@pytest.mark.parametrize("case", [0, 1])
def test_notes_a_function_plants_for_the_next_engines_are_not_believed(server, client, case: int) -> None:
    """The supervisor reads a process's warm-up note (``warming-PID`` in the run
    directory: which function it is warming up, since when) to kill a warm-up that
    hangs and to name one that ends its process, and strikes that function. The run
    directory is the functions' to write. One that left notes for the pids after its
    engine's (the next engines' and spares', allocated in turn), saying the warm-up of
    another client's function began long ago, and ended its engine, had each engine
    started after it killed before it was ready, as hung in that warm-up: the other
    function struck (``QUARANTINE_AFTER``: 503 ``function_quarantined`` for every client
    of it) and skipped, the engines killed one after the other while the pids ran
    through the notes. With one under its own engine's pid too (case 1), its own crash
    was put down to that warm-up: its request a retryable 503, the other function
    struck, the planter never. Now the supervisor takes away the notes under a pid
    before the process that gets it runs (forked: the zygote; exec'd: below), and reads
    none of a process whose board names the jobs it runs (a warm-up runs none): the
    planter's crash is its own (500, struck), the other function answers."""
    url, proc = server
    pid = _engine_pid(client, url)
    start, quarantines = len(proc.read_log()), _metric(url, "jacobian_service_quarantines")
    deadline = time.monotonic() + 10
    while client.delete(f"{url}/v1/functions/plants_notes/quarantine").json()["released"]:  # (the case before's)
        assert time.monotonic() < deadline, "plants_notes still quarantined"  # (until the word reaches the front end)
        time.sleep(0.05)
    assert_problem(_armed(client, url, "plants_notes", case), 500, "function_error")
    _replaced(client, url, pid, 60, "no engine ready after the crash")
    x = [0.5, 1.0, 2.0]
    np.testing.assert_allclose(_evaluated(client, url, "erf_half", x), [math.erf(v) / 2 for v in x], rtol=1e-12)
    log = _log_saying(proc, "running plants_notes for 1 requests", "started (forked)", start=start)
    assert "warm-up of erf_half" not in log and "running plants_notes for 1 requests" in log, log[-3000:]
    assert "started (forked)" in log, log[-3000:]  # (the zygote took the notes away; exec'd: below)
    assert _metric(url, "jacobian_service_quarantines") == quarantines + 1  # plants_notes, for its crash


def test_an_execd_engine_finds_no_note_left_under_its_pid(tmp_path) -> None:
    """The same where the engine is exec'd (no zygote: ``ENGINE_FORK_SERVER=false``, or
    one that cannot serve): the notes under its pid are gone before it runs. A process
    started as an engine is (``start_engine``) looks for its own, planted for the pids
    allocated next."""
    pids = next_pids()
    for pid in pids:
        ipc.warming_path(tmp_path, pid).write_text("0 erf_half")
    look = ("import os, sys; d, p = sys.argv[1], os.getpid(); "
            "sys.exit(2 if not int(sys.argv[2]) < p < int(sys.argv[3]) else "
            "os.path.exists(f'{d}/warming-{p}'))")
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        child = start_engine(None, [sys.executable, "-S", "-c", look, str(tmp_path), str(pids.start - 1), str(pids.stop)],
                             dict(os.environ), null, null, null, standby=False, confine=False, run_dir=tmp_path)
    finally:
        os.close(null)
    assert child.wait(30) == 0  # (1: it found a note under its pid; 2: its pid is not among those planted)


def test_a_signal_handler_of_faulthandlers_a_function_registers_is_taken_away(server, client) -> None:
    """``faulthandler.register(signal.SIGTERM, chain=False)`` in a function installs a
    handler of C's that writes a traceback and returns; Python's table of handlers
    (``signal.getsignal``), which the engine put back from, still said the default,
    and SIGTERM no longer stopped the engine: serve's stop waited 10 s for it before
    killing it. Now faulthandler's registrations on the signals that stop a process
    are taken away after each batch (``faulthandler.unregister``), the log naming the
    function: the SIGTERM sent here ends the engine. (Last: the engine goes.)"""
    url, proc = server
    r = _armed(client, url, "holds_off_sigterm", 0)
    assert r.status_code == 200, r.text
    log = _log_until(proc, 0, "holds_off_sigterm registered faulthandler")
    assert "holds_off_sigterm registered faulthandler on SIGTERM (faulthandler.register), which kept the signal from " \
           "stopping the engine; taken away" in log, log[-3000:]
    pid = _engine_pid(client, url)
    os.kill(pid, signal.SIGTERM)
    log = _log_until(proc, 0, "killed by SIGTERM")
    assert "engine 0 died: the engine process was killed by SIGTERM" in log, log[-3000:]
