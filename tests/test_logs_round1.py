"""Log flooding, round one: lines a hostile function or client could make at the rate it
chose, and lines it could forge.

One real server for the file (one front end, a spare); its functions are in
tests/logs1_functions.py, each misbehaving only on the input 666 (round 11's ``_armed``),
the second input picking how. The repeat filter's windows are tried in-process, on a
clock of the test's.
"""

from __future__ import annotations

import io
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import pytest
from jacobian_service.logs import JsonFormatter, RepeatFilter, TextFormatter

from .conftest import live_server
from .logs1_functions import FORGED

FUNCTIONS = "jacobian_service.examples,tests.logs1_functions"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1) as served:
        yield served


def _armed(url: str, function: str, case: int, n: int) -> httpx.Response:
    body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, float(case), float(n)]}]}
    return httpx.post(f"{url}/v1/functions/{function}/evaluate", json=body, timeout=60)


def _log_after(proc: subprocess.Popen, mark: int, needle: str) -> str:
    """The server's log from ``mark`` on, once it has ``needle`` (its access line, say:
    written after what the request made it log) and has stopped growing."""
    deadline, log = time.monotonic() + 30, ""
    while needle not in log or proc.read_log()[mark:] != log:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, log[-3000:]
        log = proc.read_log()[mark:]  # type: ignore[attr-defined]
        time.sleep(0.05)
    return log


def test_a_function_writing_on_its_connection_is_said_once(server) -> None:
    """A function that wrote 1,000 messages that were no reply on its engine's connection
    made 1,000 tracebacks in the front end's log (20,000 of them: 480,001 lines, 25.7 MB,
    the request 12.5 s where it takes 0.5); JSON that was no reply (``{}``, ``[1]``)
    raised out of the channel's reader instead: asyncio's "Fatal error on transport"
    traceback, the connection closed, the request a 503 (``{}``) or a 500 with its engine
    restarted (``[1]``). Now each is an unreadable reply, said once in 10 s."""
    url, proc = server
    mark = len(proc.read_log())
    for case in (0, 1, 2):  # not JSON, an object without an id, not an object
        r = _armed(url, "floods_its_connection", case, 1000)
        assert r.status_code == 200, r.text
        assert r.json()["output"]["data"] == pytest.approx(np.sin([666.0, float(case), 1000.0]).tolist())
    log = _log_after(proc, mark, "evaluate 200")
    assert log.count("unreadable reply from engine 0") == 1, log[-3000:]
    assert "Fatal error" not in log and "KeyError" not in log and "restart" not in log, log[-3000:]
    assert len(log.splitlines()) < 40, log[-3000:]


def test_a_function_s_text_cannot_forge_a_line_of_the_text_log(server) -> None:
    """The engine names the environment variables a function left set as it puts them
    back: a name's newline began a line of the function's choosing (a forged access
    line) and its ESC sequence reached the operator's terminal. Now control characters
    are escapes: a record is one line."""
    url, proc = server
    mark = len(proc.read_log())  # type: ignore[attr-defined]
    r = _armed(url, "names_a_variable", 0, 0)
    assert r.status_code == 200 and r.json()["output"]["data"] == pytest.approx(np.sin([666.0, 0.0, 0.0]).tolist())
    log = _log_after(proc, mark, "changed environment variables")
    said = [line for line in log.splitlines() if "names_a_variable changed environment variables" in line]
    assert len(said) == 1 and "LOGS1\\x0a" + FORGED + "\\x1b[2J" in said[0], log[-3000:]
    assert not any(line.startswith(FORGED) for line in log.splitlines()) and "\x1b" not in log, log[-3000:]


def test_a_client_pipelining_on_many_connections_is_said_once(server) -> None:
    """A client that pipelines more than MAX_PIPELINED (16) requests on a connection
    made a line each time: 30 connections, 30 lines, at the rate the client chose
    (each a connection opened and dropped). Now one, the rest counted."""
    url, proc = server
    mark = len(proc.read_log())  # type: ignore[attr-defined]
    where = urlsplit(url)
    heads = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 40
    for _ in range(30):
        with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
            sock.sendall(heads)
            while sock.recv(1 << 16):  # until the server closes it, its answers read
                pass
    r = _armed(url, "floods_its_connection", 0, 0)  # (its access line: the connections' lines are before it)
    assert r.status_code == 200, r.text
    log = _log_after(proc, mark, "evaluate 200")
    assert log.count("a client pipelined more than 16 requests") == 1, log[-3000:]


def test_a_client_garbling_requests_is_said_once(server) -> None:
    """uvicorn says "Invalid HTTP request received." for each request it cannot parse:
    30 garbled requests (a connection each), 30 lines, at the client's rate. Now one."""
    url, proc = server
    mark = len(proc.read_log())  # type: ignore[attr-defined]
    where = urlsplit(url)
    for _ in range(30):
        with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
            sock.sendall(b"\x00\x01garbage\r\n\r\n")
            while sock.recv(1 << 16):  # until the server closes it, its 400 read
                pass
    r = _armed(url, "floods_its_connection", 0, 0)  # (its access line: the requests' lines are before it)
    assert r.status_code == 200, r.text
    log = _log_after(proc, mark, "evaluate 200")
    assert log.count("Invalid HTTP request received.") == 1, log[-3000:]


def _logged(fmt: str, clock: list[float]) -> tuple[logging.Logger, io.StringIO]:
    """A logger of the test's own, written as the service's are (its formatters, its
    repeat filter, this one on ``clock``), into a buffer. (Not the service's loggers:
    tests in this process capture them.)"""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter(clock=lambda: clock[0]))
    logger = logging.getLogger(f"logs_round1.{fmt}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_repeats_are_counted_and_summarised(fmt: str) -> None:
    """The first of each line is said, the rest of its window counted, and the count said
    at the first record after the window (10 s); a place says at most 100 distinct lines a
    window (its arguments may be a function's), and other places are not held up."""
    clock = [100.0]
    log, out = _logged(fmt, clock)
    for i in range(1000):
        try:
            raise ValueError(f"frame {i}")
        except ValueError:
            log.exception("unreadable reply from engine %d", 0)
    for i in range(120):
        log.error("engine %d answered a request sent to engine %d", i, 0)
    log.info("something else")
    clock[0] += 10.0
    log.info("something else")
    lines = out.getvalue().splitlines()
    if fmt == "json":
        messages = [orjson.loads(line)["message"] for line in lines]
    else:
        messages = [line.split(": ", 1)[1] for line in lines if f" logs_round1.{fmt}: " in line]
        assert sum("Traceback" in line for line in lines) == 1, lines
    assert messages == [
        "unreadable reply from engine 0",
        *(f"engine {i} answered a request sent to engine 0" for i in range(100)),
        "something else",
        "... 999 more times in the last 10 s: unreadable reply from engine 0",
        "... 20 more times in the last 10 s: engine 0 answered a request sent to engine 0",
        "something else",
    ], messages
