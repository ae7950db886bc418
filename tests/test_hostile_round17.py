"""Red team, round seventeen: what a function patches or changes and what the engine's
put-back did not see, what a function's own answer is when it left a patch, and a
function's output across engine restarts.

Each case names what a user saw before. One real server for the module (as round
fifteen); the functions are in tests/hostile17_functions.py, each misbehaving only on
the input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from jacobian_service.output_relay import OutputRelay


# ------------------------------------------------------------ output across a restart


def test_a_spare_that_takes_a_dead_engines_place_draws_on_what_it_left_of_its_output_budget(tmp_path: Path) -> None:
    """Left open by round fifteen: each engine process had an output budget of its own,
    full as it started, so a function that printed its 16 seconds' worth and then
    crashed its engine had a full budget again in the spare promoted at once, and again
    at the next crash: it printed its way through each restart. The budget is now the
    engine's (its index): the process that takes its place draws on what the dead one
    left; another engine's budget is its own."""
    log_path = tmp_path / "serve.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    relay = OutputRelay(1024, out=log_fd, err=log_fd)  # 1 KiB a second, 16 KiB at once
    relay.start()
    line = b"z" * 63 + b"\n"

    def relayed(key: int, pid: int, lines: int) -> int:
        """Bytes a process of engine ``key`` got into the log of the ``lines`` it wrote."""
        before = log_path.stat().st_size
        read, write = relay.pipe()
        relay.watch(key, f"engine {key} (pid {pid})", [(read, 1)])
        os.write(write, line * lines)
        os.close(write)
        assert relay.flush(10)
        return log_path.stat().st_size - before

    try:
        assert relayed(0, 101, 512) == 16 << 10  # 32 KiB written, its burst passed
        started = time.monotonic()
        passed = relayed(0, 102, 512)  # the spare promoted in its place: no fresh burst
        assert passed <= 1024 * (time.monotonic() - started + 1), passed  # what refilled meanwhile, no more
        assert relayed(1, 103, 128) == 8 << 10  # another engine: its own budget
    finally:
        relay.stop(2.0)
        os.close(log_fd)
