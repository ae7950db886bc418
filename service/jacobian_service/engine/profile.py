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


@dataclass
class BatchStats:
    """The last run of one batch key: result bytes per request, batch size, compute time."""

    result_bytes: int = 0
    batch_size: int = 1
    compute_s: float = 0.0


@dataclass
class FunctionProfile:
    vmap_pullback: bool = True  # False once vmap of its pullback failed (row loop instead)
    vmap_function: bool = True  # False once vmap of the function failed deterministically
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
