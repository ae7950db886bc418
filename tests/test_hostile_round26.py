"""Red team, round twenty-six: a hostile function against the shared memory its engine
writes its large answers into, while the front end still sends them to their callers.

Each case names what a user saw before. One real server for the module (one engine, no
spare); the functions are in tests/hostile30_functions.py, misbehaving only on the
input 666 (round 11's ``_armed``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import numpy as np
import pytest

from jacobian_client import wire

from .conftest import live_server, npy_bytes
from .test_hostile_round11 import _armed
from .test_hostile_round15 import _log_until
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)

FUNCTIONS = "tests.hostile30_functions"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # One front end and its one engine: the attacker runs where the victim's answer was made.
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false") as served:
        yield served


def test_a_function_cannot_rewrite_an_answer_still_being_sent(server, client) -> None:
    """The engine wrote a large answer into its own segment, which it kept mapped
    read-write, and the front end sent it from there to the caller as the caller read it.
    A function run meanwhile in that engine found the mapping in ``/proc/self/maps`` and
    wrote NaN over it: a slow reader of ``cumsum30``'s 1000 x 1000 Jacobian (8 MB of
    ``.npy``) got 200 with 649,024 of its 1,000,000 values NaN. Now each large answer is
    a memfd of its own, written, sealed against writing (``F_SEAL_WRITE``) and never
    mapped in the engine; the function finds nothing it can write, the answer is right."""
    url, proc = server
    n = 1000
    x = np.linspace(-1.0, 1.0, n)
    start = len(proc.read_log())  # type: ignore[attr-defined]
    with client.stream("POST", f"{url}/v1/functions/cumsum30/jacobian", content=npy_bytes(x),
                       headers={"content-type": wire.NPY, "accept": wire.NPY}) as r:
        assert r.status_code == 200
        body = r.iter_raw(1 << 16)
        first = next(body)  # the front end is sending it: the rest waits for this reader
        attacked = _armed(client, url, "rewrites_results30", 0)
        rest = b"".join(body)
    assert attacked.status_code == 200, attacked.text
    said = _log_until(proc, start, r"rewrites_results30 found \d+ descriptors, rewrote \d+ bytes")
    got = wire.read_npy(first + rest)
    assert got.shape == (n, n)
    bad = int(np.count_nonzero(got != 2 * np.tril(np.ones((n, n)))))
    assert bad == 0, (bad, said[-300:])
    assert "rewrote 0 bytes" in said, said[-300:]
