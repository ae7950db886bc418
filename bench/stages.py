"""Where one lone request's time goes, stage by stage, across the client, the front end and the engine.

    python -m bench.stages TREE [--format npy|json] [--calls 150] [--gap-ms 4] [--keep DIR]

A tree's service (``serve``, one front end, one torch thread, as ``bench.ab`` starts it)
answers ``--calls`` small ``mlp`` Jacobians from one keep-alive client, one at a time
(``--gap-ms`` apart; 0: a closed loop), while ``perf record`` takes every system call
and every scheduler switch system-wide on ``CLOCK_MONOTONIC``. Each request is then cut
at its system calls, in order: the client's ``sendto``; the front end's ``epoll`` returning
(it wakes); its write of the job to the engine's socket; the engine's ``epoll`` returning;
its ``sendmsg`` of the reply; the front end's ``epoll`` returning; its ``writev`` of the
answer; the client's ``recvfrom`` returning. Then, off the path: how long the engine and
the front end work on after their sends before they sleep again (the engine's tidying:
the settings' put-back, the watchers). Each stage is given as measured and "net" of the
time its process stood preempted (runnable, off the CPU: other jobs on a shared machine),
medians with the 25th percentile; a JSON answer's ``meta`` adds the engine's own
``queue_ms`` and ``compute_ms``. Requests whose events ``perf`` lost (a loaded machine
loses many) are left out and counted.

Needs ``perf`` and the right to trace system-wide (root, or ``perf_event_paranoid`` <= -1).
No code of the service is changed: what it times is what the tree serves.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._server import json_request, npy_bytes, process_label, tree_pids
from .ab import HEADERS, Lean, request_bytes, start, stop, wait_ready

# x86-64 system call numbers
_READ, _WRITE, _WRITEV, _SCHED_YIELD, _SENDTO, _RECVFROM, _SENDMSG = 0, 1, 20, 24, 44, 45, 46
_EPOLL_WAIT, _EPOLL_PWAIT = 232, 281
_WAKES = {_EPOLL_WAIT, _EPOLL_PWAIT}
_SENDS = {_WRITE, _SENDTO, _SENDMSG, _WRITEV}

STAGES = (
    ("client sends -> the front end wakes", "CL", "FE"),
    ("the front end reads, parses, writes the job", "FE", "FE"),
    ("the job -> the engine wakes", "FE", "EN"),
    ("the engine takes the job in, computes, sends the reply", "EN", "EN"),
    ("the reply -> the front end wakes", "EN", "FE"),
    ("the front end reads the reply, encodes, writes the answer", "FE", "FE"),
    ("the answer -> the client has it", "FE", "CL"),
)

_LINE = re.compile(r"\s*(\d+)/(\d+)\s+\[\d+\]\s+([\d.]+):\s+(\S+):\s*(.*)")
_SWITCH = re.compile(r"prev_pid=(\d+) .*prev_state=(\S+) ==> .*next_pid=(\d+)")


def record(tree: Path, fmt: str, calls: int, gap_s: float, out: Path) -> dict[str, Any]:
    """Serve ``calls`` lone requests under ``perf record``; the client's marks and the pids."""
    proc, port = start(tree, out / "server.log", {})
    try:
        wait_ready(proc, port, out / "server.log")
        x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
        req = request_bytes(port, npy_bytes(x) if fmt == "npy" else json_request(x), HEADERS[fmt])
        client = Lean(port)
        for _ in range(100):  # warm, as the bench's other clients are
            status, body = client.call(req)
        if status != 200:
            raise RuntimeError(f"{status} {body[:300]!r}")
        pids = {process_label(p): p for p in tree_pids(proc.pid)}
        perf = subprocess.Popen(["perf", "record", "-q", "-a", "-k", "CLOCK_MONOTONIC", "-m", "1024", "-o",
                                 str(out / "perf.data"), "-e",
                                 "raw_syscalls:sys_enter,raw_syscalls:sys_exit,sched:sched_switch"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # (perf's start-up)
        marks = []
        for _ in range(calls):
            if gap_s:
                time.sleep(gap_s)
            t0 = time.monotonic()
            status, body = client.call(req)
            t1 = time.monotonic()
            marks.append((t0, t1, json.loads(body).get("meta") if fmt == "json" else None))
        time.sleep(0.2)
        perf.send_signal(signal.SIGINT)
        perf.wait()
        client.close()
    finally:
        stop([proc])
    return {"pids": {"FE": pids["front end"], "EN": pids["engine"], "CL": os.getpid()}, "marks": marks}


class Trace:
    """The system calls and CPU switches of the three processes (main threads)."""

    def __init__(self, script: str, pids: dict[str, int]) -> None:
        self.role = {pid: role for role, pid in pids.items()}
        self.calls: dict[str, list[tuple[float, str, int]]] = {r: [] for r in pids}
        self.switches: dict[str, list[tuple[float, bool, bool]]] = {r: [] for r in pids}  # (t, on, preempted)
        for line in script.splitlines():
            m = _LINE.match(line)
            if m is None:
                continue
            pid, tid, t, event, rest = int(m[1]), int(m[2]), float(m[3]), m[4], m[5]
            if event == "sched:sched_switch":
                s = _SWITCH.search(rest)
                if s is None:
                    continue
                if (role := self.role.get(int(s[1]))) is not None:
                    self.switches[role].append((t, False, s[2].startswith("R")))
                if (role := self.role.get(int(s[3]))) is not None:
                    self.switches[role].append((t, True, False))
            elif pid == tid and (role := self.role.get(pid)) is not None:
                self.calls[role].append((t, event.rpartition(":")[2], int(rest.split()[1])))

    def first(self, role: str, after: float | None, kind: str, numbers: set[int], until: float) -> float | None:
        """The first ``kind`` (sys_enter / sys_exit) of one of ``numbers`` in (after, until]."""
        if after is None:
            return None
        calls = self.calls[role]
        for t, k, nr in calls[bisect.bisect_right(calls, (after, "~")):]:
            if t > until:
                return None
            if k == kind and nr in numbers:
                return t
        return None

    def preempted(self, role: str, a: float, b: float) -> float:
        """Time ``role`` stood runnable but off the CPU within [a, b]."""
        waited, since = 0.0, None
        for t, on, preempted in self.switches[role]:
            if t > b:
                break
            if not on:
                since = t if preempted else None
            elif since is not None:
                if t > a:
                    waited += min(t, b) - max(since, a)
                since = None
        return waited + (b - max(since, a) if since is not None else 0.0)


def stages(trace: Trace, marks: list[Any]) -> list[dict[str, float]]:
    """Each request's stages (seconds), for those whose events are all there."""
    rows = []
    for t0, t1, meta in marks:
        late = t1 + 0.05
        points = [trace.first("CL", t0, "sys_exit", {_SENDTO}, t1)]
        points.append(trace.first("FE", points[-1], "sys_exit", _WAKES, t1))
        points.append(trace.first("FE", points[-1], "sys_enter", _SENDS, t1))
        points.append(trace.first("EN", points[-1], "sys_exit", _WAKES, t1))
        points.append(trace.first("EN", points[-1], "sys_enter", _SENDS, t1))
        points.append(trace.first("FE", points[-1], "sys_exit", _WAKES, t1))
        points.append(trace.first("FE", points[-1], "sys_enter", _SENDS, t1))
        points.append(trace.first("CL", points[-1], "sys_exit", {_RECVFROM}, late))
        engine_sleeps = trace.first("EN", points[4], "sys_enter", {_EPOLL_WAIT}, late)
        front_sleeps = trace.first("FE", points[6], "sys_enter", _WAKES, late)
        if None in points or engine_sleeps is None or front_sleeps is None:
            continue
        row: dict[str, float] = {"client's whole call": t1 - t0}
        for (name, _, runs), a, b in zip(STAGES, points, points[1:]):
            row[name] = b - a  # type: ignore[operator]
            row[name + " [net]"] = b - a - trace.preempted(runs, a, b)  # type: ignore[operator,arg-type]
        row["send -> the client has it"] = points[-1] - points[0]  # type: ignore[operator]
        row["(off the path) the engine works on after its reply [net]"] = (
            engine_sleeps - points[4] - trace.preempted("EN", points[4], engine_sleeps))  # type: ignore[operator,arg-type]
        row["(off the path) the front end works on after its answer [net]"] = (
            front_sleeps - points[6] - trace.preempted("FE", points[6], front_sleeps))  # type: ignore[operator,arg-type]
        if meta:
            row["meta.queue_ms"], row["meta.compute_ms"] = meta["queue_ms"] / 1e3, meta["compute_ms"] / 1e3
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    p.add_argument("tree", type=Path)
    p.add_argument("--format", choices=("npy", "json"), default="npy")
    p.add_argument("--calls", type=int, default=150)
    p.add_argument("--gap-ms", type=float, default=4.0, help="between calls (0: a closed loop)")
    p.add_argument("--keep", type=Path, help="keep perf.data and the marks in this directory")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        print("perf is not installed (linux-perf)", file=sys.stderr)
        return 2
    out = args.keep or Path(tempfile.mkdtemp(prefix="jacobian-stages-"))
    out.mkdir(parents=True, exist_ok=True)
    run = record(args.tree.resolve(), args.format, args.calls, args.gap_ms / 1e3, out)
    script = subprocess.run(["perf", "script", "-i", str(out / "perf.data"), "-F", "pid,tid,cpu,time,event,trace"],
                            capture_output=True, text=True).stdout
    if not script:
        print("perf recorded nothing (is system-wide tracing allowed? perf_event_paranoid)", file=sys.stderr)
        return 2
    rows = stages(Trace(script, run["pids"]), run["marks"])
    if not rows:
        print("no request had all its events (perf lost them)", file=sys.stderr)
        return 1
    print(f"# {args.tree}: {args.format}, {len(rows)} of {args.calls} lone requests whole in the trace "
          f"({args.gap_ms:g} ms apart); medians (p25) in us")
    for key in rows[0]:
        values = sorted(r[key] for r in rows)
        print(f"{key:66s} {statistics.median(values) * 1e6:8.0f} ({values[len(values) // 4] * 1e6:6.0f})")
    if args.keep is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
