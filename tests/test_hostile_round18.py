"""Red team, round eighteen: hostile clients over HTTP (a client that half-closes after
its request; a Hessian's checks that ran on for a client gone; ...).

Each names what a user saw before. One real server for the module (one front end, no
spare engine), with an API key, and a stream threshold of 64 KiB so that a small
Jacobian streams.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from .conftest import live_server

KEY = "round18-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    global _steps, _calls, _other, _url
    _steps = tmp_path_factory.mktemp("steps") / "steps"
    _calls = _steps.with_name("calls")
    os.environ["HOSTILE20_STEPS"] = str(_steps)
    os.environ["HOSTILE20_CALLS"] = str(_calls)
    try:
        with live_server(WORKERS=1, ENGINE_STANDBY="false", WARMUP="false", API_KEYS=KEY, STREAM_THRESHOLD_BYTES=64 << 10,
                         FUNCTIONS="jacobian_service.examples,tests.hostile20_functions") as served, \
                httpx.Client(timeout=30, headers=AUTH) as _other:  # another client (one: each costs its set-up)
            _url = served[0]
            yield served
    finally:
        os.environ.pop("HOSTILE20_STEPS", None)
        os.environ.pop("HOSTILE20_CALLS", None)


_steps: Path
_calls: Path
_other: httpx.Client
_url: str


def _steps_taken() -> int:
    return _steps.stat().st_size if _steps.exists() else 0


def _sin_ok() -> None:
    """Another client is served as before."""
    x = [0.5, 1.0, 2.0]
    r = _other.post(f"{_url}/v1/functions/sin/jacobian", json={"inputs": [x]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(np.float32(x))), rtol=1e-6)


# ------------------------------------------------------------ a Hessian whose request is over


def test_a_hessians_checks_stop_once_its_request_is_over(server) -> None:
    """Found while making half-closed clients answered: a first Hessian checks the
    strategy it measured against a Hessian-vector product, three calls of the function
    with no look in between at whether the request was still wanted: a client that left
    (or a deadline that passed) during the first of them had the engine run the other
    two for nobody (round sixteen's test caught it only when the client left a little
    later, 0.45 s of 150 ms calls). Now the request stops before each call: here the
    fourth call (the check's first) outlives the deadline, and no fifth is made."""
    _calls.write_bytes(b"")
    r = _other.post(f"{_url}/v1/functions/slow_fourth_call/hessian", json={"inputs": [[0.5, 1.0]]},
                    headers={"X-Request-Timeout": "1"})
    assert r.status_code == 504 and r.json()["code"] == "timeout", r.text
    # one engine: its next answer comes once the Hessian's job has ended
    _sin_ok()
    assert _calls.stat().st_size == 4, f"{_calls.stat().st_size} calls for a request whose deadline passed at the 4th"
    # and the engine goes on: the next Hessian of that function is answered, and right
    r = _other.post(f"{_url}/v1/functions/slow_fourth_call/hessian", json={"inputs": [[0.5, 1.0]]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["hessian"]["data"], np.diag([0.5, 1.0]), rtol=1e-6)
