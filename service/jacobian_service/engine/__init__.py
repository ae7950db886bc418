"""The torch side: everything that needs torch, split by what it needs it for.

    core.py      Engine: one device; Jacobians (rows or forward mode), evaluate, vjp, jvp, hvp
    rows.py      reverse-mode rows chunk by chunk (jacrev's vjp + vmap over the identity)
    hessian.py   Hessian strategies, measured per function and shapes
    batched.py   per-example vmap, and request batching (stack, run, split)
    calling.py   calling the user's function: aux, fixed inputs, failures
    profile.py   what is learned per function at run time, bounded
    devices.py   device choice, memory budgets, the heap policy, warm-up calls
    process.py   the engine process: a socket in front of a scheduler and an engine
"""

from __future__ import annotations

from .core import Engine, Streamed, host_dtype, to_numpy
from .devices import default_memory_budget, keep_free_heap, resolve_devices, warmup_call

__all__ = ["Engine", "Streamed", "default_memory_budget", "host_dtype", "keep_free_heap", "resolve_devices", "to_numpy",
           "warmup_call"]
