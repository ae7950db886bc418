"""Red team, round twenty-three: hostile functions against what every engine starts
with (torch's generator, as forked from the zygote) and what the process keeps that
Python's own tables do not show (a standard stream closed in its place; a signal
handler of C's).

Each case names what a user saw before. One real server for the module (as round
twenty-one); the functions are in tests/hostile25_functions.py, each misbehaving only on
the input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest

from ._fault_support import _log_until
from .conftest import assert_problem, live_server
from .test_hostile_round11 import _armed, _engine_pid, _replaced
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)
from .test_hostile_round21 import _evaluated  # an evaluate's 200 output

FUNCTIONS = "tests.hostile25_functions"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # No spare (each engine here is one the supervisor forks on the spot); a crash here is
    # no strike that matters (QUARANTINE_AFTER high: the crashing function runs twice).
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", QUARANTINE_AFTER=50,
                     REQUEST_TIMEOUT_S=20, HANG_GRACE_S=0.5) as served:
        yield served


# ------------------------------------------------------------ torch's generator at an engine's start


def test_each_engine_starts_torchs_generator_afresh(server, client) -> None:
    """Every engine is forked from the zygote, which imported torch once: each began
    with the zygote's generator state. Another client's ``x + torch.rand(3)`` on each
    new engine drew the same three numbers (in every engine, restart and spare of a
    ``serve``: [0.422, 0.357, 0.899] after each crash, in one run): a caller who saw one
    engine's first draws (or crashed an engine, as here) knew every later engine's. Now each engine seeds
    torch's generators from the OS's entropy as it starts (CUDA's queued for its start,
    which had torch's fixed default seed)."""
    url, _ = server
    firsts, weights = [], []
    for _ in range(2):
        pid = _engine_pid(client, url)
        assert_problem(_armed(client, url, "exits25", 0), 500, "function_error")
        _replaced(client, url, pid, 60, "no engine after the crash")
        firsts.append(_evaluated(client, url, "noise25", [0.0, 0.0, 0.0]))  # the new engine's first draws
        assert ((0 <= firsts[-1]) & (firsts[-1] < 1)).all(), firsts
        weights.append(_evaluated(client, url, "module_weights25", [1.0, 1.0, 1.0]))
    assert not np.array_equal(firsts[0], firsts[1]), firsts
    # ... but after its functions' modules loaded: what a module draws as it loads (an
    # unseeded nn.Linear's weights) is the same in every engine, as in any fresh process
    # (seeded before them, each restart changed such a function's answers)
    assert np.array_equal(weights[0], weights[1]), weights


# ------------------------------------------------------------ the standard streams


@pytest.mark.parametrize("case", [0, 1])
def test_a_standard_stream_a_function_closes_is_opened_again(server, client, case: int) -> None:
    """``sys.stdout.close()`` in a function (``sys.stderr.buffer.close()``, case 1) kept
    the stream object in its place, which the engine's check of the streams (by
    identity) took for unchanged: every later request of any function that prints
    failed, 500 ``ValueError: I/O operation on closed file.``, for the engine's life.
    Now a closed standard stream of the engine's is opened again on its descriptor (the
    same object, re-initialised), the log naming the function: the next function's
    request answers, and what it prints reaches the log."""
    url, proc = server
    pid, start = _engine_pid(client, url), len(proc.read_log())
    r = _armed(client, url, "closes_streams", case)
    assert r.status_code == 200, r.text
    x = [0.5, 1.0, float(case)]
    np.testing.assert_allclose(_evaluated(client, url, "prints25", x), np.sin(x), rtol=1e-12)
    log = _log_until(proc, start, rf"prints25 stderr \[0.5, 1.0, {float(case)}\]")
    assert f"prints25 x = [0.5, 1.0, {float(case)}]" in log and f"prints25 stderr [0.5, 1.0, {float(case)}]" in log, \
        log[-3000:]
    assert "closes_streams changed sys.stdin, sys.stdout or sys.stderr (closed)" in _log_until(proc, 0, re.escape("closes_streams changed sys.stdin, sys.stdout or sys.stderr (closed)"))  # (named once)
    assert _engine_pid(client, url) == pid


# ------------------------------------------------------------ signal handlers of C's (last: it ends the engine)


def test_a_c_handler_a_function_gives_sigterm_is_taken_away(server, client) -> None:
    """A handler of C's on SIGTERM (``libc.signal(SIGTERM, f)`` through ctypes, or its
    ``sigaction``) is none Python knows of: its table still said the default, which the
    engine put back from. SIGTERM ran ``f`` and stopped nothing: the supervisor's restart
    of the engine and serve's stop waited for it (the stop killed it 10 s later); here it
    was still running 15 s after the SIGTERM. Now the signals the kernel hands to a
    handler (``SigCgt``) are read after each batch as the ignored ones are, and a
    handler set outside Python is given back the one Python has: the SIGTERM sent here
    ends the engine."""
    url, proc = server
    start = len(proc.read_log())
    r = _armed(client, url, "catches_sigterm", 0)
    assert r.status_code == 200, r.text
    log = _log_until(proc, start, "catches_sigterm changed signals caught")  # (the batch's settings, after its answer)
    assert "catches_sigterm changed signals caught outside Python (SigCgt: a handler of C's, ctypes' sigaction) " \
           "(to a handler of its own on SIGTERM) and left it so; put back to the handlers Python has (or the " \
           "default)" in log, log[-3000:]
    os.kill(_engine_pid(client, url), signal.SIGTERM)
    log = _log_until(proc, start, "killed by SIGTERM")
    assert "engine 0 died: the engine process was killed by SIGTERM" in log, log[-3000:]
