"""Red team, round forty: hostile registered functions against a real server.

The functions are in tests/hostile40_functions.py, each misbehaving only on the input
666 (round 11's ``_armed``), or in the warm-ups that follow.
"""

from __future__ import annotations

import time

import httpx

from ._fault_support import _log_saying, back_within
from ._spare_support import ends_its_engine, run_dir, serves_sin, wait_for_file
from .conftest import live_server

FUNCTIONS = "tests.hostile40_functions"  # (no examples: fewer warm-ups, a faster file)


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
        forged = run_dir(url) / "forged40"
        start = len(proc.read_log())  # type: ignore[attr-defined]
        ends_its_engine(url, "forges_warm40")  # the warm spare serves; the next spare forges
        wait_for_file(forged)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/v1/info", timeout=30).json().get("spares") != [True]:
            assert time.monotonic() < deadline, "the forged word was not taken (the case is gone?)"
            time.sleep(0.1)
        ends_its_engine(url, "forges_warm40")  # and the hanging spare is promoted
        back_within(url, 45)
        log = _log_saying(proc, "a spare promoted on its word that it was warm was not ready within 10 s",
                          "engines skip the warm-up of forges_warm40", start=start, within=30)
        assert "engines start without warm-ups" not in log, log[-3000:]
        serves_sin(url, "forges_warm40")
        serves_sin(url, "after40")
