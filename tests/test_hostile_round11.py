"""Red team, round eleven: a function that attacks the supervision from inside its engine.

One server for the module (a start costs ~3 s), with API keys; each case names what a
user saw before. The functions are in tests/hostile11_functions.py; each misbehaves only
on the input 666. The tests run in order: the hang gets its function quarantined, which
the next test's function then tries to lift.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import orjson
import pytest
from jacobian_service import ipc
from jacobian_service.confinement import confiner, landlock_abi
from jacobian_service.settings import Settings
from jacobian_service.supervisor import Supervisor, _Engine

from ._fault_support import _log_saying
from .conftest import assert_problem, live_server
from .hostile11_functions import KEY
from .test_supervisor import subscribed

FUNCTIONS = "jacobian_service.examples,tests.hostile11_functions"
X = [0.5, 1.0, 2.0]
LANDLOCK = landlock_abi() >= 6
AUTH = {"authorization": f"Bearer {KEY}"}
OPERATOR_KEY = "hostile11-operator-2b8e"  # (round 51: only an operator's key releases a quarantine)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # QUARANTINE_AFTER=1: one hang quarantines; HANG_GRACE_S: how long past its deadline a
    # request may be held (the engine's board is not believed for longer). WARMUP=false:
    # the spare that takes over from the hung engine is ready sooner.
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", QUARANTINE_AFTER=1, REQUEST_TIMEOUT_S=20, HANG_GRACE_S=0.5,
                     API_KEYS=KEY, ADMIN_KEYS=OPERATOR_KEY) as served:
        yield served


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30, headers=AUTH) as c:
        yield c


def _armed(client: httpx.Client, url: str, function: str, case: int, endpoint: str = "evaluate",
           **headers: str) -> httpx.Response:
    """A hostile function's request on its armed input (666; ``case`` picks how it misbehaves)."""
    body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, float(case), 0.0]}]}
    return client.post(f"{url}/v1/functions/{function}/{endpoint}", json=body, headers=headers)


def _seen(r: httpx.Response) -> str:
    body = assert_problem(r, 500, "function_error")
    assert body["detail"].startswith("RuntimeError: seen: "), body
    return body["detail"][len("RuntimeError: seen: "):]


def _sin_ok(client: httpx.Client, url: str) -> None:
    r = client.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [X]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X)), rtol=1e-6)
    assert client.get(f"{url}/readyz").status_code == 200


def _engine_pid(client: httpx.Client, url: str) -> int | None:
    return client.get(f"{url}/v1/info").json()["engine_pids"][0]


def _replaced(client: httpx.Client, url: str, before: int | None, within: float, what: str) -> None:
    """Engine ``before`` gone, another in its place, and the service ready."""
    deadline = time.monotonic() + within
    while _engine_pid(client, url) in (before, None) or client.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_no_engine_holds_the_api_keys(server, client) -> None:
    """``JACOBIAN_SERVICE_API_KEYS`` was in every engine's environment, where a function
    read it (``os.environ``, ``/proc/self/environ``), and in ``serve``'s and every front
    end's ``/proc/PID/environ`` (which Landlock does not cover), and with it called the
    API as an operator. Engines never check keys: they are started without them; serve
    hands the keys to its front ends through their start-up pipe and takes them out of
    its environment, the block ``/proc/PID/environ`` shows included."""
    url, _ = server
    seen = _seen(_armed(client, url, "looks_around", 0))
    assert seen == "environ=[] proc_self=False serve=False front_end=False", seen
    assert_problem(httpx.get(f"{url}/v1/info", timeout=10), 401, "unauthorized")  # the keys still guard the API
    _sin_ok(client, url)


