"""The benchmarks in their tiny ``--quick`` configuration, so that they cannot rot.

Runs ``python -m bench --quick`` (every benchmark, real server subprocesses on loopback)
and checks that each one ran and that none failed outright (a wrong answer, a server that
did not come up, a load-test goal: lost, wrong or 5xx answers). Speed targets are printed
by the benchmarks but never asserted here: timings on shared machines mean little.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` in a session of its own, killed whole past ``timeout``: the
    benchmarks start servers, which outlived a benchmark killed at its timeout alone
    (orphans serving on for ever, seen after a run on an overloaded machine)."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_benchmarks_run_quick() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = _run([sys.executable, "-m", "bench", "--quick"], env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for header in ("## latency", "## throughput", "## big", "## modes", "## load_test", "## remote", "## summary"):
        assert header in proc.stdout, f"{header!r} missing:\n{out[-4000:]}"
    assert "FAILED" not in proc.stdout, out[-6000:]


def test_the_ipc_hop_benchmark_runs_and_both_transports_echo() -> None:
    """``python -m bench.ipc_hop`` (separate from ``python -m bench``) in a tiny size:
    both echo loops answer and the ratio line is printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = _run([sys.executable, "-m", "bench.ipc_hop", "--rounds", "1", "--calls", "50"], env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "zeromq / channel:" in proc.stdout, out[-4000:]


def test_every_benchmark_module_compiles() -> None:
    """The benchmarks run outside ``python -m bench --quick`` too (``bench.sparse``,
    ``bench.stream_bench``, ...): each file at least compiles on this Python."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        compile(path.read_text(), str(path), "exec")
