"""Red team, round twenty-five: a hostile function against the shared memory its engine
maps (the front end's segment, holding the large inputs of requests queued behind it).

Each case names what a user saw before. One real server for the module (one engine, no
spare); the functions are in tests/hostile29_functions.py, each misbehaving only on the
input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest

from .conftest import assert_problem, live_server
from .hostile29_functions import MARK
from .test_hostile_round11 import _armed
from .test_hostile_round15 import _log_until
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)
from .test_hostile_round21 import _evaluated  # an evaluate's 200 output

FUNCTIONS = "tests.hostile29_functions"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # One front end and its one engine: the victim's request queues behind the attacker's.
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false") as served:
        yield served


def test_a_function_cannot_rewrite_queued_inputs_in_shared_memory(server, client) -> None:
    """The engine mapped the front end's segment read-write: a function found it in
    ``/proc/self/maps`` and, while it ran, rewrote the large input of another caller's
    request queued behind it (placed in the segment as it was sent). That caller's
    ``doubles29`` answered 200 with -2 where its input had 1, 2, ...: a wrong answer
    for an innocent request. Now the segment is sealed against writing
    (``F_SEAL_FUTURE_WRITE``) before the engine gets it, and the engine maps it read-only:
    the function's ``mprotect`` fails, its own request answers 500, the victim's is right."""
    url, proc = server
    x = np.arange(4096, dtype=np.float64)  # 32 KiB: through shared memory
    x[0] = MARK
    start = len(proc.read_log())  # type: ignore[attr-defined]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        attacker = pool.submit(_armed, client, url, "rewrites_inputs29", 0)
        assert "rewrites_inputs29 waiting" in _log_until(proc, start, "rewrites_inputs29 waiting")
        got = _evaluated(client, url, "doubles29", x.tolist())
        attacked = attacker.result()
    assert np.array_equal(got, 2 * x), got[:8]
    body = assert_problem(attacked, 500, "function_error")
    assert "read-only" in body["detail"], body
