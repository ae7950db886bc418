"""Instructions per request of the front end's app (callgrind), for source trees side by side.

    python -m bench.fe_callgrind TREE [TREE ...] [--requests 300] [--format npy|json]

Times on a shared machine move with its other jobs (this VM ran at load 10-19 for hours);
instruction counts do not. Each tree's app is built as a served front end builds it
(``create_app`` over a run directory's ``registry.json``, no torch, multiprocess metrics),
its engines faked behind the real IPC codec (``ipc.encode_call`` of each job, a prebuilt
reply through ``ipc.parse`` / ``decode_reply``), and posts small ``mlp`` Jacobians over
``.npy`` (or JSON, ``--format json``: the request's 128 numbers parsed, the answer's
8,192 written as text) through the whole ASGI stack (middleware, routing, parsing,
encoding, metrics, the access line). uvicorn, the event loop's I/O and the channel's sockets are not in it.
Only the measured loop is counted (``--toggle-collect`` on ``sys.call_tracing``): start-up,
which varies by more than a request costs, is left out. Counts of one tree repeat to within
~0.5 %.

``--timed ROUNDS`` runs the same loop natively instead (no valgrind), the trees interleaved
round by round, and splits each request's time at its job: from the request to the job
encoded for the engine ("in"), and from the engine's reply to the answer's last body handed
to the server ("out": what a lone request waits for after its compute), medians in us.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MEDIA = {"npy": b"application/x-npy", "json": b"application/json"}


def _headers(fmt: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"content-type", MEDIA[fmt]), (b"accept", MEDIA[fmt])]


def _registry(run_dir: Path) -> None:
    """registry.json as engine 0 writes it (this needs torch: outside callgrind)."""
    import orjson

    from jacobian_service.registry import Registry
    from jacobian_service.settings import Settings

    registry = Registry.from_modules(Settings().function_modules)
    doc = {"functions": [spec.describe() for spec in registry], "devices": ["cpu"], "torch": "", "torch_threads": 1}
    (run_dir / "registry.json").write_bytes(orjson.dumps(doc))


def _drive(run_dir: Path, requests: int, fmt: str = "npy", timed: bool = False) -> None:
    """The measured process: the app, a faked engine, ``requests`` requests (``timed``:
    natively, not counted; prints the medians of each request's two halves)."""
    import gc
    import time

    from jacobian_service import ipc
    from jacobian_service.app import create_app
    from jacobian_service.settings import Settings
    from jacobian_service.types import JobInfo, Result

    app = create_app(Settings(), run_dir=run_dir, channel=object())
    rng = np.random.default_rng(0)
    jac = rng.standard_normal((64, 128)).astype(np.float32)
    x = rng.standard_normal(128).astype(np.float32)
    if fmt == "json":
        from jacobian_client import wire

        body = wire.dumps({"inputs": [wire.encode_tree(x)]})
    else:
        buf = io.BytesIO()
        np.save(buf, x)
        body = buf.getvalue()
    reply = [bytes(f) for f in ipc.encode_reply(1, Result(value=jac, chunk_size=64, mode="rev"),
                                                JobInfo(device="cpu", batch_size=1, queue_s=1e-4, compute_s=2e-4))]

    stamps: dict[str, float] = {}
    halves: list[tuple[float, float]] = []

    async def run(kind, call, **_):
        ipc.encode_call(1, kind, call)
        if timed:
            stamps["job"] = time.perf_counter()
        await asyncio.sleep(0)
        if timed:
            stamps["reply"] = time.perf_counter()
        return ipc.decode_reply(*ipc.parse(reply))

    app.service_state.engines.run = run
    headers = [*_headers(fmt), (b"content-length", str(len(body)).encode())]

    async def one() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "server": ("127.0.0.1", 8000),
                 "client": ("127.0.0.1", 5555), "scheme": "http", "method": "POST", "root_path": "",
                 "path": "/v1/functions/mlp/jacobian", "raw_path": b"/v1/functions/mlp/jacobian", "query_string": b"",
                 "headers": list(headers)}
        sent: list = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)
            if timed and message["type"] == "http.response.body" and not message.get("more_body", False):
                stamps["answered"] = time.perf_counter()

        started = time.perf_counter() if timed else 0.0
        await app(scope, receive, send)
        if sent[0]["status"] != 200:
            raise RuntimeError(f"answered {sent}")
        if timed:
            halves.append((stamps["job"] - started, stamps["answered"] - stamps["reply"]))

    async def loop(n: int) -> None:
        for _ in range(n):
            await one()
        # The access log writes its lines a batch at a time (logs.BatchedStreamHandler),
        # formatting them then, from a timer on the loop of a batch's first line: the warm
        # loop's last batch, its timer gone with that loop, left every later line waiting
        # for a batch of 256, so a run counted the lines' formatting (~30,000 instructions
        # a request) or not, as the warm-up's timing fell. Each loop ends with its lines
        # written: each measured request's line is formatted in the measured loop.
        for handler in logging.getLogger("jacobian_service.access").handlers:
            handler.flush()

    gc.collect()
    gc.freeze()
    asyncio.run(loop(50))  # warm: caches, templates, learnt places
    if timed:
        asyncio.run(loop(250))
        halves.clear()
        asyncio.run(loop(requests))
        ins, outs = (sorted(h[i] for h in halves)[len(halves) // 2] * 1e6 for i in (0, 1))
        print(f"timed_us in {ins:.1f} out {outs:.1f}", flush=True)
        return
    sys.call_tracing(asyncio.run, (loop(requests),))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fe_callgrind", description=__doc__.splitlines()[0])
    p.add_argument("trees", type=Path, nargs="+")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--format", choices=sorted(MEDIA), default="npy", help="the request's and the answer's (default npy)")
    p.add_argument("--timed", type=int, default=0, metavar="ROUNDS",
                   help="natively, ROUNDS interleaved: the request's time split at its job (medians, us)")
    p.add_argument("--drive", type=Path, help=argparse.SUPPRESS)  # (the measured process)
    args = p.parse_args(argv)
    if args.drive is not None:
        _drive(args.drive, args.requests, args.format, timed=args.timed > 0)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="jacobian-fe-callgrind-"))
    _registry(tmp)

    def command_env(tree: Path) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=os.pathsep.join(str(tree / d) for d in ("service", "client", ".")),
                   PROMETHEUS_MULTIPROC_DIR=str(Path(tempfile.mkdtemp(dir=tmp))))
        # (this file run as a script: the measured tree's own bench may not have it)
        return [sys.executable, str(Path(__file__).resolve()), str(tree), "--drive", str(tmp), "--format", args.format], env

    if args.timed:
        trees = [tree.resolve() for tree in args.trees]
        split: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
        for r in range(args.timed):
            for tree in trees if r % 2 == 0 else trees[::-1]:
                command, env = command_env(tree)
                out = subprocess.run([*command, "--requests", str(args.requests), "--timed", "1"], env=env, cwd=tree,
                                     capture_output=True, text=True, check=True).stdout
                words = out.split("timed_us", 1)[1].split()
                split[tree].append((float(words[1]), float(words[3])))
        for tree in trees:
            ins, outs = (statistics.median(s[i] for s in split[tree]) for i in (0, 1))
            print(f"{tree}: request -> job {ins:.1f} us, reply -> answer {outs:.1f} us ({args.format}, "
                  f"medians of {args.timed} runs of {args.requests})", flush=True)
        return 0
    for tree in args.trees:
        tree = tree.resolve()
        command, env = command_env(tree)
        subprocess.run([*command, "--requests", "1"], env=env, cwd=tree, check=True, capture_output=True)  # .pyc written
        env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(tempfile.mkdtemp(dir=tmp)))
        out = subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no",
                              "--toggle-collect=_PyEval_CallTracing", f"--callgrind-out-file={tmp}/callgrind.out",
                              *command, "--requests", str(args.requests)],
                             env=env, cwd=tree, capture_output=True, text=True, check=False)
        line = next((x for x in out.stderr.splitlines() if "Collected" in x), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(out.stderr[-3000:])
        print(f"{tree}: {int(line.split()[-1]) // args.requests:,} instructions a request ({args.format})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
