"""Sparse derivatives in the SDK: the result type without scipy, and pattern pictures.

With scipy installed (``pip install 'jacobian-service[scipy]'``) sparse results decode
to ``scipy.sparse`` arrays; without it to :class:`SparseCOO` (``row``, ``col``,
``data``, ``shape``, ``toarray()``). :func:`braille` draws a pattern in the terminal;
:func:`plot_pattern` with matplotlib (``pip install 'jacobian-service[plot]'``).
"""

from __future__ import annotations

from typing import Any

from ._pattern import coords, braille, plot_pattern
from .wire import SparseCOO, decode_sparse_json, read_sparse_npz

__all__ = ["SparseCOO", "braille", "decode_sparse_json", "pattern_string", "plot_pattern", "read_sparse_npz"]


def pattern_string(matrix: Any, max_width: int = 60) -> str:
    """A sparse matrix's (or dense array's) pattern as braille lines, with a title."""
    rows, cols, shape = coords(matrix)
    return f"{shape[0]} x {shape[1]}, {len(rows)} stored entries\n" + braille(rows, cols, shape, max_width)
