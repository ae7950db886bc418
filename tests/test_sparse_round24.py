"""Sparse and structured Jacobians, round 24: round-off in the per-example checks, and more.

A scientist's structured Jacobians, each answer against torch.func in this process:

- per-example Jacobians (``batched=true``, request batching) are checked against one VJP
  per example, relative to the answer; float32 terms that cancel inside the function put
  that VJP 1e4 |v| ulps past right vmapped rows, and every such request was computed
  again example by example (8 x 400: 0.4-0.8 s where the vmapped rows take 0.05 s). The
  function's own round-off is measured now, as the sparse checks measure it (batched
  Hessians too: they left their vmapped strategy for torch's own, example by example).

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests import sparse24_functions as s24

from .conftest import ready_app


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse24_functions") as c:
        yield c


def _problem(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["code"] == code, body
    assert "Traceback" not in r.text
    return body


def _dense(r, key="jacobian"):
    assert r.status_code == 200, r.text
    j = r.json()[key]
    return np.array(j["data"], dtype=j["dtype"]).reshape(j["shape"]), r.json()["meta"]


# ------------------------------------------------------------------ per-example round-off


def test_per_example_jacobians_through_cancelling_float32_terms_keep_the_vmapped_rows(client, caplog):
    """batched=true over 8 examples of a float32 ring through ``(x * 1e4 + x) - x *
    1e4``: the vmapped rows are right, but the per-example check's VJP carries 1e4 |v|
    of round-off, so each request was taken for a wrong vmap and computed again example
    by example (the engine's WARNING). Now the function's round-off is measured first:
    the vmapped rows are answered, vmap(jacrev)'s, with no example-by-example pass, for
    every request (none is remembered: each batch is checked at its own points)."""
    rng = np.random.default_rng(24)
    fn = torch.func.vmap(torch.func.jacrev(s24.ring_cancels24))
    for _ in range(2):
        x = rng.uniform(0.1, 3, (8, 400)).astype(np.float32)
        with caplog.at_level(logging.INFO, logger="jacobian_service.engine"):
            got, meta = _dense(client.post("/v1/functions/ring_cancels24/jacobian",
                                           json={"inputs": [x.tolist()], "batched": True}))
        want = fn(torch.from_numpy(x)).numpy()
        assert got.shape == (8, 400, 400) and meta["mode"] == "rev", meta
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert not [r.getMessage() for r in caplog.records if "example by example" in r.getMessage()]


def test_per_example_hessians_through_cancelling_float32_terms_stay_vmapped(client):
    """The same for batched Hessians: the first example's Hessian was checked against
    one Hessian-vector product whose round-off (1e4 |v|) took the vmapped reverse over
    reverse strategy for one torch's vmap gets wrong, and from then on every batch of
    the function ran torch's own strategy example by example (meta.mode
    ``jacfwd_jacrev``). Now the vmapped strategy stays (meta.mode ``jacrev_grad``), at a
    second batch too, and its answer is vmap(hessian)'s."""
    rng = np.random.default_rng(240)
    fn = torch.func.vmap(torch.func.hessian(s24.energy_cancels24))
    for _ in range(2):
        x = rng.uniform(0.1, 3, (8, 200)).astype(np.float32)
        got, meta = _dense(client.post("/v1/functions/energy_cancels24/hessian",
                                       json={"inputs": [x.tolist()], "batched": True}), "hessian")
        assert meta["mode"] == "jacrev_grad", meta
        np.testing.assert_allclose(got, fn(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)

