"""Red team, round fifteen: what a function writes to its engine's standard output and
error, and what it leaves changed in the modules, libraries and process it shares with
every later function of its engine.

One server for the module, each case naming what a user saw before. The functions are in
tests/hostile15_functions.py; each misbehaves only on the input 666 (round 11's
``_armed``), the second input picking how.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Iterator

import httpx
import numpy as np
import pytest
from jacobian_service.output_relay import OutputRelay

from ._fault_support import _log_until
from .conftest import assert_problem, live_server
from .hostile15_functions import FLOOD_BYTES
from .test_hostile_round11 import _armed, _engine_pid
from .test_hostile_round13 import _sin_ok

FUNCTIONS = "jacobian_service.examples,tests.hostile15_functions"
X = [0.5, 1.0, 2.0]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # QUARANTINE_AFTER=1: one strike quarantines, so a strike on the wrong function shows.
    # No spare: nothing here takes an engine down (each case checks it is the same one).
    # Without PYTHONUNBUFFERED (this shell's, the image's): Python's own buffering, as `make
    # serve` from a terminal has it (serve copies the environment as it starts).
    unbuffered = os.environ.pop("PYTHONUNBUFFERED", None)
    try:
        with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", QUARANTINE_AFTER=1,
                         REQUEST_TIMEOUT_S=20, HANG_GRACE_S=0.5) as served:
            if unbuffered is not None:
                os.environ["PYTHONUNBUFFERED"] = unbuffered
                unbuffered = None
            yield served
    finally:
        if unbuffered is not None:
            os.environ["PYTHONUNBUFFERED"] = unbuffered


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def _evaluated(r: httpx.Response, case: int) -> None:
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], np.sin([666.0, float(case), 0.0]), rtol=1e-12)


def _metric(client: httpx.Client, url: str, name: str) -> float:
    text = client.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# ------------------------------------------------------------ what a function writes to stdout/stderr


def test_a_functions_flood_of_output_costs_serves_log_a_bounded_share(server, client) -> None:
    """A function's 64 MB ``os.write(1, ...)`` (and a 64 MB line written to
    ``sys.stderr``) landed whole in serve's log: 64 MB more a request, a disk or a log
    pipeline filled by a loop of them. Now each engine's output reaches serve's log
    through ``serve`` (``output_relay``), line by line, under ENGINE_OUTPUT_BYTES_PER_S
    (64 KiB a second, 1 MiB at once): the rest is dropped, counted in a metric and said
    in the log; what the engine says itself comes whole through a pipe of its own (it
    was taken into a line the function left unended). The function's request is
    answered, the engine serves on, and a line a
    function prints reaches the log at once: Python buffered an engine's stdout by the
    block (a file, now a pipe), so a print reached the log 8 KiB later, or never if the
    engine died (now line-buffered, as on a terminal)."""
    url, proc = server
    pid = _engine_pid(client, url)
    start = len(proc.read_log())  # type: ignore[attr-defined]
    _evaluated(_armed(client, url, "floods_output", 3), 3)
    assert "floods_output says hello" in _log_until(proc, start, "floods_output says hello")
    for case in (2, 1):  # (the over-long line first, while the budget has room for its head)
        before = len(proc.read_log())  # type: ignore[attr-defined]
        _evaluated(_armed(client, url, "floods_output", case), case)
        log = _log_until(proc, before, rf"engine 0 \(pid {pid}\): \d+ bytes of its standard output and error dropped")
        grown = len(proc.read_log()) - before  # type: ignore[attr-defined]
        assert grown < 3 << 20, f"serve's log grew by {grown} bytes for a {FLOOD_BYTES}-byte write"
        assert re.search(rf"engine 0 \(pid {pid}\): \d+ bytes of its standard output and error dropped", log), log[-2000:]
    said = r"\(pid \d+\)'s own log: \S+ \S+ WARNING jacobian_service.engine: floods_output changed the umask"
    log = _log_until(proc, start, said)  # (the engine's line, relayed: on its own time)
    assert "y" * (16 << 10) + " [line cut]\n" in log  # the unended line's head
    # What the engine said next (the umask it put back) is a line of its own, whole: its
    # log has a pipe and a budget of its own, which the function's line did not take.
    assert re.search(said, log), log[-3000:]
    # (the supervisor publishes the count with its state, a moment after the relay's line)
    deadline = time.monotonic() + 10
    while (dropped := _metric(client, url, "jacobian_service_engine_output_dropped_bytes{")) < 2 * FLOOD_BYTES - (4 << 20):
        assert time.monotonic() < deadline, dropped
        time.sleep(0.1)
    assert _engine_pid(client, url) == pid  # nothing restarted, no one struck
    _sin_ok(client, url)


def test_the_relay_never_blocks_a_writer_on_a_log_nobody_reads() -> None:
    """Serve's log read slower than an engine writes (a terminal paused, a collector
    behind): the engine, writing to serve's descriptors, waited in its write for as long
    (a full pipe: its request and every one queued behind it). Through the relay the
    writer never waits on the log: what the log has no room for is dropped, counted, and
    the lines that pass are whole."""
    log_r, log_w = os.pipe()  # serve's log, which nobody reads
    relay = OutputRelay(64 << 10, out=log_w, err=log_w)
    relay.start()
    (out_r, out_w), (err_r, err_w) = relay.pipe(), relay.pipe()
    try:
        script = ("import os\nline = b'z' * 63 + b'\\n'\n"
                  "for _ in range(128): os.write(1, line * 4096)\nos.write(2, b'done\\n')")
        writer = subprocess.Popen([sys.executable, "-c", script],
                                  stdout=out_w, stderr=err_w)
        os.close(out_w)
        os.close(err_w)
        relay.watch(0, f"engine 0 (pid {writer.pid})", [(out_r, 1), (err_r, 2)])
        assert writer.wait(timeout=30) == 0  # 32 MB written past a log that took 64 KiB
        os.set_blocking(log_r, False)
        taken = b""
        deadline = time.monotonic() + 10
        while not relay.flush(0.05):  # the log read now, at last: what was queued comes
            assert time.monotonic() < deadline
            try:
                taken += os.read(log_r, 1 << 20)
            except BlockingIOError:
                pass
        try:
            taken += os.read(log_r, 1 << 20)
        except BlockingIOError:
            pass
        dropped = relay.dropped()[0]
        assert dropped + len(taken) == (32 << 20) + len(b"done\n")  # each byte relayed or counted
        assert dropped >= (32 << 20) - (2 << 20)  # the log took its 64 KiB, the queue 1 MiB
        lines = taken.split(b"\n")
        assert lines[-1] == b"" and all(line in (b"z" * 63, b"done") for line in lines[:-1]), {len(x) for x in lines}
    finally:
        os.close(log_r)  # the writer thread, blocked on the log, is let go (EPIPE)
        relay.stop(2.0)
        os.close(log_w)



def test_a_file_put_over_the_engines_log_pipe_is_taken_away(server, client) -> None:
    """The engine logs through a pipe of its own to serve (the function's stdout and
    stderr apart): a function that ``dup2``-ed a file of its own over that descriptor and
    returned had every later line the engine logged (what later functions changed and it
    put back, naming them) written into its file, none in serve's log, for the engine's
    life. The descriptor is now watched as 0-2 are, and put back after the batch."""
    url, proc = server
    pid = _engine_pid(client, url)
    start = len(proc.read_log())  # type: ignore[attr-defined]
    _evaluated(_armed(client, url, "covers_the_engines_log", 1), 1)
    _evaluated(_armed(client, url, "sets_the_umask", 1), 1)
    log = _log_until(proc, start, "sets_the_umask changed the umask")
    assert "WARNING jacobian_service.engine: sets_the_umask changed the umask" in log, log[-3000:]
    assert "covers_the_engines_log changed descriptors 0-2 (stdin, stdout, stderr), the engine's log pipe" in log
    assert _engine_pid(client, url) == pid  # put back, not restarted
    _sin_ok(client, url)

# ------------------------------------------------------------ what a function patches and leaves

F64 = {"dtype": "float64", "shape": [3], "data": X}
_X = np.array(X)
# case -> (the victim, another client's function; its Jacobian at X; where the log says the patch was)
PATCHES = {
    1: ("uses_einsum", np.diag(2 * _X), "names in torch._VF (einsum)"),
    2: ("uses_mse_loss", 2 * _X / 3, "names in torch._C._nn (mse_loss)"),
    4: ("uses_autograd_function", np.diag(2 * _X), "names in torch.autograd.Function (apply)"),
    5: ("sin", np.diag(np.cos(_X)), "names in jacobian_service.ipc (_NONE)"),
    6: ("sin", np.diag(np.cos(_X)), "names in jacobian_service.engine.core (TORCH_DTYPES, _AS_SENT)"),
    7: ("sin", np.diag(np.cos(_X)), "names in socket.socket (sendmsg)"),
    8: ("sin", np.diag(np.cos(_X)), "names in time (monotonic)"),
}
VALUES = {"uses_einsum": _X * _X, "uses_mse_loss": np.mean(_X * _X), "uses_autograd_function": _X * _X, "sin": np.sin(_X)}


def _victim_served_right(client: httpx.Client, url: str, victim: str, jacobian: np.ndarray) -> None:
    """Another client's float64 Jacobian and value, as torch.func.jacrev and f answer in-process."""
    r = client.post(f"{url}/v1/functions/{victim}/jacobian", json={"inputs": [F64]})
    assert r.status_code == 200, r.text
    assert r.json()["jacobian"]["dtype"] == "float64", r.json()
    np.testing.assert_allclose(r.json()["jacobian"]["data"], jacobian, rtol=1e-12)
    r = client.post(f"{url}/v1/functions/{victim}/evaluate", json={"inputs": [F64]})
    assert r.status_code == 200, r.text
    assert r.json()["output"]["dtype"] == "float64", r.json()
    np.testing.assert_allclose(r.json()["output"]["data"], VALUES[victim], rtol=1e-12)


