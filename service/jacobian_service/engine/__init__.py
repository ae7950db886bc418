"""The torch side: everything that needs torch, split by what it needs it for.

The engine process (``process.py``) runs an :class:`Engine` (``core.py``) on one device;
the other modules are its parts (rows, Hessians, batching, products, calling the
function) and the watches that keep one function from spoiling the next (settings,
namespaces, imports, memory, descriptors, strays). docs/architecture.md ("Where the
code is") names each module's one job; tests/test_code_map.py keeps that list whole.
"""

from __future__ import annotations

from .core import Engine, Streamed, host_dtype, to_numpy
from .devices import default_memory_budget, keep_free_heap, resolve_devices, warmup_call

__all__ = ["Engine", "Streamed", "default_memory_budget", "host_dtype", "keep_free_heap", "resolve_devices", "to_numpy",
           "warmup_call"]
