"""PyTorch's own torch.func test cases, round 19, replayed over HTTP against
tests/parity19_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

1. test_eager_transforms.py's TestJac dtype cases (a float64 input with a float32
   output, and the other way round) under ``mode=fwd`` / ``auto``, dense and sparse,
   over JSON, .npy and the SDK: the answer is jacrev's, in jacrev's dtypes and to its
   precision, whatever the mode.
2. ``mode=fwd`` for an op with reverse-mode AD only (cdist, test_ops.py's jacfwd
   skips): jacrev's answer, forward mode tried once per function, on every route.

One in-process app serves the module (no server start), as rounds 7-18.
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from jacobian_client import wire
from torch.func import jacfwd, jacrev

from . import parity19_functions as F
from .conftest import ready_app
from .test_parity_round7 import answer, post, same, t
from .test_parity_round15 import sdk  # noqa: F401 (the SDK over this module's app)


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity19_functions") as client:
        yield client


def _npy(c: Any, name: str, x: np.ndarray, query: str) -> np.ndarray:
    buf = io.BytesIO()
    np.save(buf, x)
    r = c.post(f"/v1/functions/{name}/jacobian?{query}", content=buf.getvalue(),
               headers={"content-type": wire.NPY, "accept": wire.NPY})
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content))


def _dense(matrix: Any, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(matrix.todense()).reshape(shape)


X = np.array([0.3, -1.2, 0.7, 0.45])


def test_a_float32_output_of_a_float64_input_is_jacrevs_to_float64_precision_in_every_mode(c, sdk):
    """TestJac over dtype promotion: f(x) = outer(sin x, exp x).float() of a float64 x.
    jacrev answers float64 gradients (the cast's backward widens the float32 cotangent);
    jacfwd's columns pass through the cast, so its values are float32's. mode=fwd (and
    auto, the outputs outnumbering the inputs) answered jacfwd's values cast to float64,
    2e-8 off jacrev's: the check against one reverse product took the output's float32
    round-off as its bound. Now jacrev's, to 1e-12, on every route and transport."""
    want = jacrev(F.narrowing)(t(X))
    fwd = jacfwd(F.narrowing)(t(X))
    assert want.dtype == torch.float64 and float((fwd.double() - want).abs().max()) > 1e-9  # the two modes differ
    for mode in ("fwd", "auto", "rev"):
        got, doc = answer(post(c, "narrowing", "jacobian", [X], mode=mode), "jacobian")
        same(got, want)
        assert doc["meta"]["mode"] == "rev", doc["meta"]
        same(_npy(c, "narrowing", X, f"mode={mode}"), want)
        for transport in ("binary", "json"):
            same(sdk.jacobian("narrowing", X, mode=mode, transport=transport), want)
        sparse, _ = answer(post(c, "narrowing", "jacobian", [X], mode=mode, sparsity="auto"), "jacobian")
        same(_dense(sparse, want.shape), want)


def test_the_check_against_one_reverse_product_takes_jacrevs_answer_and_not_jacfwds():
    """The check every forward-mode (and the sparse routes' dense) Jacobian passes,
    products.agrees_with_reverse, at float64 round-off for a float32 output of a float64
    input: it read v^T J with its float64 v where the VJP got v rounded to float32, so
    jacrev's own Jacobian failed it (the sparse routes' dense fallback then ran it row by
    row). jacrev's passes, jacfwd's float32-rounded one does not."""
    from jacobian_service.engine.products import agrees_with_reverse

    def g(x: torch.Tensor) -> tuple[torch.Tensor, tuple[()]]:
        return F.narrowing(x), ()

    x = t(X)
    assert agrees_with_reverse(g, (x,), jacrev(F.narrowing)(x))
    assert not agrees_with_reverse(g, (x,), jacfwd(F.narrowing)(x))


def test_a_float64_output_of_a_float32_input_is_float32_in_every_mode(c, sdk):
    """The other way round: outer(sin x, exp x).double() of a float32 x. jacrev's
    Jacobian is float32; the sparse route's forward products (mode=fwd) answered a
    float64 matrix. Now float32 on every route; forward mode still answers where asked
    (its float32 values are jacrev's: the check's bound is the input's round-off)."""
    x = X.astype(np.float32)
    want = jacrev(F.widening)(t(x))
    assert want.dtype == torch.float32
    for mode in ("fwd", "auto"):
        got, doc = answer(post(c, "widening", "jacobian", [x], mode=mode), "jacobian")
        same(got, want)
        assert doc["meta"]["mode"] == "fwd", doc["meta"]
        sparse, doc = answer(post(c, "widening", "jacobian", [x], mode=mode, sparsity="auto"), "jacobian")
        same(_dense(sparse, want.shape), want)
        assert doc["meta"]["mode"] == "fwd", doc["meta"]
        for transport in ("binary", "json"):
            same(_dense(sdk.jacobian("widening", x, mode=mode, sparsity="auto", transport=transport), want.shape), want)


def test_forward_mode_for_an_op_without_forward_ad_is_tried_once(c):
    """mode=fwd for cdist, which has reverse-mode AD only: the answer is jacrev's, and
    once forward mode failed for the function it is not tried again (its profile keeps
    it, as for the dense route). The sparse route (sparsity=auto) retried its JVPs,
    vmapped then one by one, at every request, each failing, for reverse mode's answer."""
    x = np.array([[0.3, -1.2], [0.7, 0.1], [0.5, 0.2]])
    with pytest.raises(NotImplementedError, match="forward AD"):
        jacfwd(F.cdist_rows)(t(x))
    # (row by row: torch's vmap of cdist's pullback is wrong here, as round 16 found;
    # the service checks its vmap and loops, answering torch's one-by-one rows)
    want = jacrev(F.cdist_rows, chunk_size=1)(t(x))

    def attempts() -> float:
        return float(answer(post(c, "jvp_attempts", "evaluate", [X]), "output")[0])

    before = attempts()
    sparse, doc = answer(post(c, "cdist_rows", "jacobian", [x], mode="fwd", sparsity="auto"), "jacobian")
    same(_dense(sparse, want.shape), want)
    assert doc["meta"]["mode"] == "rev"
    tried = attempts()
    assert tried > before  # forward mode was tried, and failed
    for options in ({"sparsity": "auto"}, {"sparsity": "auto", "chunk_size": 1}, {}):
        for mode in ("fwd", "auto"):
            got, doc = answer(post(c, "cdist_rows", "jacobian", [x], mode=mode, **options), "jacobian")
            same(got if not options else _dense(got, want.shape), want)
            assert doc["meta"]["mode"] == "rev"
    assert attempts() == tried
