"""Sparsity detection and compressed derivatives, in process, against torch.func."""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("scipy.sparse")

from jacobian_service.registry import Registry  # noqa: E402
from jacobian_service.sparsity import (  # noqa: E402
    Pattern,
    PatternCache,
    banded,
    describe_sparsity,
    probe,
    sparse_hessian,
    sparse_jacobian,
    trace_hessian,
    trace_jacobian,
)

from jacobian_service.sparsity.detect import TraceError  # noqa: E402
from jacobian_service.sparsity.patterns import CHOICE_NOTE  # noqa: E402
from tests import sparse_functions as sparse_fem  # noqa: E402

BUILTINS = Registry.from_modules()


def dense_jacobian(fn, args, argnums=(0,)):
    jac = torch.func.jacrev(fn, argnums=tuple(argnums))(*args)
    out = fn(*args)
    m = out.numel()
    return torch.cat([j.reshape(m, -1) for j in jac], dim=1).numpy()


def true_pattern(fn, args, argnums=(0,), points=3):
    """Nonzeros of the dense Jacobian united over random points (away from zeros)."""
    gen = torch.Generator().manual_seed(1)
    found = None
    for _ in range(points):
        moved = [a + torch.rand(a.shape, generator=gen, dtype=a.dtype) + 0.5 if i in argnums else a for i, a in enumerate(args)]
        nz = dense_jacobian(fn, moved, argnums) != 0
        found = nz if found is None else found | nz
    return Pattern.from_dense(found)


def builtin_inputs(name):
    gen = torch.Generator().manual_seed(0)
    shapes = {"mlp": [(128,)], "add_square": [(7,), (7,)], "polar": [(7,), (7,)], "reaction_diffusion": [(6, 9)],
              "lorenz96": [(20,)], "planar_arm": [(5,)]}
    dtype = torch.float32 if name == "mlp" else torch.float64
    return [torch.randn(s, generator=gen, dtype=dtype) + 1.5 for s in shapes.get(name, [(9,)])]


@pytest.mark.parametrize("spec", [s for s in BUILTINS if s.name != "rosenbrock" and not s.has_trees], ids=lambda s: s.name)
def test_every_builtin_sparse_equals_dense(spec):
    args = builtin_inputs(spec.name)
    argnums = tuple(range(len(args)))
    result = sparse_jacobian(spec.fn, args, argnums, has_aux=spec.has_aux, declared=spec.sparsity, name=spec.name, cache=PatternCache())
    fn = (lambda *a: spec.fn(*a)[0]) if spec.has_aux else spec.fn
    leaves = fn(*args)
    leaves = leaves if isinstance(leaves, tuple) else (leaves,)
    want = np.concatenate([np.concatenate([j.reshape(o.numel(), -1).numpy() for j in torch.func.jacrev(lambda *a, k=k: (fn(*a) if isinstance(fn(*a), tuple) else (fn(*a),))[k], argnums=argnums)(*args)], axis=1) for k, o in enumerate(leaves)])
    tol = dict(rtol=1e-5, atol=1e-6) if spec.name == "mlp" else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.matrix.toarray(), want, **tol)
    assert result.source == "traced"


@pytest.mark.parametrize("name,choice", [("lorenz96", "band"), ("reaction_diffusion", "stencil")])
def test_declared_patterns_equal_detected_and_dense(name, choice):
    spec = BUILTINS.get(name)
    args = builtin_inputs(name)
    declared = sparse_jacobian(spec.fn, args, pattern=choice, declared=spec.sparsity, cache=PatternCache())
    assert declared.source == "declared" and declared.pattern.name == choice
    assert declared.pattern == trace_jacobian(spec.fn, args) == true_pattern(spec.fn, args)
    np.testing.assert_allclose(declared.matrix.toarray(), dense_jacobian(spec.fn, args), rtol=1e-10, atol=1e-12)


