"""A/B: one small ``mlp`` Jacobian's latency on two source trees' services, side by side.

    python -m bench.ab OLD_TREE NEW_TREE [--rounds 30] [--calls 50] [--format npy,json]

Each tree (a checkout with ``service/`` and ``client/``: ``git archive main | tar -x -C
/tmp/base`` makes one) serves with its own code on its own port, in the process layout
(``serve``), one front end (``WORKERS=1``) and one torch thread, so that what differs is
the code. Calls alternate between the two round by round (the order shuffled each round,
seeded), each from one keep-alive connection of a lean blocking client, so the machine's
drifting load (other jobs on a shared machine) hits both alike: absolute times move from
run to run, the ratio of the medians holds. Every answer is checked against in-process
``torch.func.jacrev`` first.

Run it with one tree twice first (``python -m bench.ab T T``): the ratio it prints is
what noise alone gives on this machine. On the loaded 2-core VM that was 1.04-1.09,
the server started second being the slower one: the new tree's server starts first,
so that such a bias counts against the change, never for it.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jacobian_service.procfs import cpu_seconds

from ._server import LOOPBACK, free_port, json_request, npy_bytes, process_label, tree_pids

PATH = "/v1/functions/mlp/jacobian"
HEADERS = {
    "npy": {"content-type": "application/x-npy", "accept": "application/x-npy"},
    "json": {"content-type": "application/json", "accept": "application/json"},
}


class Lean:
    """One keep-alive HTTP/1.1 connection, blocking: a prebuilt request out, a
    ``Content-Length`` response in (the cheapest client: it shares the cores)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def call(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(l.split(b":", 1)[1]) for l in lines if l.lower().startswith(b"content-length:"))
        while len(rest) < length:
            rest += self._recv()
        self.buf = rest[length:]
        return int(lines[0].split()[1]), rest[:length]

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


def request_bytes(port: int, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {PATH} HTTP/1.1", f"Host: {LOOPBACK}:{port}", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def start(tree: Path, log: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(tree / p) for p in ("service", "client", "."))
    env.update({"JACOBIAN_SERVICE_DEVICE": "cpu", "JACOBIAN_SERVICE_WORKERS": "1",
                "JACOBIAN_SERVICE_TORCH_THREADS": "1", "JACOBIAN_SERVICE_LOG_FORMAT": "text", **env_extra})
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jacobian_service.cli", "serve", "--host", LOOPBACK,
                                 "--port", str(port)], env=env, cwd=tree, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    return proc, port


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2) as s:
                s.sendall(f"GET /readyz HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


def stop(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """Stop servers started by :func:`start`: all told at once, then each waited for
    (killed after 30 s)."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=50, help="calls per tree per round")
    p.add_argument("--format", default="npy,json")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for both servers (JACOBIAN_SERVICE_...)")
    p.add_argument("--keep", type=float, default=0, help="seconds to keep the servers up after (for a profiler)")
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    extra = dict(kv.split("=", 1) for kv in args.env)

    import torch

    from jacobian_service.examples import mlp

    torch.set_num_threads(1)
    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    J = torch.func.jacrev(mlp)(torch.from_numpy(x)).numpy()
    bodies = {"npy": npy_bytes(x), "json": json_request(x)}

    trees = {"new": args.new.resolve(), "old": args.old.resolve()}  # started in this order (see above)
    tmp = Path(tempfile.mkdtemp(prefix="jacobian-ab-"))
    procs = {name: start(tree, tmp / f"{name}.log", extra) for name, tree in trees.items()}
    try:
        for name, (proc, port) in procs.items():
            wait_ready(proc, port, tmp / f"{name}.log")
        clients = {name: Lean(port) for name, (_, port) in procs.items()}
        requests = {(name, f): request_bytes(procs[name][1], bodies[f], HEADERS[f]) for name in trees for f in formats}
        for (name, f), req in requests.items():  # right answers first, and warm
            for _ in range(20):
                status, body = clients[name].call(req)
            if status != 200:
                raise RuntimeError(f"{name} {f}: {status} {body[:300]!r}")
            got = np.load(io.BytesIO(body)) if f == "npy" else np.asarray(__import__("orjson").loads(body)["jacobian"]["data"], np.float32)
            if got.shape != J.shape or not np.allclose(got, J, rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"{name} {f}: the answer differs from in-process jacrev")
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in requests}
        # CPU seconds by role (front end, engine, supervisor) over each tree's calls
        pids = {name: [(process_label(p), p) for p in tree_pids(proc.pid)] for name, (proc, _) in procs.items()}
        cpu: dict[tuple[str, str], dict[str, float]] = {key: {} for key in requests}
        rng = random.Random(0)
        keys = list(requests)
        for _ in range(args.rounds):
            for key in rng.sample(keys, len(keys)):
                client, req, out = clients[key[0]], requests[key], samples[key]
                before = [(role, cpu_seconds(p) or 0.0) for role, p in pids[key[0]]]
                for _ in range(args.calls):
                    t = time.perf_counter()
                    client.call(req)
                    out.append(time.perf_counter() - t)
                for (role, b), (_, p) in zip(before, pids[key[0]]):
                    cpu[key][role] = cpu[key].get(role, 0.0) + (cpu_seconds(p) or 0.0) - b
        print(f"# A/B: mlp Jacobian, 1 front end, 1 torch thread, {args.rounds} rounds x {args.calls} calls, "
              f"medians in ms (old {trees['old']}, new {trees['new']})")
        for f in formats:
            old, new = (statistics.median(samples[(n, f)]) * 1e3 for n in ("old", "new"))
            p90 = {n: float(np.percentile(samples[(n, f)], 90)) * 1e3 for n in ("old", "new")}
            print(f"{f:5s} old {old:.3f} (p90 {p90['old']:.3f})  new {new:.3f} (p90 {p90['new']:.3f})  "
                  f"new/old {new / old:.3f}")
            for n in ("old", "new"):
                calls = len(samples[(n, f)])
                roles = ", ".join(f"{role} {seconds / calls * 1e6:.0f}" for role, seconds in sorted(cpu[(n, f)].items())
                                  if role in ("front end", "engine", "supervisor"))
                print(f"      {n} CPU us per call: {roles}")
        if args.keep:
            print(f"servers: old :{procs['old'][1]} new :{procs['new'][1]}; kept up {args.keep:g} s", flush=True)
            time.sleep(args.keep)
        for c in clients.values():
            c.close()
    finally:
        stop(proc for proc, _ in procs.values())
    return 0


if __name__ == "__main__":
    sys.exit(main())
