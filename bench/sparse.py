"""``python -m bench.sparse [--quick] [--rounds N] [--torch-threads T] [--service]``: sparse
vs dense derivatives, in process (no HTTP), side by side, with asdex (JAX) as a peer when
installed; ``--service`` adds the same sparse calls through a real ``serve`` process (SDK,
binary ``.npz`` answers), against the in-process dense ``jacrev`` of the same run;
``--large N`` times only a bandwidth-20 band and a partially separable Hessian at n = N
(dense estimated from 256 of its products: at n = 100,000 it would not fit in memory);
``--stencil [SIDE ...]`` only a periodic 2-D advection-diffusion stencil at n = 10^4 and
~10^5, sparse and dense rounds interleaved.

Cases (issue 11): lorenz96 at n = 8192 (periodic band), one reaction-diffusion step on a
128 x 128 grid (5-point stencil), the sparse Hessian of a separable-plus-banded
objective at n = 4096, the symmetric Jacobian of a chain's force at n = 2048 (read
from 3 JVPs once seen symmetric, where bicolouring takes 5), diffusion on a graph given by
its edge list (a 64 x 64 grid's, shuffled: the 5-point Laplacian again, through
``index_add``) and an MLP on a batch of 2,048 points (block-diagonal, 3 x 4 blocks). For each: medians of dense ``torch.func.jacrev`` (or ``hessian``)
and of the sparse path with its pattern and colouring cached (steady state), the first
call (detection + colouring) on its own, the ratio, colours against the known optimum,
result bytes against nnz x (value + index) bytes, and the largest difference from dense.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from jacobian_service.registry import Registry
from jacobian_service.sparsity import PatternCache, sparse_hessian, sparse_jacobian

Row = dict[str, Any]


def median_time(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def hessian_objective(x: torch.Tensor) -> torch.Tensor:
    """Chained Rosenbrock (banded) plus a separable quartic: a tridiagonal Hessian."""
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum() + (x**4).sum()


_BAND = torch.linspace(-1.0, 1.0, 21).reshape(1, 1, 21)


def banded20(x: torch.Tensor) -> torch.Tensor:
    """A band of bandwidth 20 (offsets -10..10, not periodic): a 21-tap convolution of
    a pointwise nonlinearity, as a nonlocal diffusion term is discretised."""
    return torch.nn.functional.conv1d(torch.sin(x).reshape(1, 1, -1), _BAND.to(x.dtype), padding=10).reshape(-1) - x**3


def separable(x: torch.Tensor) -> torch.Tensor:
    """A partially separable objective, sum of f_i(x[i-1], x[i], x[i+1]): a pentadiagonal
    Hessian (f_i couples x[i-1] with x[i+1] too)."""
    a, b, c = x[:-2], x[1:-1], x[2:]
    return ((b - a * c) ** 2 + 0.1 * (a + b + c) ** 4).sum() + (x**2).sum()


def chain_force(x: torch.Tensor) -> torch.Tensor:
    """The force -dE/dx of a chain in a global field x[0] (round 11): a symmetric
    Jacobian, an arrowhead with a tridiagonal body. Bicolouring takes 5 products; read
    as symmetric (from its second call on) 3 JVPs over an acyclic colouring."""
    def energy(y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y[1:] - y[:-1]) ** 2).sum() + 0.25 * (y**4).sum() + torch.sin(y[0]) * y.sum()

    return -torch.func.grad(energy)(x)


def stencil2d(u: torch.Tensor) -> torch.Tensor:
    """One explicit step of periodic advection-diffusion-reaction on a 2-D torus (round
    12): upwind advection, the 5-point Laplacian, a logistic reaction. A 5-point
    pattern that wraps around: 5 products on a torus whose sides are multiples of 5."""
    lap = u.roll(1, 0) + u.roll(-1, 0) + u.roll(1, 1) + u.roll(-1, 1) - 4 * u
    adv = (u - u.roll(1, 1)) + 0.5 * (u - u.roll(1, 0))
    return u + 0.01 * (0.1 * lap - adv + u * (1 - u))


def grid_graph_edges(side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The edges of a side x side grid graph (nodes row-major), listed in a shuffled
    order, as a mesh's edge list comes: its Laplacian is the 5-point stencil's."""
    node = torch.arange(side * side).reshape(side, side)
    src = torch.cat([node[:, :-1].reshape(-1), node[:-1, :].reshape(-1)])
    dst = torch.cat([node[:, 1:].reshape(-1), node[1:, :].reshape(-1)])
    order = torch.randperm(src.numel(), generator=torch.Generator().manual_seed(seed))
    return src[order], dst[order]


