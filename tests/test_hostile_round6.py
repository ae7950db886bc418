"""Red team, round six: what hostile functions and clients still did to a real server.

One server for the module (a start costs ~3 s); each case names what a user saw before.
The functions are in tests/hostile6_functions.py; each misbehaves only on the input 666.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from jacobian_service.channel import Listener

from .conftest import assert_problem, live_server

FUNCTIONS = "jacobian_service.examples,tests.hostile6_functions"
ARMED = {"inputs": [[666.0, 1.0, 2.0]]}
X = [0.5, 1.0, 2.0]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # One offence quarantines: each case's function offends once.
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, QUARANTINE_AFTER=1, REQUEST_TIMEOUT_S=20) as served:
        yield served


def _post(url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=30, **kw)


def _sin_served(url: str, seconds: float = 60.0) -> None:
    """Until sin's Jacobian is served right (an engine replaced: a spare promoted, or a
    cold one started)."""
    deadline = time.monotonic() + seconds
    while (r := _post(url, "/v1/functions/sin/jacobian", json={"inputs": [X]})).status_code == 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X)), rtol=1e-6)


def _quarantined(url: str, name: str, seconds: float = 10.0) -> None:
    """Until ``name`` is refused as quarantined (the word reaches front ends twice a second)."""
    deadline = time.monotonic() + seconds
    while (r := _post(url, f"/v1/functions/{name}/jacobian", json={"inputs": [X]})).status_code != 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert_problem(r, 503, "function_quarantined")


# ----------------------------------------------------------------- the engine's channel


def _accepted(listener: Listener) -> None:
    while not [k for k in listener.selector.get_map().values() if k.data is not None]:
        listener.poll(0.05)


def test_a_selector_closed_and_another_opened_at_its_number_is_lost(tmp_path: Path) -> None:
    """Every epoll is the one anonymous inode to fstat: a function that closed the
    engine's epoll and made another (the lowest free number: the same) left an engine
    that polled an empty epoll, never read a job again, and beat on: every later request
    of every function 504, for as long as the engine lived."""
    listener = Listener(tmp_path / "e.sock")
    try:
        assert listener.lost() is None
        fd = listener.selector.fileno()
        os.close(fd)
        other = select.epoll()
        try:
            assert other.fileno() == fd
            assert listener.lost() == "selector"
        finally:
            other.close()
        with open(tmp_path / "taken", "w") as taken:  # a file at its number: as before
            assert taken.fileno() == fd and listener.lost() == "selector"
    finally:
        listener.selector = __import__("selectors").DefaultSelector()  # its own is gone: close() closes this one
        listener.close()


# ----------------------------------------------------------------- on a real server
