"""Shared pieces: the run context, targets, markdown tables, timing and a lean HTTP client."""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ._server import LOOPBACK, Pool


@dataclass
class Target:
    """One goal from the issues: ``value`` against ``limit`` (``<=`` or ``>=``)."""

    name: str
    value: float
    limit: float
    op: str  # "<=" or ">="
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def line(self) -> str:
        verdict = "met" if self.met else f"MISSED by {self._miss()}"
        return f"{self.name}: {self.value:.3g}{self.unit} (target {self.op} {self.limit:g}{self.unit}): {verdict}"

    def _miss(self) -> str:
        if self.limit == 0:
            return f"{abs(self.value - self.limit):.3g}{self.unit}"
        frac = (self.value / self.limit - 1) if self.op == "<=" else (1 - self.value / self.limit)
        return f"{frac * 100:.0f} %"


@dataclass
class Report:
    title: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # hard failures: wrong answers, load goals
    gating: bool = False  # whether a missed target fails the run (load test only)

    def add(self, text: str = "") -> None:
        self.lines.append(text)
        print(text, flush=True)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        cells = [[_cell(c) for c in row] for row in rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
        self.add("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
        self.add("|" + "|".join(("-" * (w + 1)) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
        for r in cells:
            self.add("| " + " | ".join(c.rjust(w) if i and _numeric(c) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
        self.add()

    def target(self, t: Target) -> None:
        self.targets.append(t)
        self.add("- " + t.line())

    def fail(self, why: str) -> None:
        self.failures.append(why)
        self.add("- FAILED: " + why)

    @property
    def ok(self) -> bool:
        return not self.failures and (not self.gating or all(t.met for t in self.targets))


def _numeric(c: str) -> bool:
    return c.replace(",", "").replace(".", "").replace("-", "").replace("+", "").replace("%", "").strip().isdigit()


def _cell(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:,.0f}"
    return str(c)


@dataclass
class Context:
    pool: Pool
    quick: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def service_env(self) -> dict[str, str]:
        """The configuration every benchmark's service shares (torch threads pinned to the
        bench process's own, so compute is compared like for like)."""
        threads = self.options.get("torch_threads")
        env = {} if not threads else {"JACOBIAN_SERVICE_TORCH_THREADS": str(threads)}
        if self.quick:  # start faster; first calls are slow, which --quick does not mind
            env["JACOBIAN_SERVICE_WARMUP"] = "false"
            # One front end (each is a process of ~1.3 CPU-s to start): --quick runs each
            # code path once (the layout benchmark's full run starts its own --workers N).
            env["JACOBIAN_SERVICE_WORKERS"] = "1"
        return env

    @property
    def side_env(self) -> dict[str, str]:
        """``service_env`` for a server that never restarts its engine: without a warm spare
        under ``--quick`` (a spare is one more torch start-up on the run's few cores; the
        full run measures the service as shipped)."""
        return {**self.service_env, "JACOBIAN_SERVICE_ENGINE_STANDBY": "false"} if self.quick else self.service_env

    def opt(self, name: str, full: Any, quick: Any) -> Any:
        """A setting from the command line, else this run's default."""
        value = self.options.get(name)
        return value if value is not None else (quick if self.quick else full)


def mlp_case() -> tuple[Any, Any]:
    """The one small ``mlp`` input (128 float32) latency and throughput share, and its
    Jacobian from in-process ``jacrev`` (so the floor answers the same bytes to both)."""
    import numpy as np
    import torch
    from jacobian_service.examples import mlp

    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    return x, torch.func.jacrev(mlp)(torch.from_numpy(x)).numpy()


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(seconds: float) -> float:
    return seconds * 1e3


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, per_round: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each variant; variants alternate call by call so that drift in
    the machine's load hits them all alike. The order is shuffled for every pass (seeded):
    in a fixed order, a variant that follows another one served by the same server finds
    that server's processes and caches warm, and the one that follows a different server
    finds them cold (measured: two identically configured services, 1.39x and 1.94x)."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(rounds * per_round):
        order = rng.sample(names, len(names))
        for name in order:
            fn = variants[name]
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


def in_blocks(variants: dict[str, Callable[[], Any]], rounds: int, per_round: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each variant, each round running every variant's calls back to
    back (``warmup`` untimed first): a client that calls in a loop, with its server and
    its own process warm. The order of the blocks rotates each round."""
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = variants[name]
            for _ in range(warmup):
                fn()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return samples


def service_device() -> Any:
    """The device the benchmarked services compute on (JACOBIAN_SERVICE_DEVICE, default
    auto: the first GPU where there is one, as the engines resolve it). The in-process
    references run there too, their results brought to the host as the service's are:
    on a GPU host a CPU reference would compare the device with the processor, not the
    service with torch."""
    from jacobian_service.engine.devices import resolve_devices

    return resolve_devices(os.environ.get("JACOBIAN_SERVICE_DEVICE", "auto"))[0]


def cpu_line() -> str:
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    # The services run on JACOBIAN_SERVICE_DEVICE (default auto: every visible GPU, else
    # the CPU), and so do the latency and big references (service_device).
    import torch

    setting = os.environ.get("JACOBIAN_SERVICE_DEVICE", "auto")
    if service_device().type == "cpu":
        return f"{os.cpu_count()} CPU cores ({model}), services on the CPU (device {setting})"
    return (f"{os.cpu_count()} CPU cores ({model}), services on {torch.cuda.device_count()} x "
            f"{torch.cuda.get_device_name(0)} (device {setting})")


# ---------------------------------------------------------------------- lean client


class RawConnection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to post a
    prebuilt request and read a ``Content-Length`` response. Far cheaper per request than
    httpx, so a load generator sharing two cores with the server steals less from it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(LOOPBACK, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def post(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
        if b"content-length" not in headers:
            raise RuntimeError("response without Content-Length")
        body = await self.reader.readexactly(int(headers[b"content-length"]))
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body


def raw_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
