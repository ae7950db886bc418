"""An optional progress bar for long transfers: tqdm when installed, else a plain line on
stderr. Off unless asked for, and never an import-time dependency."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

__all__ = ["Progress"]


class Progress:
    """Callable as ``progress(done_bytes, total_bytes)``; :meth:`close` when done."""

    def __init__(self, description: str, *, stream: Any = None) -> None:
        self._description = description
        self._bar: Any = None
        self._stream = stream if stream is not None else sys.stderr
        self._last = 0.0
        self._total = 0
        self._update: Callable[[int, int], None]
        try:
            import tqdm  # noqa: F401  (optional extra)
        except ImportError:
            self._update = self._plain
        else:
            self._update = self._tqdm

    def __call__(self, done: int, total: int) -> None:
        self._total = total
        self._update(done, total)

    def _tqdm(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self._description)
        self._bar.update(done - self._bar.n)

    def _plain(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.5 and done < total:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        self._stream.write(f"\r{self._description}: {done / 2**20:,.1f} / {total / 2**20:,.1f} MiB ({pct:5.1f}%)")
        self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._update == self._plain and self._total:
            self._stream.write("\n")
            self._stream.flush()