def test_a_nonzero_that_vanishes_here_is_still_found():
    x, y = torch.randn(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    f = lambda x, y: x * y  # noqa: E731  d/dx = y = 0 at this point
    traced = trace_jacobian(f, [x, y], (0, 1))
    assert traced.nnz == 12 and traced.exact
    probed = probe(f, [x, y], (0, 1))
    assert probed.source == "probe" and not probed.exact  # random points do find it here
    result = sparse_jacobian(f, [x, y], (0, 1), cache=PatternCache())
    np.testing.assert_array_equal(result.matrix.toarray(), dense_jacobian(f, [x, y], (0, 1)))
    assert result.matrix.nnz == 12  # the x-block's zeros are stored: the pattern holds


def mixed(x, w):
    """Gathers, rolls, slices, cat, matmul with a banded constant, in-place writes."""
    n = x.shape[0]
    a = torch.roll(x, 3) * x
    b = torch.cat([x[n // 2 :], x[: n // 2]]).flip(0)
    c = x[torch.tensor([5, 0, 7, 7])].repeat(n // 4)
    d = w @ torch.sin(x)
    e = torch.gather(x.reshape(4, -1), 1, torch.tensor([[1, 0]] * 4)).reshape(-1).repeat(n // 8)
    out = a + b + c + d + torch.nn.functional.pad(e[2:], (0, 2))
    out = out.clone()
    out[1:3] = x[:2] ** 2  # a write into a view of a traced tensor
    return torch.cumsum(out.reshape(4, -1), dim=1).reshape(-1) + torch.softmax(x[:4], 0).repeat(n // 4)


def test_detection_on_mixed_ops_is_exact():
    n = 16
    x = torch.randn(n, dtype=torch.float64)
    w = torch.diag(torch.ones(n - 1, dtype=torch.float64), 1) + torch.eye(n, dtype=torch.float64)  # banded constant
    f = lambda x: mixed(x, w)  # noqa: E731
    traced = trace_jacobian(f, [x])
    assert traced.exact, traced.notes
    assert traced == true_pattern(f, [x])


def test_unknown_ops_are_dense_and_flagged():
    target = torch.tensor([0, 1])
    f = lambda x: torch.nn.functional.multi_margin_loss(x.reshape(2, 4), target, reduction="none") * 1.0  # noqa: E731  (not in the tracer's tables)
    x = torch.randn(8, dtype=torch.float64)
    p = trace_jacobian(f, [x])
    assert not p.exact and any("multi_margin_loss" in note for note in p.notes)
    assert p.contains(true_pattern(f, [x]))


def test_an_unknown_op_on_part_of_the_input_depends_on_that_part_only():
    """Every output of an unknown op depends on every element of its arguments, and no
    more: the elements it never sees stay out (sp.kron stored zeros that became entries,
    so an unknown op on x[:4] made its rows depend on all of x)."""
    target = torch.tensor([1])
    f = lambda x: torch.cat([torch.nn.functional.multi_margin_loss(x[:4].reshape(1, 4), target, reduction="none").expand(4), x[4:] ** 2])  # noqa: E731
    x = torch.randn(8, dtype=torch.float64)
    p = trace_jacobian(f, [x])
    want = np.zeros((8, 8), bool)
    want[:4, :4] = True  # (an unknown op: each of the 4 on all 4)
    want[np.arange(4, 8), np.arange(4, 8)] = True
    assert not p.exact and np.array_equal(p.to_dense(), want)


def test_no_grad_values_carry_no_dependencies():
    spec = BUILTINS.get("no_grad_square")
    x = torch.randn(9, dtype=torch.float64)
    assert trace_jacobian(spec.fn, [x]) == Pattern((9, 9), np.arange(9), np.arange(9))


_PLAIN = torch.zeros(8, dtype=torch.float64)


def test_probe_fallback_when_tracing_cannot_run():
    def into_buffer(x):  # writes traced values into a copy of a plain tensor: the tracer gives up
        buf = _PLAIN[: x.shape[0] + 1].clone()
        buf[1:] = x**2
        return buf[:-1] * x

    x = torch.randn(7, dtype=torch.float64)
    result = sparse_jacobian(into_buffer, [x], mode="rev", cache=PatternCache())
    assert result.source == "probe" and any("tracing failed" in n for n in result.pattern.notes)
    assert result.pattern == true_pattern(into_buffer, [x])  # row 0 is 0 * x[0]: empty
    want = torch.func.jacrev(into_buffer, chunk_size=1)(x).numpy()
    np.testing.assert_allclose(result.matrix.toarray(), want)


def test_hessian_of_separable_plus_banded_objective():
    spec = BUILTINS.get("rosenbrock")
    n = 4096
    x = torch.randn(n, dtype=torch.float64)
    f = lambda x: spec.fn(x) + (x**4).sum() + (torch.sin(x[2:] * x[:-2])).sum()  # noqa: E731  pentadiagonal
    result = sparse_hessian(f, [x], cache=PatternCache())
    # acyclic colouring (substitution over long two-coloured paths, in float64): 3, where star takes 5
    assert result.mode == "acyclic" and result.n_products == 3
    small = torch.randn(64, dtype=torch.float64)
    dense_small = torch.func.hessian(f)(small).numpy()
    assert trace_hessian(f, [small]) == Pattern.from_dense(dense_small != 0)
    # At n = 4096, against Hessian-vector products (forward over reverse, no colouring):
    # 64 whole columns (e_i) and 4 random directions, which a wrong entry anywhere would
    # change. The dense Hessian (128 MiB, 4096 products) took 11 s of the suite.
    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(torch.func.grad(f), (x,), (v,))[1]

    picked = torch.randperm(n)[:64]
    directions = torch.cat([torch.eye(n, dtype=torch.float64)[picked], torch.randn(4, n, dtype=torch.float64)])
    want = torch.func.vmap(hvp)(directions).numpy()
    got = (result.matrix @ directions.numpy().T).T
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_chunks_and_modes_do_not_change_the_result():
    spec = BUILTINS.get("lorenz96")
    x = torch.randn(64, dtype=torch.float64)
    want = dense_jacobian(spec.fn, [x])
    calls = []
    for mode in ("fwd", "rev"):
        cache = PatternCache()
        sparse_jacobian(spec.fn, [x], mode=mode, cache=cache)  # detection's own checks are not counted below
        r = sparse_jacobian(spec.fn, [x], mode=mode, memory_budget=1, check_alive=lambda: calls.append(1), cache=cache)
        # 13 entries a row on a ring of 64: the optimum is ceil(64 / floor(64 / 13)) = 16.
        assert r.mode == mode and r.chunk_size == 1 and r.n_products == 16
        np.testing.assert_allclose(r.matrix.toarray(), want, rtol=1e-12, atol=1e-12)
    # checked between every chunk: the 16 colours' and, for VJPs, the checking seed's (JVPs
    # are checked by the VJP that proves them jacrev's)
    assert len(calls) == 16 + (16 + 1)


def test_cache_on_disk_skips_detection(tmp_path, monkeypatch):
    spec = BUILTINS.get("reaction_diffusion")
    u = torch.rand(8, 8, dtype=torch.float64)
    first = sparse_jacobian(spec.fn, [u], name=spec.name, cache=PatternCache(tmp_path))
    from jacobian_service.sparsity import compute

    def refuse(*a, **k):
        raise AssertionError("detection ran again")

    monkeypatch.setattr(compute, "trace_jacobian", refuse)
    again = sparse_jacobian(spec.fn, [u], name=spec.name, cache=PatternCache(tmp_path))  # a "restart"
    assert again.timings["cached"] == "disk" and again.pattern == first.pattern
    # (the same values, to round-off: the first answer, symmetric entry by entry, sends the
    # next to 3 JVPs read as symmetric where the first took 5 VJPs)
    np.testing.assert_allclose(again.matrix.toarray(), first.matrix.toarray(), rtol=1e-14, atol=1e-15)


def test_a_build_that_detects_differently_never_reads_the_disk_cache_of_another(tmp_path, monkeypatch):
    """The key held torch's and the service's versions, which a tracer fix does not
    change (0.1.0 throughout): patterns an older tracer got wrong were read back from
    disk after the upgrade. It now holds a hash of the sparsity package's source."""
    import shutil

    from jacobian_service.sparsity import compute

    spec = BUILTINS.get("reaction_diffusion")
    u = torch.rand(8, 8, dtype=torch.float64)
    sparse_jacobian(spec.fn, [u], name=spec.name, cache=PatternCache(tmp_path / "cache"))
    package = Path(compute.__file__).parent
    copy = tmp_path / "sparsity"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(compute, "__file__", str(copy / "compute.py"))
    assert compute._detection_digest() == compute._DETECTION_DIGEST  # the same source, the same key
    with open(copy / "detect.py", "a") as f:
        f.write("\n# a tracer fix\n")
    monkeypatch.setattr(compute, "_DETECTION_DIGEST", compute._detection_digest())
    again = sparse_jacobian(spec.fn, [u], name=spec.name, cache=PatternCache(tmp_path / "cache"))
    assert again.timings["cached"] == ""  # detected again, not read back


def test_describe_sparsity_is_json_ready():
    import json

    spec = BUILTINS.get("lorenz96")
    d = describe_sparsity(spec.fn, [torch.zeros(100)], pattern="band", declared=spec.sparsity, name=spec.name, cache=PatternCache())
    json.dumps(d)
    assert d["pattern"]["source"] == "declared" and d["pattern"]["nnz"] == 1300
    optimum = -(-100 // (100 // 13))  # 13 a row on a ring of 100: ceil(100 / 7) = 15
    assert d["products"] == d["coloring"]["colors"] <= optimum + 2 and d["dense_products"] == 100
    assert d["picture"] and d["declared"] == ["band"]
    with pytest.raises(KeyError):
        describe_sparsity(spec.fn, [torch.zeros(100)], pattern="nope", declared=spec.sparsity)
    with pytest.raises(ValueError):
        sparse_jacobian(spec.fn, [torch.zeros(10)], pattern=banded(1, 1, hessian=True), cache=PatternCache())


# --------------------------------------------------------------------------- rows, chunks, batches


def _mixed(x, y):
    """Two inputs, a roll and a reduction: the last row is dense in x."""
    return torch.cat([x[1:] * x[:-1] + torch.roll(x, 2)[1:] * y[:-1], (x**2).sum(0, keepdim=True)])


@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
@pytest.mark.parametrize("rows", [None, (3, 17), (0, 50), (10, 10), (49, 50)])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_rows_and_chunk_size_equal_jacrev(mode, rows, chunk_size):
    x, y = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    r = sparse_jacobian(_mixed, [x, y], (0, 1), mode=mode, cache=PatternCache(), rows=rows, chunk_size=chunk_size)
    want = dense_jacobian(_mixed, [x, y], (0, 1))
    if rows is not None:
        want = want[rows[0] : rows[1]]
    assert r.matrix.shape == want.shape
    np.testing.assert_allclose(r.matrix.toarray(), want, rtol=1e-12, atol=1e-12)
    if chunk_size is not None:
        assert r.chunk_size <= chunk_size
    if rows is not None and mode == "rev":  # only the rows asked for are seeded
        assert r.n_products <= rows[1] - rows[0]


def test_rows_out_of_range_and_on_a_hessian_are_refused():
    from jacobian_service.sparsity.compute import resolve

    x = torch.randn(8)
    with pytest.raises(IndexError):
        resolve(torch.sin, [x], rows=(0, 9), cache=PatternCache())
    with pytest.raises(ValueError):
        resolve(lambda v: (v**2).sum(), [x], kind="hessian", rows=(0, 2), cache=PatternCache())


@pytest.mark.parametrize("mode", ["fwd", "rev"])
@pytest.mark.parametrize("rows", [None, (5, 20)])
def test_a_batch_of_points_equals_each_point(mode, rows):
    from jacobian_service.sparsity.compute import resolve, sparse_batch

    xs, ys = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    p, coloring, _ = resolve(_mixed, [xs[0], ys[0]], (0, 1), mode=mode, cache=PatternCache(), rows=rows)
    mats, chunk = sparse_batch(_mixed, [xs, ys], (0, 1), p, coloring, 50, rows=rows, chunk_size=2)
    assert chunk == min(2, coloring.n_colors)
    for i in range(4):
        want = dense_jacobian(_mixed, [xs[i], ys[i]], (0, 1))
        np.testing.assert_allclose(mats[i].toarray(), want if rows is None else want[rows[0] : rows[1]], rtol=1e-12)


def test_a_batch_of_hessians_equals_each_hessian():
    from jacobian_service.sparsity.compute import resolve, sparse_batch

    def objective(x):
        return (100 * (x[1:] - x[:-1] ** 2) ** 2).sum() + (x**4).sum()

    xs = torch.randn(3, 40, dtype=torch.float64)
    p, coloring, _ = resolve(objective, [xs[0]], kind="hessian", cache=PatternCache())
    mats, _ = sparse_batch(objective, [xs], (0,), p, coloring, 1)
    for i in range(3):
        want = torch.func.hessian(objective)(xs[i]).numpy()
        # (substitution solves entries out of sums of products: round-off scales with the
        # largest entry, not each one's; a random point's 0.34 beside 2582 missed rtol
        # 1e-12 by 4e-13)
        np.testing.assert_allclose(mats[i].toarray(), want, rtol=1e-12, atol=1e-14 * np.abs(want).max())
    assert coloring.mode == "acyclic" and coloring.n_colors == 2  # (star colouring: 3)


# --------------------------------------------------------------------------- deadlines


class Stop(Exception):
    """What a request's check raises past its deadline (the engine's is a 504 Timeout)."""


def stop_after(n):
    """A check_alive that raises on its n-th call, and the list of its calls."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) >= n:
            raise Stop(f"stopped at check {n}")

    return check, calls


def long_loop(count):
    """A Python loop of 5 * count small ops (a banded pattern), counting its iterations."""
    iterations = []

    def fn(x):
        y = x
        for _ in range(count):
            iterations.append(1)
            y = 0.999 * y + 1e-3 * torch.sin(x.roll(1))
        return y

    return fn, iterations


def refuse_probe(*a, **k):
    raise AssertionError("probing started after the check raised")


def test_tracing_stops_when_check_alive_raises(monkeypatch, tmp_path):
    from jacobian_service.sparsity import compute, detect

    monkeypatch.setattr(detect, "_CHECK_EVERY_S", 0.0)  # a check on every op: counts are exact
    monkeypatch.setattr(compute, "probe", refuse_probe)
    fn, iterations = long_loop(400)
    x = torch.randn(64, dtype=torch.float64)
    cache = PatternCache(tmp_path)
    check, calls = stop_after(50)
    with pytest.raises(Stop, match="stopped at check 50"):  # itself: not a TraceError, no probe
        compute.resolve(fn, [x], check_alive=check, cache=cache)
    assert len(calls) == 50 and 0 < len(iterations) < 400  # partway through the loop
    assert not cache._memory and not any(tmp_path.iterdir())  # nothing partial is cached
    check, calls = stop_after(30)
    with pytest.raises(Stop):
        compute.resolve(lambda x: fn(x).square().sum(), [x], kind="hessian", check_alive=check, cache=cache)
    assert len(calls) == 30 and not cache._memory and not any(tmp_path.iterdir())
    # A user function that swallows the check's exception is stopped all the same.
    def swallows(x):
        y = x
        for _ in range(100):
            try:
                y = y + torch.sin(x)
            except Stop:
                pass
        return y

    with pytest.raises(Stop):
        compute.resolve(swallows, [x], check_alive=stop_after(5)[0], cache=cache)
    assert not cache._memory
    # The next request, with time to spare, detects in full and computes the right matrix.
    iterations.clear()
    ok, calls = stop_after(10**9)
    result = sparse_jacobian(fn, [x], check_alive=ok, cache=cache)
    assert len(iterations) == 3 * 400 and len(calls) > 5 * 400  # forward, whole trace, products
    assert result.timings["cached"] == "" and result.source == "traced" and result.pattern.nnz == 2 * 64
    np.testing.assert_allclose(result.matrix.toarray(), dense_jacobian(fn, [x]), rtol=1e-12, atol=1e-12)


def test_tracing_checks_at_most_every_few_milliseconds(monkeypatch):
    """The tracer reads its clock at each op and calls ``check_alive`` only once
    ``_CHECK_EVERY_S`` has passed. Timed on the wall clock, the bound (the elapsed time
    over 5 ms) reached the op count itself once a loaded machine made the trace slow
    (an op past 5 ms is checked, rightly): here the tracer's clock is a counter that
    moves a millisecond a read, so the count is exact whatever the load."""
    from jacobian_service.sparsity import detect

    reads = []

    def monotonic() -> float:  # one read an op: a millisecond each
        reads.append(1)
        return len(reads) * 1e-3

    monkeypatch.setattr(detect, "time", SimpleNamespace(monotonic=monotonic))
    fn, _ = long_loop(300)
    check, calls = stop_after(10**9)
    trace_jacobian(fn, [torch.randn(64, dtype=torch.float64)], check_alive=check)
    every = round(detect._CHECK_EVERY_S / 1e-3)  # reads from one check to the next (one more where round-off has it)
    assert len(reads) >= 5 * 300 and every >= 2
    assert len(reads) // (every + 1) <= len(calls) <= -(-len(reads) // every), (len(calls), len(reads))


def test_probing_stops_when_check_alive_raises(monkeypatch, tmp_path):
    from jacobian_service.sparsity import compute, detect

    evaluations = []

    def into_buffer(x):  # writes traced values into a copy of a plain tensor: tracing fails, probing runs
        evaluations.append(1)
        buf = _PLAIN[: x.shape[0] + 1].clone()
        buf[1:] = x**2
        return buf[:-1] * x

    x = torch.randn(7, dtype=torch.float64)
    check, calls = stop_after(2)
    with pytest.raises(Stop):
        probe(into_buffer, [x], points=5, check_alive=check)
    # the sizing pass and the first of 5 points: jacrev's, and one VJP checking its vmap
    assert len(calls) == 2 and len(evaluations) == 3
    # Through resolve: the trace fails (its TraceError starts the probe), then the probe
    # is stopped before its second point, and nothing is cached.
    monkeypatch.setattr(detect, "_CHECK_EVERY_S", 0.0)
    evaluations.clear()

    def after_one_point():  # the trace, the sizing pass and one point (and its check) have run
        if len(evaluations) >= 4:
            raise Stop("stopped while probing")

    cache = PatternCache(tmp_path)
    with pytest.raises(Stop, match="while probing"):
        compute.resolve(into_buffer, [x], check_alive=after_one_point, cache=cache)
    assert len(evaluations) == 4
    assert not cache._memory and not any(tmp_path.iterdir())
    p, _, cached = compute.resolve(into_buffer, [x], cache=cache)
    assert cached == "" and p.source == "probe" and p == true_pattern(into_buffer, [x])


def test_colouring_stops_when_check_alive_raises():
    from jacobian_service.sparsity.coloring import choose_coloring, star_coloring

    jac_pattern = banded(2, 2).build([(500,)], 500)
    for mode in ("auto", "fwd", "rev"):
        check, calls = stop_after(1)
        with pytest.raises(Stop):
            choose_coloring(jac_pattern, mode, check_alive=check)
    check, calls = stop_after(3)
    with pytest.raises(Stop):
        star_coloring(banded(2, 2, hessian=True).build([(10_000,)], 1), check_alive=check)
    assert len(calls) == 3


def test_a_dense_jacobian_is_detected_and_coloured_in_a_second():
    """softmax (a dense Jacobian) at n = 2000: it took a minute (numpy's hash-based
    unique on 4M entries, an n**3 graph product, networkx over n**2 / 2 edges) and held
    the engine past the request's deadline. Now: the pattern, n colours, and the right
    matrix, the colouring with no graph at all."""
    from jacobian_service.examples import softmax
    from jacobian_service.sparsity import entry_limit
    from jacobian_service.sparsity.compute import resolve

    n = 2000
    x = torch.linspace(0.5, 1.5, n)
    check, calls = stop_after(10**9)
    # CPU time, not the wall clock's: a loaded machine (a tenth of a core) stretches the
    # wall time of the same work ten times; the work itself is what was a minute.
    t0 = time.process_time()
    with entry_limit((256 << 20) // 16, (256 << 20) // 64):  # the engine's, at its CPU budget
        p, coloring, cached = resolve(softmax, [x], cache=PatternCache(None), check_alive=check)
    assert time.process_time() - t0 < 8  # ~0.7 s here (all threads); 60 s and more before
    assert p.nnz == n * n and coloring.n_colors == n and cached == "" and len(calls) >= 3
    small = torch.linspace(0.5, 1.5, 50, dtype=torch.float64)
    result = sparse_jacobian(softmax, [small], cache=PatternCache(None))
    assert result.n_products == 50
    np.testing.assert_allclose(result.matrix.toarray(), dense_jacobian(softmax, [small]), rtol=1e-12, atol=1e-12)


def test_auto_mode_skips_a_side_that_cannot_win(monkeypatch):
    """Reverse mode colours a dense row's outputs with one colour; forward mode would
    colour that row's columns (a clique) first. A side whose lower bound the other's
    colouring already meets is never coloured."""
    from jacobian_service.sparsity import coloring

    rows = np.repeat(np.arange(4), 1000)
    p = Pattern((4, 4000), rows, np.arange(4000))  # disjoint dense rows, as w @ x w.r.t. w
    real = coloring.column_coloring

    def column_coloring(q, *a, **k):
        assert q.shape == (4000, 4), "coloured the forward side"  # the transpose: rev's rows
        return real(q, *a, **k)

    monkeypatch.setattr(coloring, "column_coloring", column_coloring)
    c = coloring.choose_coloring(p)
    assert c.mode == "rev" and c.n_colors == 1


# --------------------------------------------------------------------------- patterns that depend on values


def _matvec(x, A):
    return A @ x


def _gather(x, idx):
    return x[idx]


def _branchy(x):
    if bool(x.sum() > 0):
        return 2 * x
    return 2 * torch.roll(x, 1)


def _argsorted(x):
    return x[torch.argsort(x)]


def _positives(x):
    return x[x > 0] * 3


def _assembled(x, nodes):  # element values added into the nodes an input names
    return x.new_zeros(4).index_add(0, nodes, x * x)


_N = 6
_VALUE_CASES = {
    # name: (fn, two points whose patterns differ)
    "matvec": (_matvec, [[torch.arange(1.0, _N + 1), torch.eye(_N)],
                         [torch.arange(1.0, _N + 1), torch.eye(_N) + torch.roll(torch.eye(_N), 1, 1)]]),
    "gather": (_gather, [[torch.arange(1.0, _N + 1), torch.arange(_N)], [torch.arange(1.0, _N + 1), torch.arange(_N).flip(0)]]),
    "branchy": (_branchy, [[torch.arange(1.0, _N + 1)], [-torch.arange(1.0, _N + 1)]]),
    "argsort": (_argsorted, [[torch.arange(1.0, _N + 1)], [torch.arange(1.0, _N + 1).flip(0)]]),
    "index_add": (_assembled, [[torch.arange(1.0, _N + 1), torch.tensor([0, 1, 1, 2, 3, 3])],
                               [torch.arange(1.0, _N + 1), torch.tensor([3, 3, 2, 1, 0, 0])]]),
    "positives": (_positives, [[torch.tensor([1.0, -1, -1, -1, -1, -1])], [torch.tensor([1.0, 1, 1, -1, -1, -1])]]),
}


@pytest.mark.parametrize("mode", ["fwd", "rev"])
@pytest.mark.parametrize("case", sorted(_VALUE_CASES))
def test_a_pattern_that_depends_on_values_is_not_reused_at_another_point(case, mode):
    """The pattern of A @ x with A an input, x[idx], a branch on x, x[argsort(x)] and
    x[x > 0] follows the values: detected at one point, it is wrong at the other. The
    tracer says so, and the cache keeps it for its own point only: each answer equals
    jacrev at its point, and the same point again hits the cache."""
    fn, points = _VALUE_CASES[case]
    cache = PatternCache(None)
    for args in points + points:
        r = sparse_jacobian(fn, args, (0,), mode=mode, cache=cache, name=case)
        want = dense_jacobian(fn, args)
        assert r.matrix.shape == want.shape
        np.testing.assert_array_equal(r.matrix.toarray(), want)
        assert r.pattern.value_dependent and any("input values" in note for note in r.pattern.notes)
    # the second round met each point again: from the cache
    assert sparse_jacobian(fn, points[0], (0,), mode=mode, cache=cache, name=case).timings["cached"] == "memory"


def test_structural_masks_and_dense_constants_do_not_make_a_pattern_value_dependent():
    """torch.where and masked_fill keep both branches (structural); a non-differentiated
    input with no zeros here exploits no zeros; multiplying by an input reads nothing."""
    x, w = torch.rand(8) + 0.5, torch.rand(8, 8) + 0.5
    for fn, args in ((lambda x: torch.where(x > 1.0, x * x, torch.roll(x, 1)), [x]),
                     (lambda x: x.masked_fill(x > 1.0, 0.0) * 2, [x]),
                     (lambda x, w: w @ x, [x, w]),
                     (lambda x, w: x * w[0], [x, w])):
        p = trace_jacobian(fn, args)
        assert not p.value_dependent, p.notes
        r = sparse_jacobian(fn, args, cache=PatternCache(None))
        np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, args), rtol=1e-6)


def test_a_batch_refuses_a_pattern_that_depends_on_values():
    from jacobian_service.sparsity.compute import resolve, sparse_batch

    fn, points = _VALUE_CASES["matvec"]
    p, coloring, _ = resolve(fn, points[0], cache=PatternCache(None))
    stacked = [torch.stack(col) for col in zip(*points)]
    with pytest.raises(ValueError, match="one point"):
        sparse_batch(fn, stacked, (0,), p, coloring, _N)


def test_a_value_dependent_pattern_on_disk_is_kept_per_point(tmp_path):
    fn, points = _VALUE_CASES["gather"]
    first = [sparse_jacobian(fn, args, cache=PatternCache(tmp_path), name="gather") for args in points]
    again = [sparse_jacobian(fn, args, cache=PatternCache(tmp_path), name="gather") for args in points]  # restarts
    for args, a, b in zip(points, first, again):
        assert a.timings["cached"] == "" and b.timings["cached"] == "disk"
        np.testing.assert_array_equal(b.matrix.toarray(), dense_jacobian(fn, args))


def _doubles_in_place(x):
    with torch.no_grad():
        x.mul_(2)
    return x**3


@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
def test_an_in_place_write_under_no_grad_keeps_dependencies_and_every_call_sees_the_inputs(mode):
    """x.mul_(2) under no_grad, then x**3: autograd keeps x as the leaf, so jacrev gives
    3 (2x)^2 on the diagonal (12, 48, 108 at [1, 2, 3]). The tracer dropped x's
    dependencies (nnz 0, exact: true); and each of the engine's calls of the function
    (forward, trace, products) must start from the caller's x, never the doubled one."""
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    p = trace_jacobian(_doubles_in_place, [x.clone()])
    assert p == Pattern((3, 3), np.arange(3), np.arange(3)) and any("no_grad" in n for n in p.notes)
    r = sparse_jacobian(_doubles_in_place, [x], mode=mode, cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), np.diag([12.0, 48.0, 108.0]))
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0, 3.0])  # the caller's tensor is untouched
    h = sparse_hessian(lambda v: _doubles_in_place(v).sum(), [x], cache=PatternCache(None))
    want = torch.func.hessian(lambda v: _doubles_in_place(v).sum())(x.clone()).numpy()
    np.testing.assert_allclose(h.matrix.toarray(), want)
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0, 3.0])


_W = torch.tensor([[1.0, 2, 0, 0], [0, 1, 2, 0], [0, 0, 1, 2], [0, 0, 0, 1]], dtype=torch.float64)


def _relaid(x):
    y = x.reshape(2, -1).clone()
    y.transpose_(0, 1)  # (n/2, 2), strides (1, n/2)
    y.unsqueeze_(0)
    y.squeeze_(0)
    z = y.t_().reshape(-1)  # back to x's order
    return 2 * z + torch.roll(x, 1) * x


@pytest.mark.parametrize("fn,x", [
    (lambda x: x @ _W + torch.relu(x.flip(0) - 10.0), torch.tensor([1.0, 1, 1, 12], dtype=torch.float64)),
    (_relaid, torch.arange(1.0, 9.0, dtype=torch.float64)),
])
def test_in_place_changes_of_layout_are_traced(fn, x):
    """x @ W (vector @ matrix): torch's matmul squeezes its result in place (squeeze_),
    which sent detection to probing; and transpose_, unsqueeze_, squeeze_, t_ by hand."""
    p = trace_jacobian(fn, [x])
    assert p.source == "traced" and p.exact and not p.value_dependent
    assert p.contains(true_pattern(fn, [x]))
    r = sparse_jacobian(fn, [x], cache=PatternCache(None))
    assert r.source == "traced"
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, [x]), rtol=1e-12)


_COLUMNS = torch.tensor([3, 2, 1, 0])


def _columns_set(x):
    y = x.clone()
    y[:, _COLUMNS] = x * 2  # aten: index_put_(y, [None, idx], ...): None is a whole dimension
    return y


def _columns_added(x):
    y = x * 1.0
    y[..., _COLUMNS] += x**2
    return y


def _columns_3d(x):
    y = x.clone()
    y[:, :, torch.tensor([1, 0, 2])] = x.flip(0) * 3
    return y


@pytest.mark.parametrize("fn,shape", [(_columns_set, (4, 4)), (_columns_added, (4, 4)), (_columns_3d, (2, 3, 3))],
                         ids=["set", "added", "3d"])
def test_writes_indexed_past_a_whole_dimension_are_traced_where_they_land(fn, shape):
    """``y[:, idx] = v``: aten spells the whole first dimension ``None`` in its index
    list. Read as Python indexing (a new axis), the tracer put the writes in the rows
    ``idx`` names: on a square matrix every entry was wrong, with ``exact: true``."""
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(fn, [x])
    assert p.source == "traced" and p.exact
    assert p == true_pattern(fn, [x])
    r = sparse_jacobian(fn, [x], cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, [x]), rtol=1e-12)
    h = sparse_hessian(lambda x: (fn(x) ** 2).sum(), [x], cache=PatternCache(None))
    want = torch.func.hessian(lambda x: (fn(x) ** 2).sum())(x).reshape(x.numel(), -1).numpy()
    np.testing.assert_allclose(h.matrix.toarray(), want, rtol=1e-10, atol=1e-12)


