"""The latency cuts keep behaviour whole: a faster path gives what the path it replaces
gave, bit for bit, and hands whatever it does not cover back to that path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jacobian_service.engine.core import Engine
from jacobian_service.engine.lean_vmap import vmap_rows
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.types import Call


def _two_inputs(x, w):
    return torch.tanh(w @ x) * x[:3].sum()


def _params(x, p):
    return torch.sin(p["a"] * x) + p["b"]


@pytest.fixture
def vmaps(monkeypatch):
    """The calls of torch.func.vmap made meanwhile (it still runs)."""
    calls: list[object] = []
    real = torch.func.vmap

    def counted(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.func, "vmap", counted)
    return calls


def test_a_jacobians_rows_skip_vmaps_wrapping_and_are_jacrevs_bitwise(vmaps):
    """One cotangent tensor (one output): the pullback runs at a functorch level of the
    engine's own making (not through torch.func.vmap), one input or two, and the rows
    are torch.func.jacrev's, every bit."""
    from jacobian_service.examples import mlp

    engine = Engine(torch.device("cpu"), 1 << 28)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(128).astype(np.float32)
    spec = FunctionSpec("mlp", mlp, (Input("x", shape=(128,)),))
    got = engine.jacobian_npy(Call(spec=spec, args=[x], dtypes=["float32"], mode="rev"), 8 << 20).value
    assert vmaps == []  # (the path replaced made one vmap per request)
    assert np.array_equal(got, torch.func.jacrev(mlp)(torch.from_numpy(x)).numpy())

    x2, w = rng.standard_normal(5), rng.standard_normal((4, 5))
    spec2 = FunctionSpec("two", _two_inputs, (Input("x", shape=(5,)), Input("w", shape=(4, 5))))
    got2 = engine.jacobian(Call(spec=spec2, args=[x2, w], dtypes=["float64", "float64"], argnums=(0, 1),
                                as_tuple=True, mode="rev")).value
    want2 = torch.func.jacrev(_two_inputs, argnums=(0, 1))(torch.from_numpy(x2), torch.from_numpy(w))
    assert vmaps == []
    assert all(np.array_equal(g, t.numpy()) for g, t in zip(got2, want2))


def test_what_the_lean_path_does_not_cover_is_vmaps_own():
    """A pytree of cotangents goes to torch.func.vmap; a pullback giving a dict (pytree
    parameters) is unwrapped leaf by leaf; either way the answer is vmap's, bitwise."""
    x = torch.randn(3, dtype=torch.float64)
    p = {"a": torch.randn(3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    out, pullback = torch.func.vjp(_params, x, p)
    basis = torch.eye(3, dtype=torch.float64)
    want = torch.func.vmap(pullback)(basis)
    got = vmap_rows(pullback, basis)
    assert torch.equal(got[0], want[0]) and got[1].keys() == want[1].keys()
    assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])

    (a, b), pair_pullback = torch.func.vjp(lambda t: (t.sin(), t.cos()), x)
    pair = (basis, basis * 2)
    assert torch.equal(vmap_rows(pair_pullback, pair)[0], torch.func.vmap(pair_pullback)(pair)[0])


def test_a_failing_pullback_leaves_no_vmap_level_behind():
    """An error inside (vmap cannot batch an operation, a non-tensor output) is vmap's
    own error, and the level made for it is gone after, as vmap's context leaves it."""
    level_before = torch._C._functorch.maybe_current_level()

    def raises(t):
        raise RuntimeError("no batching rule here")

    with pytest.raises(RuntimeError, match="no batching rule here"):
        vmap_rows(raises, torch.eye(2))
    with pytest.raises(ValueError, match="must only return Tensors"):
        vmap_rows(lambda t: (t * 2, None), torch.eye(2))
    with pytest.raises(ValueError, match="must only return Tensors"):
        torch.func.vmap(lambda t: (t * 2, None))(torch.eye(2))
    assert torch._C._functorch.maybe_current_level() == level_before
    assert torch.equal(vmap_rows(lambda t: (t * 3,), torch.eye(2))[0], torch.eye(2) * 3)


def test_latency_samples_written_together_are_the_librarys_samples(tmp_path, monkeypatch) -> None:
    """Metrics.observe_all writes a request's latency phases under one lock, straight
    into the multiprocess files: the files then read, merged, as those of the library's
    own ``labels(...).observe`` do (edges, between, past the last, zero, NaN)."""
    from prometheus_client import CollectorRegistry, generate_latest, values
    from prometheus_client.multiprocess import MultiProcessCollector

    from jacobian_service.metrics import _LATENCY_BUCKETS, Metrics, _quick_values, process_id

    amounts = [0.0, float("nan"), 1e9, *_LATENCY_BUCKETS, *(b * 1.001 for b in _LATENCY_BUCKETS)]
    amounts += amounts[:(-len(amounts)) % 4]  # whole requests of four phases

    def merged(value_class, folder, together: bool) -> bytes:
        folder.mkdir()
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
        monkeypatch.setattr(values, "ValueClass", value_class)
        m = Metrics()
        for i in range(0, len(amounts), 4):
            phases = list(zip(amounts[i:i + 4], (("jacobian", p) for p in ("queue", "compute", "encode", "total"))))
            if together:
                m.observe_all(m.latency, phases)
            else:
                for amount, labels in phases:
                    m.latency.labels(*labels).observe(amount)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(folder))
        return b"\n".join(line for line in generate_latest(registry).splitlines() if b"latency" in line)

    library = merged(values.MultiProcessValue(process_identifier=process_id), tmp_path / "library", False)
    quick = merged(_quick_values(values.MultiProcessValue(process_identifier=process_id)), tmp_path / "quick", True)
    assert quick == library and library.count(b"_bucket{") == 4 * (len(_LATENCY_BUCKETS) + 1)
