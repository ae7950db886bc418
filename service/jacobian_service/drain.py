"""Graceful shutdown: SIGTERM turns /readyz to 503 first, then uvicorn drains.

Kubernetes (and any load balancer that polls readiness) needs a moment between
"stop sending me traffic" and "stop accepting it": during ``drain_delay_s`` the server
still serves everything but reports not ready; then uvicorn stops accepting connections
and gives requests in flight its graceful-shutdown timeout. A second signal exits at once.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn
from typing import Any

__all__ = ["DrainingServer"]

log = logging.getLogger("jacobian_service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any, drain_delay_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_delay_s = drain_delay_s
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self.app, "service_state", None)
        if self.draining or state is None or self.drain_delay_s <= 0:
            if state is not None:
                state.draining = True
            super().handle_exit(sig, frame)
            return
        self.draining = True
        state.draining = True
        log.info("signal %d: /readyz now answers 503; draining in %.1f s", sig, self.drain_delay_s)
        timer = threading.Timer(self.drain_delay_s, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()
