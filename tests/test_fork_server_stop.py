"""A zygote (``fork_server``) told that serve has gone leaves at once.

Found measuring the suite's time: every SIGTERM'd server took 1.5 to 4 s to exit, most of
it serve's stop waiting for its zygote, which tore its torch down through the
interpreter's own exit (~0.9 s of CPU) though it has nothing to flush or clean up.
Measured as CPU, not wall time: the zygote's use after it read EOF does not depend on
how loaded the machine is.
"""

from __future__ import annotations

import os
import resource

from jacobian_service import fork_server
from jacobian_service.procfs import cpu_seconds
from jacobian_service.settings import FRONT_END_ONLY


def test_a_zygote_whose_serve_has_gone_exits_without_tearing_torch_down() -> None:
    forks = fork_server.ForkServer({k: v for k, v in os.environ.items() if k.upper() not in FRONT_END_ONLY})
    try:
        assert forks.ready(wait_s=120)
        zygote = forks._proc
        assert zygote is not None
        before = cpu_seconds(zygote.pid)  # its imports: torch and what every engine takes
        assert before is not None
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        forks.stop()  # closes its socket (EOF), waits for it (and reaps it)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = (after.ru_utime + after.ru_stime) - (reaped.ru_utime + reaped.ru_stime)
    assert zygote.returncode == 0  # it left of itself, not killed at stop's timeout
    # before: 0.9 s of CPU after EOF (the interpreter's exit); now: none to speak of
    assert total - before < 0.3, f"the zygote used {total - before:.2f} s of CPU after serve had gone"