def graph_laplacian(edges: tuple[torch.Tensor, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Diffusion on a graph given by its edge list (scatter-adds of the edge differences)
    plus a reaction: the Jacobian is the graph Laplacian plus a diagonal, symmetric."""
    src, dst = edges

    def fn(x: torch.Tensor) -> torch.Tensor:
        flow = x[src] - x[dst]
        return torch.zeros_like(x).index_add(0, dst, flow).index_add(0, src, -flow) - torch.tanh(x)
    return fn


_MLP_W1 = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)) / 2
_MLP_W2 = torch.randn(16, 3, generator=torch.Generator().manual_seed(2)) / 4


def mlp_batch(x: torch.Tensor) -> torch.Tensor:
    """A small MLP (4 -> 16 -> 3) on each of a batch of points: a block-diagonal Jacobian
    of 3 x 4 blocks (3 VJPs whatever the batch)."""
    return torch.tanh(x @ _MLP_W1.to(x.dtype)) @ _MLP_W2.to(x.dtype)


#: Above this many unknowns the dense Jacobian is estimated (its n x n float32 would
#: take 1.6 GB at 20,000 and 40 GB at 100,000), at or below it measured.
_DENSE_MEASURED_MOST = 16_384


def stencil_cases(sides: list[int], rounds: int, dense_rounds: int) -> list[Row]:
    """Round 12: the periodic stencil at n = side^2, sparse (pattern cached) and dense
    ``jacrev`` side by side: their rounds interleaved (sparse, dense, sparse, ...) so
    that the machine's load falls on both alike, medians of each. Dense is measured
    (chunks of 2,048 VJPs) up to ``_DENSE_MEASURED_MOST`` unknowns, estimated from 256
    of its products above."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for side in sides:
        u = torch.rand(side, side, generator=gen) + 0.5
        n = u.numel()
        cache = PatternCache()
        sparse_jacobian(stencil2d, [u[:10, :10].contiguous()], cache=PatternCache(), name="warm-up")
        t0 = time.perf_counter()
        got = sparse_jacobian(stencil2d, [u], cache=cache, name="stencil2d")
        first_s = time.perf_counter() - t0
        measured = n <= _DENSE_MEASURED_MOST
        sparse_times, dense_times = [], []
        for r in range(max(rounds, dense_rounds)):
            if r < rounds:
                t0 = time.perf_counter()
                got = sparse_jacobian(stencil2d, [u], cache=cache, name="stencil2d")
                sparse_times.append(time.perf_counter() - t0)
            if r < dense_rounds:
                if measured:
                    t0 = time.perf_counter()
                    dense = torch.func.jacrev(stencil2d, chunk_size=2048)(u)
                    dense_times.append(time.perf_counter() - t0)
                else:
                    dense_times.append(dense_estimate(lambda v, side=side: stencil2d(v.reshape(side, side)).reshape(-1), u.reshape(-1),
                                                      "jacobian"))
        diff = float("nan")
        if measured:
            want = dense.reshape(n, n).numpy()
            diff = float(np.abs(got.matrix.toarray() - want).max() / np.abs(want).max())
            del dense, want
        sparse_s, dense_s = statistics.median(sparse_times), statistics.median(dense_times)
        rows.append({"case": f"periodic stencil {side}x{side}", "n": n, "nnz": got.matrix.nnz, "mode": got.mode,
                     "colors": got.n_products, "first_s": first_s, "sparse_s": sparse_s, "dense_s": dense_s,
                     "measured": measured, "ratio": dense_s / sparse_s, "rel_diff": diff})
    return rows


def dense_estimate(fn: Callable[..., Any], x: torch.Tensor, kind: str, rows: int = 256) -> float:
    """Seconds dense ``jacrev`` (``hessian``'s ``jacfwd(jacrev)``) would take at this n,
    from ``rows`` of its products (VJPs, or HVPs) vmapped as torch does and scaled to n:
    the dense matrix itself (n x n) would not fit in memory at n = 100,000."""
    n = x.numel()
    if kind == "hessian":
        grad = torch.func.grad(fn)
        product = lambda v: torch.func.jvp(grad, (x,), (v,))[1]  # noqa: E731
    else:
        _, pullback = torch.func.vjp(fn, x)
        product = lambda v: pullback(v)[0]  # noqa: E731
    basis = torch.eye(rows, n, dtype=x.dtype)
    t0 = time.perf_counter()
    torch.func.vmap(product)(basis)
    return (time.perf_counter() - t0) * n / rows


def large_cases(n: int, rounds: int) -> list[Row]:
    """Round 10: a band of bandwidth 20 (Jacobian) and a partially separable objective
    (Hessian) at ``n``: sparse calls (pattern cached) against dense ``jacrev`` estimated
    from 256 of its products."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, fn, kind, dtype in (("band 20 (21 diagonals)", banded20, "jacobian", torch.float32),
                                   ("separable Hessian", separable, "hessian", torch.float64)):
        x = torch.rand(n, generator=gen, dtype=dtype) + 0.5
        cache = PatternCache()
        call = (lambda: sparse_hessian(fn, [x], cache=cache, name=label)) if kind == "hessian" else \
            (lambda: sparse_jacobian(fn, [x], cache=cache, name=label))
        # (a small call first: the process's first products and traces pay torch's warm-up)
        (sparse_hessian if kind == "hessian" else sparse_jacobian)(fn, [x[:64]], cache=PatternCache(), name="warm-up")
        t0 = time.perf_counter()
        first = call()
        first_s = time.perf_counter() - t0
        sparse_s, got = median_time(call, rounds)
        dense_s = dense_estimate(fn, x, kind)
        rows.append({"case": label, "n": n, "nnz": got.matrix.nnz, "mode": got.mode, "colors": got.n_products,
                     "first_s": first_s, "sparse_s": sparse_s, "dense_s": dense_s, "ratio": dense_s / sparse_s,
                     "plan_first_s": first.timings["plan_s"]})
    return rows


def _ms(s: float) -> str:
    return f"{s * 1e3:,.2f} ms" if s < 10 else f"{s:,.1f} s"


def run_case(name: str, fn: Callable[..., Any], x: torch.Tensor, kind: str, optimum: int, rounds: int,
             dense_rounds: int, declared: Any = None, pattern: str = "auto") -> Row:
    cache = PatternCache()  # memory only: the first call really detects
    if kind == "hessian":
        sparse = lambda: sparse_hessian(fn, [x], pattern=pattern, cache=cache, name=name)  # noqa: E731
        dense = lambda: torch.func.hessian(fn)(x)  # noqa: E731
    else:
        sparse = lambda: sparse_jacobian(fn, [x], pattern=pattern, declared=declared, cache=cache, name=name)  # noqa: E731
        dense = lambda: torch.func.jacrev(fn)(x)  # noqa: E731
    t0 = time.perf_counter()
    first = sparse()
    first_s = time.perf_counter() - t0
    sparse_s, result = median_time(sparse, rounds)
    dense_s, dense_value = median_time(dense, dense_rounds)
    n = x.numel()
    want = dense_value.reshape(-1, n).numpy()
    got = result.matrix
    diff = float(np.abs(got.toarray() - want).max()) if want.size <= 1 << 28 else float("nan")
    scale = float(np.abs(want).max())
    del dense_value, want
    value_bytes = got.data.dtype.itemsize
    ideal = got.nnz * (value_bytes + got.indices.dtype.itemsize)
    return {
        "case": name, "kind": kind, "n": n, "nnz": got.nnz, "source": result.source, "mode": result.mode,
        "colors": result.n_products, "optimum": optimum, "dense_s": dense_s, "sparse_s": sparse_s,
        "first_s": first_s, "ratio": dense_s / sparse_s, "bytes": result.nbytes(), "ideal_bytes": ideal,
        "max_diff": diff, "rel_diff": diff / max(scale, 1e-300), "plan_first_s": first.timings["plan_s"],
    }


# --------------------------------------------------------------------------- through the service


def service_cases(cases: list[Row], n_lorenz: int, grid: int, n_hess: int, rounds: int, threads: int) -> list[Row]:
    """Sparse calls through a real server (engine process, IPC, HTTP, SDK decoding), timed
    after one call that detects and colours (the pattern cache then holds them)."""
    import httpx

    from jacobian_client import Client

    from ._server import Pool

    gen = np.random.default_rng(0)
    x = (gen.standard_normal(n_lorenz) + 8).astype(np.float32)
    u = gen.uniform(size=(grid, grid)).astype(np.float32)
    xh = gen.standard_normal(n_hess)
    rows = []
    with Pool() as pool:
        server = pool.service({"JACOBIAN_SERVICE_TORCH_THREADS": str(threads), "JACOBIAN_SERVICE_WORKERS": "1"})
        with Client(server.url, timeout=600) as client:
            for label, call, dense in (
                ("lorenz96 (declared band)", lambda: client.jacobian("lorenz96", x, sparsity="band"), cases[1]),
                ("lorenz96 (detected)", lambda: client.jacobian("lorenz96", x, sparsity="auto"), cases[0]),
                (f"reaction_diffusion {grid}x{grid}", lambda: client.jacobian("reaction_diffusion", u, sparsity="auto"), cases[2]),
                (f"hessian rosenbrock n={n_hess}", lambda: client.hessian("rosenbrock", xh, sparsity="auto"), None),
            ):
                t0 = time.perf_counter()
                call()
                first_s = time.perf_counter() - t0
                sparse_s, got = median_time(call, rounds)
                rows.append({"case": label, "service_s": sparse_s, "first_s": first_s, "nnz": got.nnz,
                             "dense_s": dense["dense_s"] if dense else float("nan"),
                             "ratio": dense["dense_s"] / sparse_s if dense else float("nan")})
        body = httpx.post(f"{server.url}/v1/functions/lorenz96/jacobian?sparsity=band", content=_npy(x),
                          headers={"content-type": "application/x-npy", "accept": "application/x-npz"}, timeout=600)
        rows[0]["body_bytes"] = len(body.content)
        rows[0]["ideal_bytes"] = rows[0]["nnz"] * (4 + 4)
    return rows


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# --------------------------------------------------------------------------- asdex peer


def asdex_cases(n_lorenz: int, grid: int, n_hess: int, rounds: int) -> list[Row] | str:
    try:
        import asdex
        import jax
        import jax.numpy as jnp
    except ImportError as exc:
        return f"asdex peer skipped: {exc} (pip install -e '.[bench]')"
    jax.config.update("jax_enable_x64", False)

    def rhs(x: Any) -> Any:
        return (jnp.roll(x, -1) - jnp.roll(x, 2)) * jnp.roll(x, 1) - x + 8.0

    def lorenz(x: Any) -> Any:
        dt = 0.01
        k1 = rhs(x)
        k2 = rhs(x + dt / 2 * k1)
        k3 = rhs(x + dt / 2 * k2)
        k4 = rhs(x + dt * k3)
        return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    def reaction(u: Any) -> Any:
        p = jnp.pad(u, 1)
        lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u
        return u + 0.1 * (lap + u * (1 - u))

    def objective(x: Any) -> Any:
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum() + (x**4).sum()

    rng = np.random.default_rng(0)
    rows = []
    for name, f, shape, kind in (
        ("lorenz96", lorenz, (n_lorenz,), "jacobian"),
        ("reaction_diffusion", reaction, (grid, grid), "jacobian"),
        ("hessian", objective, (n_hess,), "hessian"),
    ):
        x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        t0 = time.perf_counter()
        coloring = asdex.hessian_coloring(f, x) if kind == "hessian" else asdex.jacobian_coloring(f, x)
        plan_s = time.perf_counter() - t0
        make = asdex.hessian_from_coloring if kind == "hessian" else asdex.jacobian_from_coloring
        compute = jax.jit(make(f, coloring))

        def call() -> Any:
            out = compute(x)
            jax.block_until_ready(jax.tree_util.tree_leaves(out))
            return out

        call()  # compile
        s, _ = median_time(call, rounds)
        rows.append({"case": name, "colors": int(coloring.num_colors), "mode": str(coloring.mode),
                     "plan_s": plan_s, "sparse_s": s})
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sparse", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: checks the benchmark runs")
    p.add_argument("--rounds", type=int, default=20, help="sparse rounds (median)")
    p.add_argument("--dense-rounds", type=int, default=3, help="dense rounds (median); the stencil's dense run is 1 GiB")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--no-asdex", action="store_true")
    p.add_argument("--service", action="store_true", help="also time the sparse calls through a real server")
    p.add_argument("--large", type=int, default=0, metavar="N",
                   help="only the round-10 cases at n = N (a bandwidth-20 band, a separable Hessian)")
    p.add_argument("--stencil", type=int, nargs="*", metavar="SIDE",
                   help="only the periodic 2-D stencil (round 12) on SIDE x SIDE tori (default 100 and 315: "
                        "n = 10,000 and 99,225), sparse and dense rounds interleaved")
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.stencil is not None:
        sides = args.stencil or [100, 315]
        print(f"# periodic 2-D stencil, sparse vs dense jacrev (torch {torch.__version__}, {torch.get_num_threads()} "
              f"torch threads; medians, rounds interleaved; dense estimated from 256 products above "
              f"{_DENSE_MEASURED_MOST:,} unknowns)\n")
        print("| case | n | nnz | mode | products | first call | sparse | dense jacrev | ratio | max diff (rel) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in stencil_cases(sides, args.rounds, args.dense_rounds):
            dense = _ms(r["dense_s"]) + ("" if r["measured"] else " (est.)")
            print(f"| {r['case']} | {r['n']:,} | {r['nnz']:,} | {r['mode']} | {r['colors']} | {_ms(r['first_s'])} "
                  f"| {_ms(r['sparse_s'])} | {dense} | {r['ratio']:,.0f}x | {r['rel_diff']:.1e} |", flush=True)
        return 0
    if args.large:
        print(f"# sparse vs dense at n = {args.large:,} (torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
              "dense estimated from 256 products)\n")
        print("| case | n | nnz | mode | products | first call | sparse | dense jacrev (est.) | ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in large_cases(args.large, args.rounds):
            print(f"| {r['case']} | {r['n']:,} | {r['nnz']:,} | {r['mode']} | {r['colors']} | {_ms(r['first_s'])} "
                  f"| {_ms(r['sparse_s'])} | {_ms(r['dense_s'])} | {r['ratio']:,.0f}x |")
        return 0
    n_lorenz, grid, n_hess = (512, 24, 256) if args.quick else (8192, 128, 4096)
    n_chain = 256 if args.quick else 2048
    graph, n_batch = (16, 256) if args.quick else (64, 2048)
    builtins = Registry.from_modules()
    lorenz, rd = builtins.get("lorenz96"), builtins.get("reaction_diffusion")
    gen = torch.Generator().manual_seed(0)
    print(f"# sparse derivatives vs dense (torch {torch.__version__}, {torch.get_num_threads()} torch threads"
          f"{', --quick' if args.quick else ''})\n", flush=True)

    per_row = 13  # lorenz96: offsets -8..+4
    cases = [
        run_case("lorenz96 (detected)", lorenz.fn, torch.randn(n_lorenz, generator=gen) + 8, "jacobian",
                 math.ceil(n_lorenz / (n_lorenz // per_row)), args.rounds, args.dense_rounds),
        run_case("lorenz96 (declared band)", lorenz.fn, torch.randn(n_lorenz, generator=gen) + 8, "jacobian",
                 math.ceil(n_lorenz / (n_lorenz // per_row)), args.rounds, args.dense_rounds,
                 declared=lorenz.sparsity, pattern="band"),
        run_case(f"reaction_diffusion {grid}x{grid}", rd.fn, torch.rand(grid, grid, generator=gen), "jacobian", 5,
                 args.rounds, 1 if not args.quick else args.dense_rounds),
        run_case(f"hessian rosenbrock+quartic n={n_hess}", hessian_objective,
                 torch.randn(n_hess, generator=gen, dtype=torch.float64), "hessian", 2, args.rounds, 1),
        run_case(f"chain force -dE/dx n={n_chain} (symmetric)", chain_force,
                 torch.rand(n_chain, generator=gen, dtype=torch.float64) + 0.5, "jacobian", 3, args.rounds, 1),
        # (a grid graph's Laplacian is the 5-point stencil: 3 products read it as symmetric)
        run_case(f"graph Laplacian, edge list of a {graph}x{graph} grid", graph_laplacian(grid_graph_edges(graph)),
                 torch.rand(graph * graph, generator=gen, dtype=torch.float64), "jacobian", 3, args.rounds, 1),
        run_case(f"MLP 4-16-3 on a batch of {n_batch}", mlp_batch,
                 torch.randn(n_batch, 4, generator=gen, dtype=torch.float64), "jacobian", 3, args.rounds, args.dense_rounds),
    ]
    print("| case | n | nnz | source | mode | colours (optimum) | dense | sparse | ratio | first call | bytes / ideal | max diff (rel) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        print(f"| {c['case']} | {c['n']:,} | {c['nnz']:,} | {c['source']} | {c['mode']} | {c['colors']} ({c['optimum']}) "
              f"| {_ms(c['dense_s'])} | {_ms(c['sparse_s'])} | {c['ratio']:,.0f}x | {_ms(c['first_s'])} "
              f"| {c['bytes'] / c['ideal_bytes']:.2f} | {c['max_diff']:.1e} ({c['rel_diff']:.1e}) |")
    print()

    peer = None if args.no_asdex else asdex_cases(n_lorenz, grid, n_hess, args.rounds)
    if isinstance(peer, str):
        print(peer + "\n")
    elif peer:
        ours = {"lorenz96": cases[0], "reaction_diffusion": cases[2], "hessian": cases[3]}
        print("asdex (JAX, jit, float32; Hessian float32) on the same functions:\n")
        print("| case | asdex colours (mode) | ours | asdex detect+colour | ours first call | asdex compute | ours sparse |")
        print("|---|---|---|---|---|---|---|")
        for r in peer:
            o = ours[r["case"]]
            print(f"| {r['case']} | {r['colors']} ({r['mode']}) | {o['colors']} ({o['mode']}) | {_ms(r['plan_s'])} "
                  f"| {_ms(o['first_s'])} | {_ms(r['sparse_s'])} | {_ms(o['sparse_s'])} |")
        print()

    service = service_cases(cases, n_lorenz, grid, n_hess, args.rounds, args.torch_threads or 0) if args.service else []
    if service:
        print("Through the service (serve, one engine process, SDK over .npz; dense = in-process jacrev above):\n")
        print("| case | nnz | service call | first call (detect + colour) | dense jacrev in-process | ratio |")
        print("|---|---|---|---|---|---|")
        for r in service:
            ratio = "" if math.isnan(r["ratio"]) else f"{r['ratio']:,.0f}x"
            dense = "" if math.isnan(r["dense_s"]) else _ms(r["dense_s"])
            print(f"| {r['case']} | {r['nnz']:,} | {_ms(r['service_s'])} | {_ms(r['first_s'])} | {dense} | {ratio} |")
        print(f"\nlorenz96 .npz body: {service[0]['body_bytes']:,} bytes; nnz x (4 + 4) = {service[0]['ideal_bytes']:,}\n")

    lz, st, he = cases[0], cases[2], cases[3]
    targets = [
        ("lorenz96 sparse vs dense jacrev", lz["ratio"], ">=", 300),
        ("lorenz96 bytes / (nnz x (value + index))", lz["bytes"] / lz["ideal_bytes"], "<=", 2),
        ("stencil sparse vs dense jacrev", st["ratio"], ">=", 1000),
        ("stencil colours / optimum", st["colors"] / st["optimum"], "<=", 1.5),
        ("Hessian relative difference from dense", he["rel_diff"], "<=", 1e-12),
    ]
    if service:
        targets += [
            ("lorenz96 service call vs dense jacrev", service[0]["ratio"], ">=", 300),
            ("lorenz96 .npz body / (nnz x (value + index))", service[0]["body_bytes"] / service[0]["ideal_bytes"], "<=", 2),
            ("stencil service call vs dense jacrev", service[2]["ratio"], ">=", 1000),
        ]
    failed = 0
    print("## targets\n")
    for label, value, op, limit in targets:
        ok = value >= limit if op == ">=" else value <= limit
        failed += 0 if ok else 1
        print(f"- {'met' if ok else 'MISSED'}: {label} = {value:,.3g} (target {op} {limit})")
    wrong = [c["case"] for c in cases if not c["rel_diff"] <= 1e-5]
    if wrong:
        print(f"- FAILED: sparse differs from dense for {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
