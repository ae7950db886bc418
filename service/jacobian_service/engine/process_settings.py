"""Process-wide settings a function may change, put back after each batch.

A function runs in the engine process that serves every other function, so what it
changes of the process's settings and leaves so would change every later request of
every function, for as long as the engine lives. Measured or reproduced:

- ``torch.set_default_dtype(torch.float64)``: every later ``evaluate`` of a function that
  builds ``torch.ones(3)`` answered float64, not float32;
- ``warnings.simplefilter("error")``: every other function that warns on its way (as
  much user code does) failed with 500 ``function_error`` "UserWarning: ...";
- anomaly detection (every later backward pass slower), 64 threads, TF32 matmuls (every
  later result on the GPU less precise), ``gc.disable()`` (memory held by reference
  cycles never freed), a low recursion limit, ``numpy.seterr(all="raise")``.

The engine takes these settings as it starts and, after each batch, puts back what the
batch changed, naming the function in the log once per setting. Where a library may
legitimately change a setting as it is lazily imported (warning filters, the recursion
limit), only the harmful direction counts: warnings made errors (or filters reset), a
lower limit.
"""

from __future__ import annotations

import gc
import logging
import operator
import os
import sys
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

__all__ = ["ProcessSettings"]

log = logging.getLogger("jacobian_service.engine")


class _Setting(NamedTuple):
    what: str
    get: Callable[[], Any]  # each a call of a microsecond or less
    put: Callable[[Any], None]
    changed: Callable[[Any, Any], bool] = operator.ne  # (now, taken)


# The default device as torch keeps it: the context ``torch.set_default_device`` installs
# (None: the CPU), read in a tenth of a microsecond; ``torch.get_default_device()`` takes
# 4 us. (Private; the public getter stands in if a torch lacks it.)
_DEVICE_CONTEXT = getattr(torch, "_GLOBAL_DEVICE_CONTEXT", None)


def _default_device() -> Any:
    if _DEVICE_CONTEXT is None:
        return torch.get_default_device()
    return getattr(_DEVICE_CONTEXT, "device_context", None)


def _set_default_device(taken: Any) -> None:
    if taken is None or taken == torch.device("cpu"):
        # None, not "cpu": an explicit device installs a mode every torch call then passes through.
        torch.set_default_device(None)
    else:
        torch.set_default_device(taken if isinstance(taken, torch.device) else taken.device)


def _setter(obj: Any, name: str) -> Callable[[Any], None]:
    return lambda value: setattr(obj, name, value)


def _filters() -> list[Any]:
    return list(warnings.filters)


def _repaired(now: list[Any], taken: list[Any]) -> list[Any]:
    """The filters as taken, under any new filter that makes no error (a library's
    "ignore", added as it was lazily imported, stays): filters that made warnings errors,
    a reset, or a reordering that put an "error" above the filters it was under, undone."""
    return [f for f in now if f[0] != "error" and f not in taken] + taken


def _put_filters(taken: list[Any]) -> None:
    warnings.filters[:] = _repaired(list(warnings.filters), taken)
    warnings._filters_mutated()  # type: ignore[attr-defined]  # what warnings' own functions call


def _set_gc(enabled: bool) -> None:
    gc.enable() if enabled else gc.disable()


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # removed under us: nothing to compare with
        return ""


def _chdir(path: str) -> None:
    try:
        os.chdir(path)
    except OSError:
        pass


_SETTINGS: tuple[_Setting, ...] = (
    _Setting("torch's default dtype", torch.get_default_dtype, torch.set_default_dtype),
    _Setting("torch's default device", _default_device, _set_default_device),
    _Setting("torch's grad mode", torch.is_grad_enabled, torch.set_grad_enabled),
    _Setting("torch's number of threads", torch.get_num_threads, torch.set_num_threads),
    _Setting("torch's anomaly detection", torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    _Setting("torch's deterministic algorithms", torch.are_deterministic_algorithms_enabled,
             torch.use_deterministic_algorithms),
    _Setting("torch's float32 matmul precision", torch.get_float32_matmul_precision,
             torch.set_float32_matmul_precision),
    _Setting("cuDNN's TF32", lambda: torch.backends.cudnn.allow_tf32, _setter(torch.backends.cudnn, "allow_tf32")),
    _Setting("cuDNN's benchmark mode", lambda: torch.backends.cudnn.benchmark, _setter(torch.backends.cudnn, "benchmark")),
    _Setting("the warning filters", _filters, _put_filters,
             lambda now, taken: now != taken and _repaired(now, taken) != now),
    _Setting("the garbage collector (disabled)", gc.isenabled, _set_gc),
    _Setting("the recursion limit (lowered)", sys.getrecursionlimit, sys.setrecursionlimit, operator.lt),
    _Setting("the thread switch interval", sys.getswitchinterval, sys.setswitchinterval),
    _Setting("numpy's floating-point error handling", np.geterr, lambda taken: np.seterr(**taken)),
    _Setting("logging (disabled)", lambda: logging.root.manager.disable, logging.disable),
    _Setting("the working directory", _cwd, _chdir),
)


def _shown(value: Any) -> Any:
    """For the log: a default-device context as its device."""
    return getattr(value, "device", value)


class ProcessSettings:
    """The settings as they were when made; :meth:`restore` puts back what changed."""

    def __init__(self) -> None:
        self._taken = [s.get() for s in _SETTINGS]
        self._named: set[tuple[str, str]] = set()  # (function, setting) already logged

    def restore(self, function: str) -> None:
        """Put back what differs now (nothing, nearly always)."""
        for setting, taken in zip(_SETTINGS, self._taken):
            now = setting.get()
            if setting.changed(now, taken):
                setting.put(taken)
                if (function, setting.what) not in self._named:
                    self._named.add((function, setting.what))
                    log.warning("%s changed %s (to %s) and left it so; put back to %s for the other functions "
                                "(it is put back after each of its calls)", function or "a function", setting.what,
                                _shown(now), _shown(taken))
