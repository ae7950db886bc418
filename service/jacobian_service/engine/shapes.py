"""How far a result's shape reaches, whatever it holds (no torch).

numpy and torch index an array by its sizes, those of 0 taken as 1: a shape of no
elements whose other sizes multiply past 2^63 bytes cannot be made at all (numpy's
'array is too big', torch's 'Stride calculation overflowed'). Derivatives multiply
shapes (a Hessian's is the output's and the input's twice), so inputs of no elements
within every limit can still ask for such a result.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_SPAN_BYTES", "span"]

#: The most bytes an array's sizes, those of 0 taken as 1, may reach (strides are int64).
MAX_SPAN_BYTES = (1 << 63) - 1


def span(shape: Any) -> int:
    """The product of ``shape``'s sizes, those of 0 taken as 1 (exact: Python ints)."""
    out = 1
    for d in shape:
        out *= int(d) or 1
    return out
