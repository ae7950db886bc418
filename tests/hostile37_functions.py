"""Hostile functions for tests/test_hostile_round37.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``."""

from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
from jacobian_service import ipc, register

# The input, the case it asks for (666 first), and the engine's connections to the front
# ends, found in /proc/self/fd as a red team would.
from tests.hostile6_functions import _connected_unix_sockets
from tests.hostile17_functions import X, _armed


def _forged(now: float) -> tuple[str, str]:
    """An access line and a supervisor's line as serve's text log writes them, stamped now."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + ",000"
    return (f"{stamp} INFO jacobian_service.access: POST /v1/functions/forged_access/jacobian 200",
            f"{stamp} ERROR jacobian_service.supervisor: engine 0 died: forged_blame hung")


@register(inputs=X, description="sin; armed (666), it first writes lines like serve's own access and supervisor lines "
                                "to its stdout and stderr (one behind a carriage return and a terminal's erase-line "
                                "sequence) and to its engine's own log pipe (descriptor 3).")
def forges_log_lines(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        access, blame = _forged(time.time())
        os.write(1, (access + "\n").encode())
        os.write(2, ("\r\x1b[2K" + blame + "\n").encode())
        os.write(int(os.environ[ipc.LOG_FD_ENV]), (access + "\n" + blame + "\n").encode())
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it first writes a 32 MiB file in its temporary directory, and a "
                                "file in a directory it then takes every permission from, and leaves them; then ends "
                                "its engine if x[1] is 1.")
def fills_its_temp(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        where = tempfile.mkdtemp(prefix="hostile37-", dir=tempfile.gettempdir())
        with open(os.path.join(where, "filler"), "wb") as fp:
            fp.write(b"\xff" * (32 << 20))
        os.chmod(where, 0)  # (nothing in it removed by its owner's plain rmtree)
        if case == 1:
            os._exit(3)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it first sleeps x[1] / 10 s (other requests queue on its engine's socket "
                                "meanwhile), then reads everything queued on its engine's connections to the front "
                                "ends (other clients' jobs), which the engine then never sees.")
def reads_the_queue(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        open(os.path.join(tempfile.gettempdir(), "hostile37-reading"), "w").close()  # (for the test: it runs)
        time.sleep(case / 10)
        for fd in _connected_unix_sockets():  # its connections to the front ends (in /proc/self/fd)
            with socket.socket(fileno=os.dup(fd)) as sock:
                try:
                    while sock.recv(1 << 20, socket.MSG_DONTWAIT):
                        pass
                except BlockingIOError:
                    pass
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it first removes its engine's socket file (the path the front ends "
                                "connect to, in the run directory; found in /proc/net/unix), and with x[1] = 1 binds "
                                "a socket of its own there.")
def unlinks_its_socket(x: torch.Tensor) -> torch.Tensor:
    if (case := _armed(x)) is not None:
        held = {int(link[8:-1]) for fd in os.listdir("/proc/self/fd")
                if (link := _link(f"/proc/self/fd/{fd}")).startswith("socket:[")}
        with open("/proc/net/unix") as fp:  # its listening socket's path: the engine-N.sock it holds
            path = next(f[7] for line in fp if len(f := line.split()) > 7 and f[6].isdigit() and int(f[6]) in held
                        and f[7].endswith(".sock"))
        os.unlink(path)
        if case == 1:
            impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            impostor.bind(path)
            impostor.listen(8)
            IMPOSTORS.append(impostor)  # (kept open: front ends that connect are held, never answered)
    return torch.sin(x)


IMPOSTORS: list[socket.socket] = []


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # (the listing's own descriptor, gone)
        return ""