@pytest.mark.parametrize("case", PATCHES)
def test_a_patch_of_what_every_function_goes_through_is_put_back(server, client, case: int) -> None:
    """A function patched what other functions' answers go through and returned; the
    next function, another client's, got a wrong answer with a 200: ``torch._VF.einsum``
    (what ``torch.einsum`` calls) or ``torch._C._nn.mse_loss`` (what ``F.mse_loss``
    calls) doubled made every later einsum's (mse_loss's) Jacobian twice torch's, and
    ``torch.autograd.Function.apply`` doubled every custom Function's; the engine's own
    ``ipc._NONE`` rebound answered every later evaluate's output as ``1.0``, and its
    dtype table rebound (``core.TORCH_DTYPES``) every later float64 request in float32;
    a ``sendmsg`` of its own on ``socket.socket`` (zeroing 72-byte frames) sent every later
    3x3 float64 Jacobian as zeros, and ``time.monotonic`` run ahead answered every later
    request of every function 504 ("waited in the queue past its deadline"), /readyz 200.
    Now each is put back after the function's batch, in the same engine, the log naming
    the function (no restart: nothing is lost). The patcher's own answer, which was
    computed, packed and sent under its patch (its own evaluate packed as 1.0, its own
    Jacobian sent as zeros, with a 200: round seventeen), is its 500 naming the patch."""
    url, proc = server
    victim, jacobian, where = PATCHES[case]
    pid = _engine_pid(client, url)
    _victim_served_right(client, url, victim, jacobian)
    r = _armed(client, url, "patches", case)
    problem = assert_problem(r, 500, "function_error")
    assert problem["detail"].startswith(f"patches rebound or deleted {where}, which the engine's work"), problem
    _victim_served_right(client, url, victim, jacobian)
    log = _log_until(proc, 0, f"patches rebound or deleted {re.escape(where)}")
    assert f"patches rebound or deleted {where}" in log, log[-3000:]
    assert _engine_pid(client, url) == pid
    _sin_ok(client, url)