class _RoundStraightThrough(torch.autograd.Function):
    """round(x) with the identity's derivative (a straight-through estimator)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def jvp(ctx, t):
        return t


class _CoupledBackward(torch.autograd.Function):
    """Forward 2 x; its backward (and jvp) couple neighbours."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2 + torch.roll(g, 1)

    @staticmethod
    def jvp(ctx, t):
        return t * 2 + torch.roll(t, -1)


@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
@pytest.mark.parametrize("fn", [
    lambda x: _RoundStraightThrough.apply(x) * 2,
    lambda x: torch.roll(x, 1) ** 2 + _CoupledBackward.apply(x[:4]).sum(),
], ids=["straight_through", "coupled"])
def test_a_custom_autograd_function_is_differentiated_by_its_backward(fn, mode):
    """A custom autograd.Function's derivative is its backward, which its forward's ops
    do not show, and its forward runs under no_grad: the tracer gave a straight-through
    round no entries (nnz 0 with exact: true, where jacrev is 2 I). Now every output of
    the Function depends on all of its inputs, the pattern says so, and the products are
    VJPs whatever mode asks (a Function's jvp may differ from the backward jacrev uses)."""
    x = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = sparse_jacobian(fn, [x], mode=mode, cache=PatternCache(None))
    assert r.source == "traced" and not r.pattern.exact and r.mode == "rev"
    assert any("autograd.Function" in note for note in r.pattern.notes)
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, [x]), rtol=1e-12)
    assert r.pattern.contains(true_pattern(fn, [x]))
    h = sparse_hessian(lambda x: (fn(x) * x).sum(), [x], cache=PatternCache(None))
    want = torch.func.hessian(lambda x: (fn(x) * x).sum())(x).numpy()
    np.testing.assert_allclose(h.matrix.toarray(), want, rtol=1e-12)


