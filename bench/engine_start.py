"""An engine's start, exec'd (``python -m``, as before) against forked from the zygote
(``jacobian_service.fork_server``), side by side in one run.

For each mode and round: an engine started until it says ready on its status board
(imports, the functions' modules loaded, warm-up), and a spare (``--standby``) until it
is warm (its flag file), each as the supervisor starts them (``fork_server.start_engine``:
confined, a session of its own, its output to /dev/null here). Wall time from the call
that starts it, and its CPU (utime + stime) then; medians over ``--rounds``, the modes
interleaved round by round. The zygote's own start (its imports: paid once per ``serve``,
and again only if it dies) is shown apart.

    python -m bench.engine_start [--rounds 3] [--functions jacobian_service.examples]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jacobian_service import ipc
from jacobian_service.fork_server import ForkServer, start_engine
from jacobian_service.orphans import become_subreaper
from jacobian_service.settings import FRONT_END_ONLY


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _one(forks: ForkServer | None, run_dir: Path, env: dict[str, str], standby: bool) -> tuple[float, float]:
    """(wall s, CPU s) of one engine (``standby``: a spare) from its start to ready (warm)."""
    board = ipc.StatusBoard(run_dir / "engine-1.status", create=True)
    argv = [sys.executable, "-m", "jacobian_service.engine.process", "--index", "1", "--device", "cpu",
            "--run-dir", str(run_dir), *(["--standby"] if standby else [])]
    null = os.open(os.devnull, os.O_WRONLY)
    t0 = time.perf_counter()
    try:
        proc = start_engine(forks, argv, env, null, null, null, standby, confine=True)
    finally:
        os.close(null)
    try:
        said = b""  # (a spare's words on its stdin: its warm-ups, then that it is warm)
        while not (ipc.SPARE_WARM in (said := said + ipc.heard(proc.stdin)) if standby else board.read()["ready"]):
            if proc.poll() is not None:
                raise SystemExit(f"the engine exited with status {proc.returncode}")
            time.sleep(0.005)
        wall, cpu = time.perf_counter() - t0, _cpu_s(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        board.close()
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--functions", default="jacobian_service.examples")
    args = parser.parse_args()
    if not become_subreaper():  # as serve is: a forked engine is handed to it
        raise SystemExit("not a child subreaper here: engines cannot be forked")
    env = {k: v for k, v in os.environ.items() if k.upper() not in FRONT_END_ONLY}
    env.update(JACOBIAN_SERVICE_FUNCTIONS=args.functions, JACOBIAN_SERVICE_DEVICE="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()
        forks = ForkServer(env)
        if not forks.ready(wait_s=120):
            raise SystemExit("the fork server did not start")
        zygote = (time.perf_counter() - t0, _cpu_s(forks.pid))  # type: ignore[arg-type]
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        try:
            for _ in range(args.rounds):
                for mode, server in (("exec", None), ("fork", forks)):
                    for what, standby in (("engine to ready", False), ("spare to warm", True)):
                        results.setdefault((what, mode), []).append(_one(server, run_dir, env, standby))
        finally:
            forks.stop()
    print(f"zygote start (once per serve): wall {zygote[0]:.2f} s, CPU {zygote[1]:.2f} s")
    print(f"{'':16} {'exec wall':>10} {'fork wall':>10} {'ratio':>6} {'exec CPU':>9} {'fork CPU':>9} {'ratio':>6}"
          f"   (medians of {args.rounds}, s)")
    for what in ("engine to ready", "spare to warm"):
        ew, ec = (statistics.median(v) for v in zip(*results[(what, "exec")]))
        fw, fc = (statistics.median(v) for v in zip(*results[(what, "fork")]))
        print(f"{what:16} {ew:10.2f} {fw:10.2f} {ew / fw:5.1f}x {ec:9.2f} {fc:9.2f} {ec / fc:5.1f}x")


if __name__ == "__main__":
    main()