def test_an_engine_hung_behind_a_forged_status_board_is_restarted(server, client) -> None:
    """A function's thread wrote "idle" and fresh beats into its engine's status board
    while the engine's thread hung in the function: the supervisor, which reads only
    the board, saw a healthy engine. The request got its 504, then every later request
    of every function queued behind the hang got one too, /readyz said 200 all along,
    and nothing restarted the engine until serve did. Now the front end, which cancelled
    the request at its deadline and got no answer within HANG_GRACE_S, tells the
    supervisor (a signed word), which kills the engine as hung: the spare takes over,
    the function is struck (here: quarantined), the request queued behind it is
    answered with a retryable 503 at once, not at its deadline."""
    url, proc = server
    before = _engine_pid(client, url)
    t0 = time.monotonic()
    with httpx.Client(timeout=30, headers=AUTH) as other:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hung = pool.submit(_armed, client, url, "forges_its_board", 0, **{"x-request-timeout": "1"})
            time.sleep(0.3)
            behind = other.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [X]})
            r = hung.result()
    assert_problem(r, 504, "timeout")
    # Queued behind the hang (deadline 20 s): answered when the engine was killed.
    assert_problem(behind, 503, "unavailable")
    assert behind.headers["retry-after"]
    assert time.monotonic() - t0 < 10
    _replaced(client, url, before, 30, "the hung engine was never replaced")  # (30 s: a spare still warming up finishes first)
    _sin_ok(client, url)
    log = _log_saying(proc, "held a cancelled request of forges_its_board", "said it was idle")
    assert "held a cancelled request of forges_its_board" in log and "said it was idle" in log, log[-3000:]
    r = _armed(client, url, "forges_its_board", 0)
    assert_problem(r, 503, "function_quarantined")


def test_a_function_cannot_release_a_quarantine(server, client) -> None:
    """The supervisor's control socket was ``control.sock`` in the run directory: a
    function connected (pyzmq is in every engine) and sent ``{"t": "release", "fn":
    ...}``, and the quarantine was lifted, no API key asked. Now the socket has an
    abstract name that Landlock keeps engines from connecting to, and the supervisor
    takes only messages signed with the front ends' key: the quarantine holds until an
    operator lifts it with an operator's key."""
    url, _ = server
    r = _armed(client, url, "looks_around", 1)
    assert r.status_code == 200, r.text
    time.sleep(1.0)  # a release would have landed (the supervisor ticks every 50 ms, states every 0.5 s)
    assert_problem(_armed(client, url, "forges_its_board", 0), 503, "function_quarantined")
    assert_problem(httpx.delete(f"{url}/v1/functions/forges_its_board/quarantine", timeout=10), 401, "unauthorized")
    r = client.delete(f"{url}/v1/functions/forges_its_board/quarantine",
                      headers={"authorization": f"Bearer {OPERATOR_KEY}"})
    assert r.status_code == 200 and r.json() == {"function": "forges_its_board", "released": True}, r.text
    deadline = time.monotonic() + 5
    while True:
        r = client.post(f"{url}/v1/functions/forges_its_board/evaluate", json={"inputs": [X]})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], np.sin(X), rtol=1e-6)


def test_the_supervisors_sockets_are_out_of_the_engines_reach(server, client) -> None:
    """``events.sock`` and ``control.sock`` were files in the run directory: a function
    unlinked ``events.sock`` and bound its own there, and a front end started again
    listened to it (forged deaths and states). Now they have abstract names (no file to
    unlink; a name bound is never bound again) and, with Landlock, an engine cannot
    connect to them."""
    url, _ = server
    seen = _seen(_armed(client, url, "looks_around", 2))
    connect = "Operation not permitted" if LANDLOCK else "connected"
    assert seen == (f"files=[]; abstract=found; control: connect {connect}, bind Address already in use; "
                    f"events: connect {connect}, bind Address already in use"), seen
    _sin_ok(client, url)


# ------------------------------------------------------------------ the supervisor alone


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[Supervisor, object]]:
    import zmq

    # (engines exec'd, as test_supervisor's: the zygote's own tests are test_fork_server's)
    sup = Supervisor(Settings(hang_grace_s=0.2, request_timeout_s=1.0, engine_fork_server=False), tmp_path)
    sub = sup.ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(sup.channel.events)
        subscribed(sup, sub)
        yield sup, sub
    finally:  # the sockets closed whatever failed: a context with sockets open hangs when collected
        for engine in sup.engines:
            if engine.proc is not None:
                engine.proc.kill()
                engine.proc.wait()
        sub.close(linger=0)
        sup.pub.close(linger=0)
        sup.control.close(linger=0)
        sup.ctx.term()


def _died(sub) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sub.poll(100) and (msg := orjson.loads(sub.recv()))["t"] == "died":
            return msg
    raise AssertionError("no died message")


