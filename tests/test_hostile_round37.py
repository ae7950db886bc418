"""Red team, round thirty-seven: hostile functions against what the operator reads (serve's
log), what the service leaves on disk, and the other clients queued on the same engine.

Each case names what a user saw before. One real server for the file (one front end, a
spare); the functions are in tests/hostile37_functions.py, each misbehaving only on the
input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from jacobian_service.output_relay import OutputRelay

from ._fault_support import _log_saying, back_within
from .conftest import assert_problem, live_server

FUNCTIONS = "jacobian_service.examples,tests.hostile37_functions"


@pytest.fixture(scope="module")
def temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's TMPDIR: its run directory's, and (before) its functions'."""
    return tmp_path_factory.mktemp("serve-tmp")


@pytest.fixture(scope="module")
def server(temp_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    with pytest.MonkeyPatch.context() as mp:  # only while it starts: the server keeps its environment
        mp.setenv("TMPDIR", str(temp_dir))
        with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", QUARANTINE_AFTER=100) as served:
            mp.undo()
            yield served


def _attack(url: str, function: str, case: int, timeout: float = 60) -> httpx.Response:
    body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, float(case), 0.0]}]}
    return httpx.post(f"{url}/v1/functions/{function}/evaluate", json=body, timeout=timeout)


def _sin_of_attack(r: httpx.Response, case: int) -> None:
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], np.sin([666.0, case, 0.0]), rtol=1e-12)


# ------------------------------------------------------------ serve's log


def test_a_functions_lines_cannot_pass_for_serves_own(server) -> None:
    """Engines' stdout, stderr and own log pipe were relayed into serve's log as written:
    a function that printed "<now> INFO jacobian_service.access: POST
    /v1/functions/forged_access/jacobian 200" made an access line no request made, and
    one that wrote "... jacobian_service.supervisor: engine 0 died: forged_blame hung" on
    its stderr (behind "\\r\\x1b[2K", which erased anything before it on a terminal) or on
    its engine's log pipe (descriptor 3) blamed another function: each line, byte for
    byte, what serve itself writes. Now every relayed line begins with its process and
    stream, control characters escaped: no line of serve's log begins with a forged one."""
    url, proc = server
    start = len(proc.read_log())  # type: ignore[attr-defined]
    _sin_of_attack(_attack(url, "forges_log_lines", 0), 0)
    log = _log_saying(proc, "forged_access", "forged_blame", start=start, times=2)
    pid = next(int(line.split("(pid ")[1].split(")")[0]) for line in log.splitlines() if "forged_access" in line)
    lines = [line for line in log.splitlines() if "forged_" in line]
    assert sorted(line.split(": ", 1)[0] for line in lines) == sorted([
        f"engine 0 (pid {pid}) stdout", f"engine 0 (pid {pid}) stderr",
        f"engine 0 (pid {pid})'s own log", f"engine 0 (pid {pid})'s own log"]), log[-3000:]
    assert "\x1b" not in log and "\r" not in log and "\\x0d\\x1b[2K" in log, log[-3000:]
    assert "access: POST /v1/functions/forges_log_lines/evaluate 200" in log  # the real one, unmarked
    assert not any(line.startswith("engine") for line in log.splitlines() if "forges_log_lines/evaluate 200" in line)


def test_relayed_lines_in_the_json_log_are_objects_naming_their_process(tmp_path) -> None:
    """In the JSON log (LOG_FORMAT=json) a line a function printed was relayed as written:
    a JSON object it printed was a record of serve's, an access record or the
    supervisor's, and any other line broke the log's one-object-a-line. Now each line
    relayed is an object carrying the engine, pid and stream it came from (a record of
    the engine's own log keeps its fields and gets those too)."""
    log_path = tmp_path / "serve.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    relay = OutputRelay(1 << 20, out=log_fd, err=log_fd, log_format="json")
    relay.start()
    forged = {"ts": "2026-01-01T00:00:00.000Z", "level": "info", "logger": "jacobian_service.access",
              "message": "POST /v1/functions/sin/jacobian 200"}
    try:
        (out_r, out_w), (log_r, log_w) = relay.pipe(), relay.pipe()
        relay.watch(0, "engine 0 (pid 101)", [(out_r, 1)], pid=101)
        relay.watch(0, "engine 0 (pid 101)'s own log", [(log_r, 2)], budget="log", pid=101, own_log=True)
        os.write(out_w, orjson.dumps(forged) + b"\nplain \x1b[2J text\n")
        os.write(log_w, orjson.dumps({**forged, "engine": 7, "pid": 1}) + b"\n")
        os.close(out_w)
        os.close(log_w)
        assert relay.flush(10)
    finally:
        relay.stop(2.0)
        os.close(log_fd)
    docs = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(d["engine"], d["pid"], d["stream"]) for d in docs] == [(0, 101, "stdout")] * 2 + [(0, 101, "log")], docs
    assert docs[0]["message"] == orjson.dumps(forged).decode() and docs[1]["message"] == "plain \x1b[2J text"
    assert docs[0]["logger"] == docs[1]["logger"] == "engine output"
    assert docs[2]["logger"] == "jacobian_service.access" and docs[2]["message"] == forged["message"]


# ------------------------------------------------------------ the disk


def _left(temp_dir: Path) -> list[Path]:
    """The function's directories anywhere under the server's TMPDIR (modes put back
    first: it took them away)."""
    found = []
    for root, dirs, _ in os.walk(temp_dir):
        for name in dirs:
            if name.startswith("hostile37-"):
                os.chmod(os.path.join(root, name), 0o700)
                found.append(Path(root, name))
    return found


def test_what_a_function_leaves_in_its_temporary_directory_goes_with_its_engine(server, temp_dir) -> None:
    """A function's temporary files were serve's temporary directory's (TMPDIR, the run
    directory's file system): what it wrote there and left (a 32 MiB file in a directory
    it took every permission from), then crashed its engine, stayed after the engine was
    replaced, for good (a function that filled the disk so left it full for every later
    function and engine start: round 31). Now each engine process has a temporary
    directory of its own, removed as it ends, whatever modes were left in it; while the
    engine lives, its files are there."""
    url, _ = server
    _sin_of_attack(_attack(url, "fills_its_temp", 0), 0)
    (kept,) = _left(temp_dir)
    assert (kept / "filler").stat().st_size == 32 << 20
    os.chmod(kept, 0)  # (as the function left it)
    body = assert_problem(_attack(url, "fills_its_temp", 1), 500, "function_error")
    assert "the engine was restarted" in body["detail"], body
    back_within(url, 30)
    deadline = time.monotonic() + 15
    while left := _left(temp_dir):  # (removed as the supervisor puts the death down: a moment after the 500)
        assert time.monotonic() < deadline, left
        for where in left:
            os.chmod(where, 0)
        time.sleep(0.1)
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.25, -1.0, 2.0]]}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(np.float32([0.25, -1.0, 2.0]))), rtol=1e-6)
