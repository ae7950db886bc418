"""Red team, round thirty-nine: hostile registered functions against a real server.

The functions are in tests/hostile39_functions.py, each misbehaving only on the input
666 (round 11's ``_armed``), the second input picking how, or in the warm-ups that follow.
Each case that turns warm-ups off (for the rest of its server's run) is last on its
server: the note cases (no spare) each start one, the rest share one (``TestOneServer``).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from ._fault_support import _log_saying, back_within
from ._spare_support import body, ends_its_engine, run_dir, serves_sin, wait_for_file
from .conftest import Served, live_server

FUNCTIONS = "tests.hostile39_functions"  # (no examples: fewer warm-ups, a faster file)


# ------------------------------------------------------------ the warm-up note, removed


@pytest.mark.parametrize("case, said", [
    (0, "a warm-up ended the engine (the engine process exited with status 4), its note gone"),
    (1, "a warm-up hung the engine (it was not ready within "),
    (2, "the second engine in a row to end soon after its start with nothing named"),
])
def test_a_warm_up_that_removes_its_note_does_not_crash_loop(case: int, said: str) -> None:
    """A cold engine writes ``warming-PID`` in the run directory before each function's
    warm-up, and a death (or a warm-up past ``WARMUP_TIMEOUT_S``) with it there has that
    function's warm-up skipped from then on. The run directory is the functions' to
    write: a warm-up that removed its note and then ended its engine (``os._exit``) had
    engine after engine started and dying in the same warm-up, 'running nothing', the
    backoff growing, the service never ready (measured: 7 generations in 40 s); one that
    removed it and hung kept the engine warming for ever; one that also wrote the status
    board's 'ready' first (its engine then past its warm-ups, its death an idle one's)
    crash-looped the same. Now such a death, no note for ``WARMUP_TIMEOUT_S`` plus the
    start-up, or a second nameless death in a row soon after a start turns warm-ups off:
    the next engine is ready, and serves the function (it misbehaves only in a warm-up).
    (No spare: the cold engine's path. A server each: warm-ups stay off once turned off.)"""
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, QUARANTINE_AFTER=100, ENGINE_STANDBY="false",
                     WARMUP_TIMEOUT_S=3) as (url, proc):
        start = len(proc.read_log())  # type: ignore[attr-defined]
        ends_its_engine(url, "erases_its_note", case)
        log = _log_saying(proc, said, start=start, within=60)  # (case 2's board said ready: /readyz 200 before)
        back_within(url, 60)
        assert "engines start without warm-ups from now on" in log, log[-3000:]
        serves_sin(url, "erases_its_note")
        assert "engine 0 died" not in log.rsplit("engines start without warm-ups", 1)[1]  # (no crash loop after it)


class TestOneServer:
    """One server (a warm spare) for the rest, in this order: the last turns warm-ups off.
    In a session of its own (round 38: setsid), so that serve's out-of-memory score is its
    own; QUARANTINE_AFTER=3, the forged word's case (a victim struck thrice was
    quarantined); WARMUP_TIMEOUT_S=10, the hanging spare's."""

    SERVER = dict(wrapper=("setsid",), FUNCTIONS=FUNCTIONS, WORKERS=1, QUARANTINE_AFTER=3, WARMUP_TIMEOUT_S=10)

    # -------------------------------------------------------- serve's out-of-memory score

    def test_serves_oom_score_a_function_raises_is_put_back_within_a_tick(self, served: Served) -> None:
        """A function that raises ``serve``'s out-of-memory score adjustment to 1000 (and
        lowers its engine's to 0) and then uses up the memory has the kernel kill ``serve``,
        the whole service, not the engine: at adjustments 1000 against 0 the engine would
        have to hold more than all of the memory to be chosen. ``serve`` put its score back
        only at its 0.5 s look (measured: held 0.2-0.5 s, a median of ~0.3 s), time enough
        to fill a container's 1-2 GiB. Now it looks every 50 ms, as the supervisor's tick."""
        held = []
        for _ in range(7):
            r = httpx.post(f"{served.url}/v1/functions/raises_serves_oom_score/evaluate", json=body(666.0, 0.0, 0.0),
                           timeout=60)
            assert r.status_code == 200, r.text
            held.append(r.json()["output"]["data"][0])
        assert float(np.median(held)) < 0.15, held

    # -------------------------------------------------------- a spare's word, forged

    def test_a_spares_warm_up_word_a_function_forges_does_not_strike_another(self, served: Served) -> None:
        """A spare says on its stdin (a socket only the supervisor shares) which warm-up it
        begins, and a spare that dies in one has that function struck and its warm-up skipped.
        The functions it warms up hold that descriptor too: one whose warm-up wrote
        ``w victim39`` there and ended the spare had victim39 struck at each new spare, and
        quarantined (503 for every client) within 6 s (measured, QUARANTINE_AFTER=3). Now the
        words are believed only in the order the spare warms the functions up; the forger's
        own warm-up, the last believed, is the one named."""
        url, proc = served.url, served.proc
        start = len(proc.read_log())  # type: ignore[attr-defined]
        ends_its_engine(url, "frames_victim39")  # the warm spare serves, the next spare is armed
        said = "the spare's warm-up of frames_victim39 ended it (status 5); the next spare skips it"
        log = _log_saying(proc, said, start=start, within=60)
        assert "a spare (pid" in log and "said it began the warm-up of victim39 out of its order" in log, log[-3000:]
        assert "warm-up of victim39 ended it" not in log
        serves_sin(url, "victim39")  # (not quarantined: a 503 before)

    # -------------------------------------------------------- a promoted spare, hanging (last)

    def test_a_spare_promoted_in_a_warm_up_that_removed_its_note_and_hangs_is_not_waited_for_ever(
            self, served: Served) -> None:
        """A spare says which warm-up it is in on its stdin, but once promoted (its engine
        died) only its note in the run directory is read: a spare promoted in the warm-up
        that removed that note and hung was never ready, never killed (measured: /readyz 503
        for good). Now it too is killed past ``WARMUP_TIMEOUT_S`` plus its start-up without a
        note, and warm-ups are turned off."""
        url, proc = served.url, served.proc
        hanging = run_dir(url) / "hanging39"
        start = len(proc.read_log())  # type: ignore[attr-defined]
        ends_its_engine(url, "erases_its_note", 1)  # the warm spare serves; the next spare hangs
        wait_for_file(hanging)
        ends_its_engine(url, "erases_its_note", 1)  # and the hanging spare is promoted
        log = _log_saying(proc, "a warm-up hung the engine (it was not ready within ", start=start, within=60)
        assert "engines start without warm-ups from now on" in log, log[-3000:]
        back_within(url, 60)
        serves_sin(url, "erases_its_note")