def _engine(sup: Supervisor, tmp_path: Path, board_says: str) -> subprocess.Popen:
    """An engine stand-in whose status board says ``board_says`` (as a function's thread
    would write it): idle, or running another request due in ten minutes."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    board = ipc.StatusBoard(tmp_path / "engine-0.status", create=True)
    now = time.monotonic()
    board.idle(now) if board_says == "idle" else board.running(now, now + 600, "sin", ["1:7"])
    sup.engines = [_Engine(0, "cpu", proc=proc, board=board)]
    return proc


@pytest.mark.parametrize("board_says", ["idle", "running"])
def test_a_front_ends_overdue_word_is_believed_over_the_board(supervisor, tmp_path, board_says) -> None:
    """What the supervisor does with a front end's word that an engine holds a request it
    cancelled (``overdue``): nothing within the hang grace (a second at least), nothing
    unsigned, nothing for another process; past it, an engine whose board says idle is
    killed as hung. One whose board says it runs something (a batch may legitimately run to its
    own deadline) is killed once no batch could still be running: request_timeout_s
    plus twice the grace plus a second after the cancel. The death names the function
    the front end named and none of the tags the board claims (those would be failed)."""
    sup, sub = supervisor
    proc = _engine(sup, tmp_path, board_says)
    word = {"t": "overdue", "engine": 0, "pid": proc.pid, "function": "forges_its_board"}
    now = time.monotonic()
    sup._control(sup.channel.sign({**word, "since": now - 0.5}))  # past the grace (0.2 s), within the least wait
    sup._control(b"\0" * 32 + orjson.dumps({**word, "since": now - 60}))  # not signed
    sup._control(sup.channel.sign({**word, "pid": proc.pid + 1, "since": now - 60}))  # another process
    time.sleep(0.1)
    assert proc.poll() is None
    sup._control(sup.channel.sign({**word, "since": now - 1.1}))  # past both
    if board_says == "running":
        assert proc.poll() is None
        sup._control(sup.channel.sign({**word, "since": time.monotonic() - 2.5}))  # no batch runs this long
    assert proc.wait(5) == -9
    died = _died(sub)
    assert died["function"] == "forges_its_board" and died["hang"] and died["tags"] == [], died
    assert "status board, which a function can write, said otherwise" in died["reason"], died
    assert len(sup.strikes["forges_its_board"]) == 1


_RELEASE = r"""
import os, socket, sys, zmq
run_dir = sys.argv[1]
fds = f"/proc/{os.getppid()}/fd"
try:
    held = {os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)}
except PermissionError:  # Landlock: every server's, which it cannot reach anyway
    held = None
rows = [line.split() for line in open("/proc/net/unix")]
names = [r[7] for r in rows if len(r) > 7 and r[7].startswith("@jacobian-service-") and r[7].endswith("/control")
         and (held is None or f"socket:[{r[6]}]" in held)]
ctx = zmq.Context()
for target in [f"ipc://{run_dir}/control.sock", *(f"ipc://{n}" for n in names)]:
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(target)
    if push.poll(300, zmq.POLLOUT):
        push.send(b'{"t": "release", "fn": "f"}')
    push.close()
ctx.term()
print(len(names))
"""


def test_a_confined_process_cannot_release_a_quarantine(tmp_path) -> None:
    """A process confined as an engine is (here the test plays serve) tried every way to
    the control socket it could find: the run directory's ``control.sock`` (before: the
    quarantine was lifted), the server's abstract sockets. The quarantine holds: no file,
    Landlock's scope (where the kernel has it), and no signature."""
    import zmq

    sup = Supervisor(Settings(), tmp_path)
    sup.quarantined["f"] = time.time() + 600
    push = sup.ctx.socket(zmq.PUSH)
    try:
        out = subprocess.run([sys.executable, "-c", _RELEASE, str(tmp_path)], capture_output=True, text=True,
                             timeout=30, start_new_session=True, preexec_fn=confiner(), check=False)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            sup.tick()
            time.sleep(0.05)
        assert "f" in sup.quarantined
        # A front end's word, signed, does land.
        push.connect(sup.channel.control)
        push.send(sup.channel.sign({"t": "release", "fn": "f"}))
        deadline = time.monotonic() + 5
        while "f" in sup.quarantined:
            assert time.monotonic() < deadline, "the front end's release never landed"
            sup.tick()
            time.sleep(0.02)
    finally:
        push.close(linger=0)
        sup.pub.close(linger=0)
        sup.control.close(linger=0)
        sup.ctx.term()
