"""Red team, round twenty-three: hostile functions against what every engine starts
with (torch's generator, as forked from the zygote).

Each case names what a user saw before. One real server for the module (as round
twenty-one); the functions are in tests/hostile25_functions.py, each misbehaving only on
the input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from .conftest import assert_problem, live_server
from .test_hostile_round11 import _armed, _engine_pid, _replaced
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)

FUNCTIONS = "tests.hostile25_functions"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # No spare (each engine here is one the supervisor forks on the spot); a crash here is
    # no strike that matters (QUARANTINE_AFTER high: the crashing function runs twice).
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", QUARANTINE_AFTER=50,
                     REQUEST_TIMEOUT_S=20, HANG_GRACE_S=0.5) as served:
        yield served


def _evaluated(client: httpx.Client, url: str, function: str, x: list[float]) -> np.ndarray:
    r = client.post(f"{url}/v1/functions/{function}/evaluate",
                    json={"inputs": [{"dtype": "float64", "shape": [len(x)], "data": x}]})
    assert r.status_code == 200, r.text
    return np.array(r.json()["output"]["data"])


# ------------------------------------------------------------ torch's generator at an engine's start


def test_each_engine_starts_torchs_generator_afresh(server, client) -> None:
    """Every engine is forked from the zygote, which imported torch once: each began
    with the zygote's generator state. Another client's ``x + torch.rand(3)`` on each
    new engine drew the same three numbers (in every engine, restart and spare of a
    ``serve``: [0.422, 0.357, 0.899] after each crash, in one run): a caller who saw one
    engine's first draws (or crashed an engine, as here) knew every later engine's. Now each engine seeds
    torch's generators from the OS's entropy as it starts (CUDA's queued for its start,
    which had torch's fixed default seed)."""
    url, _ = server
    firsts = []
    for _ in range(2):
        pid = _engine_pid(client, url)
        assert_problem(_armed(client, url, "exits25", 0), 500, "function_error")
        _replaced(client, url, pid, 60, "no engine after the crash")
        firsts.append(_evaluated(client, url, "noise25", [0.0, 0.0, 0.0]))  # the new engine's first draws
        assert ((0 <= firsts[-1]) & (firsts[-1] < 1)).all(), firsts
    assert not np.array_equal(firsts[0], firsts[1]), firsts
