"""A/B: the front end's CPU per request under wrk, two source trees side by side.

    python -m bench.fe_cpu OLD_TREE NEW_TREE [--rounds 4] [--seconds 5] [--connections 16]

Each tree (``git archive main | tar -x -C /tmp/base`` makes one) serves with its own code
in the process layout, one front end (``WORKERS=1``) and one torch thread; wrk posts small
``mlp`` Jacobians over ``.npy`` to one at a time, the trees alternating round by round
(the order swapped each round). Per round it reads each process's CPU from ``/proc`` and
prints the front end's and the engine's CPU per answered request, then medians. CPU per
request, not requests/s, is the figure to compare on a shared machine: the machine's other
load moves throughput far more than it moves the instructions each request costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jacobian_service.procfs import cpu_seconds

from ._server import npy_bytes, process_label, tree_pids
from .ab import start, stop, wait_ready
from .layout import _LUA, wrk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fe_cpu", description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for both servers (JACOBIAN_SERVICE_...)")
    p.add_argument("--keep", type=float, default=0, help="seconds to keep the servers up after (for a profiler)")
    args = p.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.env)

    tmp = Path(tempfile.mkdtemp(prefix="jacobian-fe-cpu-"))
    body = tmp / "x.npy"
    body.write_bytes(npy_bytes(np.random.default_rng(0).standard_normal(128).astype(np.float32)))
    script = tmp / "post.lua"
    script.write_text(_LUA.format(body=body))
    trees = {"new": args.new.resolve(), "old": args.old.resolve()}
    procs = {name: start(tree, tmp / f"{name}.log", extra) for name, tree in trees.items()}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    try:
        for name, (proc, port) in procs.items():
            wait_ready(proc, port, tmp / f"{name}.log")
        pids = {name: [(process_label(p), p) for p in tree_pids(proc.pid)] for name, (proc, _) in procs.items()}
        for name, (_, port) in procs.items():  # warm-up under load
            wrk(f"http://127.0.0.1:{port}", script, args.connections, 1.0, threads=1)
        order = list(trees)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                port = procs[name][1]
                before = {p: cpu_seconds(p) or 0.0 for _, p in pids[name]}
                rps, bad, _, _ = wrk(f"http://127.0.0.1:{port}", script, args.connections, args.seconds, threads=1)
                if bad:
                    raise RuntimeError(f"{name}: {bad}")
                n = rps * args.seconds
                used: dict[str, float] = {}
                for role, p in pids[name]:
                    used[role] = used.get(role, 0.0) + (cpu_seconds(p) or 0.0) - before[p]
                fe, eng = used.get("front end", 0.0) / n * 1e6, used.get("engine", 0.0) / n * 1e6
                results[name].append((rps, fe, eng))
                print(f"round {r} {name}: {rps:,.0f} req/s, front end {fe:.0f} us, engine {eng:.0f} us per request",
                      flush=True)
        print(f"# medians over {args.rounds} rounds, wrk -t1 -c{args.connections} -d{args.seconds:g}s")
        for name in ("old", "new"):
            rps, fe, eng = (statistics.median(x) for x in zip(*results[name]))
            print(f"{name}: {rps:,.0f} req/s, front end {fe:.0f} us, engine {eng:.0f} us per request")
        fe_old, fe_new = (statistics.median(x[1] for x in results[n]) for n in ("old", "new"))
        print(f"front end new/old {fe_new / fe_old:.3f}")
        if args.keep:
            print(f"servers: old :{procs['old'][1]} new :{procs['new'][1]}; kept up {args.keep:g} s", flush=True)
            time.sleep(args.keep)
    finally:
        stop(proc for proc, _ in procs.values())
    return 0


if __name__ == "__main__":
    sys.exit(main())
