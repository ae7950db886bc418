"""``python -m bench.sparse_steady [--quick] [--baseline DIR] [--asdex PATH] [--dense]``: a
repeated sparse request's time, its pattern and colouring cached.

In process, on a warmed engine (``Engine.jacobian`` / ``Engine.hessian``, as an engine
process answers a request, without IPC and HTTP), 1 torch thread, float64, the median
wall time of ``--rounds`` requests at fresh random points after 3 untimed ones, and the
split of each request between its stages (the compressed products under ``vmap``, their
decompression, the CSR, the check that proves JVPs jacrev's):

- 3-D Laplacians ``lap(u) + u^3`` on 20 x 20 x 20 grids, Dirichlet (``F.pad``) and
  periodic (``torch.roll``), and their energy's Hessian (as ``bench.sparse_first``);
- lorenz96's right-hand side, n = 8,192.

``--baseline DIR`` measures another tree's ``service`` directory (``/work/main/service``)
the same way, runs alternating with this tree's (A B A B: the shared machine's load falls
on both alike), and prints both medians and their ratio. ``--asdex PATH`` adds asdex
(JAX, ``jax.jit`` of its compressed products, float64, CPU; ``PATH``: a directory
holding it, appended to ``sys.path`` so that the environment's numpy stays first) on the
same functions written in JAX; ``--dense`` adds ``torch.func.jacrev`` / ``hessian``
(one call: seconds); ``--compiled`` adds the same compressed products outside the
engine, the engine's own colouring's seeds under ``vmap`` of ``jvp`` (forward, read as
symmetric, Hessians: of ``grad``) or ``vjp`` (reverse), eager and under
``torch.compile`` (inductor, ``dynamic=False``; its first call's CPU seconds reported),
each compiled product checked against the eager one, and one against central
differences (a VJP: against jacrev's rows). Every answer of this tree is checked against
the baseline's bit for bit (a hash of each answer's CSR arrays at the same points), and against dense
``torch.func`` on an 8^3 grid with ``--quick``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

CASES = ("lap3d_pad", "lap3d_roll", "energy3d", "lorenz96")


def _torch_fns(torch):
    def lap_pad(u):
        p = torch.nn.functional.pad(u, (1, 1, 1, 1, 1, 1))
        return (p[2:, 1:-1, 1:-1] + p[:-2, 1:-1, 1:-1] + p[1:-1, 2:, 1:-1] + p[1:-1, :-2, 1:-1]
                + p[1:-1, 1:-1, 2:] + p[1:-1, 1:-1, :-2] - 6 * u) + u**3

    def lap_roll(u):
        return sum(torch.roll(u, s, d) for d in range(3) for s in (1, -1)) - 6 * u + u**3

    def energy(u):
        return -(u * lap_pad(u)).sum() / 2 + (u**4).sum() / 2

    def lorenz96(x):
        return (torch.roll(x, -1) - torch.roll(x, 2)) * torch.roll(x, 1) - x + 8.0

    return {"lap3d_pad": (lap_pad, "jacobian"), "lap3d_roll": (lap_roll, "jacobian"),
            "energy3d": (energy, "hessian"), "lorenz96": (lorenz96, "jacobian")}


def _shape(case: str, n: int) -> tuple[int, ...]:
    return (n * 1024,) if case == "lorenz96" else (n, n, n)


def _measure(quick: bool, rounds: int, compiled: bool = False) -> dict[str, object]:
    import collections
    import functools

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from jacobian_service.engine.core import Engine
    from jacobian_service.engine.sparse import preload
    from jacobian_service.registry import FunctionSpec, Input
    from jacobian_service.sparsity import compute, verify
    from jacobian_service.types import Call

    n = 8 if quick else 20
    # Stage times: wrappers around the stages' functions (a few microseconds each)
    spent: collections.Counter[str] = collections.Counter()

    def timed(owner, name, label):
        f = getattr(owner, name)

        @functools.wraps(f)
        def w(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t

        setattr(owner, name, w)

    timed(compute._Products, "compressed", "products")
    used: list[object] = []  # (the last request's colouring: --compiled runs its seeds)
    real_compressed = compute._Products.compressed

    def capture(self, *a, **k):
        used[:] = [self.coloring]
        return real_compressed(self, *a, **k)

    compute._Products.compressed = capture
    timed(compute._Products, "values", "decompress")
    timed(compute._Products, "unsolvable", "decompress")
    timed(compute, "_to_csr", "csr")
    timed(compute, "differs_from_reverse", "jvp check (a VJP)")
    del verify

    engine = Engine(torch.device("cpu"), 256 << 20)
    preload()
    engine.jacobian(Call(FunctionSpec("_prime", torch.sin, (Input("x", shape=(3,)),)), [np.ones(3, np.float32)], ["float32"]))
    out: dict[str, object] = {}
    for case, (fn, kind) in _torch_fns(torch).items():
        shape = _shape(case, n)
        spec = FunctionSpec(f"{case}_steady", fn, (Input("u", shape=shape, dtype="float64"),))
        rng = np.random.default_rng(0)
        digest = hashlib.sha256()
        times = []
        spent.clear()
        for i in range(3 + rounds):
            if i == 3:
                spent.clear()
            x = rng.standard_normal(shape)
            call = Call(spec, [x], ["float64"], sparsity="auto", mode="auto", deadline=time.monotonic() + 300)
            t = time.perf_counter()
            res = engine.jacobian(call) if kind == "jacobian" else engine.hessian(call)
            if i >= 3:
                times.append(time.perf_counter() - t)
            v = res.value
            for a in (v.data, v.indices, v.indptr):
                digest.update(np.ascontiguousarray(a).tobytes())
        if quick:  # dense torch.func at the last point
            xt = torch.tensor(x)
            want = torch.func.jacrev(fn)(xt) if kind == "jacobian" else torch.func.hessian(fn)(xt)
            err = float(np.abs(v.toarray() - want.reshape(v.shape).numpy()).max())
            assert err < 1e-9, (case, err)
        out[case] = {"median_ms": 1e3 * float(np.median(times)), "times_ms": [1e3 * t for t in times],
                     "products": int(res.sparse_meta["products"]), "nnz": int(res.sparse_meta["nnz"]),
                     "hash": digest.hexdigest()[:16],
                     "stages_ms": {k: 1e3 * v / rounds for k, v in spent.items()}}
        if compiled:
            out[case]["compiled"] = _compiled_products(fn, kind, used[0], shape, rounds)
    return out


def _compiled_products(fn, kind: str, coloring, shape: tuple[int, ...], rounds: int) -> dict[str, object]:
    """The engine's compressed products for ``coloring`` (one seed per colour), eager and
    under ``torch.compile``: median ms of each at fresh points, the first compiled call's
    CPU seconds, and the largest difference between the two."""
    import numpy as np
    import torch

    colors = torch.as_tensor(np.asarray(coloring.colors))
    seeds = (colors.unsqueeze(0) == torch.arange(coloring.n_colors).unsqueeze(1)).to(torch.float64)
    if kind == "hessian":
        def one(x, t):
            return torch.func.jvp(torch.func.grad(fn), (x,), (t.reshape(shape),))[1].reshape(-1)
    elif coloring.mode == "rev":  # (a VJP per colour of rows: lorenz96)
        def one(x, t):
            return torch.func.vjp(fn, x)[1](t.reshape(shape))[0].reshape(-1)
    else:  # fwd, or JVPs read as symmetric
        def one(x, t):
            return torch.func.jvp(fn, (x,), (t.reshape(shape),))[1].reshape(-1)

    def products(x, s):
        return torch.func.vmap(one, in_dims=(None, 0))(x, s)

    rng = np.random.default_rng(1)
    x = torch.tensor(rng.standard_normal(shape))
    t = time.process_time()
    fast = torch.compile(products, dynamic=False)
    first = fast(x, seeds)
    compile_s = time.process_time() - t
    worst = float((first - products(x, seeds)).abs().max())
    # and a colour's product against central differences (of the gradient, for a Hessian;
    # a VJP's against the same columns of jacrev's rows): float64, step 1e-6
    s0, h = seeds[0].reshape(shape), 1e-6
    if kind == "hessian":
        g = torch.func.grad(fn)
        fd = ((g(x + h * s0) - g(x - h * s0)) / (2 * h)).reshape(-1)
    elif coloring.mode == "rev":
        fd = seeds[0] @ torch.func.jacrev(fn)(x).reshape(seeds.shape[1], -1)
    else:
        fd = ((fn(x + h * s0) - fn(x - h * s0)) / (2 * h)).reshape(-1)
    fd_err = float((first[0] - fd).abs().max() / max(float(fd.abs().max()), 1e-300))
    assert fd_err < 1e-6, ("compiled product against differences", fd_err)
    eager, done = [], []
    for _ in range(3 + rounds):  # (interleaved: the machine's load falls on both alike)
        x = torch.tensor(rng.standard_normal(shape))
        t0 = time.perf_counter()
        a = products(x, seeds)
        t1 = time.perf_counter()
        b = fast(x, seeds)
        t2 = time.perf_counter()
        eager.append(t1 - t0)
        done.append(t2 - t1)
        worst = max(worst, float((a - b).abs().max()))
    return {"eager_ms": 1e3 * float(np.median(eager[3:])), "compiled_ms": 1e3 * float(np.median(done[3:])),
            "compile_cpu_s": compile_s, "max_abs_diff": worst, "fd_rel_err": fd_err, "mode": str(coloring.mode),
            "colors": int(coloring.n_colors)}


def _asdex(path: str, quick: bool, rounds: int) -> dict[str, dict[str, float]]:
    sys.path.append(path)
    import asdex
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu")

    def lap_pad(u):
        p = jnp.pad(u, 1)
        return (p[2:, 1:-1, 1:-1] + p[:-2, 1:-1, 1:-1] + p[1:-1, 2:, 1:-1] + p[1:-1, :-2, 1:-1]
                + p[1:-1, 1:-1, 2:] + p[1:-1, 1:-1, :-2] - 6 * u) + u**3

    def lap_roll(u):
        return sum(jnp.roll(u, s, d) for d in range(3) for s in (1, -1)) - 6 * u + u**3

    def energy(u):
        return -(u * lap_pad(u)).sum() / 2 + (u**4).sum() / 2

    def lorenz96(x):
        return (jnp.roll(x, -1) - jnp.roll(x, 2)) * jnp.roll(x, 1) - x + 8.0

    n = 8 if quick else 20
    out = {}
    for case, f, kind in (("lap3d_pad", lap_pad, "jacobian"), ("lap3d_roll", lap_roll, "jacobian"),
                          ("energy3d", energy, "hessian"), ("lorenz96", lorenz96, "jacobian")):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(_shape(case, n)))
        coloring = asdex.hessian_coloring(f, x) if kind == "hessian" else asdex.jacobian_coloring(f, x)
        make = asdex.hessian_from_coloring if kind == "hessian" else asdex.jacobian_from_coloring
        compute = jax.jit(make(f, coloring))
        jax.block_until_ready(jax.tree_util.tree_leaves(compute(x)))  # (compiles)
        times = []
        for _ in range(rounds):
            x = jnp.asarray(rng.standard_normal(_shape(case, n)))
            t = time.perf_counter()
            jax.block_until_ready(jax.tree_util.tree_leaves(compute(x)))
            times.append(time.perf_counter() - t)
        out[case] = {"median_ms": 1e3 * float(np.median(times)), "colors": int(coloring.num_colors)}
    return out


def _dense(quick: bool) -> dict[str, float]:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    out = {}
    n = 8 if quick else 20
    for case, (fn, kind) in _torch_fns(torch).items():
        x = torch.tensor(np.random.default_rng(0).standard_normal(_shape(case, n)))
        t = time.perf_counter()
        (torch.func.jacrev(fn) if kind == "jacobian" else torch.func.hessian(fn))(x)
        out[case] = 1e3 * (time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sparse_steady", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8^3 grids and n = 8,192 / 4: checks the bench runs")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--baseline", help="another tree's service directory, measured alike in a subprocess")
    ap.add_argument("--asdex", help="a directory holding asdex (pip install --target DIR asdex numba)")
    ap.add_argument("--dense", action="store_true", help="dense torch.func.jacrev / hessian, one call each")
    ap.add_argument("--compiled", action="store_true",
                    help="the engine colouring's products eager and under torch.compile (compiles: tens of CPU-s)")
    ap.add_argument("--json", choices=("engine", "asdex", "dense"), help=argparse.SUPPRESS)  # (subprocesses)
    args = ap.parse_args(argv)
    if args.json == "engine":
        print(json.dumps(_measure(args.quick, args.rounds, args.compiled)))
        return 0
    if args.json == "asdex":
        print(json.dumps(_asdex(args.asdex, args.quick, args.rounds)))
        return 0
    if args.json == "dense":
        print(json.dumps(_dense(args.quick)))
        return 0

    def run(service: str | None, what: str) -> dict:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in (service, os.getcwd()) if p]))
        cmd = [sys.executable, "-m", "bench.sparse_steady", "--json", what, "--rounds", str(args.rounds)]
        cmd += (["--quick"] if args.quick else []) + (["--asdex", args.asdex] if args.asdex else [])
        cmd += ["--compiled"] if args.compiled and service == here and what == "engine" else []
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{what} ({service}) failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "service")
    mine = [run(here, "engine")]
    base = [run(args.baseline, "engine")] if args.baseline else []
    if args.baseline:  # A B A B
        mine.append(run(here, "engine"))
        base.append(run(args.baseline, "engine"))
    peer = run(None, "asdex") if args.asdex else {}
    dense = run(here, "dense") if args.dense else {}

    import numpy as np

    def med(runs: list[dict], case: str) -> float:
        return float(np.median([t for r in runs for t in r[case]["times_ms"]]))

    print("| case | nnz | products | this tree ms | baseline ms | baseline / this | same bytes | asdex ms (colours) | this / asdex | dense ms | dense / this |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        m = med(mine, case)
        r = mine[0][case]
        b = med(base, case) if base else float("nan")
        same = (all(x[case]["hash"] == r["hash"] for x in mine + base)) if base else ""
        a = peer.get(case, {}).get("median_ms", float("nan"))
        colours = peer.get(case, {}).get("colors", "")
        d = dense.get(case, float("nan"))
        print(f"| {case} | {r['nnz']:,} | {r['products']} | {m:.2f} | {b:.2f} | {b / m:.2f} | {same} | {a:.2f} ({colours}) "
              f"| {m / a:.1f} | {d:.0f} | {d / m:.0f} |")
    if args.compiled:
        print("\nThe same compressed products outside the engine (this tree's colouring, same seeds), interleaved:")
        print("| case | mode | products | engine request ms | eager vmap products ms | compiled products ms "
              "| eager / compiled | request / compiled | asdex ms | compiled / asdex | compile CPU-s | max abs diff | against differences |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for case in CASES:
            c = mine[0][case]["compiled"]
            m = med(mine, case)
            a = peer.get(case, {}).get("median_ms", float("nan"))
            print(f"| {case} | {c['mode']} | {c['colors']} | {m:.2f} | {c['eager_ms']:.2f} | {c['compiled_ms']:.3f} "
                  f"| {c['eager_ms'] / c['compiled_ms']:.1f} | {m / c['compiled_ms']:.1f} | {a:.3f} "
                  f"| {c['compiled_ms'] / a:.2f} | {c['compile_cpu_s']:.1f} | {c['max_abs_diff']:.1e} | {c['fd_rel_err']:.1e} |")
    print("\nStages, ms a request (this tree; baseline):")
    for case in CASES:
        mine_st = mine[0][case]["stages_ms"]
        base_st = base[0][case]["stages_ms"] if base else {}
        parts = ", ".join(f"{k} {v:.2f}" + (f" ({base_st.get(k, float('nan')):.2f})" if base else "")
                          for k, v in sorted(mine_st.items()))
        print(f"- {case}: {parts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
