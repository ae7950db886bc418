"""``python -m bench [--quick] [--only NAME[,NAME]]``: every benchmark side by side.

Benchmarks: latency, throughput, layout, big, modes, load_test, remote (see each module's docstring).
Each prints a markdown table of medians and ratios and the targets from the issues.
The exit status is non-zero when a benchmark fails outright (a wrong answer, a server
that does not come up) or the load test misses its goals; speed targets that are missed
are reported, not fatal (these machines are noisy).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
import traceback

from ._common import Context, Report, cpu_line
from ._server import Pool

BENCHMARKS = ("latency", "throughput", "layout", "big", "modes", "load_test", "remote")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny configuration (seconds): checks the benchmarks run")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--rounds", type=int, help="interleaved rounds (latency, big, modes, throughput)")
    p.add_argument("--duration", type=float, help="seconds per throughput measurement")
    p.add_argument("--workers", default=None, help="layout: front-end counts of the process layout, e.g. 1,2,4")
    p.add_argument("--clients", default=None, help="throughput concurrencies, e.g. 1,4,16,64")
    p.add_argument("--batch-wait-ms", type=float, help="MAX_BATCH_WAIT_MS of the batching-on server (throughput)")
    p.add_argument("--load-seconds", type=float, help="load test duration (default 60, quick 1)")
    p.add_argument("--load-clients", type=int, help="load test clients (default 64)")
    p.add_argument("--big-n", type=int, help="softmax size for 'big' (default 1000)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads of the bench process and of every service (default 1; 0: torch's default)")
    p.add_argument("--modes-n", type=int, help="the long side of 'tall' and 'wide' (default 4096)")
    args = p.parse_args(argv)

    chosen = [b.strip() for b in args.only.split(",") if b.strip()] or list(BENCHMARKS)
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")

    options = {
        "rounds": args.rounds, "duration": args.duration, "batch_wait_ms": args.batch_wait_ms,
        "clients": [int(c) for c in args.clients.split(",")] if args.clients else None,
        "workers": [int(c) for c in args.workers.split(",")] if args.workers else None,
        "load_seconds": args.load_seconds, "load_clients": args.load_clients, "big_n": args.big_n,
        "modes_n": args.modes_n, "torch_threads": args.torch_threads,
    }
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    print(f"# jacobian-service benchmarks{' (--quick)' if args.quick else ''}\n")
    print(f"machine: {cpu_line()}; Python {platform.python_version()}, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}\n")
    reports: list[Report] = []
    started = time.monotonic()
    with Pool() as pool:
        ctx = Context(pool, quick=args.quick, options=options)
        # Start the servers the chosen benchmarks share at once: start-up is mostly imports.
        configs = []
        if set(chosen) & {"latency", "big", "modes", "throughput", "remote"} or (args.quick and "load_test" in chosen):
            configs.append((ctx.service_env, ""))
        if "throughput" in chosen and not args.quick:
            from .throughput import off_env, on_env

            configs += [(on_env(ctx), ""), (off_env(ctx), "")]
        if "latency" in chosen and not args.quick and args.torch_threads:
            configs.append(({}, "default threads"))
        if args.quick and "layout" in chosen:  # --quick measures nothing that counts: start every server at once
            from .layout import layouts

            configs += [(env, "", serve_args) for env, serve_args in layouts(ctx).values()]
        pool.prestart(configs)
        for name in chosen:
            module = importlib.import_module(f"bench.{name}")
            t0 = time.monotonic()
            try:
                report = module.run(ctx)
            except Exception as exc:  # one broken benchmark must not hide the others
                traceback.print_exc()
                report = Report(name)
                report.fail(f"{name} raised {type(exc).__name__}: {exc}")
            print(f"({name}: {time.monotonic() - t0:.1f} s)\n", flush=True)
            reports.append(report)

    print("## summary\n")
    for report in reports:
        for t in report.targets:
            print("- " + t.line())
        for f in report.failures:
            print(f"- FAILED ({report.title.split(':')[0]}): {f}")
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