_PRELU_WEIGHT = torch.tensor([0.2], dtype=torch.float64)


@pytest.mark.parametrize("mode", ["fwd", "auto"])
@pytest.mark.parametrize("fn", [
    lambda x: torch.nn.functional.prelu(x, _PRELU_WEIGHT) + torch.roll(x, 1),
    lambda x: torch.fmax(x, torch.zeros_like(x)) * torch.roll(x, 1),
    lambda x: torch.cdist(x.reshape(-1, 2), x.reshape(-1, 2)).sum(1),
], ids=["prelu_at_0", "fmax_ties", "cdist_no_forward_ad"])
def test_forward_products_give_jacrevs_answer(fn, mode):
    """Where jvp and vjp differ (prelu at 0, ties of fmax) forward products answered
    jacfwd's derivative (off by 0.8 and 1), and an op without forward AD (cdist) failed
    where jacrev answers: the answer never depends on mode. One VJP now checks a forward
    answer; where it differs, or a JVP fails, VJPs over the same pattern answer."""
    # jacrev row by row: torch's vmap of cdist's backward gives every row the first one's
    # (so the library's sparse answer, vmapped unchecked without a name, agreed with it)
    x = torch.tensor([0.0, 1.0, -2.0, 0.0, 3.0, -1.0], dtype=torch.float64)
    r = sparse_jacobian(fn, [x], mode=mode, cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), torch.func.jacrev(fn, chunk_size=1)(x).numpy(), rtol=1e-12, atol=1e-12)
    assert r.mode == r.coloring.mode == "rev"
    y = x + 0.5  # smooth here: forward products stand when fwd asks for them
    r = sparse_jacobian(fn, [y], mode="fwd", cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), torch.func.jacrev(fn, chunk_size=1)(y).numpy(), rtol=1e-12, atol=1e-12)


