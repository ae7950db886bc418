"""Timing, round two: results that a busy machine (CI's two cores, two test workers, each
server's supervisor, front ends, engines and zygote) must not change. A fixed short wait
the service imposes on a request it already took turns into a wrong answer, or a needless
503, when the machine is slow to do what that wait was for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jacobian_service import engine_client, ipc
from jacobian_service.engine_client import RemoteEngines
from jacobian_service.errors import FunctionError, Unavailable
from jacobian_service.procfs import descendants

from .test_engine_client import _call, _state
from .test_engine_client import engines  # noqa: F401  (its registry; the connection is made here)

# An engine that takes the front end's connection, reads a job's first bytes and dies:
# its own process, so that it is really dead (no engine of ours in it, no torch).
_DIES_WITH_A_JOB = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen()
print("listening", flush=True)
conn, _ = s.accept()
conn.recv(1)
print("took a job", flush=True)
os._exit(7)
"""


async def _a_request_its_engine_died_with(engines: RemoteEngines, run_dir: Path) -> tuple[asyncio.Task, int]:
    """A request sent to an engine process that died with it (its connection broken, no
    word yet from the supervisor): the request, and the dead engine's pid."""
    ipc.engine_path(run_dir, 0).unlink(missing_ok=True)  # (the last one's)
    engine = subprocess.Popen([sys.executable, "-c", _DIES_WITH_A_JOB, str(ipc.engine_path(run_dir, 0))],
                              stdout=subprocess.PIPE, text=True)
    assert await asyncio.to_thread(engine.stdout.readline) == "listening\n"  # type: ignore[union-attr]
    engines._socks = [engines._connection(0)]
    engines._event(_state(1, engine.pid, ready=True))
    request = asyncio.create_task(engines.run("jacobian", _call(engines)))
    assert await asyncio.to_thread(engine.stdout.readline) == "took a job\n"  # type: ignore[union-attr]
    assert await asyncio.to_thread(engine.wait, 10) == 7
    engine.stdout.close()  # type: ignore[union-attr]
    return request, engine.pid


@pytest.mark.asyncio
async def test_a_crash_is_named_to_its_caller_whenever_the_supervisors_word_comes(engines, tmp_path,  # noqa: F811
                                                                                   monkeypatch):
    """An engine dies running a request: its connection breaks at once, and the
    supervisor's word, naming the request it ran (500 for a crash, 504 for a hang),
    comes at its next tick. 2 s after the break (``_LOST_GRACE_S``), whatever was still
    waiting got 503 "the connection to the engine broke while this request waited;
    retry": on a busy machine, a request whose own function crashed the engine was told
    to try again (as round 28's crashes33 and round 6's shuts_its_connection_down would
    be, should the supervisor's tick come late). Now, while the engine is dead and the
    supervisor talks, the word is waited for; a silent supervisor still means the 503."""
    monkeypatch.setattr(engine_client, "_LOST_GRACE_S", 0.05)
    request, pid = await _a_request_its_engine_died_with(engines, tmp_path)
    tag = next(entry[2] for entry in engines._pending.values())
    for _ in range(6):  # twelve graces, the supervisor stating each 0.1 s and not yet naming the death
        await asyncio.sleep(0.1)
        engines._event(_state(1, pid, ready=True))
    assert not request.done(), request.exception() if request.done() else None
    engines._event({"t": "died", "engine": 0, "generation": 1, "pid": pid, "tags": [tag], "function": "sin",
                    "reason": "the engine process exited with status 7", "hang": False, "ready_in": 0.5})
    with pytest.raises(FunctionError, match="exited with status 7 while running this request"):
        await asyncio.wait_for(request, 5)
    engines._socks[0].close()

    # The supervisor silent (no state for _SILENT_S): no word will come; the 503, as before.
    monkeypatch.setattr(engine_client, "_SILENT_S", 1.0)
    request, pid = await _a_request_its_engine_died_with(engines, tmp_path)
    with pytest.raises(Unavailable, match="connection to the engine broke") as refused:
        await asyncio.wait_for(request, 5)
    assert time.monotonic() - engines._state_at >= 1.0, "answered before the supervisor fell silent"
    assert refused.value.headers["Retry-After"] == "1"
    engines._socks[0].close()


def test_a_server_start_is_given_up_on_when_it_stops_moving_not_at_a_fixed_wall_time(monkeypatch):
    """``live_server`` gave a server 120 s of wall time to become ready. With two busy
    loops beside the fault tests (a load of ~20), two servers whose zygote took ~100 s to
    import torch said "ready" just as those 120 s ran out, and their tests failed. Now a
    start is given up on once its processes use no CPU for a while (stuck), or after 600 s
    in all: a process that works (here a spinning child of a parent that sleeps) goes on."""
    from .conftest import _Starting

    monkeypatch.setattr(_Starting, "STILL_S", 1.0)
    spinning = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, "
                                 "'-c', 'while True: pass'])"])
    sleeping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watched = [_Starting(spinning.pid), _Starting(sleeping.pid)]
        seen: list[list[bool]] = []
        while not seen or not seen[-1][1]:  # until the sleeper, past its start, is found still
            time.sleep(0.1)
            seen.append([w.stuck() for w in watched])
            assert len(seen) < 200, seen
        assert not any(spin for spin, _ in seen), seen
    finally:
        for proc in (spinning, sleeping):
            for child in descendants(proc.pid):
                os.kill(child, signal.SIGKILL)
            proc.kill()
            proc.wait()
