"""Stream a large Jacobian to a file through the SDK and compare with plain loopback copies.

What it shows (issue 3): a Jacobian larger than the memory either side should spend on
it (default ``softmax`` at n = 23,000, float32: 2.1 GB) flows from a real server
subprocess into a ``.npy`` file via ``Client.jacobian(..., out=...)`` while the server's
and the client's resident memory barely grow (goal: <= 256 MB each), and how its MB/s
compares with moving the same number of bytes over loopback without any compute:

* ``raw tcp``: a socket sender thread -> socket receiver writing the file (the floor
  of this machine's loopback + disk path);
* ``http``: the same bytes from a minimal ASGI app under uvicorn, read by httpx in
  streaming mode and written to the file (the HTTP stack alone, no compute, no SDK);
* ``sdk``: the real service computing and streaming the Jacobian, the SDK writing it.

Peak RSS growth is measured by resetting the kernel's high-water mark
(``/proc/PID/clear_refs`` = 5) before each transfer and reading ``VmHWM`` after, with a
sampling thread as a fallback. Linux only.

Usage: ``python bench/stream_bench.py [--n 23000] [--dir /tmp] [--chunk-size N]``.
Start small (``--n 4000``) to check the set-up; every file is deleted after use.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "client"))  # run from a checkout without installing
sys.path.insert(0, str(ROOT))  # the bench package, run as a script

from jacobian_client import Client  # noqa: E402
from jacobian_client.wire import npy_nbytes  # noqa: E402

from bench._server import process_label, tree_pids  # noqa: E402

MiB = 1 << 20
PIECE = 1 << 20  # bytes per write in the baselines


# --------------------------------------------------------------------------- memory


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as fp:
        for line in fp:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak RSS growth of one process over a ``with`` block, in bytes."""

    def __init__(self, pid: int | str = "self") -> None:
        self.pid = pid
        self.growth = 0
        self._sampled = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as fp:
                fp.write("5")  # reset VmHWM to the current RSS
            self._reset = True
        except OSError:
            self._reset = False
        self.base = _status_kib(self.pid, "VmRSS")
        self._sampled = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self._sampled = max(self._sampled, _status_kib(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        peak = self._sampled
        if self._reset:
            peak = max(peak, _status_kib(self.pid, "VmHWM"))
        self.growth = (peak - self.base) * 1024


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(port: int, extra_env: dict[str, str], args: list[str]) -> subprocess.Popen[bytes]:
    """``jacobian-service serve`` as the README runs it: a supervisor, front ends, an engine."""
    env = {**os.environ, "JACOBIAN_SERVICE_WARMUP": "false", "JACOBIAN_SERVICE_DEVICE": "cpu",
           "JACOBIAN_SERVICE_LOG_LEVEL": "warning", **extra_env}
    return subprocess.Popen([sys.executable, "-m", "jacobian_service.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port), *args], env=env, cwd=ROOT)


def service_processes(pid: int) -> dict[str, int]:
    """The server's processes by role: supervisor, front end(s), engine, spare engine."""
    out: dict[str, int] = {}
    for p in tree_pids(pid):
        role = process_label(p)
        if role in ("resource tracker", "gone"):
            continue
        out[f"{role} {sum(r.startswith(role) for r in out)}" if role.endswith(("front end", "engine")) else role] = p
    return out


def start_plain_http(port: int, nbytes: int) -> subprocess.Popen[bytes]:
    """A minimal ASGI app (no framework) streaming ``nbytes`` of zeros in 1 MiB pieces."""
    code = f"""
import uvicorn
PIECE = bytes({PIECE})
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    n = {nbytes}
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"), (b"content-length", str(n).encode())]}})
    while n > 0:
        piece = PIECE if n >= len(PIECE) else PIECE[:n]
        n -= len(piece)
        await send({{"type": "http.response.body", "body": piece, "more_body": n > 0}})
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning")
"""
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- transfers


def raw_tcp(nbytes: int, path: Path) -> float:
    """Seconds to move ``nbytes`` through a loopback socket into ``path``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def sender() -> None:
        conn, _ = listener.accept()
        piece = bytes(PIECE)
        left = nbytes
        with conn:
            while left > 0:
                n = min(left, PIECE)
                conn.sendall(piece[:n] if n < PIECE else piece)
                left -= n

    thread = threading.Thread(target=sender, daemon=True)
    started = time.perf_counter()
    thread.start()
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "wb") as fp:
        buf = bytearray(PIECE)
        view = memoryview(buf)
        while got < nbytes:
            n = sock.recv_into(view)
            if n == 0:
                break
            fp.write(view[:n])
            got += n
    elapsed = time.perf_counter() - started
    thread.join()
    listener.close()
    assert got == nbytes, (got, nbytes)
    return elapsed


def plain_http(url: str, nbytes: int, path: Path) -> float:
    started = time.perf_counter()
    got = 0
    with httpx.stream("GET", url, timeout=600) as response, open(path, "wb") as fp:
        for piece in response.iter_bytes():
            fp.write(piece)
            got += len(piece)
    elapsed = time.perf_counter() - started
    assert got == nbytes, (got, nbytes)
    return elapsed


def measured(label: str, nbytes: int, path: Path, run: Callable[[], Any], server_pids: dict[str, int] | None,
             check: Callable[[Path], None] | None = None) -> dict[str, Any]:
    servers = {role: PeakRSS(pid) for role, pid in (server_pids or {}).items()}
    with PeakRSS() as client:
        for s in servers.values():
            s.__enter__()
        try:
            started = time.perf_counter()
            run()
            elapsed = time.perf_counter() - started
        finally:
            for s in servers.values():
                s.__exit__(None, None, None)
    size = path.stat().st_size
    try:
        if check is not None:
            check(path)
    finally:
        path.unlink()
    assert size == nbytes, (label, size, nbytes)
    return {"label": label, "seconds": elapsed, "mbps": nbytes / MiB / elapsed, "client": client.growth,
            "server": max((s.growth for s in servers.values()), default=None),
            "processes": {role: s.growth for role, s in servers.items()}}


def spot_check(path: Path, x: np.ndarray) -> None:
    """A few rows of the written file against the closed form ``diag(s) - s s^T``."""
    J = np.load(path, mmap_mode="r")
    s = np.exp(x.astype(np.float64) - x.max())
    s /= s.sum()
    for r in (0, len(x) // 2, len(x) - 1):
        want = -s[r] * s
        want[r] += s[r]
        np.testing.assert_allclose(J[r], want, atol=1e-6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=23000, help="softmax input size; the Jacobian is n*n float32")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the (deleted) output files go")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per vmap chunk on the server")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--runs", type=int, default=5, help="service transfers in a row (each must meet the goal)")
    p.add_argument("--workers", type=int, default=None, help="front ends of the service (serve --workers)")
    args = p.parse_args(argv)

    n = args.n
    nbytes = npy_nbytes((n, n), "float32")
    out = Path(args.dir) / f"stream_bench_{os.getpid()}.npy"
    print(f"softmax n={n}: Jacobian {n}x{n} float32 = {nbytes / MiB:,.1f} MiB (.npy incl. header)")

    rows = []
    rows.append(measured("raw tcp (no compute)", nbytes, out, lambda: raw_tcp(nbytes, out), None))

    http_port = free_port()
    plain = start_plain_http(http_port, nbytes)
    try:
        url = f"http://127.0.0.1:{http_port}/"
        wait_http(url)
        rows.append(measured("http uvicorn+httpx (no compute)", nbytes, out, lambda: plain_http(url, nbytes, out),
                             {"server": plain.pid}))
    finally:
        stop(plain)

    port = free_port()
    service = start_service(port, {}, ["--workers", str(args.workers)] if args.workers else [])
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz")
        x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        with Client(base, timeout=600) as client:
            client.jacobian("softmax", x[:64])  # warm the function up (first jacrev costs ~1 s)
            for run in range(args.runs):
                rows.append(measured(
                    f"sdk out= (service computes + streams) #{run + 1}", nbytes, out,
                    lambda: client.jacobian("softmax", x, out=out, chunk_size=args.chunk_size, progress=args.progress),
                    service_processes(service.pid), check=lambda path: spot_check(path, x)))
    finally:
        stop(service)

    print(f"{'transfer':40s} {'seconds':>9s} {'MB/s':>9s} {'vs raw':>7s} "
          f"{'client peak +MiB':>17s} {'server peak +MiB':>17s}")
    floor = rows[0]["mbps"]
    for r in rows:
        server = "-" if r["server"] is None else f"{r['server'] / MiB:,.1f}"
        print(f"{r['label']:40s} {r['seconds']:9.2f} {r['mbps']:9.1f} {r['mbps'] / floor:7.2f} "
              f"{r['client'] / MiB:17.1f} {server:>17s}")
    print("\npeak RSS growth per server process (MiB), per service run:")
    for r in rows[2:]:
        print(f"  {r['label']}: " + ", ".join(f"{role} {g / MiB:.1f}" for role, g in r["processes"].items()))
    ok = all(r["client"] <= 256 * MiB and (r["server"] or 0) <= 256 * MiB for r in rows[2:])
    print(f"goal (<= 256 MiB peak RSS growth in every process, client and each server process, in each of "
          f"{args.runs} runs): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
