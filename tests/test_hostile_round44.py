"""Red team, round forty-four: hostile functions against torch's per-thread dispatch
state, which every later function of the engine runs under (the dispatch keys a guard
of torch's includes or excludes; ``__torch_function__`` handling disabled).

Each case names what a user saw before. One real server for the file (one engine, no
spare); the functions are in tests/hostile44_functions.py, each misbehaving only on the
input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from ._fault_support import _log_until
from .conftest import live_server
from .test_hostile_round11 import _armed, _engine_pid, _replaced
from .test_hostile_round21 import _evaluated  # an evaluate's 200 output

FUNCTIONS = "tests.hostile44_functions"
X = [0.1, 0.2, 0.3]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # (a hang grace of 1 s: an engine stopped by SIGSTOP is killed after it)
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", QUARANTINE_AFTER=50,
                     REQUEST_TIMEOUT_S=20, HANG_GRACE_S=1) as served:
        yield served


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def _diagonal(client: httpx.Client, url: str, function: str) -> np.ndarray:
    r = client.post(f"{url}/v1/functions/{function}/jacobian",
                    json={"inputs": [{"dtype": "float64", "shape": [3], "data": X}]})
    assert r.status_code == 200, r.text
    return np.diag(np.array(r.json()["jacobian"]["data"]).reshape(3, 3))


def _served_right(client: httpx.Client, url: str) -> None:
    """Another function's Jacobian (2 cos x), one through a subclass's ``__torch_function__``
    (2 cos x), and one that takes its own gradient (2 x): as torch computes them."""
    np.testing.assert_allclose(_diagonal(client, url, "victim44"), 2 * np.cos(X), rtol=1e-12)
    np.testing.assert_allclose(_diagonal(client, url, "subclass_victim44"), 2 * np.cos(X), rtol=1e-12)
    np.testing.assert_allclose(_evaluated(client, url, "own_grad44", X), 2 * np.array(X), rtol=1e-12)


@pytest.mark.parametrize("case, shown", [
    (0, "excluded FuncTorchDynamicLayerBackMode"),  # _DisableFuncTorch
    (1, "included Python"),  # _IncludeDispatchKeyGuard(Python)
    (2, "excluded CPU"),  # _ExcludeDispatchKeyGuard(CPU)
    (3, "torch's __torch_function__ handling"),  # DisableTorchFunction
    (4, "excluded Autograd"),  # _AutoDispatchBelowAutograd
])
def test_a_dispatch_guard_a_function_keeps_entered_is_put_back(server, http, case: int, shown: str) -> None:
    """A function that entered one of torch's guards over the thread's dispatch keys and
    kept it (a global; a generator suspended inside its ``with``) left every later request
    of every function under it, for the engine's life (measured, one engine, 200s before):
    ``torch._C._DisableFuncTorch()``, every later Jacobian all zeros with a 200; the Python
    key included, or the CPU's excluded, every later request a 500 ``internal_error``;
    ``DisableTorchFunction()``, every later subclass's ``__torch_function__`` skipped (its
    Jacobian half the truth, a 200); ``_AutoDispatchBelowAutograd()``, every later
    function's own ``torch.autograd.grad`` failed. Now the keys (and the handling) the
    engine started with are put back after the batch, the function named."""
    url, proc = server
    _served_right(http, url)
    pid, start = _engine_pid(http, url), len(proc.read_log())
    r = _armed(http, url, f"keeps_guard44_{case}", 0)
    assert r.status_code in (200, 500), r.text  # the function's own answer runs under its guard
    _served_right(http, url)
    assert _engine_pid(http, url) == pid  # put back in place: no engine replaced
    pattern = rf"keeps_guard44_{case} changed [^\n]*" + re.escape(shown)
    log = _log_until(proc, start, pattern)
    assert re.search(pattern, log), log[-3000:]


# ------------------------------------------------------------ SIGINT, later


@pytest.mark.parametrize("case", [0, 1])
def test_a_sigint_a_function_sends_later_fails_no_other_request(server, http, case: int) -> None:
    """The engine turned SIGINT into KeyboardInterrupt (Python's default), though it leads
    a session of its own and is stopped by SIGTERM: a function that left a Timer calling
    ``_thread.interrupt_main()`` (case 0), or a child sleeping then ``kill -INT``-ing its
    engine (case 1), had the KeyboardInterrupt raised into the next request that ran,
    another client's of another function: 500 ``function_error`` "KeyboardInterrupt:"
    (measured, at every call; the sender never named). Now SIGINT is let be in an engine,
    the log saying so."""
    url, proc = server
    pid = _engine_pid(http, url)
    for _ in range(2):  # the signal during another request, then while the engine is idle
        assert _armed(http, url, "interrupts44", case).status_code == 200
        np.testing.assert_allclose(_evaluated(http, url, "sleeps44", X), 2 * np.sin(X), rtol=1e-12)
    time.sleep(0.5)
    _served_right(http, url)
    assert _engine_pid(http, url) == pid
    log = _log_until(proc, 0, "SIGINT sent to the engine")  # (said once in 10 s: the other case's line may be it)
    assert "SIGINT sent to the engine" in log and "last ran: " in log, log[-3000:]


# ------------------------------------------------------------ a child that ends the engine later


@pytest.mark.parametrize("function, gone", [("kills_later44", "killed"), ("stops_later44", "stopped")])
def test_a_child_one_function_left_ending_the_engine_strikes_not_the_function_running(
        server, http, function: str, gone: str) -> None:
    """A function that left a child sleeping, which then SIGKILLed the engine while
    another client's request of another function ran (``sleeps44``), had that request
    answered 500 ("killed by SIGKILL ... while running sleeps44") and ``sleeps44`` struck:
    quarantined at the second such death (``QUARANTINE_AFTER=2``, measured), the sender
    never named. Only threads a function left alive were suspects; now the engine's
    children are too: the first such death strikes no one and the request runs again on
    the next engine (a 200), the second strikes the child's function, never ``sleeps44``.

    The same with a SIGSTOP (``stops_later44``: the supervisor kills an engine stopped
    past the grace): it was put down to the function running, "sleeps44 stopped the
    engine process", its request a 500, ``sleeps44`` quarantined at the second such stop
    (measured), though the child's function was named alive. Now a stop is read as a
    death by itself is."""
    url, proc = server
    start = len(proc.read_log())
    for _ in range(2):
        pid = _engine_pid(http, url)
        assert _armed(http, url, function, 0).status_code == 200
        np.testing.assert_allclose(_evaluated(http, url, "sleeps44", X), 2 * np.sin(X), rtol=1e-12)
        _replaced(http, url, pid, 60, f"the engine was not {gone} (the case is gone?)")
    log = _log_until(proc, start, f"{function} struck")
    assert "no one is struck the first time" in log and f"{function} struck" in log, log[-3000:]
    assert "sleeps44 quarantined" not in log
    np.testing.assert_allclose(_evaluated(http, url, "sleeps44", X), 2 * np.sin(X), rtol=1e-12)
