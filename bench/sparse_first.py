"""``python -m bench.sparse_first [--quick] [--baseline DIR]``: a sparse request's first calls.

A shape's first ``sparsity=auto`` request detects and colours its pattern; a symmetric
Jacobian's first request also colours it for JVPs read as symmetric (later requests);
the next is the engine's first JVP. Times, in-process on a warmed engine (its warm-up's
reverse-mode Jacobian and ``engine.sparse.preload``, as an engine process starts), the
CPU seconds of each of the first three requests of:

- 3-D Laplacians ``lap(u) + u^3`` on 20 x 20 x 20 grids, Dirichlet (``F.pad``) and
  periodic (``torch.roll``; 20 is no multiple of 7: greedy and tabu), and their energy's
  Hessian;
- the colourings alone (``hessian_coloring``) of 3-D and 2-D stencils.

Each answer is checked against ``torch.func`` (a grid of 8^3 for jacrev: the same code).
``--baseline DIR`` runs the same measurements with another tree's ``service`` directory
on ``sys.path`` (``/work/main/service``) in a subprocess, and prints both side by side
with their ratio: the before/after of a change to the colourings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .sparse_steady import _torch_fns


def _measure(quick: bool) -> dict[str, float]:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from jacobian_service.engine.core import Engine
    from jacobian_service.engine.sparse import preload
    from jacobian_service.registry import FunctionSpec, Input
    from jacobian_service.sparsity import coloring
    from jacobian_service.sparsity.acyclic import most_summed
    from jacobian_service.sparsity.patterns import Pattern
    from jacobian_service.types import Call

    n = 8 if quick else 20

    fns = _torch_fns(torch)  # (the same 3-D Laplacians and energy as sparse_steady's)

    engine = Engine(torch.device("cpu"), 256 << 20)
    preload()
    engine.jacobian(Call(FunctionSpec("_prime", torch.sin, (Input("x", shape=(3,)),)), [np.ones(3, np.float32)], ["float32"]))
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for name in ("lap3d_pad", "lap3d_roll", "energy3d"):
        fn, kind = fns[name]
        spec = FunctionSpec(f"{name}_first", fn, (Input("u", shape=(n, n, n), dtype="float64"),))
        for i in range(3):
            x = rng.standard_normal((n, n, n))
            call = Call(spec, [x], ["float64"], sparsity="auto", mode="auto", deadline=time.monotonic() + 300)
            t = time.process_time()
            res = engine.jacobian(call) if kind == "jacobian" else engine.hessian(call)
            out[f"{name} request {i + 1}"] = time.process_time() - t
            if i == 2 and n <= 8:  # (a dense check where it is cheap)
                xt = torch.tensor(x)
                want = (torch.func.jacrev(fn)(xt) if kind == "jacobian" else torch.func.hessian(fn)(xt)).reshape(n**3, n**3)
                err = float(np.abs(res.value.toarray() - want.numpy()).max())
                assert err < 1e-9, (name, err)
        out[f"{name} products"] = float(res.sparse_meta["products"])

    def grid(shape):
        idx = np.arange(int(np.prod(shape))).reshape(shape)
        rows, cols = [idx.ravel()], [idx.ravel()]
        for axis in range(len(shape)):
            for step in (1, -1):
                a, b = [slice(None)] * len(shape), [slice(None)] * len(shape)
                a[axis] = slice(max(0, -step), shape[axis] - max(0, step))
                b[axis] = slice(max(0, step), shape[axis] - max(0, -step))
                rows.append(idx[tuple(a)].ravel())
                cols.append(idx[tuple(b)].ravel())
        key = np.unique(np.concatenate(rows) * idx.size + np.concatenate(cols))
        return Pattern((idx.size, idx.size), key // idx.size, key % idx.size)

    for shape in ((n, n, n), (30, 30) if quick else (90, 90)):
        p = grid(shape)
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            c = coloring.hessian_coloring(p, most_summed=most_summed(2.0**-52))
            best = min(best, time.process_time() - t)
        label = "x".join(map(str, shape))
        out[f"hessian_coloring {label}"] = best
        out[f"hessian_coloring {label} colours"] = float(c.n_colors)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sparse_first", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8^3 grids (seconds): checks the bench runs")
    ap.add_argument("--baseline", help="another tree's service directory, measured alike in a subprocess")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # (the subprocess's output)
    args = ap.parse_args(argv)
    if args.json:
        print(json.dumps(_measure(args.quick)))
        return 0

    def run(service: str) -> dict[str, float]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([service, os.getcwd()]))
        cmd = [sys.executable, "-m", "bench.sparse_first", "--json"] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "service")
    mine = run(here)
    base = run(args.baseline) if args.baseline else None
    print("| case | CPU s (or count) | baseline | ratio baseline / this |")
    print("|---|---|---|---|")
    for key, value in mine.items():
        if base is None:
            print(f"| {key} | {value:.3f} | | |")
        else:
            b = base.get(key, float("nan"))
            ratio = b / value if value else float("nan")
            print(f"| {key} | {value:.3f} | {b:.3f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
