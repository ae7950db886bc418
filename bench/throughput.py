"""Throughput of small ``mlp`` Jacobians (.npy in and out) under 1, 4, 16 and 64 clients.

Three servers side by side, measured in turn for a fixed duration at every concurrency,
round after round: the bare Starlette HTTP floor, the service with batching on
(``MAX_BATCH_SIZE=64``) and with batching off (``MAX_BATCH_SIZE=1``). The load generator
is one asyncio process of keep-alive connections speaking minimal HTTP/1.1 (each client
waits for its answer before sending again), cheap enough to leave the server most of the
machine. Batch sizes come from the service's ``/metrics`` histogram, before and after.
Targets (issue 4): at 16 clients, service >= 0.7 x the floor, and batching on >= 3 x off.
"""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np

from ._common import Context, RawConnection, Report, Target, median, mlp_case, raw_request
from ._server import NPY_HEADERS, Server, npy_bytes

TITLE = "throughput: mlp Jacobians (.npy) under concurrent clients"
PATH = "/v1/functions/mlp/jacobian"


def on_env(ctx: Context) -> dict[str, str]:
    env = {**ctx.service_env, "JACOBIAN_SERVICE_MAX_BATCH_SIZE": "64"}
    if ctx.quick:  # the server every other benchmark uses, so --quick starts only one
        return ctx.service_env
    wait = ctx.opt("batch_wait_ms", 0.0, 0.0)
    if wait:
        env["JACOBIAN_SERVICE_MAX_BATCH_WAIT_MS"] = str(wait)
    return env


def off_env(ctx: Context) -> dict[str, str]:
    return {**ctx.service_env, "JACOBIAN_SERVICE_MAX_BATCH_SIZE": "1"}


async def _load(port: int, request: bytes, clients: int, duration: float, warm: float) -> tuple[int, int]:
    """Answers counted in a ``duration`` window after ``warm`` seconds; (ok, errors)."""
    conns = [RawConnection(port) for _ in range(clients)]
    await asyncio.gather(*(c.open() for c in conns))
    loop = asyncio.get_running_loop()
    begin = loop.time() + warm
    end = begin + duration
    ok = errors = 0

    async def client(conn: RawConnection) -> None:
        nonlocal ok, errors
        while loop.time() < end:
            status, _, _ = await conn.post(request)
            now = loop.time()
            if status != 200:
                errors += 1
            elif begin <= now <= end:
                ok += 1

    try:
        await asyncio.gather(*(client(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    return ok, errors


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def measure(port: int, request: bytes, clients: int, duration: float, warm: float) -> tuple[float, int]:
    loop = _new_loop()
    try:
        ok, errors = loop.run_until_complete(_load(port, request, clients, duration, warm))
    finally:
        loop.close()
    return ok / duration, errors


def _batch_stats(server: Server) -> tuple[float, float, dict[float, float]]:
    m = server.metrics()
    buckets = {float(k.split('le="')[1].split('"')[0]): v for k, v in m.items()
               if k.startswith("jacobian_service_batch_size_bucket")}
    return m.get("jacobian_service_batch_size_sum", 0.0), m.get("jacobian_service_batch_size_count", 0.0), buckets


def _batch_summary(before: tuple[float, float, dict[float, float]], after: tuple[float, float, dict[float, float]]) -> tuple[float, str]:
    """Mean requests per engine call and the largest batch bucket seen in between."""
    s = after[0] - before[0]
    n = after[1] - before[1]
    mean = s / n if n else float("nan")
    largest = "-"
    for le in sorted(after[2]):
        if after[2][le] - before[2].get(le, 0.0) >= n and n:
            largest = f"<= {le:g}"
            break
    return mean, largest


def run(ctx: Context) -> Report:
    report = Report(TITLE)
    report.add(f"## {TITLE}\n")
    concurrencies = ctx.opt("clients", [1, 4, 16, 64], [16])
    duration = ctx.opt("duration", 3.0, 0.3)
    warm = 0.5 if not ctx.quick else 0.1
    rounds = ctx.opt("rounds", 3, 1)

    x, J = mlp_case()
    floor = ctx.pool.floor({"mlp": {"application/x-npy": npy_bytes(J)}})
    servers: dict[str, Server] = {
        "HTTP floor": floor,
        "service, batching on": ctx.pool.service(on_env(ctx)),
        # --quick only checks that this runs: one server plays both parts (no second start-up).
        "service, batching off": ctx.pool.service(off_env(ctx) if not ctx.quick else on_env(ctx)),
    }
    body = npy_bytes(x)
    requests = {name: raw_request(s.port, PATH, body, NPY_HEADERS) for name, s in servers.items()}
    for name, server in servers.items():  # correctness, and the first-call path out of the way
        loop = _new_loop()
        conn = RawConnection(server.port)
        try:
            for _ in range(3):
                status, _, answer = loop.run_until_complete(conn.post(requests[name]))
        finally:
            conn.close()
            loop.close()
        got = np.load(io.BytesIO(answer)) if status == 200 else None
        if got is None or not np.allclose(got, J, rtol=1e-5, atol=1e-6):
            report.fail(f"{name}: wrong answer (status {status})")

    rps: dict[tuple[str, int], list[float]] = {}
    errors: dict[tuple[str, int], int] = {}
    batches: dict[tuple[str, int], list[float]] = {}
    largest: dict[tuple[str, int], str] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    names = list(servers)
    for clients in concurrencies:
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                server = servers[name]
                is_service = name.startswith("service")
                before = _batch_stats(server) if is_service else None
                cpu0, t0 = server.cpu_seconds(), time.monotonic()
                value, errs = measure(server.port, requests[name], clients, duration, warm)
                cpu.setdefault((name, clients), []).append((server.cpu_seconds() - cpu0) / (time.monotonic() - t0))
                rps.setdefault((name, clients), []).append(value)
                errors[(name, clients)] = errors.get((name, clients), 0) + errs
                if is_service:
                    mean, big = _batch_summary(before, _batch_stats(server))  # type: ignore[arg-type]
                    batches.setdefault((name, clients), []).append(mean)
                    largest[(name, clients)] = big

    report.add(f"{rounds} round(s) x {duration:g} s per cell (after {warm:g} s warm-up), servers interleaved; "
               f"requests/s (median over rounds).\n")
    rows = []
    for clients in concurrencies:
        f = median(rps[("HTTP floor", clients)])
        on = median(rps[("service, batching on", clients)])
        off = median(rps[("service, batching off", clients)])
        rows.append([clients, f, on, off, on / f, on / off,
                     median(batches[("service, batching on", clients)]), largest[("service, batching on", clients)],
                     "/".join(f"{median(cpu[(n, clients)]) * 100:.0f}" for n in names),
                     sum(errors.get((n, clients), 0) for n in names)])
    report.table(["clients", "floor req/s", "on req/s", "off req/s", "on / floor", "on / off",
                  "mean batch (on)", "largest batch (on)",
                  "server CPU % floor/on/off", "non-200"], rows)
    report.add(f"batching on: {on_env(ctx)}; off: {off_env(ctx)}. Server CPU % is the server process's "
               "CPU time over wall time (100 = one core; the machine has 2, shared with the load generator).\n")
    for row in rows:
        if row[-1]:
            report.fail(f"{row[-1]} non-200 answers at {row[0]} clients")
    if 16 in concurrencies:
        row = rows[concurrencies.index(16)]
        report.target(Target("throughput, 16 clients: service (batching on) / HTTP floor", row[4], 0.7, ">="))
        report.target(Target("throughput, 16 clients: batching on / off", row[5], 3.0, ">="))
    report.add()
    return report