def _by_requires_grad(x, c):
    """jacrev's tensors computed from x say requires_grad, c (not differentiated) does not."""
    y = x**2 if x.requires_grad else torch.roll(x, 1)
    return y * (c if not c.requires_grad else 0.0) + (torch.roll(y, 2) if y.requires_grad else 0.0)


def test_a_branch_on_requires_grad_is_traced_as_jacrev_takes_it():
    """The tracer's tensors said requires_grad False where jacrev's say True: a function
    branching on it was traced through the other branch, and its pattern (a roll where
    jacrev has a diagonal) gave wrong values with exact: true."""
    x = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    r = sparse_jacobian(_by_requires_grad, [x, c], cache=PatternCache(None))
    assert r.source == "traced" and r.pattern.exact
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(_by_requires_grad, [x, c]), rtol=1e-12)
    assert r.pattern == true_pattern(_by_requires_grad, [x, c])


@pytest.mark.parametrize("fn", [
    lambda x: torch.empty_like(x).fill_(x[0]) * 2 + x,
    lambda x: torch.fill(x, x[1] ** 2),
    lambda x: torch.zeros_like(x).fill_(x.sum()),
    lambda x: (lambda y: (y[2:].fill_(x[0]), y)[1])(x.clone()),
], ids=["fill_", "torch.fill", "fill_sum", "fill_view"])
def test_filling_with_a_traced_value_depends_on_that_value(fn):
    """fill with a tensor value (y.fill_(x[0]), torch.fill(x, t)) was traced as a constant
    fill: the elements got no dependencies (nnz 0 with exact: true where jacrev is
    nonzero)."""
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(fn, [x])
    assert p.exact and p == true_pattern(fn, [x])
    r = sparse_jacobian(fn, [x], cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, [x]), rtol=1e-12)


_SEGMENTS = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])  # 10 elements into 4 segments (5 slots)
_EDGES = (torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 2, 3, 4, 0, 2]))  # a graph of 5 nodes


def _message_passing(x):  # one GNN layer: tanh messages summed at their destination node
    X = x.reshape(5, 2)
    src, dst = _EDGES
    return X.new_zeros(5, 2).index_add(0, dst, torch.tanh(X[src])) * X


def _in_place_index_add(x):
    r = x.new_zeros(5)
    r.index_add_(0, _SEGMENTS, x * x, alpha=2.5)
    return r


def _in_place_scatter_add(x):
    r = x.new_zeros(5)
    r.scatter_add_(0, _SEGMENTS, torch.sin(x))
    return r * r


_SCATTERS = {
    "index_add": _message_passing,
    "index_add_": _in_place_index_add,
    "index_add_dim1": lambda x: x.reshape(2, 5)[:, :3].index_add(1, torch.tensor([2, 0, 2, 1, 1]), x.reshape(2, 5) ** 2),
    "index_add_self": lambda x: x.index_add(0, _SEGMENTS, x.roll(1) * x),
    "scatter_add": lambda x: x.new_zeros(5).scatter_add(0, _SEGMENTS, x ** 3),
    "scatter_add_": _in_place_scatter_add,
    "scatter_add_2d": lambda x: x.new_zeros(3, 5).scatter_add(0, torch.tensor([[1, 0, 1, 0, 2]]), x.reshape(2, 5)[:1] * x.reshape(2, 5)[1:]),
    "scatter_reduce_sum": lambda x: x.new_ones(5).scatter_reduce(0, _SEGMENTS, x * x, "sum"),
    "scatter_reduce_mean": lambda x: x.new_ones(5).scatter_reduce(0, _SEGMENTS, x.exp(), "mean", include_self=False),
    "scatter_reduce_prod": lambda x: x.new_ones(5).scatter_reduce(0, _SEGMENTS, x, "prod"),
    "scatter": lambda x: x.reshape(2, 5).scatter(1, torch.tensor([[0, 3, 1], [2, 4, 0]]), x.reshape(2, 5)[:, 2:] ** 2),
    "scatter_value_": lambda x: (x * 1.0).scatter_(0, torch.tensor([1, 2]), 0.5) ** 2,
    "index_copy": lambda x: x.index_copy(0, torch.tensor([0, 9]), x[4:6] ** 2),
    "index_copy_": lambda x: (x * 2).index_copy_(0, torch.tensor([3, 1]), x[:2].sin()) * x,
    "index_fill": lambda x: x.reshape(2, 5).index_fill(1, torch.tensor([0, 3]), 1.5) * x.reshape(2, 5),
    "index_fill_tensor": lambda x: x.reshape(2, 5).index_fill(1, torch.tensor([0, 3]), x[4]) * x.reshape(2, 5),
    "index_put_accumulate": lambda x: x.new_zeros(5).index_put_((_SEGMENTS,), x.cos(), accumulate=True),
    "index_reduce_prod": lambda x: x.new_ones(5).index_reduce(0, _SEGMENTS, x, "prod"),
    "index_reduce_mean": lambda x: x.new_ones(5).index_reduce(0, _SEGMENTS, x * x, "mean", include_self=False),
    "put": lambda x: x.new_zeros(6).put(torch.tensor([0, 5, 5, 2]), x[:4] ** 2, accumulate=True),
    "put_": lambda x: (x * 1).put_(torch.tensor([0, -1, 3]), x[5:8].sin()) * x,
    "embedding": lambda x: torch.nn.functional.embedding(torch.tensor([[0, 2], [4, 4]]), x.reshape(5, 2)).sin(),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over index_copy_, scatter_ (torch's own)
@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
@pytest.mark.parametrize("name", sorted(_SCATTERS))
def test_scatter_style_ops_are_traced_exactly(name):
    """index_add, scatter_add, scatter_reduce, scatter, index_copy and index_fill (in place
    or not) were traced as dense ops: every output on every input, exact: false. How
    finite-element residuals and graph operators are assembled, so their Jacobians came
    out dense (a 413 at scale). Each source element now lands where the index says."""
    fn = _SCATTERS[name]
    x = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(fn, [x])
    assert p.source == "traced" and p.exact and not p.value_dependent, p.notes
    assert p == true_pattern(fn, [x])
    r = sparse_jacobian(fn, [x], cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, [x]), rtol=1e-12, atol=1e-12)
    h = sparse_hessian(lambda x: (fn(x) ** 2).sum(), [x], cache=PatternCache(None))
    # index_reduce has no forward AD, so no torch.func.hessian: jacrev over jacrev, as the dense Hessian falls back
    hessian = torch.func.hessian if not name.startswith("index_reduce") else lambda f: torch.func.jacrev(torch.func.jacrev(f))
    want = hessian(lambda x: (fn(x) ** 2).sum())(x).reshape(x.numel(), -1).numpy()
    np.testing.assert_allclose(h.matrix.toarray(), want, rtol=1e-10, atol=1e-12)


_SEGMENT_MAX = {  # each of the 5 outputs: the largest (smallest) of its segment's elements
    "scatter_reduce_amax": lambda x: x.new_zeros(5).scatter_reduce(0, _SEGMENTS, x, "amax", include_self=False),
    "scatter_reduce_amin_": lambda x: x.new_zeros(5).scatter_reduce_(0, _SEGMENTS, x, "amin", include_self=False),
    "index_reduce_amax": lambda x: x.new_zeros(5).index_reduce(0, _SEGMENTS, x, "amax", include_self=False),
    "segment_reduce_max": lambda x: torch.segment_reduce(x, "max", lengths=torch.tensor([2, 3, 1, 4, 0]), initial=0.0),
}


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
@pytest.mark.parametrize("name", sorted(_SEGMENT_MAX))
def test_scatter_max_is_a_superset(name):
    """amax / amin pass the derivative to the winners only: the pattern keeps every
    candidate (as max reductions do), never fewer, and says so: ``conservative`` (with
    the choice note), as a max over a dim does. A scatter's, index's or segment's max
    was stored as an exact pattern that was not conservative (24 entries where 6 are
    nonzero, nothing saying why)."""
    fn = _SEGMENT_MAX[name]
    x = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(fn, [x])
    members = _SEGMENTS.numpy()[None, :] == np.arange(5)[:, None]  # row s: the elements of segment s
    assert p.exact and np.array_equal(p.to_dense(), members)
    assert p.conservative and any(n.startswith(CHOICE_NOTE) for n in p.notes), p.notes
    assert not (dense_jacobian(fn, [x]) != 0)[~members].any()
    r = sparse_jacobian(fn, [x], cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, [x]), rtol=1e-12)


