"""Peak RSS growth of the front end for one large JSON Jacobian (issue 10, item 11):
``python -m bench.json_memory [N]``. softmax, float32, n = N (default 4096: 64 MiB),
finite and all NaN; one front end; the response is read through and discarded. Two
servers: one that gathers every result (STREAM_THRESHOLD_BYTES huge: the front end
encodes it in pieces) and one with the default threshold (streamed from the engine, by
its own chunk size or 256 rows)."""

from __future__ import annotations

import sys

import numpy as np

from tests._rss import front_end_pid, peak_growth
from tests.conftest import live_server
from tests.test_json_limits import _jacobian_json

MiB = 1 << 20


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    for path, threshold in (("gathered", 1 << 40), ("streamed", 8 * MiB)):
        with live_server(WORKERS=1, WARMUP="false", MAX_RESULT_BYTES=4 * n * n + MiB,
                         STREAM_THRESHOLD_BYTES=threshold) as (url, proc):
            pid = front_end_pid(proc.pid)
            for label, x in (("finite", np.linspace(-2, 2, n).tolist()), ("all NaN", ["NaN"] * n)):
                for options in ({}, {"chunk_size": 256}) if path == "streamed" else ({},):
                    _jacobian_json(url, x, **options)  # warm
                    growth, size = peak_growth(pid, lambda: _jacobian_json(url, x, **options))
                    print(f"{path:8s} {label:8s} {options or ''!s:18s} n={n}: result {4 * n * n / MiB:.0f} MiB, "
                          f"JSON {size / MiB:.0f} MiB, front-end peak RSS +{growth / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
