"""Peak RSS growth of the front end for one large JSON Jacobian (issue 10, item 11):
``python -m bench.json_memory [N]``. softmax, float32, n = N (default 4096: 64 MiB), once
finite and once all NaN; one front end; the response is read through and discarded."""

from __future__ import annotations

import sys

import numpy as np

from tests._rss import front_end_pid, peak_growth
from tests.conftest import live_server
from tests.test_json_limits import _jacobian_json

MiB = 1 << 20


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    with live_server(WORKERS=1, WARMUP="false", MAX_RESULT_BYTES=4 * n * n + MiB, STREAM_THRESHOLD_BYTES=1 << 40) as (url, proc):
        pid = front_end_pid(proc.pid)
        for label, x in (("finite", np.linspace(-2, 2, n).tolist()), ("all NaN", ["NaN"] * n)):
            _jacobian_json(url, x)  # warm
            growth, size = peak_growth(pid, lambda: _jacobian_json(url, x))
            print(f"{label:8s} n={n}: result {4 * n * n / MiB:.0f} MiB, JSON {size / MiB:.0f} MiB, "
                  f"front-end peak RSS +{growth / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