def test_sums_and_nan_to_num_are_no_choices():
    """A scatter's sum and a segment's sum read every element (no choice: not
    conservative); nan_to_num passes the derivative where the value is finite only, a
    choice the values make (conservative, as a clamp is)."""
    x = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for fn in (lambda x: x.new_zeros(5).scatter_reduce(0, _SEGMENTS, x, "sum"),
               lambda x: torch.segment_reduce(x, "sum", lengths=torch.tensor([2, 3, 5]))):
        assert not trace_jacobian(fn, [x]).conservative
    p = trace_jacobian(lambda x: torch.nan_to_num(torch.log(x)), [x])  # NaN where x < 0: a zero derivative there
    assert p.nnz == 10 and p.conservative, p.notes


# Empty intermediates (a slice of a size-1 dim), as a 1 x n grid makes them; each case's
# output is what jacrev reads, its empty part no entry.
_EMPTY = {
    "sum": lambda x: x[10:].sum() + x,
    "mean_norm": lambda x: torch.nan_to_num(x[10:].mean()) + x[10:].norm() + x,
    "sum_dim": lambda x: torch.cat([x[10:].reshape(0, 2).sum(0), x]),
    "cumsum_softmax_sort": lambda x: torch.cat([x[10:].cumsum(0), x[10:].softmax(0), x[10:].sort().values, x]),
    "cdist": lambda x: torch.cat([torch.cdist(x[10:].reshape(0, 2), x.reshape(5, 2)).reshape(-1), x]),
    "prod_dim_in_place": lambda x: x.reshape(10, 1)[:, :0].prod(1) * x + (x[10:] * 2).add_(1).sum(),
    "diagonal_differences": lambda x: ((x.reshape(1, 10)[1:, 1:] - x.reshape(1, 10)[:-1, :-1]) ** 2).sum() + x.sin(),
}


@pytest.mark.parametrize("name", sorted(_EMPTY))
def test_empty_intermediates_read_nothing(name):
    """A reduction, scan or line op over an empty slice failed the trace (scipy's (1, 1)
    x (0, n) product: ``matmul: dimension mismatch``), and cdist of no points alike: the
    whole request was probed (``source: probed``, exact false). An op with no element
    out, or none in, reads nothing; the rest of the pattern is traced exactly."""
    fn = _EMPTY[name]
    x = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(fn, [x])
    assert p.source == "traced" and p.exact and not p.conservative, p.notes
    assert p == true_pattern(fn, [x])


def test_a_one_row_grids_hessian_is_traced():
    """The 9-point energy of a 1 x n grid: its diagonal differences are empty."""
    def energy(u):
        g = u.reshape(1, -1)
        diag = g[1:, 1:] - g[:-1, :-1]
        return (diag**2).sum() + ((g[:, 1:] - g[:, :-1]) ** 2).sum() + (u**4).sum()

    x = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_hessian(energy, [x])
    assert p.source == "traced" and p.exact
    assert np.array_equal(p.to_dense(), torch.func.hessian(energy)(x).numpy() != 0)


def _interior_writes(x):  # writes through views of a fresh buffer: R[1:-1] += ..., its slice's index_add_
    R = torch.zeros(x.shape[0] + 2, dtype=x.dtype)
    R[1:-1].index_add_(0, torch.arange(x.shape[0] - 1), x[1:] * x[:-1])
    R[1:-1] += x**2
    return R


def _accumulated(x):  # R[idx] += v with repeated nodes: index_put_(accumulate=True) into torch.full
    R = torch.full((4,), 0.5, dtype=x.dtype)
    R.index_put_((_SEGMENTS[: x.shape[0]] % 4,), x.sin(), accumulate=True)
    return R * R


def _filled_then_scattered(x):
    R = torch.empty(5, dtype=x.dtype).fill_(1.0)
    R.scatter_add_(0, _SEGMENTS[: x.shape[0]], x.exp())
    return R


@pytest.mark.parametrize("fn,shape", [
    (sparse_fem.fem_1d, (12,)), (sparse_fem.fem_2d, (4, 5)), (_interior_writes, (9,)),
    (_accumulated, (10,)), (_filled_then_scattered, (10,)),
], ids=["fem_1d", "fem_2d", "views", "index_put_accumulate", "empty_fill_scatter_add"])
def test_assembly_into_a_buffer_the_function_makes_is_traced(fn, shape):
    """``R = torch.zeros(n); R.index_add_(0, elements, contributions)``: how residuals
    are assembled. The tracer never saw the buffer made (a factory has no traced
    argument), so the write was 'a traced value into an untraced tensor': tracing gave
    up, and probing (dense derivatives) ran, a 413 at any real size. Buffers the
    function makes are now traced, with no dependencies, from the start."""
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    p = trace_jacobian(fn, [x])
    assert p.source == "traced" and p.exact and not p.value_dependent, p.notes
    assert p == true_pattern(fn, [x])
    r = sparse_jacobian(fn, [x], cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, [x]), rtol=1e-12, atol=1e-12)
    h = sparse_hessian(lambda x: (fn(x) ** 2).sum(), [x], cache=PatternCache(None))
    want = torch.func.hessian(lambda x: (fn(x) ** 2).sum())(x).reshape(x.numel(), -1).numpy()
    np.testing.assert_allclose(h.matrix.toarray(), want, rtol=1e-10, atol=1e-12)


def _scaled_by_a_constant(x):
    c = torch.linspace(1, 2, x.shape[0], dtype=x.dtype)
    if c.sum() > 0:  # a constant the function made: reading it reads no input value
        c = c * 2
    return torch.eye(x.shape[0], dtype=x.dtype) @ x * c  # its zeros are the same at every point


def test_constants_the_function_makes_read_no_input_values():
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(_scaled_by_a_constant, [x])
    assert p.exact and not p.value_dependent and p == Pattern((6, 6), np.arange(6), np.arange(6)), p.notes


@functools.lru_cache
def _laplacian(n):  # a helper that caches a matrix it builds from torch.zeros
    K = torch.zeros(n, n, dtype=torch.float64)
    i = torch.arange(n)
    K[i, i] = 2.0
    K[i[:-1], i[1:]] = -1.0
    K[i[1:], i[:-1]] = -1.0
    return K


def _cached_operator(x):
    return _laplacian(x.shape[0]) @ x + x**3


def test_a_buffer_kept_past_the_trace_is_a_plain_tensor():
    """A buffer the function made while traced and kept (functools.cache) is a plain
    constant to every later call: plain results, jacrev's derivative, and later traces
    read it as a constant."""
    _laplacian.cache_clear()
    x = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(_cached_operator, [x])  # the first call: the cache is filled while traced
    assert p.exact and not p.value_dependent and p == true_pattern(_cached_operator, [x])
    out = _cached_operator(x)
    assert type(out) is torch.Tensor
    np.testing.assert_allclose(out.numpy(), (_laplacian.__wrapped__(7) @ x + x**3).numpy())
    np.testing.assert_allclose(dense_jacobian(_cached_operator, [x]), _laplacian.__wrapped__(7).numpy() + np.diag(3 * x.numpy() ** 2))
    assert trace_jacobian(_cached_operator, [x]) == p
    _laplacian.cache_clear()


