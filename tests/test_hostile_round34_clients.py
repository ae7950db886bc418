"""Hostile clients, round thirty-four: cross-request batching's cost model.

The engine's scheduler (``Worker``) on a stand-in engine whose key's statistics are set,
so what it batches and refuses does not hang on this machine's timing.
"""

from __future__ import annotations

import collections
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
from jacobian_service.engine.profile import BatchStats
from jacobian_service.errors import Timeout
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.scheduler import Job, Worker
from jacobian_service.types import Call

RUN_S = 1.0  # one run of the function, whatever its batch (vmap calls it once for all)


def _worker() -> tuple[Worker, Any, Any]:
    spec = FunctionSpec("fixed", None, (Input("x", shape=(2,)),))
    profile = SimpleNamespace(batches={}, output_rows={})
    engine = SimpleNamespace(device="cpu", profiles=collections.defaultdict(lambda: profile), memory_budget=1 << 30,
                             can_batch=lambda name: True)
    return Worker(engine, max_queue=10, max_batch=32), spec, profile


def _job(worker: Worker, spec: Any, client: str, left_s: float, answers: dict) -> Job:
    call = Call(spec, [np.zeros(2, np.float32)], ["float32"], deadline=time.monotonic() + left_s)
    call.client = client
    job = Job("jacobian", call, lambda result, error, info: answers.__setitem__(client, error), deadline=call.deadline)
    job.enqueued -= 1.0  # it waited a run's time behind other work: 1.3 s in all, 0.3 s left
    worker.submit(job)
    return job


def test_a_short_deadline_is_not_batched_with_another_clients_request_after_a_large_batch() -> None:
    """A batch was costed at its size times the last batch's time per request; a batch of
    30 takes about what one request does, so a batch of 2 was then costed at 1/15 of a
    run. Measured on a real server (a 0.4 s function, 16 requests batched first): a
    request with a short X-Request-Timeout was batched with another client's; the batch
    ran past the short deadline, failed, and the other ran again alone (1.17 s for its
    0.4 s of work; 3 runs where 2 were needed). Now a batch's cost is a fixed part plus a
    part per request, fitted from the sizes seen: the short one is not batched, and is
    refused before it runs (504 ``timeout``); the other is not held for it."""
    worker, spec, _ = _worker()
    call = Call(spec, [np.zeros(2, np.float32)], ["float32"], deadline=time.monotonic() + 60)
    seen = Job("jacobian", call, lambda *a: None, deadline=call.deadline)
    assert worker._batch_key(seen) is not None
    result = SimpleNamespace(nbytes=lambda: 8)
    worker._remember(seen, result, 1, RUN_S)  # alone, then a batch of 30 in about the same time
    worker._remember(seen, result, 30, RUN_S * 1.05)
    answers: dict[str, Any] = {}
    short = _job(worker, spec, "hostile", 0.3, answers)  # less than one run left
    _job(worker, spec, "honest", 60.0, answers)
    group = worker.take(lambda s: None)
    assert group == [short]  # (before: both, a batch costed at 0.07 s)
    worker.run(group)
    assert isinstance(answers["hostile"], Timeout) and "not computed" in str(answers["hostile"])
    assert "honest" not in answers and worker.has_work()  # its own turn next, not run for nothing


def test_a_batch_is_costed_a_fixed_part_plus_a_part_per_request() -> None:
    """The fit itself: bounded memory (a few sizes), the larger estimate with one size."""
    stats = BatchStats()
    stats.observe(8, 4, 2.0)
    assert stats.cost(1) == 2.0 and stats.cost(8) == 4.0  # one size: fixed below it, per request above
    stats.observe(8, 1, 1.0)
    assert abs(stats.cost(2) - (2 / 3 + 2 / 3)) < 1e-9  # through (1, 1.0) and (4, 2.0)
    for size in range(2, 40):
        stats.observe(8, size, 1.0)
    assert len(stats.times) <= 8
