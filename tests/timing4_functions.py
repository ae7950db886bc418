"""A function for tests that assert a line is NOT in serve's log (tests/_fault_support's
``_log_complete``): an engine's lines reach the log through serve's output relay on their
own time, so one read of the log can come before a line that is on its way, and such a
check pass wrongly. This one writes a line of its own through the engine's logger, the
same pipe, after whatever the engine logged for the requests before it: once that line
is in the log, so is everything its engine said before it."""

from __future__ import annotations

import logging

import torch
from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))],
          description="sin; logs 'log mark <x[0]>' through the engine's own logger (a marker for tests).")
def logs_a_mark(x: torch.Tensor) -> torch.Tensor:
    logging.getLogger("jacobian_service.engine").warning("log mark %r", float(x[0]))
    return torch.sin(x)
