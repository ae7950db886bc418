"""Instructions per request of the engine process's loop (callgrind), source trees side by side.

    python -m bench.engine_callgrind TREE [TREE ...] [--batches 20] [--batch 32] [--kind jacobian_npy]

The engine's CPU per request under wrk is what issue 9's throughput is short of, and a
shared machine's times move with its other jobs; instruction counts do not. Each tree's
``EngineServer`` runs its real ``serve`` loop (batching, vmap of jacrev, the settings'
put-back, the watchers, encoding the replies) on small ``mlp`` Jacobians, its socket faked:
each poll, once the previous batch has been answered, hands it ``--batch`` jobs as front
ends encode them (``ipc.encode_call``; two front ends, alternating), and each send is laid
out as the channel does (``channel.encode_messages``, large frames in sealed memfds, or a
shared segment's blocks in trees before them, given back at once). Kernel I/O is not in it. Only the measured batches are
counted (``--toggle-collect`` on ``sys.call_tracing``); batches of a few sizes have been
run first, so that the counted ones meet warm caches, as under load. Under callgrind torch
loads for minutes: ``--native ROUNDS`` runs the same loop natively instead, the trees
interleaved round by round, and prints CPU microseconds per request (medians: on a
loaded machine they move by 10 % and more between runs). ``ENGINE_BENCH_PYSPY=FILE``
(with ``--native``) records py-spy's raw samples of the measured loop (cProfile cannot:
the engine puts a profile function back after each batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class _Done(Exception):
    pass


def _drive(tmp: Path, batches: int, size: int, kind: str) -> None:
    """The measured process: an engine's serve loop over ``batches`` batches of ``size``."""
    import gc

    import numpy as np
    import torch
    from jacobian_service import channel, ipc
    from jacobian_service.engine.process import EngineServer
    from jacobian_service.registry import Registry
    from jacobian_service.settings import Settings
    from jacobian_service.types import Call

    settings = Settings()
    torch.set_num_threads(1)
    registry = Registry.from_modules(settings.function_modules)
    server = EngineServer(settings, registry, torch.device("cpu"))
    server.engine.take_settings()
    server.board = ipc.StatusBoard(tmp / f"engine-{os.getpid()}.status", create=True)
    spec = registry.get("mlp")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(128).astype(np.float32) for _ in range(max(size, 8))]
    expected = torch.func.jacrev(spec.fn)(torch.from_numpy(xs[0])).numpy()

    # Each job as a front end encodes it (made before the count: the front end's work)
    jobs = [[bytes(f) for f in ipc.encode_call(i + 1, kind, Call(
        spec=spec, args=[x], dtypes=["float32"], max_result_bytes=settings.max_result_bytes, stream_room=64 << 20,
        deadline=time.monotonic() + 3600), tag=f"t{i}")] for i, x in enumerate(xs)]

    class Listener:
        """The socket, faked: a batch's jobs per poll once the last batch is answered."""

        def __init__(self) -> None:
            self.peers = [object(), object()]
            self.ran_on: list[set[str]] = [set(), set()]  # (the functions run since each peer's count matched)
            # Where results go, as the tree's engine puts them: each large one in a sealed memfd
            # of its own, or (trees before it) a block of a segment. Both give back by ``used``.
            self.segment = channel.Sealed() if hasattr(channel, "Sealed") else channel.Segment(64 << 20)
            self.batches: list[int] = []
            self.waiting = 0  # replies still due for the batch handed out
            self.checked = False

        def poll(self, timeout: float) -> list[tuple[Any, list[Any]]]:
            if self.waiting or server.worker.has_work() or server.worker.running:
                return []
            if not self.batches:
                raise _Done
            n = self.batches.pop()
            self.waiting = n
            return [(self.peers[i % 2], jobs[i]) for i in range(n)]  # (ids are free again: the last batch was answered)

        def send(self, peer: Any, messages: Any) -> None:
            buffers, _ = channel.encode_messages(messages, self.segment.place)
            for frames in messages:
                header = ipc.parse(frames)[0]
                if header["t"] != "result":
                    raise RuntimeError(f"answered {header}")
                if not self.checked:
                    self.checked = True
                    got = ipc.decode_reply(*ipc.parse(frames))[0].value
                    if not np.allclose(got, expected, rtol=1e-5, atol=1e-6):
                        raise RuntimeError("the answer differs from in-process jacrev")
                self.waiting -= 1
            for offset in list(self.segment.used):  # the front end reads and gives back at once
                self.segment.give_back(offset)
            del buffers

        def lost(self) -> None:
            return None

        def ran(self, function: str) -> None:  # (as channel.Listener.ran: each connection's set)
            for seen in self.ran_on:
                seen.add(function)

        def robbed(self) -> None:  # (no function reads this fake's jobs: channel.Listener.robbed's None)
            return None

    server.listener = Listener()  # type: ignore[assignment]

    def serve(counts: list[int]) -> None:
        server.listener.batches = list(reversed(counts))  # type: ignore[attr-defined]
        try:
            server.serve()
        except _Done:
            pass

    # Warm: first calls, batch statistics, and batches of several sizes (vmap's caches)
    serve([1, 1, 2, 4, 8, size, size, size, size])
    gc.collect()
    gc.freeze()
    cpu = time.process_time()
    if os.environ.get("ENGINE_BENCH_PYSPY"):  # where the time goes: py-spy's samples (the put-back undoes cProfile)
        subprocess.Popen(["py-spy", "record", "-p", str(os.getpid()), "-r", "400", "-f", "raw", "-o",
                                os.environ["ENGINE_BENCH_PYSPY"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        cpu = time.process_time()
    sys.call_tracing(serve, ([size] * batches,))
    cpu = time.process_time() - cpu
    print(f"cpu_us_per_request {cpu / (batches * size) * 1e6:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_callgrind", description=__doc__.splitlines()[0])
    p.add_argument("trees", type=Path, nargs="+")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch", type=int, default=32, help="requests per batch")
    p.add_argument("--kind", default="jacobian_npy", help="the job kind (jacobian_npy: .npy requests; jacobian: JSON)")
    p.add_argument("--native", type=int, default=0, metavar="ROUNDS", help="CPU time natively, ROUNDS interleaved")
    p.add_argument("--drive", type=Path, help=argparse.SUPPRESS)  # (the measured process)
    args = p.parse_args(argv)
    if args.drive is not None:
        _drive(args.drive, args.batches, args.batch, args.kind)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="jacobian-engine-callgrind-"))

    def command(tree: Path) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=os.pathsep.join(str(tree / d) for d in ("service", "client", ".")),
                   JACOBIAN_SERVICE_MAX_BATCH_SIZE="64", JACOBIAN_SERVICE_DEVICE="cpu", OMP_NUM_THREADS="1")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        # (this file run as a script: the measured tree's own bench may not have it)
        return [sys.executable, str(Path(__file__).resolve()), str(tree), "--drive", str(tmp), "--batch", str(args.batch),
                "--kind", args.kind], env

    trees = [tree.resolve() for tree in args.trees]
    if args.native:
        cpu: dict[Path, list[float]] = {tree: [] for tree in trees}
        for r in range(args.native):
            for tree in trees if r % 2 == 0 else trees[::-1]:
                cmd, env = command(tree)
                out = subprocess.run([*cmd, "--batches", str(args.batches)], env=env, cwd=tree, capture_output=True,
                                     text=True, check=True).stdout
                cpu[tree].append(float(out.split("cpu_us_per_request")[1].split()[0]))
                print(f"round {r} {tree}: {cpu[tree][-1]:.1f} us a request", flush=True)
        for tree in trees:
            print(f"{tree}: median {statistics.median(cpu[tree]):.1f} us of CPU a request (batches of {args.batch})")
        return 0
    for tree in trees:
        command_, env = command(tree)
        subprocess.run([*command_, "--batches", "1"], env=env, cwd=tree, check=True, capture_output=True)  # .pyc written
        out = subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no",
                              "--toggle-collect=_PyEval_CallTracing", f"--callgrind-out-file={tmp}/callgrind-{tree.name}.out",
                              *command_, "--batches", str(args.batches)],
                             env=env, cwd=tree, capture_output=True, text=True, check=False)
        line = next((x for x in out.stderr.splitlines() if "Collected" in x), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-3000:])
        total = int(line.split()[-1])
        print(f"{tree}: {total // (args.batches * args.batch):,} instructions a request "
              f"({total // args.batches:,} a batch of {args.batch}); {tmp}/callgrind-{tree.name}.out", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
