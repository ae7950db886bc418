"""What the engine learns about each function at run time, in one bounded place.

Fast paths that fail for a function (vmap of its pullback, vmap of the function itself,
forward-mode AD) are tried once and remembered, as are the Hessian strategy measured
fastest and the sizes of recent results per request signature. Clients choose shapes,
so every per-shape table is a bounded LRU: a client cycling through shapes cannot grow
the engine's memory.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Generic, Hashable, TypeVar

__all__ = ["BatchStats", "FunctionProfile", "Profiles"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_PER_SHAPE = 256


class _LRU(Generic[K, V]):
    """Written by the engine's thread only; read also by the in-process driver's thread
    (the scheduler's batch key), so a read tolerates a write evicting its key meanwhile
    (each OrderedDict call is atomic under the GIL; the pair of them is not)."""

    def __init__(self, size: int = _PER_SHAPE) -> None:
        self.size = size
        self._d: collections.OrderedDict[K, V] = collections.OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._d.get(key)
        if value is not None:
            try:
                self._d.move_to_end(key)
            except KeyError:  # evicted since: the value read still stands
                pass
        return value

    def __setitem__(self, key: K, value: V) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)


# Batch sizes whose last time a key keeps (``BatchStats.times``): its cost model's points.
_COST_POINTS = 8


@dataclass
class BatchStats:
    """The last run of one batch key: result bytes per request, batch size, compute time;
    and the last time of each of a few batch sizes, which ``cost`` fits."""

    result_bytes: int = 0
    batch_size: int = 1
    compute_s: float = 0.0
    times: dict[int, float] = field(default_factory=dict)  # batch size -> its last time

    def observe(self, result_bytes: int, batch_size: int, compute_s: float) -> None:
        self.result_bytes, self.batch_size, self.compute_s = result_bytes, batch_size, compute_s
        self.times.pop(batch_size, None)  # (re-inserted: the oldest size goes first)
        self.times[batch_size] = compute_s
        if len(self.times) > _COST_POINTS:
            del self.times[next(iter(self.times))]

    def cost(self, size: int) -> float:
        """What a batch of ``size`` is expected to take: a fixed part plus a part per
        request, fitted through the smallest and the largest size seen. Not the last
        batch's time per request times ``size``: vmap runs a function once for all its
        examples, so a batch of 16 costs about what one request does, and a batch of 2
        was costed at 1/8 of a run. A request with 0.5 s left joined another client's
        request in a batch of a 0.4 s function; the batch stopped at the short deadline
        (504) and the other ran again alone (measured: 1.17 s for its 0.4 s of work).
        With one size seen, all of its time is taken as fixed below it and per request
        above it (the larger estimate either way)."""
        times = self.times or {self.batch_size: self.compute_s}
        lo, hi = min(times), max(times)
        if lo == hi:
            return times[lo] * max(1.0, size / lo)
        per = max(0.0, (times[hi] - times[lo]) / (hi - lo))
        fixed = max(0.0, times[lo] - per * lo)
        return fixed + per * size


@dataclass
class FunctionProfile:
    vmap_pullback: bool = True  # False once vmap of its pullback failed (row loop instead)
    vmap_function: bool = True  # False once vmap of the function failed deterministically
    # False once a stacked batch of its requests drew from a global random generator
    # (engine.core.Engine.run_batch): its requests run alone, each with its own draws
    stacks: bool = True
    # Requests watched for state the function keeps across calls (kept_state.Replay),
    # the first _STATE_WATCHED of them (engine.core), and how many of those changed it;
    # True once a few did (not only a cache filled on first use): always watched then
    state_watched: int = 0
    state_changed: int = 0
    keeps_state: bool = False
    # True once a walk found no lazy module's parameter left to materialise
    # (Engine.initialise): until then each request first looks
    initialised: bool = False
    # Stacked batches of its requests whose call changed no such state (Engine.run_batch):
    # past _STATE_WATCHED, its batches are no longer watched
    stacked_unchanged: int = 0
    # (what ran: "evaluate" / "jacobian" / "hessian", in_dims) vmap refused, where only
    # that is refused (batched.over_examples): those examples loop, the rest still vmap
    vmap_refused: _LRU[Any, bool] = field(default_factory=_LRU)
    # (what, signature, vectors) -> whether vmap of its products agreed with one product
    # (products.vmap_agrees): torch's vmap can be silently wrong for some shapes
    vmap_checked: _LRU[Any, bool] = field(default_factory=_LRU)
    forward_ad: bool = True  # False once jacfwd failed for want of forward AD (reverse mode instead)
    # False once forward over reverse (torch.func.hessian's products, the HVP checks) failed
    # for want of forward AD: reverse over reverse first. Its own bit: a backward without
    # forward AD (_cdist_backward) leaves the function's jacfwd running.
    hvp_forward: bool = True
    # True once seen computing with grad off (torch.no_grad): forward mode, which sees
    # through it, is not jacrev then; Hessians take torch.func.hessian's own strategy.
    grad_off: bool = False
    hessian: _LRU[Any, str] = field(default_factory=_LRU)  # signature -> strategy
    # signature -> torch's own Hessian strategy's error where it failed (no forward rule);
    # batched Hessians learn it on one example: ("per example", signature) -> error or False
    hessian_torch_error: _LRU[Any, Any] = field(default_factory=_LRU)
    batches: _LRU[Any, BatchStats] = field(default_factory=_LRU)  # batch key -> last run
    output_rows: _LRU[Any, int] = field(default_factory=_LRU)  # signature -> Jacobian rows
    row_bytes: _LRU[Any, int] = field(default_factory=_LRU)  # signature -> measured peak bytes per row


class Profiles:
    """One profile per function name (names come from the registry, so this is bounded)."""

    def __init__(self) -> None:
        self._by_name: dict[str, FunctionProfile] = {}

    def __getitem__(self, name: str) -> FunctionProfile:
        profile = self._by_name.get(name)
        if profile is None:  # setdefault: two threads asking first get the same profile
            profile = self._by_name.setdefault(name, FunctionProfile())
        return profile
