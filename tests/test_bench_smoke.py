"""The benchmarks in their tiny ``--quick`` configuration, so that they cannot rot.

Runs ``python -m bench --quick`` (every benchmark, real server subprocesses on loopback)
and checks that each one ran and that none failed outright (a wrong answer, a server that
did not come up, a load-test goal: lost, wrong or 5xx answers). Speed targets are printed
by the benchmarks but never asserted here: timings on shared machines mean little.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_run_quick() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for header in ("## latency", "## throughput", "## big", "## modes", "## load_test", "## remote", "## summary"):
        assert header in proc.stdout, f"{header!r} missing:\n{out[-4000:]}"
    assert "FAILED" not in proc.stdout, out[-6000:]


def test_the_ipc_hop_benchmark_runs_and_both_transports_echo() -> None:
    """``python -m bench.ipc_hop`` (separate from ``python -m bench``) in a tiny size:
    both echo loops answer and the ratio line is printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ipc_hop", "--rounds", "1", "--calls", "50"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "zeromq / channel:" in proc.stdout, out[-4000:]


def test_every_benchmark_module_compiles() -> None:
    """The benchmarks run outside ``python -m bench --quick`` too (``bench.sparse``,
    ``bench.stream_bench``, ...): each file at least compiles on this Python."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        compile(path.read_text(), str(path), "exec")