def test_forward_mode_switched_off_for_the_engines_thread_is_switched_on_again(server, client) -> None:
    """``torch._C._set_fwd_grad_enabled(False)`` in a function, left so: torch.func's own
    forward mode still ran, but every later function's ``torch.autograd.forward_ad``
    got a tangent of None (its 500, ``TypeError``), for as long as the engine lived. Now
    it is switched on again after the batch, as grad mode is, the log naming the function."""
    url, proc = server
    value = np.sin(_X) + np.cos(_X)
    r = _armed(client, url, "patches", 9)
    assert r.status_code == 200, r.text
    r = client.post(f"{url}/v1/functions/uses_forward_ad/evaluate", json={"inputs": [F64]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], value, rtol=1e-12)
    log = _log_until(proc, 0, "patches changed forward-mode AD")
    assert "patches changed forward-mode AD (torch._C._set_fwd_grad_enabled) (to False)" in log, log[-3000:]


def test_a_table_of_the_engines_changed_in_place_fails_its_function_alone(server, client) -> None:
    """``core.TORCH_DTYPES["float64"] = torch.float32`` in a function, a change in place
    that no name's rebinding shows: every later float64 request of every function was
    computed and answered in float32 (a 200, ``"dtype": "float32"``). The engine's tables
    are read-only now: the function's own request is its 500, the others are served."""
    url, _ = server
    r = _armed(client, url, "patches", 3)
    assert_problem(r, 500, "function_error")
    assert r.json()["detail"] == "TypeError: 'mappingproxy' object does not support item assignment", r.json()
    _victim_served_right(client, url, "sin", np.diag(np.cos(_X)))
