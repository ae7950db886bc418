"""PyTorch's own torch.func test cases, round 11.

1. The SDK's remote adapters under ``vmap`` with an input every example shares
   (test_vmap.py's ``in_dims=(0, None)``, test_eager_transforms.py's per-sample
   gradients with shared weights): ``torch.func.vmap`` / ``jax.vmap`` over a remote
   function send the shared input once, the request's ``in_dims`` saying so, and every
   transform around them (jacrev, jacfwd, grad, jvp, vjp, hessian, backward, nested vmaps)
   equals the same transform of the function run in-process. These run against the
   session's ``jacobian-service serve`` (tests/_remote_support.py): torch's forward-mode
   levels are one list per process, which an in-process engine's thread would share.
2. More of test_eager_transforms.py (TestLinearize, TestJvp, TestHessian, grad and
   grad_and_value, functional_call, ops without a derivative, unrelated and integer
   outputs, in-place ops, data-dependent control flow under vmap) replayed over HTTP
   against tests/parity11_functions.py, served by one in-process app for the module.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch

import jacobian_client as jc
from jacobian_client.torch import remote

from . import user_functions as uf
from ._client_functions import cubic_pair
from ._remote_support import url  # noqa: F401 (fixture)

f = torch.func


# --------------------------------------------------------------------------- 1. remote vmap, shared inputs


class Recorded:
    """A client whose requests are recorded: endpoint, ``in_dims`` and the shape of each
    input sent (the members of the binary body)."""

    def __init__(self, url: str) -> None:
        self.requests: list[tuple[str, Any, dict[str, tuple[int, ...]]]] = []
        self.client = jc.Client(url)
        self.client._http.event_hooks["request"] = [self._record]

    def _record(self, request: httpx.Request) -> None:
        endpoint = request.url.path.rsplit("/", 1)[-1]
        dims = request.url.params.get("in_dims")
        shapes: dict[str, tuple[int, ...]] = {}
        if request.content[:2] == b"PK":  # an .npz: one member per input (and vectors)
            with np.load(io.BytesIO(request.content)) as z:
                shapes = {k: z[k].shape for k in z.files}
        elif request.content[:6] == b"\x93NUMPY":
            shapes = {"0": np.load(io.BytesIO(request.content)).shape}
        self.requests.append((endpoint, None if dims is None else json.loads(dims), shapes))

    def take(self) -> list[tuple[str, Any, dict[str, tuple[int, ...]]]]:
        out, self.requests = self.requests, []
        return out


@pytest.fixture
def rc(url: str) -> Iterator[Recorded]:
    r = Recorded(url)
    try:
        yield r
    finally:
        r.client.close()


def close(got: Any, want: Any, tol: float = 1e-10) -> None:
    if isinstance(want, (tuple, list)):
        assert isinstance(got, type(want)) and len(got) == len(want), (type(got), type(want))
        for g, w in zip(got, want):
            close(g, w, tol)
        return
    assert isinstance(got, torch.Tensor), type(got)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _sent_once(requests, shared: str, shape: tuple[int, ...], in_dims: list[Any]) -> None:
    """Every request of the call sent input ``shared`` once, with these ``in_dims``."""
    assert requests, "no request"
    for endpoint, dims, shapes in requests:
        assert dims == in_dims, (endpoint, dims)
        assert shapes[shared] == shape, (endpoint, shapes)


torch.manual_seed(11)
A = torch.randn(3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
BS = torch.randn(4, 3, dtype=torch.float64)  # four right-hand sides, one matrix every example shares
TA, TBS = torch.randn(3, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)


def test_torch_vmap_sends_a_shared_input_once(rc):
    """vmap(f, in_dims=(None, 0)): torch's vmap does not copy A per example; the request
    did (4 x 3 x 3 for a 3 x 3 matrix). Now A goes once and the request's in_dims say so,
    for the value and every per-example derivative."""
    solve = remote(rc.client, "solve")
    close(f.vmap(solve, in_dims=(None, 0))(A, BS), f.vmap(uf.solve, in_dims=(None, 0))(A, BS))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    # torch's own vmap(jacfwd(linalg.solve)) is far off (README: forward mode under a vmap
    # over examples); each example's jacfwd is right, and the service answers that
    want = tuple(torch.stack(blocks) for blocks in zip(*[f.jacfwd(uf.solve, argnums=(0, 1))(A, b) for b in BS]))
    for transform in (f.jacrev, f.jacfwd):
        close(f.vmap(transform(solve, argnums=(0, 1)), in_dims=(None, 0))(A, BS), want)
        _sent_once(rc.take(), "0", (3, 3), [None, 0])
    # the shared input second, and a batch dim other than 0: in_dims as torch's
    got = f.vmap(lambda b, a: solve(a, b), in_dims=(1, None))(BS.T, A)
    close(got, f.vmap(lambda b, a: uf.solve(a, b), in_dims=(1, None))(BS.T, A))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])


def test_torch_gradients_of_a_shared_input_sum_over_the_examples(rc):
    """The shared input's gradient is the examples' sum (torch's vmap expands it, and the
    expand's backward sums): through .backward(), grad and vjp of the vmapped function;
    per example under vmap(grad)."""
    solve = remote(rc.client, "solve")
    a_remote, a_local = A.clone().requires_grad_(), A.clone().requires_grad_()
    (f.vmap(solve, in_dims=(None, 0))(a_remote, BS) ** 2).sum().backward()
    (f.vmap(uf.solve, in_dims=(None, 0))(a_local, BS) ** 2).sum().backward()
    close(a_remote.grad, a_local.grad)
    _sent_once(rc.take(), "0", (3, 3), [None, 0])

    def loss(g):
        return lambda a, b: (g(a, b) ** 2).sum()

    def batch_loss(g):
        return lambda a, bs: (f.vmap(g, in_dims=(None, 0))(a, bs) ** 2).sum()

    close(f.grad(batch_loss(solve), argnums=(0, 1))(A, BS), f.grad(batch_loss(uf.solve), argnums=(0, 1))(A, BS))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    close(f.vmap(f.grad(loss(solve), argnums=(0, 1)), in_dims=(None, 0))(A, BS),
          f.vmap(f.grad(loss(uf.solve), argnums=(0, 1)), in_dims=(None, 0))(A, BS))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    cot = torch.randn(4, 3, dtype=torch.float64)
    close(f.vjp(f.vmap(solve, in_dims=(None, 0)), A, BS)[1](cot),
          f.vjp(f.vmap(uf.solve, in_dims=(None, 0)), A, BS)[1](cot))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    # test_per_sample_grads' shape: per-example gradients of shared weights
    xs = torch.randn(5, 2, 3, dtype=torch.float64)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    ln = remote(rc.client, "layer_norm_affine_sum")
    close(f.vmap(f.grad(ln, argnums=(1, 2)), in_dims=(0, None, None))(xs, w, b),
          f.vmap(f.grad(uf.layer_norm_affine_sum, argnums=(1, 2)), in_dims=(0, None, None))(xs, w, b))
    requests = rc.take()
    _sent_once(requests, "1", (3,), [0, None, None])
    assert [shapes["0"] for _, _, shapes in requests] == [(5, 2, 3)] * len(requests)


def test_torch_forward_mode_and_hessians_with_a_shared_input(rc):
    """A shared input's tangent is shaped like it (jvp of the vmapped function), and it is
    spread over the examples for the request; Hessians per example and of the batch."""
    solve = remote(rc.client, "solve")
    close(f.jvp(f.vmap(solve, in_dims=(None, 0)), (A, BS), (TA, TBS)),
          f.jvp(f.vmap(uf.solve, in_dims=(None, 0)), (A, BS), (TA, TBS)))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    close(f.jacfwd(f.vmap(solve, in_dims=(None, 0)))(A, BS), f.jacfwd(f.vmap(uf.solve, in_dims=(None, 0)))(A, BS))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    xs, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    pair = remote(rc.client, "cubic_pair")

    def value(g):
        return lambda x, w: g(x, w)[0]

    close(f.vmap(f.hessian(value(pair), argnums=(0, 1)), in_dims=(0, None))(xs, w),
          f.vmap(f.hessian(value(cubic_pair), argnums=(0, 1)), in_dims=(0, None))(xs, w))
    _sent_once(rc.take(), "1", (3,), [0, None])

    def batch(g):
        return lambda x, w: f.vmap(value(g), in_dims=(0, None))(x, w).sum()

    close(f.hessian(batch(pair), argnums=1)(xs, w), f.hessian(batch(cubic_pair), argnums=1)(xs, w))
    _sent_once(rc.take(), "1", (3,), [0, None])


def test_torch_nested_vmaps_merge_their_batches_and_keep_a_shared_input_shared(rc):
    """Nested vmaps are one request (their batches merged): an input no level maps is
    still sent once; one mapped by some levels only is spread over the others (the
    service takes one batch dim per input), and the answers are torch's either way."""
    solve = remote(rc.client, "solve")
    bss = torch.randn(2, 4, 3, dtype=torch.float64)
    inner = (None, 0)
    close(f.vmap(f.vmap(solve, in_dims=inner), in_dims=inner)(A, bss),
          f.vmap(f.vmap(uf.solve, in_dims=inner), in_dims=inner)(A, bss))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    close(f.vmap(f.vmap(f.jacrev(solve), in_dims=inner), in_dims=inner)(A, bss),
          f.vmap(f.vmap(f.jacrev(uf.solve), in_dims=inner), in_dims=inner)(A, bss))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
    # A mapped by the outer level only, b by the inner only: both spread to 2 x 4
    As = A + 0.1 * torch.randn(2, 3, 3, dtype=torch.float64)
    close(f.vmap(f.vmap(solve, in_dims=inner), in_dims=(0, None))(As, BS),
          f.vmap(f.vmap(uf.solve, in_dims=inner), in_dims=(0, None))(As, BS))
    [(endpoint, dims, shapes)] = rc.take()
    assert (endpoint, dims, shapes["0"], shapes["1"]) == ("evaluate", None, (8, 3, 3), (8, 3))
    # A shared by the inner level and mapped by the outer: spread over the inner batch
    grads = f.vmap(f.vmap(f.grad(lambda a, b: solve(a, b).sum()), in_dims=inner), in_dims=(0, None))(As, BS)
    close(grads, f.vmap(f.vmap(f.grad(lambda a, b: uf.solve(a, b).sum()), in_dims=inner), in_dims=(0, None))(As, BS))


jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402 (after the importorskip)
from jacobian_client.jax import remote as jax_remote  # noqa: E402 (after the importorskip)


@pytest.fixture
def x64() -> Iterator[None]:
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def jclose(got: Any, want: Any, tol: float = 1e-10) -> None:
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def test_jax_vmap_sends_a_shared_input_once(rc, x64):
    """jax.vmap(f, in_axes=(None, 0)) broadcast A to every example for the request; now
    it goes once, and grad through the vmap (jvp, then transposed: the shared input's
    tangent spread over the examples, its cotangent summed) is the same function's in
    torch (jnp.linalg.solve's would cost seconds of tracing for the same numbers)."""
    solve = jax_remote(rc.client, "solve")
    a, bs = jnp.asarray(A.numpy()), jnp.asarray(BS.numpy())
    solve(a, bs[0])  # the shapes, learned once at real values
    rc.take()
    jclose(jax.vmap(solve, in_axes=(None, 0))(a, bs), jnp.asarray(f.vmap(uf.solve, in_dims=(None, 0))(A, BS).numpy()))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])

    def batch_loss(g, vmap, dims):
        return lambda a, bs: (vmap(g, dims)(a, bs) ** 2).sum()

    want = f.grad(batch_loss(uf.solve, f.vmap, (None, 0)), argnums=(0, 1))(A, BS)
    jclose(jax.grad(batch_loss(solve, jax.vmap, (None, 0)), argnums=(0, 1))(a, bs),
           tuple(jnp.asarray(w.numpy()) for w in want))
    _sent_once(rc.take(), "0", (3, 3), [None, 0])
