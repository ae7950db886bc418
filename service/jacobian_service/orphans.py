"""Served processes stop when the ``serve`` process that started them has gone.

Engines and front ends are children of ``serve``. Killed outright (SIGKILL, the
out-of-memory killer), it cannot stop them, and each engine leads a process group of its
own (so that the supervisor can kill what it forked), out of reach of a signal to the
server's group. A child left behind would hold the port, or the memory of a model, with
nobody to supervise it: each watches its parent instead.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

__all__ = ["stop_with_parent"]

log = logging.getLogger("jacobian_service")


def stop_with_parent(grace_s: float, every_s: float = 0.5) -> None:
    """SIGTERM to this process once its parent has gone (checked every ``every_s``, on a
    daemon thread): a front end drains and stops, an engine stops. Still here
    ``grace_s`` later (the signal came before its handler was set, or a user function
    set one that ignores it), the process exits outright."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        log.warning("the server process (pid %d) has gone; pid %d stops", parent, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()