@pytest.mark.parametrize("fn", [
    lambda x: x / x.sum(),
    lambda x: torch.empty_like(x).fill_(x.sum()),
    lambda x: x.index_fill(0, torch.arange(x.shape[0]), x.sum()),
], ids=["div_sum", "fill_", "index_fill"])
def test_a_row_broadcast_past_the_limit_is_refused_before_it_is_built(fn, monkeypatch):
    """``x / x.sum()`` broadcasts the sum's row (every input) to every element: n^2
    entries, counted only once built. At n = 10^5 that is 10^10 entries (over 100 GB)
    in the engine before the 413. Now counted before they are gathered."""
    from jacobian_service.sparsity import detect
    from jacobian_service.sparsity.patterns import PatternTooLarge, entry_limit

    built = []
    real = detect._ones
    monkeypatch.setattr(detect, "_ones", lambda m: built.append(int(m.nnz)) or real(m))  # every matrix the tracer builds
    with entry_limit(1000), pytest.raises(PatternTooLarge, match="10,000 entries"):
        trace_jacobian(fn, [torch.rand(100, dtype=torch.float64)])
    assert max(built) <= 1000


@pytest.mark.parametrize("fn", [
    lambda x: x * torch.from_numpy(np.cumsum(torch.ones(x.shape[0], dtype=x.dtype).numpy())),
    lambda x: x * sum(torch.ones(3).tolist()),
    lambda x: x * float(np.asarray(torch.full((1,), 2.0)).sum()),
], ids=["numpy", "tolist", "asarray"])
def test_a_constant_the_function_makes_can_be_read_out(fn):
    """Constants the function makes are traced (so that writes into them are): reading
    one out to numpy or Python reads no input value, and tracing goes on."""
    x = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(fn, [x])
    assert p.exact and not p.value_dependent and p == Pattern((6, 6), np.arange(6), np.arange(6))


def test_reading_out_a_buffer_written_from_the_inputs_is_not_traced():
    def fn(x):
        r = torch.zeros(x.shape[0], dtype=x.dtype)
        r.index_add_(0, torch.arange(x.shape[0]), x)
        return x * float(r.numpy().sum())  # values that vary with x, read where the tracer cannot follow

    with pytest.raises(TraceError, match="numpy"):
        trace_jacobian(fn, [torch.rand(4, dtype=torch.float64)])


def test_a_sparse_constant_the_function_makes_stays_a_plain_tensor():
    """torch.eye(n).to_sparse() made inside the function: the tracer's wrapper is strided
    only, so a traced sparse constant failed every op it met (then probing)."""
    fn = lambda x: torch.sparse.mm(torch.eye(6, dtype=x.dtype).to_sparse(), x[:, None])[:, 0] + x  # noqa: E731
    x = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(fn, [x])  # sparse.mm of a constant: each row's stored entries
    assert p.source == "traced" and p.exact and p == Pattern((6, 6), np.arange(6), np.arange(6))
    want = torch.autograd.functional.jacobian(fn, x).numpy()  # (vmap, so jacrev, refuses sparse tensors)
    r = sparse_jacobian(fn, [x], mode="rev", chunk_size=1, cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), want, rtol=1e-12)


def _random_scatter(x):  # indices drawn inside the function: the pattern follows the draw
    idx = torch.randint(0, x.shape[0], (x.shape[0],))
    return torch.zeros_like(x).index_add(0, idx, x ** 2) + x


def _numpy_scatter(x):  # drawn by numpy: no torch op says so
    idx = torch.from_numpy(np.random.randint(0, x.shape[0], x.shape[0]))
    return torch.zeros_like(x).index_add(0, idx, x ** 2) + x


def _dropout_line(x):
    return torch.nn.functional.dropout(x, 0.5).cumsum(0)


def _one_draws(J, x, y):
    """J is the Jacobian of the draw y shows: past the identity, one entry 2 x_k per
    column k, in the row y says x_k**2 went to."""
    P = J - np.eye(x.size)
    assert ((P != 0).sum(axis=0) == 1).all()
    np.testing.assert_allclose(P.max(axis=0), 2 * x, rtol=1e-12)
    np.testing.assert_allclose(y, x + P @ (x / 2), rtol=1e-12)


@pytest.mark.parametrize("fn", [_random_scatter, _numpy_scatter, _dropout_line], ids=["randint", "numpy", "dropout"])
@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_a_function_that_draws_random_indices_gets_the_jacobian_of_one_draw(fn, mode):
    """Indices drawn inside the function were constants to the tracer: the pattern of
    one draw was cached and decompressed products of other draws (and each JVP drew
    anew), silently wrong (errors ~2) with exact: true. Now every call of one request
    draws what one call draws, the pattern is never reused, and for torch's generators
    the answer is jacrev's with the same seed, leaving them where jacrev leaves them."""
    cache = PatternCache(None)
    x = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    for seed in (1, 2, 1):
        torch.manual_seed(seed), np.random.seed(seed)
        r = sparse_jacobian(fn, [x], mode=mode, cache=cache)
        assert r.pattern.value_dependent and any("draws random numbers" in note for note in r.pattern.notes)
        assert not r.timings["cached"]
        if fn is not _dropout_line:
            _one_draws(r.matrix.toarray(), x.numpy(), r.output.numpy())
        if fn is not _numpy_scatter:  # numpy's draws are seen once made: a later draw's answer
            after = torch.random.get_rng_state()
            torch.manual_seed(seed)
            np.testing.assert_array_equal(r.matrix.toarray(), torch.func.jacrev(fn)(x).numpy())
            assert torch.equal(after, torch.random.get_rng_state())


def test_a_sparse_hessian_of_a_function_that_draws_is_one_draws():
    f = lambda x: (_random_scatter(x) ** 3).sum() + (_dropout_line(x) ** 2).sum()  # noqa: E731
    x = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    torch.manual_seed(4), np.random.seed(4)
    r = sparse_hessian(f, [x], cache=PatternCache(None))
    torch.manual_seed(4), np.random.seed(4)  # (torch.func.hessian refuses random ops under its vmap)
    want = torch.func.jacfwd(torch.func.jacrev(f), randomness="same")(x).numpy()
    np.testing.assert_allclose(r.matrix.toarray(), want, rtol=1e-12, atol=1e-12)


def test_a_generator_the_function_keeps_is_caught_by_the_check():
    """A torch.Generator kept across calls cannot be put back: its draws differ from
    call to call. The tracer sees its op, so the products are checked, and the answer
    is computed densely (one call: one draw) rather than wrong."""
    gen = torch.Generator().manual_seed(5)

    def fn(x):
        idx = torch.randint(0, x.shape[0], (x.shape[0],), generator=gen)
        return torch.zeros_like(x).index_add(0, idx, x ** 2) + x

    x = torch.rand(12, dtype=torch.float64) + 0.5
    r = sparse_jacobian(fn, [x], mode="rev", cache=PatternCache(None))
    J = r.matrix.toarray() - np.eye(12)
    # one draw: each column holds 2 x_k once, in some row
    np.testing.assert_allclose(np.sort(J, axis=0)[-1], 2 * x.numpy(), rtol=1e-12)
    assert ((J != 0).sum(axis=0) == 1).all()


def test_a_probed_hessian_pattern_proven_wrong_is_widened_in_the_cache():
    """Untraceable (it writes into a buffer numpy made), with a coupling x0 * x1 only where
    x2 == 1: probed away from it, then asked at x2 == 1 (proven wrong: dense), then
    again: the cached pattern now holds the coupling, and the products answer."""
    def f(x):
        buf = torch.from_numpy(np.zeros(x.shape[0])).to(x.dtype)
        buf[:] = x ** 3  # a traced value into an untraced tensor: probing runs
        return buf.sum() + torch.where(x[2] == 1.0, x[0] * x[1], torch.zeros_like(x[0]))

    cache = PatternCache(None)
    away, at_one = torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64), torch.tensor([2.0, 3.0, 1.0, 5.0], dtype=torch.float64)
    assert sparse_hessian(f, [away], cache=cache).pattern.nnz == 4
    for point, dense in ((at_one, True), (at_one, False), (away, False)):
        r = sparse_hessian(f, [point], cache=cache)
        np.testing.assert_allclose(r.matrix.toarray(), torch.func.hessian(f)(point).numpy(), rtol=1e-12)
        assert any("proved this pattern wrong" in note for note in r.pattern.notes) is dense
        assert r.n_products == (4 if dense else 2) and r.pattern.nnz == 6


_LAPLACE = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64).reshape(1, 1, 3, 3)
_CONV_W = torch.rand(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) / 10  # tanh far from saturating


