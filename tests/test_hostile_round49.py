"""Red team, round forty-nine: a front end's word that a function can keep from coming,
and what a function leaves for the engine's end.

- a function that ends its front end right after its job (or any end of that front end
  then): the front end's ``held`` word, the one witness the engine's status board needs
  for the function to be named (a stray thread, a crash), left through its zmq I/O
  thread after the job had gone, and went with it; it is now in the supervisor's socket
  queue, in the kernel, before the job is written (``supervision.HeldInbox``);
- a child made with ``clone(CLONE_PARENT)``: ``serve``'s, not the engine's, so never seen
  spinning, and left to init, spinning, when ``serve`` was killed outright (refused now:
  ``confinement``);
- a thread a C extension started (no Python thread state), spinning a core: never seen
  (``engine.strays`` now watches the process's other threads too);
- ``atexit`` hooks (a function module's) run as the engine process ended through Python's
  shutdown (a spare told to stop, a failed start): it ends with ``os._exit`` now.

Real-server cases share one server (one engine, no spare); the functions are in
tests/hostile49_functions.py, misbehaving only on the input 666 (round 11's ``_armed``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from ._fault_support import _log_until
from .conftest import assert_problem, live_server
from .hostile49_functions import where
from .test_hostile_round11 import _armed, _engine_pid
from .test_hostile_round21 import _evaluated  # an evaluate's 200 output

X = [0.1, 0.2, 0.3]

# A front end (the product's RemoteEngines, started as serve starts it) that tells the
# supervisor it sends engine 0 a job of ``function`` and is killed at once, as a function
# that ends its front end right after its job has it.
_FRONT_END = """import asyncio, os, signal, sys
from pathlib import Path
from jacobian_service import engine_client
from jacobian_service.engine_client import RemoteEngines
from jacobian_service.settings import Settings
from jacobian_service.supervision import Channel
engine_client._FIRST_STATE_S = 0.01  # (no supervisor ticks here: its state never comes)
events, control, key, run_dir, function = sys.argv[1:]
async def main():
    front_end = RemoteEngines(Settings(), Path(run_dir), Channel(events, control, bytes.fromhex(key)),
                              registry={"functions": [], "devices": ["cpu"]})
    await front_end.start()
    front_end._tell_held((0, function))  # (what _run_once does just before the job's bytes go)
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""


def test_a_front_end_killed_just_after_its_job_has_told_the_supervisor_already(tmp_path) -> None:
    """The ``held`` word went on the zmq control socket, written later by the front end's
    zmq I/O thread: a front end killed just after its job took it along (measured here:
    4 of 10 words lost, /tmp/h49/loss.py), and the board's true "stray" (a function that
    left a thread and ended its front end) was read as a lie, the function unnamed and
    unstruck (round 37's note). Now it is in the supervisor's queue before
    ``_tell_held`` returns: six front ends killed so, side by side, all six told."""
    from ._fault_support import supervisor_of_a_dead_engine

    with supervisor_of_a_dead_engine(tmp_path) as (sup, _, _):
        sup.listen_held()  # (as it starts)
        channel = sup.channel
        names = {f"leaves{i}" for i in range(6)}
        procs = [subprocess.Popen([sys.executable, "-c", _FRONT_END, channel.events, channel.control,
                                   channel.key.hex(), str(tmp_path), name], stderr=subprocess.PIPE) for name in names]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == -9, err.decode()
        began = time.monotonic()
        ran = sup._await_held(0, names, 0.5)
        assert ran == names, ran
        assert time.monotonic() - began < 0.3  # there at once, not waited for


