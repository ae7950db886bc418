"""torch's process-wide settings, put back after each batch a function may have changed.

A function runs in the engine process that serves every other function. One that calls
``torch.set_default_dtype(torch.float64)`` (measured: every later ``evaluate`` of a
function that builds ``torch.ones(3)`` then answered float64, not float32), turns on
anomaly detection (every later backward pass several times slower), sets 64 threads,
or allows TF32 matmuls (every later result on the GPU less precise) would change every
later request of every function, for as long as the engine lives. The engine takes
these settings as it starts and puts back what a batch changed, each time, naming the
function in the log once.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

__all__ = ["TorchSettings"]

log = logging.getLogger("jacobian_service.engine")


def _set_default_device(device: Any) -> None:
    # Setting "cpu" explicitly would install a device mode that every tensor factory then
    # passes through; None is torch's own default.
    torch.set_default_device(None if device == torch.device("cpu") else device)


def _setter(obj: Any, name: str) -> Callable[[Any], None]:
    return lambda value: setattr(obj, name, value)


# (what it is, read it, set it): each read is a C call of well under a microsecond.
_SETTINGS: tuple[tuple[str, Callable[[], Any], Callable[[Any], None]], ...] = (
    ("the default dtype", torch.get_default_dtype, torch.set_default_dtype),
    ("the default device", torch.get_default_device, _set_default_device),
    ("grad mode", torch.is_grad_enabled, torch.set_grad_enabled),
    ("the number of threads", torch.get_num_threads, torch.set_num_threads),
    ("anomaly detection", torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    ("deterministic algorithms", torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms),
    ("the float32 matmul precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    ("cuDNN's TF32", lambda: torch.backends.cudnn.allow_tf32, _setter(torch.backends.cudnn, "allow_tf32")),
    ("cuDNN's benchmark mode", lambda: torch.backends.cudnn.benchmark, _setter(torch.backends.cudnn, "benchmark")),
)


class TorchSettings:
    """The settings as they were when made; :meth:`restore` puts back what changed."""

    def __init__(self) -> None:
        self._taken = [get() for _, get, _ in _SETTINGS]
        self._named: set[tuple[str, str]] = set()  # (function, setting) already logged

    def restore(self, function: str) -> list[str]:
        """Put back what differs now; what it was (empty, nearly always)."""
        changed = []
        for (what, get, put), taken in zip(_SETTINGS, self._taken):
            now = get()
            if now != taken:
                put(taken)
                changed.append(what)
                if (function, what) not in self._named:
                    self._named.add((function, what))
                    log.warning("%s changed torch's %s (to %s) and left it so; put back to %s for the other "
                                "functions (it is put back after each of its calls)", function or "a function",
                                what.removeprefix("the "), now, taken)
        return changed
