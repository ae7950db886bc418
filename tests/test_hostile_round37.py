"""Red team, round thirty-seven: hostile functions against what the operator reads (serve's
log), what the service leaves on disk, and the other clients queued on the same engine.

Each case names what a user saw before. One real server for the file (one front end, a
spare); the functions are in tests/hostile37_functions.py, each misbehaving only on the
input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from jacobian_service import channel
from jacobian_service.channel import Listener, encode_control, encode_messages
from jacobian_service.output_relay import OutputRelay

from ._fault_support import _log_saying, back_within
from .conftest import assert_problem, live_server
from .test_hostile_round10 import _front_ends

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


# ------------------------------------------------------------ the engine's connection


def test_jobs_a_function_reads_off_its_engines_socket_are_run_and_it_is_struck(server, temp_dir) -> None:
    """A function reads the engine's connections to the front ends (in /proc/self/fd):
    what it read, another client's job queued behind it, the engine never saw. That
    request waited for its deadline (504), and the engine, never answering its cancel,
    was killed as hung in the victim's function ("engine 0 died: softmax hung"), struck
    for it (quarantined the third time), while the reader went free with its 200. Now
    each write of a front end says how many messages it has sent on the connection (and
    once a second while it holds a job there): the engine finds one missing, and leaves
    naming the function that ran meanwhile, which is struck; the victim's request goes
    to the spare and is answered, with softmax's values."""
    url, proc = server
    start = len(proc.read_log())  # type: ignore[attr-defined]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        thief = pool.submit(_attack, url, "reads_the_queue", 30)  # (3 s, then it reads)
        deadline = time.monotonic() + 30
        while not list(temp_dir.glob("jacobian-service-*/tmp-engine-*/hostile37-reading")):
            assert time.monotonic() < deadline and not thief.done(), "the function did not start"
            time.sleep(0.05)
        x = np.array([1.0, 2.0, 3.0])
        began = time.monotonic()
        r = httpx.post(f"{url}/v1/functions/softmax/evaluate", json={"inputs": [x.tolist()]},
                       headers={"x-request-timeout": "30"}, timeout=60)
        assert r.status_code == 200, (r.text, proc.read_log()[start:][-6000:])  # type: ignore[attr-defined]
        np.testing.assert_allclose(r.json()["output"]["data"], np.exp(x) / np.exp(x).sum(), rtol=1e-6)
        assert time.monotonic() - began < 25  # (answered by the spare, not at its deadline)
        _sin_of_attack(thief.result(), 30)
    said = "engine 0 died: reads_the_queue left 1 message(s) a front end sent to the engine read off its connection"
    log = _log_saying(proc, said, start=start)
    assert said in log and "softmax hung" not in log, log[-3000:]
    back_within(url, 30)


def test_the_engine_counts_what_it_read_against_what_was_sent(tmp_path) -> None:
    """The engine's side of the count, alone: messages a front end counted as sent that
    never came are missing, put down to the functions that ran since its count last
    matched (one: struck; several: none), and a matching count clears those."""
    listener = Listener(tmp_path / "engine.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(tmp_path / "engine.sock"))

    def write(sent: int, *ids: int) -> list[int]:
        buffers, _ = encode_messages([[orjson.dumps({"id": i})] for i in ids])
        sock.sendall(encode_control(channel._SENT, channel._SENT_COUNT.pack(sent)) + b"".join(buffers))
        got: list[int] = []
        deadline = time.monotonic() + 10
        while len(got) < len(ids):
            assert time.monotonic() < deadline
            got += [orjson.loads(frames[0])["id"] for _, frames in listener.poll(0.1) if frames]
        return got

    try:
        listener.poll(0.1)  # (accepted)
        assert write(0, 1, 2) == [1, 2] and listener.robbed() is None
        listener.ran("thief")
        assert write(3, 4) == [4]  # the third message was read by another
        assert listener.robbed() == (1, ["thief"])
        listener.ran("a")
        assert write(4, 5) == [5] and listener.robbed() is None  # in order: those that ran are cleared
        listener.ran("b")
        listener.ran("c")
        assert write(7, 8) == [8] and listener.robbed() == (2, ["b", "c"])
    finally:
        sock.close()
        listener.close()


def test_an_engine_whose_socket_file_a_function_removes_is_replaced(server) -> None:
    """A function that removed its engine's socket file (engine-0.sock in the run
    directory, the path the front ends connect to) left the engine serving the
    connections it had, beating, its board idle: a front end started again (one a
    function killed: round 31's truncated sample file) never reached it, and every
    request of it waited for its deadline (504), for as long as the engine lived; one
    that bound a socket of its own there held that front end's requests the same way.
    Now the engine checks its path after each batch, as it checks its descriptors, and
    leaves at once, the function named and struck: the spare binds the path afresh, and
    the front end started again answers."""
    url, proc = server
    for case in (0, 1):
        start = len(proc.read_log())  # type: ignore[attr-defined]
        _sin_of_attack(_attack(url, "unlinks_its_socket", case), case)
        # The death read before the kill: the front end's word that it sent the job (its
        # signed ``held``, the one witness the board's "stray" needs) leaves through its
        # zmq I/O thread. Killed 0.3 s after the 200, on a loaded machine (three copies
        # side by side, once in 30 runs), the supervisor had no word of it 2 s after the
        # leave: the word most likely went with the front end, and the leave was read as
        # the board's lie, the function unnamed.
        said = "engine 0 died: unlinks_its_socket left the engine's socket file"
        assert said in _log_saying(proc, said, start=start), case
        (front_end,) = _front_ends(proc.pid)
        os.kill(front_end, signal.SIGKILL)  # (as a function can: round 31)
        deadline = time.monotonic() + 60
        while _front_ends(proc.pid) in ([], [front_end]):
            assert time.monotonic() < deadline, "no front end started again"
            time.sleep(0.1)
        while True:  # (its /readyz waits for an engine it can reach)
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, ("the front end started again reached no engine",
                                                 proc.read_log()[start:][-4000:])  # type: ignore[attr-defined]
        r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.25, -1.0, 2.0]]},
                       headers={"x-request-timeout": "20"}, timeout=60)
        assert r.status_code == 200, (case, r.text, proc.read_log()[start:][-4000:])  # type: ignore[attr-defined]
        np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(np.float32([0.25, -1.0, 2.0]))),
                                   rtol=1e-6)