# ------------------------------------------------------------ what escapes the engine


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    with live_server(FUNCTIONS="tests.hostile49_functions", WORKERS=1, WARMUP="false", ENGINE_STANDBY="false",
                     QUARANTINE_AFTER=50, REQUEST_TIMEOUT_S=20) as served:
        os.makedirs(where(served[1].pid), exist_ok=True)
        yield served
        shutil.rmtree(where(served[1].pid), ignore_errors=True)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def _spinners(serve: int) -> dict[str, int]:
    """What the functions started and wrote down (name -> pid)."""
    d, found = where(serve), {}
    for name in os.listdir(d):
        if not name.endswith(".tmp"):
            with open(os.path.join(d, name)) as f:
                found[name] = int(f.read())
    return found


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="the raw clone's number")
@pytest.mark.parametrize("case", [0, 1])  # its own session, or not
def test_a_child_of_serve_s_a_function_makes_with_clone_parent_is_refused(server, http, case: int) -> None:
    """``clone(CLONE_PARENT)`` made a child of the engine's parent, ``serve``: no
    descendant of the engine, so its watch never saw it spin a core (8 s, a spinning
    shell, engine unchanged), its kill of its descendants as it stopped with a killed
    ``serve`` missed it, and the child, handed to init, spun on for good (measured:
    /tmp/h49/probe3.py, ``ppid=1 state=R``). Refused now (EPERM): the function's 500, the
    same engine, nothing started."""
    url, proc = server
    pid = _engine_pid(http, url)
    try:
        body = assert_problem(_armed(http, url, "escapes49", case), 500, "function_error")
        assert body["detail"] == "PermissionError: [Errno 1] clone", body
        time.sleep(0.3)  # (what a clone made would have written down by now)
        assert _spinners(proc.pid) == {}
    finally:
        for spinner in _spinners(proc.pid).values():
            os.kill(spinner, signal.SIGKILL)
    np.testing.assert_allclose(_evaluated(http, url, "escapes49", X), np.sin(X), rtol=1e-12)
    assert _engine_pid(http, url) == pid


@pytest.mark.skipif(shutil.which("cc") is None, reason="the function compiles its C thread")
def test_a_thread_a_c_extension_left_spinning_is_found(server, http) -> None:
    """A thread a C extension started (``pthread_create``: no Python thread state, so in
    no list the engine's watch read) and left spinning took a core for as long as the
    engine lived, never named (8 s, no word). Now the process's other threads are
    watched too: the engine restarts, the function named, and the next request answers."""
    url, proc = server
    start = len(proc.read_log())  # type: ignore[attr-defined]
    pid = _engine_pid(http, url)
    np.testing.assert_allclose(_evaluated(http, url, "escapes49", [666.0, 4.0, 0.0]), np.sin([666.0, 4.0, 0.0]),
                               rtol=1e-12)
    said = "engine 0 died: escapes49 left a thread running after it returned, using a core"
    assert said in _log_until(proc, start, said, within=30), proc.read_log()[start:]  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while _engine_pid(http, url) in (pid, None) or http.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not replaced"
        time.sleep(0.1)
    np.testing.assert_allclose(_evaluated(http, url, "escapes49", X), np.sin(X), rtol=1e-12)


def test_an_engine_ends_without_running_the_atexit_hooks_of_its_functions(tmp_path) -> None:
    """An engine (or spare) that ended through Python's shutdown (``sys.exit``: a spare
    told to stop, a start that failed, its loop's failure) ran the ``atexit`` hooks its
    functions' modules registered: user code at a time nothing bounds (measured: the
    hook's file written). Now the engine ends with ``os._exit`` (its output flushed, its
    descendants killed), status kept: here a start that fails on its second module."""
    mark = tmp_path / "ran"
    env = {**os.environ, "HOSTILE49_AT_EXIT": str(mark),
           "JACOBIAN_SERVICE_FUNCTIONS": "tests.hostile49_atexit,tests.no_such_module49"}
    proc = subprocess.run([sys.executable, "-m", "jacobian_service.engine.process", "--index", "0", "--device", "cpu",
                           "--run-dir", str(tmp_path)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 1, proc.stderr.decode()
    assert "cannot load the function module 'tests.no_such_module49'" in proc.stderr.decode()
    assert not mark.exists()