def _laplace(mode):
    def f(x):
        if mode == "zeros":
            return torch.nn.functional.conv2d(x[None, None], _LAPLACE, padding=1)[0, 0] ** 2
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x[None, None], (1, 1, 1, 1), mode=mode), _LAPLACE)[0, 0] ** 2
    return f


_CONVOLUTIONS = [
    *[(f"laplace_{mode}", _laplace(mode), [(7, 6)], (0,)) for mode in ("zeros", "reflect", "replicate", "circular")],
    ("groups_stride_bias", lambda x: torch.tanh(torch.nn.functional.conv2d(x, _CONV_W, _CONV_W[:, 0, 0, 0], stride=2, padding=1, groups=2)),
     [(2, 4, 7, 8)], (0,)),
    ("dilation", lambda x: torch.nn.functional.conv2d(x, _CONV_W[:, :, :2], stride=(1, 2), padding=(2, 1), dilation=(2, 1)), [(1, 2, 9, 8)], (0,)),
    ("input_and_weight", lambda x, w: torch.nn.functional.conv1d(x, w, padding=1) ** 2, [(2, 3, 10), (2, 3, 3)], (0, 1)),
    ("unbatched_1d", lambda x: torch.nn.functional.conv1d(x, torch.ones(1, 1, 3, dtype=x.dtype), padding=1) * x, [(1, 9)], (0,)),
    ("input_and_bias", lambda x, b: torch.nn.functional.conv1d(x, torch.ones(2, 1, 3, dtype=x.dtype), b), [(1, 1, 9), (2,)], (0, 1)),
]


@pytest.mark.parametrize("fn,shapes,argnums", [c[1:] for c in _CONVOLUTIONS], ids=[c[0] for c in _CONVOLUTIONS])
def test_a_convolution_gets_its_window_pattern(fn, shapes, argnums):
    """conv1d/conv2d were an unknown op, assumed dense (exact: false): a 100 x 100 image
    filtered by a 3 x 3 kernel had 10^8 pattern entries (a 413), for 5 x 10^4 true
    ones. Each output element now depends on its kernel window (stride, padding,
    dilation, groups), the weights and bias of its channel, and a constant kernel's
    zero taps add nothing: the pattern is the true one, the values jacrev's."""
    gen = torch.Generator().manual_seed(0)
    args = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes]
    p = trace_jacobian(fn, args, argnums)
    assert p.exact and not p.value_dependent and p == true_pattern(fn, args, argnums)
    r = sparse_jacobian(fn, args, argnums, cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, args, argnums), rtol=1e-12, atol=1e-12)


def test_a_convolution_stencil_at_scale_is_five_products():
    x = torch.rand(100, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = sparse_jacobian(_laplace("zeros"), [x], cache=PatternCache(None))
    assert r.pattern.exact and r.pattern.nnz == 5 * 100 * 100 - 4 * 100 and r.n_products == 5
    v = torch.rand(100 * 100, dtype=torch.float64)
    _, jv = torch.func.jvp(_laplace("zeros"), (x,), (v.reshape(100, 100),))
    np.testing.assert_allclose(r.matrix @ v.numpy(), jv.reshape(-1).numpy(), rtol=1e-12, atol=1e-12)
    e = lambda u: (_laplace("reflect")(u) + u ** 3).sum()  # noqa: E731
    u = x[:12, :10].clone()
    h = sparse_hessian(e, [u], cache=PatternCache(None))
    H = torch.func.hessian(e)(u).reshape(120, 120).numpy()
    np.testing.assert_allclose(h.matrix.toarray(), H, rtol=1e-12, atol=1e-12)
    assert h.pattern.nnz == int((H != 0).sum())


def test_a_generator_the_function_seeds_itself_keeps_its_pattern_cached():
    """Weights or indices drawn from a torch.Generator the function makes and seeds at
    every call are the same at every call: the pattern is cached as any other (it was
    detected again for every request, as if the function drew anew), and checked."""
    def fn(x):
        gen = torch.Generator().manual_seed(3)
        idx = torch.randperm(x.shape[0], generator=gen)
        return x[idx] * x + torch.randn(x.shape[0], generator=gen, dtype=x.dtype) * x.roll(1)

    cache = PatternCache(None)
    x = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    for cached in ("", "memory"):
        r = sparse_jacobian(fn, [x], cache=cache)
        assert r.timings["cached"] == cached and not r.pattern.value_dependent
        assert any("seeds itself" in note for note in r.pattern.notes)
        np.testing.assert_array_equal(r.matrix.toarray(), torch.func.jacrev(fn)(x).numpy())


_NO_DERIVATIVE = {  # torch differentiates none of these: jacrev's Jacobian through them is 0
    "bessel_j0": lambda x: torch.special.bessel_j0(x).roll(1) * x + x.sin(),
    "modified_bessel_k1": lambda x: torch.special.modified_bessel_k1(x.abs() + 0.5).roll(2) + x**2,
    "hermite_polynomial": lambda x: torch.special.hermite_polynomial_h(x, 3) * x.roll(-1),
    "affine_grid": lambda x: torch.nn.functional.affine_grid(x[:6].reshape(1, 2, 3), (1, 1, 2, 3),
                                                             align_corners=False).reshape(-1),
}


@pytest.mark.parametrize("name", sorted(_NO_DERIVATIVE))
def test_functions_without_derivative_and_affine_grid(name):
    """Bessel functions and orthogonal polynomials (torch.special) have no derivative in
    torch: jacrev's Jacobian through them is zero, and the pattern held those entries
    (roll(bessel_j0(x), 1) * x: 20 for 10, two products for one). affine_grid was an
    unknown op (every grid point on every theta, exact false); its decomposition is
    traced: each point on its row of theta."""
    fn = _NO_DERIVATIVE[name]
    x = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = trace_jacobian(fn, [x])
    assert p.exact and p == true_pattern(fn, [x]), (p.nnz, p.notes)
    r = sparse_jacobian(fn, [x], cache=PatternCache(None))
    np.testing.assert_allclose(r.matrix.toarray(), dense_jacobian(fn, [x]), rtol=1e-12, atol=1e-14)
    if name == "bessel_j0":
        assert r.n_products == 1  # (2 before: x[i - 1] read through bessel_j0)
        energy = lambda x: (fn(x) * x).sum()  # noqa: E731
        h = sparse_hessian(energy, [x], cache=PatternCache(None))
        np.testing.assert_allclose(h.matrix.toarray(), torch.func.hessian(energy)(x).numpy(), rtol=1e-12, atol=1e-14)


def _steps(x):
    return x[1:] - x[:-1]


_PIECEWISE = {  # each beside x**2: torch's Hessian is the diagonal alone
    "abs_total_variation": lambda x: _steps(x).abs().sum(),
    "relu_hinge_in_place": lambda x: (1 - _steps(x)).relu_().sum(),
    "clamp_by_a_tensor": lambda x: torch.clamp(x[1:], min=x[:-1]).sum() + torch.clamp(_steps(x), -0.5, 0.5).sum(),
    "maximum_fmin": lambda x: (torch.maximum(x[1:], x[:-1]) + torch.fmin(2 * x[1:], x[:-1])).sum(),
    "hardtanh_leaky_shrink": lambda x: (torch.nn.functional.hardtanh(_steps(x)) + torch.nn.functional.leaky_relu(_steps(x), 0.1)
                                        + torch.nn.functional.softshrink(_steps(x), 0.3)).sum(),
    "fmod_copysign": lambda x: (torch.fmod(_steps(x), 0.3) + torch.copysign(x[1:], x[:-1])).sum(),
}


@pytest.mark.parametrize("name", sorted(_PIECEWISE))
def test_piecewise_linear_terms_add_no_hessian_pairs(name):
    """An L1 or total-variation penalty, a hinge, a clamp: piecewise linear, their second
    derivative zero wherever they have one, and torch's double backward through them
    zero (masks and signs). Each took the pairs of its operands (|x[i+1] - x[i]|: a
    tridiagonal pattern, 3 products, where torch's Hessian is diagonal: 1)."""
    energy = lambda x: _PIECEWISE[name](x) + (x**2).sum()  # noqa: E731
    x = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    p = trace_hessian(energy, [x])
    assert p.exact and np.array_equal(p.to_dense(), np.eye(12, dtype=bool)), p.nnz
    h = sparse_hessian(energy, [x], cache=PatternCache(None))
    assert h.n_products == 1
    np.testing.assert_allclose(h.matrix.toarray(), torch.func.hessian(energy)(x).numpy(), rtol=1e-12, atol=1e-14)


def test_a_complex_modulus_keeps_its_pairs():
    """|z| of a complex z = x + i y is sqrt(x^2 + y^2), not piecewise linear: its pairs stay."""
    energy = lambda x: torch.complex(x[1:], x[:-1]).abs().sum()  # noqa: E731
    x = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(trace_hessian(energy, [x]).to_dense(), torch.func.hessian(energy)(x).numpy() != 0)
