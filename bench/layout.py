"""Throughput of the process layout against the in-process layout (issue 9), under wrk.

Small ``mlp`` Jacobians (128 float32 in, 64x128 out) over ``.npy``, 64 keep-alive
connections from wrk (an independent load generator written in C, so the client is not
the bottleneck), side by side in one run, cells interleaved round by round:

* the bare HTTP floor (``bench/_floor.py``: Starlette under the same uvicorn call,
  answering the precomputed bytes);
* the service in the in-process layout (``serve --in-process``: v1's single process);
* the service in the process layout (``serve --workers N``) with 1, 2 and 4 front ends,
  one engine process.

Also measured here, in this process: ``vmap(jacrev(mlp))`` over batches of 64 on one
thread, the engine's compute floor in Jacobians/s. The one-core limit is then
``1 / (1/floor_rps + 1/inprocess_batched_jps)``: one core doing the floor's HTTP work and
the batched compute in turn. Targets (issue 9): the process layout (the default number
of front ends) >= 2x the in-process layout and >= 0.8x the one-core limit.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from jacobian_service.settings import Settings

from ._common import Context, Report, Target, median, mlp_case
from ._server import NPY_HEADERS, Server, loopback_client, npy_bytes

TITLE = "layout: mlp Jacobians (.npy) under wrk, 64 connections, process vs in-process layout"
PATH = "/v1/functions/mlp/jacobian"

_LUA = """wrk.method = "POST"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/x-npy"
wrk.headers["Accept"] = "application/x-npy"
"""


def wrk(url: str, script: Path, connections: int, seconds: float, threads: int = 2) -> tuple[float, str, float, float]:
    """(requests/s, what went wrong ("" if nothing), median and 99th-percentile latency ms)
    from one wrk run.
    wrk's own timeout is raised to 30 s: a slow answer is latency, not an error."""
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "--latency",
         "-s", str(script), url + PATH],
        capture_output=True, text=True, timeout=seconds + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = " ".join(f"{n} non-2xx" for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        bad += " socket errors " + "/".join(m.groups()) + " (connect/read/write/timeout)"

    def percentile(p: int) -> float:
        lat = re.search(rf"{p}%\s+([\d.]+)(us|ms|s)\b", out)
        return float(lat.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[lat.group(2)] if lat else float("nan")

    return rps, bad, percentile(50), percentile(99)


def _answered_other_than_200(server: Server) -> str:
    """What the service itself counted besides 200s (by status and problem code), to say
    what wrk's non-2xx were. 499s are the requests in flight when wrk stopped."""
    try:
        counts = server.metrics()
    except (httpx.HTTPError, ValueError):
        return ""
    other = {k: v for k, v in counts.items() if k.startswith("jacobian_service_requests_total{")
             and 'status="200"' not in k and 'status="499"' not in k and "mlp" in k}
    said = (" (the service counted: " + ", ".join(f"{k[len('jacobian_service_requests_total'):]} {v:g}"
                                                   for k, v in other.items()) + ")") if other else ""
    # A 500 is a bug of ours: its traceback is in the server's log, which goes with the run.
    return said + "".join(f"\n  traceback: {line}" for line in server.traceback_summaries())


def batched_jacobians_per_s(x: np.ndarray, batch: int, repeats: int) -> float:
    """In-process ``vmap(jacrev(mlp))`` on batches of ``batch`` inputs, this thread only."""
    from jacobian_service.examples import mlp

    xs = torch.from_numpy(np.stack([x] * batch))
    f = torch.func.vmap(torch.func.jacrev(mlp))
    for _ in range(3):
        f(xs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(xs)
        times.append(time.perf_counter() - t0)
    return batch / median(times)


def layouts(ctx: Context) -> dict[str, tuple[dict[str, str], tuple[str, ...]]]:
    """The service configurations compared: label -> (env, serve arguments)."""
    env = {**ctx.side_env, "JACOBIAN_SERVICE_MAX_BATCH_SIZE": "64"}
    out = {"in-process layout": (env, ("--in-process",))}
    if ctx.quick and ctx.options.get("workers") is None:
        # --quick checks that this runs: the process layout is the server every other
        # benchmark shares (one front end under --quick), not one more start-up (~9.5
        # CPU-s, most of it the zygote's torch import).
        out["processes, 1 front end (the shared server)"] = (ctx.service_env, ())
        return out
    workers = ctx.opt("workers", [1, 2, 4], [2])
    for n in workers:
        out[f"processes, {n} front end{'s' if n > 1 else ''}"] = (env, ("--workers", str(n)))
    return out


def run(ctx: Context) -> Report:
    report = Report(TITLE)
    report.add(f"## {TITLE}\n")
    if shutil.which("wrk") is None:
        report.fail("wrk is not installed (apt-get install wrk)")
        return report
    seconds = ctx.opt("duration", 5.0, 1.0)
    rounds = ctx.opt("rounds", 3, 1)
    connections = 64

    x, J = mlp_case()
    floor = ctx.pool.floor({"mlp": {"application/x-npy": npy_bytes(J)}})
    configs = layouts(ctx)
    ctx.pool.prestart([(env, "", args) for env, args in configs.values()])
    servers: dict[str, Server] = {"HTTP floor": floor}
    for label, (env, args) in configs.items():
        servers[label] = ctx.pool.service(env, args=args)

    body = Path(tempfile.mkdtemp(prefix="jacobian-wrk-")) / "x.npy"
    body.write_bytes(npy_bytes(x))
    script = body.with_name("post.lua")
    script.write_text(_LUA.format(body=body))
    for name, server in servers.items():  # correctness first, and warm every process up
        got = None
        for _ in range(5):
            r = loopback_client().post(server.url + PATH, content=body.read_bytes(), headers=NPY_HEADERS, timeout=60)
            got = np.load(io.BytesIO(r.content)) if r.status_code == 200 else None
        if got is None or not np.allclose(got, J, rtol=1e-5, atol=1e-6):
            report.fail(f"{name}: wrong answer")
        if not ctx.quick:  # (--quick: the round below runs wrk against each all the same)
            wrk(server.url, script, connections, 1.0)  # warm-up under load (batch shapes, allocator)

    jps = [batched_jacobians_per_s(x, 64, 30)]
    rps: dict[str, list[float]] = {n: [] for n in servers}
    p50: dict[str, list[float]] = {n: [] for n in servers}
    p99: dict[str, list[float]] = {n: [] for n in servers}
    cpu: dict[str, list[float]] = {n: [] for n in servers}
    bad: dict[str, list[str]] = {n: [] for n in servers}
    per_request: dict[str, dict[str, list[float]]] = {}  # server -> role -> CPU seconds per request
    names = list(servers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            server = servers[name]
            cpu0, roles0, t0 = server.cpu_seconds(), server.cpu_by_role(), time.monotonic()
            value, errors, lat, tail = wrk(server.url, script, connections, seconds)
            cpu[name].append((server.cpu_seconds() - cpu0) / (time.monotonic() - t0))
            requests = max(value * seconds, 1.0)
            for role, used in server.cpu_by_role().items():
                per_request.setdefault(name, {}).setdefault(role, []).append((used - roles0.get(role, 0.0)) / requests)
            rps[name].append(value)
            p50[name].append(lat)
            p99[name].append(tail)
            if errors:
                bad[name].append(errors.strip())
        jps.append(batched_jacobians_per_s(x, 64, 30))
    body.unlink()
    script.unlink()

    floor_rps = median(rps["HTTP floor"])
    compute_jps = median(jps)
    limit = 1 / (1 / floor_rps + 1 / compute_jps)
    inproc = median(rps["in-process layout"])
    report.add(f"wrk -t2 -c{connections} -d{seconds:g}s, {rounds} round(s), servers interleaved; medians over rounds. "
               f"In-process vmap(jacrev(mlp)), batch 64, 1 thread: {compute_jps:,.0f} Jacobians/s; "
               f"one-core limit 1/(1/{floor_rps:,.0f} + 1/{compute_jps:,.0f}) = {limit:,.0f} req/s.\n")
    rows = []
    for name in names:
        v = median(rps[name])
        rows.append([name, v, median(p50[name]), median(p99[name]), "-" if name == "HTTP floor" else f"{v / inproc:.2f}",
                     "-" if name == "HTTP floor" else f"{v / limit:.2f}", f"{median(cpu[name]) * 100:.0f}",
                     len(servers[name].pids()), "; ".join(bad[name]) or 0])
    report.table(["server", "req/s", "p50 ms", "p99 ms", "/ in-process", "/ one-core limit", "server CPU %", "processes",
                  "non-2xx + errors"], rows)
    report.add("Server CPU % is the CPU time of every process of the server over wall time (100 = one core; "
               "the machine's cores are shared with wrk).\n")
    # Where each request's CPU goes: the front ends' HTTP work and the engine's compute
    # (the in-process layout's one process does both; the floor only HTTP).
    role_rows = []
    for name in names:
        roles = {role: median(v) * 1e3 for role, v in per_request.get(name, {}).items() if median(v) > 0}
        front = roles.get("front end", 0.0) if "engine" in roles else sum(roles.values())
        role_rows.append([name, f"{front:.3f}", f"{roles.get('engine', 0.0):.3f}", f"{sum(roles.values()):.3f}"])
    report.table(["server", "front end(s) CPU ms/request", "engine CPU ms/request", "all processes"], role_rows)
    report.add("CPU per request from /proc, by process role; without engine processes (the floor, the in-process "
               "layout) all of it shows under front end.\n")
    for name in names:
        if bad[name]:
            report.fail(f"{name}: {'; '.join(bad[name])}{_answered_other_than_200(servers[name])}")
    # The targets hold for what `serve` starts on this machine when WORKERS is unset (the
    # service's own rule: 2 front ends on 2 cores, 4 on a 16-core host).
    default = f"processes, {Settings(workers=None).front_end_count} front ends"
    if default in rps:
        v = median(rps[default])
        report.target(Target(f"throughput: {default} / in-process layout", v / inproc, 2.0, ">="))
        report.target(Target(f"throughput: {default} / one-core limit", v / limit, 0.8, ">="))
    report.add()
    return report
