"""Which devices an engine serves, their memory budgets, and warm-up calls."""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np
import torch

from ..procfs import status_bytes
from ..registry import FunctionSpec
from ..types import Call
from .memory_watch import MemoryWatch

__all__ = ["PeakMemory", "default_memory_budget", "device_memory_watch", "keep_free_heap", "release_free_heap",
           "resolve_devices", "warmup_call"]


def resolve_devices(setting: str) -> list[torch.device]:
    """``auto``: every visible GPU, else the CPU; ``cuda``: every visible GPU."""
    if setting == "cpu":
        return [torch.device("cpu")]
    has_cuda = torch.cuda.is_available()
    if setting == "auto":
        if not has_cuda:
            return [torch.device("cpu")]
        setting = "cuda"
    if not has_cuda:
        raise RuntimeError(f"device {setting!r} asked for, but CUDA is not available")
    if setting == "cuda":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    index = int(setting.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"device {setting!r} asked for, but only {torch.cuda.device_count()} GPUs are visible")
    return [torch.device("cuda", index)]


def default_memory_budget(device: torch.device) -> int:
    """256 MiB on the CPU (streams stay small; larger chunks gain little there); half the
    free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 256 << 20


_DEVICE_HELD_SHARE = 0.9  # ENGINE_MAX_DEVICE_BYTES unset: this share of the GPU's memory


def device_memory_watch(device: torch.device, limit: int | None) -> MemoryWatch | None:
    """The watch on the tensors this engine holds on its GPU between requests (None on the
    CPU, or with ``limit`` 0). Unset, the limit is 90 % of the GPU's memory: held while
    no request runs, that much leaves next to nothing for any request."""
    if device.type != "cuda" or limit == 0:
        return None
    if limit is None:
        limit = int(torch.cuda.get_device_properties(device).total_memory * _DEVICE_HELD_SHARE)
    return MemoryWatch(limit, read=lambda: torch.cuda.memory_allocated(device), setting="ENGINE_MAX_DEVICE_BYTES")


class PeakMemory:
    """Peak memory growth over a ``with`` block, in bytes (``growth``; None when this
    platform cannot say): torch's allocator statistics on CUDA, exact; on the CPU the
    kernel's high-water mark of this process's RSS, reset on entry (Linux
    ``/proc/self/clear_refs``). The engine runs one thread, so the RSS is its own work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.growth: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fp:
                    fp.write("5")  # VmHWM := VmRSS
                self._base = status_bytes(os.getpid(), "VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = status_bytes(os.getpid(), "VmHWM")
        if peak is not None:
            self.growth = max(0, peak - self._base)


def _libc(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None), name)  # glibc's; other C libraries may have none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc("malloc_trim")
_MALLOPT = _libc("mallopt")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_FREE_HEAP = 64 << 20
_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its moving threshold


def keep_free_heap() -> None:
    """Fix glibc's heap policy for an engine: blocks under 32 MiB come from the heap, and
    up to ``KEPT_FREE_HEAP`` of free heap is kept for the next request, not trimmed.

    glibc's defaults move both thresholds with the history of frees, so whether a large
    result's temporaries came back warm or as fresh pages depended on what the engine
    had run before: the 1000x1000 softmax's engine took ~900 page faults and 5.0 ms of
    CPU a request in one start-up, none and 2.5 ms in the next (fresh pages cost ~0.75
    ms a MB on the 2-core VM). Fixed, the engine keeps at most this much free between
    requests; a streamed Jacobian still trims between its chunks (``release_free_heap``)."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        _MALLOPT(_M_TRIM_THRESHOLD, KEPT_FREE_HEAP)


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Called between the row chunks of a streamed Jacobian. Large blocks come from the heap
    (``keep_free_heap``), where they are reused warm (jacrev of a 1000x1000 softmax: 1.8
    ms, against 6.9-11 ms when every 4 MB temporary is fresh pages, with a fixed 1 MiB
    ``MALLOC_MMAP_THRESHOLD_`` or torch's huge-page allocations, on this 2-core VM). But
    the heap keeps what it grew to: a 2 GB stream in 12 MB chunks grew an engine by
    250-450 MB. Trimming between chunks holds a stream to about one chunk's peak (+71 to
    +89 MiB over 5 runs) and costs it nothing measurable (5.1-6.2 s per 2 GB, against
    6.3-11.2 s with the fixed settings, runs alternated within one hour)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def warmup_call(spec: FunctionSpec) -> Call:
    """Small inputs of the declared shapes (symbols bound to 3), one array per leaf."""
    if not spec.inputs:
        raise ValueError("it takes no inputs: there is no Jacobian to warm up (evaluate serves it)")
    args = []
    for inp in spec.leaf_inputs:
        # (shape=() is a scalar, not "any shape": `inp.shape or (3,)` warmed such an input
        # as three numbers, and a function reading it as one, `int(steps)`, logged "warm-up
        # of f failed: only one element tensors can be converted to Python scalars" for a
        # function that serves every request.)
        shape = tuple(3 if isinstance(d, str) else d for d in (inp.shape if inp.shape is not None else (3,)))
        dtype = "float32" if inp.default_dtype == "bfloat16" else inp.default_dtype
        args.append(np.random.default_rng(0).random(shape).astype(dtype))

    def floating(inp: Any) -> bool:
        return all(leaf.default_dtype.startswith(("float", "bfloat")) for leaf in inp.leaves())

    first = next((i for i, inp in enumerate(spec.inputs) if floating(inp)), 0)
    return Call(spec=spec, args=args, dtypes=[i.default_dtype for i in spec.leaf_inputs],
                argnums=spec.leaf_argnums((first,)), positions=(first,) if spec.has_trees else None)
