"""Hostile functions for tests/test_hostile_round11.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (``_armed``), the second
input picking how. Those that look around raise ``RuntimeError("seen: ...")``, what they
found, so the test reads it in the 500's detail."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch
from jacobian_service import Input, ipc, register

X = [Input("x", shape=("n",))]
# The API key tests/test_hostile_round11.py serves with, which no engine should be able to read.
KEY = "hostile11-key-7f3a9c"


def _armed(x: torch.Tensor) -> bool:
    return x.numel() > 0 and float(x.detach().reshape(-1)[0]) == 666.0


def _engine_args() -> tuple[Path, int]:
    """The engine's run directory and index, from its command line (as a red team reads them)."""
    argv = sys.argv
    return Path(argv[argv.index("--run-dir") + 1]), int(argv[argv.index("--index") + 1])


def _forge_board(running: bool) -> None:
    """A thread that writes the engine's status board, every 10 ms, as a healthy engine
    would: idle and beating (``running`` False) or running some batch due in 5 s."""
    run_dir, index = _engine_args()
    board = ipc.StatusBoard(run_dir / f"engine-{index}.status")
    board._ready = 1

    def forge() -> None:
        while True:
            now = time.monotonic()
            board.running(now, now + 5, "sin", []) if running else board.idle(now)
            time.sleep(0.01)

    threading.Thread(target=forge, daemon=True).start()


@register(inputs=X, description="sin; armed (666), a thread of it forges the engine's status board while it hangs.")
def forges_its_board(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        _forge_board(running=bool(x[1] == 1))
        threading.Event().wait()
    return x.sin()


def _holds_key(pid: int | str) -> str:
    """Whether ``/proc/PID/environ`` holds the API key, or why it cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fp:
            return str(KEY.encode() in fp.read())
    except PermissionError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__


def _front_end() -> int:
    """A front end of this server: serve's child in serve's session (not an engine)."""
    serve = os.getppid()
    with open(f"/proc/{serve}/task/{serve}/children") as fp:
        kids = [int(k) for k in fp.read().split()]
    def cmdline(pid: int) -> bytes:
        with open(f"/proc/{pid}/cmdline", "rb") as fp:
            return fp.read()

    return next(k for k in kids if os.getsid(k) == os.getsid(serve) and b"spawn_main" in cmdline(k))


def _secrets() -> str:
    """Where the API key could be read from here: this engine's environment, serve's, a front end's."""
    in_environ = [name for name, value in os.environ.items() if KEY in value or "API_KEYS" in name.upper()]
    return (f"environ={in_environ} proc_self={_holds_key('self')} serve={_holds_key(os.getppid())} "
            f"front_end={_holds_key(_front_end())}")


def _abstract(suffix: str) -> list[str]:
    """Abstract Unix sockets of this server ending in ``suffix``, found in /proc/net/unix
    (those serve holds, where its /proc/PID/fd may be read: not those of another
    server on this machine; with Landlock, every one, which no engine reaches anyway)."""
    try:
        fds = f"/proc/{os.getppid()}/fd"
        held: set[str] | None = {os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)}
    except PermissionError:
        held = None
    with open("/proc/net/unix") as fp:
        rows = [line.split() for line in fp]
    return sorted({row[7] for row in rows if len(row) > 7 and row[7].startswith("@jacobian-service-")
                   and row[7].endswith(suffix) and (held is None or f"socket:[{row[6]}]" in held)})


def _try(name: str, how: str) -> str:
    """``connect`` or ``bind`` an AF_UNIX socket to the abstract ``name``: what it did."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        getattr(sock, how)("\0" + name[1:])
        return "connected" if how == "connect" else "bound"
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else type(exc).__name__
    finally:
        sock.close()


def _release_everything(function: str) -> None:
    """Every way at hand to say "release ``function``" to the supervisor: the run
    directory's files that were its sockets, each abstract socket of the server."""
    import orjson
    import zmq

    run_dir, _ = _engine_args()
    ctx = zmq.Context()
    message = orjson.dumps({"t": "release", "fn": function})
    targets = [f"ipc://{run_dir}/control.sock"] + [f"ipc://{name}" for name in _abstract("/control")]
    for target in targets:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 500)
        push.connect(target)
        push.send(message, zmq.NOBLOCK) if push.poll(200, zmq.POLLOUT) else None
        push.close()
    ctx.term()


def _reach() -> str:
    """What this engine can do to the supervisor's sockets: the files, and the abstract names."""
    run_dir, _ = _engine_args()
    files = sorted(p.name for p in run_dir.iterdir() if p.name in ("events.sock", "control.sock"))
    control, events = _abstract("/control"), _abstract("/events")
    # Every server on this machine's network namespace has its own pair (other tests'
    # servers too, running beside this one): what each allows, said once.
    said = [f"files={files}", f"abstract={'found' if control and events else 'missing'}"]
    said += sorted({f"{name.rsplit('/', 1)[1]}: connect {_try(name, 'connect')}, bind {_try(name, 'bind')}"
                    for name in control + events})
    return "; ".join(said)


@register(inputs=X, description="sin; armed (666), it looks for secrets (x[1] 0), tries to release forges_its_board "
                                "(1), or says what it can do to the supervisor's sockets (2).")
def looks_around(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        case = int(x[1])
        if case == 0:
            raise RuntimeError(f"seen: {_secrets()}")
        if case == 1:
            _release_everything("forges_its_board")
        if case == 2:
            raise RuntimeError(f"seen: {_reach()}")
    return x.sin()
