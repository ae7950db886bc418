"""Structured Jacobians and Hessians: sparsity patterns, colourings, sparse results.

Engine API (torch; call on the engine's thread)::

    sparse_jacobian(fn, args, argnums=(0,), pattern="auto", mode="auto",
                    memory_budget=1 << 30, check_alive=None, *, has_aux=False,
                    declared=spec.sparsity, cache=None, name=spec.name) -> SparseResult
    sparse_hessian(fn, args, argnums=(0,), pattern="auto", memory_budget=1 << 30,
                   check_alive=None, *, has_aux=False, declared=spec.sparsity,
                   cache=None, name=spec.name) -> SparseResult
    describe_sparsity(fn, args, argnums=(0,), pattern="auto", *, kind="jacobian",
                      mode="auto", has_aux=False, declared=spec.sparsity,
                      cache=None, name=spec.name) -> dict   # JSON-able

- ``args``: all positional inputs as tensors on the device; ``argnums`` a tuple.
- ``pattern``: ``"auto"`` (structural detection, numerical probing when tracing fails),
  a declared pattern's name (a key of ``declared``), a :class:`Declared` or a
  :class:`Pattern`. The request option ``sparsity: dense`` never reaches this package.
- ``mode``: ``auto`` colours both sides and takes the one with fewer products; ``fwd``
  (JVPs over column groups) or ``rev`` (VJPs over row groups) force one.
- ``check_alive()`` is called as the pattern is detected, at most every few
  milliseconds of every long loop of the colouring, and between chunks of products;
  it may raise (deadlines), and nothing is cached then.
- ``SparseResult.matrix`` is a ``scipy.sparse.csr_array`` (output elements x input
  elements, both flattened in C order, concatenated over outputs / differentiated
  inputs); ``.meta()`` gives the fields for the response's ``meta``; ``.output`` and
  ``.aux`` come from the forward pass.
- Patterns and colourings are cached per function (name + source hash), input
  shapes/dtypes, argnums and choice: in memory, and on disk under the directory named by
  ``JACOBIAN_SERVICE_SPARSITY_CACHE_DIR`` (or a :class:`PatternCache` passed in).

Declared patterns (torch-free, for ``@register(sparsity=...)``): :func:`banded`,
:func:`block_diagonal`, :func:`coo`, :func:`from_callable`, :func:`from_matrix` (or a
``scipy.sparse`` matrix as it is). Only :mod:`.patterns` is
imported eagerly; the torch-dependent names load on first use, so the registry can
import this package without torch.
"""

from __future__ import annotations

from typing import Any

from .patterns import (
    CACHE_ENV,
    Declared,
    DetectionTooCostly,
    Pattern,
    PatternCache,
    PatternTooLarge,
    banded,
    block_diagonal,
    coo,
    declared,
    entry_limit,
    from_callable,
    from_matrix,
)

__all__ = [
    "CACHE_ENV",
    "Coloring",
    "Declared",
    "DetectionTooCostly",
    "Pattern",
    "PatternCache",
    "PatternTooLarge",
    "SparseResult",
    "TraceError",
    "banded",
    "block_diagonal",
    "choose_coloring",
    "coo",
    "declared",
    "describe_sparsity",
    "entry_limit",
    "from_callable",
    "from_matrix",
    "probe",
    "sparse_hessian",
    "sparse_jacobian",
    "star_coloring",
    "trace_hessian",
    "trace_jacobian",
]

_LAZY = {
    "Coloring": "coloring", "choose_coloring": "coloring", "star_coloring": "coloring",
    "TraceError": "detect", "probe": "detect", "trace_hessian": "detect", "trace_jacobian": "detect",
    "SparseResult": "compute", "describe_sparsity": "compute", "sparse_hessian": "compute", "sparse_jacobian": "compute",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
