"""Red team, round forty: hostile registered functions against a real server.

The functions are in tests/hostile40_functions.py, each misbehaving only on the input
666 (round 11's ``_armed``), or in the warm-ups that follow.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import torch

from ._fault_support import _log_saying
from .conftest import live_server

FUNCTIONS = "tests.hostile40_functions"  # (no examples: fewer warm-ups, a faster file)


def _body(*data: float) -> dict:
    return {"inputs": [{"dtype": "float64", "shape": [len(data)], "data": list(data)}]}


def _run_dir(url: str) -> Path:
    (engine,) = httpx.get(f"{url}/v1/info", timeout=30).json()["engine_pids"]
    argv = Path(f"/proc/{engine}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--run-dir") + 1].decode())


def _serves_sin(url: str, function: str) -> None:
    x = [0.3, -1.2, 2.0]
    r = httpx.post(f"{url}/v1/functions/{function}/jacobian", json=_body(*x), timeout=60)
    assert r.status_code == 200, r.text
    expected = torch.func.jacrev(torch.sin)(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(np.asarray(r.json()["jacobian"]["data"]).reshape(3, 3), expected, rtol=1e-12)


# ------------------------------------------------------------ a spare's "warm", forged


def test_a_spare_whose_warm_up_forged_warm_and_hangs_is_not_waited_for_once_promoted() -> None:
    """A spare says it is warm on its stdin, a socket its warm-ups' functions hold too.
    One whose warm-up removed its note, wrote ``warm`` there and hung had the spare
    counted warm (``/v1/info``: spare ready) and never killed as hung; promoted at the
    engine's death, it was waited for ``WARMUP_TIMEOUT_S`` plus a start-up (120 s by
    default), every request a 503 whose Retry-After said 1 s (measured: not ready after
    60 s). Now a spare promoted on its word that it was warm and not ready within 10 s
    is killed, the warm-up it last began skipped from then on, and a cold engine serves."""
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, QUARANTINE_AFTER=100) as (url, proc):
        run_dir = _run_dir(url)
        start = len(proc.read_log())  # type: ignore[attr-defined]
        r = httpx.post(f"{url}/v1/functions/forges_warm40/evaluate", json=_body(666.0, 0.0, 0.0), timeout=60)
        assert r.status_code == 500, r.text  # its engine ended; the warm spare serves; the next spare forges
        deadline = time.monotonic() + 60
        while not (run_dir / "forged40").exists():
            assert time.monotonic() < deadline, "the new spare's warm-up never began"
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/v1/info", timeout=30).json().get("spares") != [True]:
            assert time.monotonic() < deadline, "the forged word was not taken (the case is gone?)"
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/functions/forges_warm40/evaluate", json=_body(666.0, 0.0, 0.0), timeout=60)
        assert r.status_code == 500, r.text  # and the hanging spare is promoted
        promoted = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - promoted < 45, "the server was not ready again within 45 s"
            time.sleep(0.2)
        log = _log_saying(proc, "a spare promoted on its word that it was warm was not ready within 10 s",
                          "engines skip the warm-up of forges_warm40", start=start, within=30)
        assert "engines start without warm-ups" not in log, log[-3000:]
        _serves_sin(url, "forges_warm40")
        _serves_sin(url, "after40")
