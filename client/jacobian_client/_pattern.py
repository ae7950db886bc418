"""Pictures of sparsity patterns: braille in the terminal (numpy only), matplotlib if installed.

Each braille character shows a 2 x 4 block of dots; a large pattern is scaled down
(equally along both axes) so that a dot lights when any entry of its block is nonzero.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["braille", "coords", "plot_pattern"]

# Bit of each dot in a braille cell, indexed [row][column] (Unicode's dot numbering).
_DOT_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.int64)


def braille(rows: Any, cols: Any, shape: tuple[int, int], max_width: int = 60, max_height: int | None = None) -> str:
    """The pattern with entries at ``(rows, cols)`` of a ``shape`` matrix as lines of
    braille characters, at most ``max_width`` characters wide (and ``max_height`` lines
    high, by default as many as the width). Empty matrices give an empty string."""
    max_height = max_width if max_height is None else max_height
    if int(max_width) < 1 or int(max_height) < 1:  # a scale of n / 0 cells per dot
        raise ValueError(f"a picture is at least 1 character wide and high; got max_width={max_width}, max_height={max_height}")
    m, n = int(shape[0]), int(shape[1])
    if m == 0 or n == 0:
        return ""
    # One scale for both axes (matrix cells per dot) keeps a band looking like a band.
    scale = max(1.0, n / (2 * max_width), m / (4 * max_height))
    dots_x, dots_y = max(1, math.ceil(n / scale)), max(1, math.ceil(m / scale))
    width, height = math.ceil(dots_x / 2), math.ceil(dots_y / 4)
    # Which dots light, a piece of the entries at a time: the picture is at most a few
    # thousand dots, the entries up to tens of millions. Whole, as numpy temporaries (a
    # float and an int copy of each index array, the cells' and bits' index arrays) and
    # one ``np.bitwise_or.at`` over every entry, a 4,096 x 4,096 dense pattern's picture
    # (16.7 M entries) took 5.5 s and 0.9 GB at a cached ``GET .../sparsity``, the
    # engine serving no one else meanwhile; it takes ~0.2 s and a few MB so.
    rows, cols = np.asarray(rows).ravel(), np.asarray(cols).ravel()
    lit = np.zeros((4 * height, 2 * width), bool)  # (padded to whole cells)
    for start in range(0, len(rows), _PIECE):
        r = (rows[start:start + _PIECE].astype(np.int64) / scale).astype(np.int64)
        c = (cols[start:start + _PIECE].astype(np.int64) / scale).astype(np.int64)
        lit[r, c] = True
    cells = np.einsum("hawb,ab->hw", lit.reshape(height, 4, width, 2).astype(np.int64), _DOT_BITS)
    return "\n".join("".join(chr(0x2800 + int(v)) for v in line) for line in cells)


# Entries whose dots are found at once (braille): ~1.5 MB of temporaries a piece.
_PIECE = 1 << 16


def plot_pattern(matrix: Any, ax: Any = None, **spy_kwargs: Any) -> Any:
    """Draw a sparse matrix's pattern with matplotlib's ``spy`` (install the
    ``matplotlib`` extra); returns the axes."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_pattern needs matplotlib: pip install 'jacobian-service[plot]'") from exc
    if ax is None:
        _, ax = plt.subplots()
    rows, cols, shape = coords(matrix)
    ax.plot(cols, rows, linestyle="none", marker="s", markersize=spy_kwargs.pop("markersize", 1), **spy_kwargs)
    ax.set_xlim(-0.5, shape[1] - 0.5)
    ax.set_ylim(shape[0] - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_title(f"{shape[0]} x {shape[1]}, {len(rows)} nonzeros")
    return ax


def coords(matrix: Any) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(rows, cols, shape) from a scipy sparse matrix, a SparseCOO or a dense array: a
    1-D array is drawn as one row, a scalar as a 1 x 1 matrix; more dimensions are a
    ValueError."""
    if hasattr(matrix, "tocoo"):
        coo = matrix.tocoo()
        return np.asarray(coo.row), np.asarray(coo.col), tuple(coo.shape)  # type: ignore[return-value]
    if hasattr(matrix, "row") and hasattr(matrix, "col"):
        return np.asarray(matrix.row), np.asarray(matrix.col), tuple(matrix.shape)  # type: ignore[return-value]
    dense = np.asarray(matrix)
    if dense.ndim < 2:
        dense = dense.reshape(1, -1)
    elif dense.ndim > 2:
        raise ValueError(f"a sparsity pattern is a 2-D matrix; got an array of shape {dense.shape}")
    r, c = np.nonzero(dense)
    return r, c, tuple(dense.shape)  # type: ignore[return-value]
