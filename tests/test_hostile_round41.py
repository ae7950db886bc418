"""Red team, round forty-one: the supervisor's warm-up handling against a real server.

A cold engine that died before it was ready with no warm-up note (round 39: a function
can remove its note) turned warm-ups off for the rest of the run, on the first such death.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from ._fault_support import _log_saying, back_within
from ._spare_support import ends_its_engine, serves_sin
from .conftest import live_server

FUNCTIONS = "tests.hostile40_functions"  # (forges_warm40, armed, ends its engine: os._exit(3))


def _cold_engine(serve: int, not_these: set[int]) -> int:
    """The engine process serve starts next (a child with a --run-dir), once it exists."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = subprocess.run(["pgrep", "-P", str(serve)], capture_output=True, text=True).stdout.split()
        for pid in map(int, kids):
            try:
                if pid not in not_these and b"--run-dir" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                pass
        time.sleep(0.01)
    raise AssertionError("no new engine process started")


def _warm_ups_off_in(pid: int) -> bool:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return b"JACOBIAN_SERVICE_NO_WARMUPS=1" in environ


def test_one_kill_of_a_cold_engine_before_its_first_note_does_not_turn_warm_ups_off_for_good() -> None:
    """Round 39 turned warm-ups off for the rest of the run at a cold engine's death with
    no warm-up note: a function that removes its own note crash-looped otherwise. But a
    cold engine also dies with no note when it goes before its first (the OOM killer, an
    operator's kill -9, an import that crashes): measured, one kill -9 of a cold engine
    0.3 s into its start turned warm-ups off for good, every function's first call paying
    its compile from then on. Now the first such death strikes no one and leaves warm-ups
    on (the next engine starts with them); the second in a row turns them off, as
    before (round 39's crash loop still ends)."""
    # (no fork server: a cold engine imports torch for seconds before its first note)
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, QUARANTINE_AFTER=100, ENGINE_STANDBY="false",
                     ENGINE_FORK_SERVER="false") as (url, proc):
        (first,) = httpx.get(f"{url}/v1/info", timeout=30).json()["engine_pids"]
        start = len(proc.read_log())  # type: ignore[attr-defined]
        # A crash in a request (its function named): the next engine starts cold.
        ends_its_engine(url, "forges_warm40")
        seen = {first}
        cold = _cold_engine(proc.pid, seen)
        seen.add(cold)
        assert not _warm_ups_off_in(cold)
        os.kill(cold, signal.SIGKILL)  # the OOM killer, an operator: before its first note
        log = _log_saying(proc, "it ended before it was ready (the engine process was killed by SIGKILL",
                          start=start, within=30)
        assert "warm-ups stay on: a second such death in a row turns them off" in log, log[-3000:]
        assert "without warm-ups" not in log, log[-3000:]
        # The next engine warms up: killed cold too, it is the second in a row.
        cold = _cold_engine(proc.pid, seen)
        seen.add(cold)
        assert not _warm_ups_off_in(cold)  # (failed before: the first kill had turned them off)
        os.kill(cold, signal.SIGKILL)
        log = _log_saying(proc, "the second engine in a row to end before it was ready with no note: engines "
                          "start without warm-ups from now on", start=start, within=30)
        assert _warm_ups_off_in(_cold_engine(proc.pid, seen))
        back_within(url, 60)
        serves_sin(url, "after40")
