"""Queue, deadlines and the worker threads that own the devices.

The event loop only enqueues jobs and awaits futures; each device has one thread that
runs its :class:`~jacobian_service.engine.Engine` (torch.func is not thread-safe, and
one owner per device keeps memory use predictable). A full queue answers 429 at once;
a job still queued past its deadline is dropped with 504 without running.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from .engine import Call, Engine
from .errors import InternalError, Overloaded, ServiceError, Timeout

__all__ = ["Batchable", "JobInfo", "Scheduler"]

log = logging.getLogger("jacobian_service.scheduler")

# A stacked Jacobian's working set, in multiples of its results (basis, grads, copies).
_BATCH_WORKSET_FACTOR = 4
_REFILL_WAIT_MAX_S = 0.002


@dataclass
class _KeyStats:
    """The last run of one batch key: result size per request, batch size, compute time."""

    result_bytes: int = 0
    batch_size: int = 1
    compute_s: float = 0.0


@dataclass
class JobInfo:
    """How a job ran: where, in how large a batch, and how long it queued and computed."""

    engine: Engine | None = None
    batch_size: int = 1
    queue_s: float = 0.0
    compute_s: float = 0.0


@dataclass(frozen=True)
class Batchable:
    """Marks a job that may be stacked with others of the same ``key`` into one call."""

    key: Hashable
    kind: str
    call: Call


@dataclass
class _Job:
    fn: Callable[[Engine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deadline: float
    batch: Batchable | None = None
    enqueued: float = field(default_factory=time.monotonic)
    info: JobInfo = field(default_factory=JobInfo)


class _Worker:
    """One thread, one engine, one FIFO; stacks batchable jobs that share a key."""

    def __init__(self, engine: Engine, index: int, max_batch: int, batch_wait_s: float, on_batch: Callable[[int], None]) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch
        self.jobs: collections.deque[_Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.running = 0
        self.stats: dict[Hashable, _KeyStats] = {}  # the last run of each batch key
        self.thread = threading.Thread(target=self._loop, name=f"jacobian-worker-{index}", daemon=True)

    def depth(self) -> int:
        return len(self.jobs) + self.running

    def put(self, job: _Job) -> None:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.jobs and not self.stopping:
                    self.cond.wait()
                if not self.jobs:
                    return
                group = self._take(self.jobs.popleft())
                self.running = len(group)
            try:
                self._run_group(group)
            finally:
                self.running = 0

    def _take(self, first: _Job) -> list[_Job]:
        """``first`` and the queued jobs it can be stacked with (called holding the lock).

        What accumulated while the worker was busy is taken at once (Triton's default);
        ``batch_wait_s`` optionally waits longer for batch-mates. Clients in a closed loop
        come back together, a few at a time: when the last batch of this key was larger
        than what is queued now, the worker waits a moment (at most half that batch's
        compute time, and 2 ms) for it to refill. A lone client (last batch 1) never waits.
        """
        group = [first]
        if first.batch is None or self.max_batch <= 1 or not self.engine.can_batch(first.batch.call.spec):
            return group
        stats = self.stats.get(first.batch.key) or _KeyStats()
        limit = self.max_batch
        if stats.result_bytes:  # the batch's working set stays inside the memory budget
            limit = max(1, min(limit, self.engine.memory_budget // (_BATCH_WORKSET_FACTOR * stats.result_bytes)))
        target = min(limit, stats.batch_size)
        refill_s = min(_REFILL_WAIT_MAX_S, stats.compute_s / 2)
        start = time.monotonic()
        while True:
            for job in list(self.jobs):
                if len(group) >= limit:
                    break
                if job.batch is not None and job.batch.key == first.batch.key:
                    self.jobs.remove(job)
                    group.append(job)
            waited = time.monotonic() - start
            if len(group) >= limit or self.stopping:
                return group
            if waited >= self.batch_wait_s and (len(group) >= target or waited >= refill_s):
                return group
            self.cond.wait(max(self.batch_wait_s, refill_s) - waited)

    def _remember(self, job: _Job, result: Any, batch_size: int, compute_s: float) -> None:
        if job.batch is None:  # batchable jobs answer an engine Result
            return
        if len(self.stats) > 4096:  # bounded, whatever shapes clients send
            self.stats.clear()
        self.stats[job.batch.key] = _KeyStats(result.nbytes(), batch_size, compute_s)

    def _run_group(self, group: list[_Job]) -> None:
        start = time.monotonic()
        live = []
        for job in group:
            if job.future.done():  # the caller gave up while the job was queued
                continue
            job.info.queue_s = start - job.enqueued
            if start > job.deadline:
                _resolve(job, error=Timeout("the request waited in the queue past its deadline"))
            else:
                live.append(job)
        if len(live) > 1:
            try:
                results = self.engine.run_batch(live[0].batch.kind, [j.batch.call for j in live])  # type: ignore[union-attr]
            except Exception as exc:  # one bad request must not fail its batch-mates
                log.info("batch of %d failed (%s); running each alone", len(live), type(exc).__name__)
                if all([self._run(job) for job in live]):  # all fine alone: vmap was the problem
                    self.engine.mark_unbatchable(live[0].batch.call.spec.name, exc)  # type: ignore[union-attr]
                return
            elapsed = time.monotonic() - start
            self.on_batch(len(live))
            for job, result in zip(live, results):
                job.info.engine, job.info.batch_size, job.info.compute_s = self.engine, len(live), elapsed
                self._remember(job, result, len(live), elapsed)
                _resolve(job, result)
            return
        for job in live:
            self._run(job)

    def _run(self, job: _Job) -> bool:
        """Run one job alone; whether it succeeded."""
        if job.future.done():
            return True
        start = time.monotonic()
        if job.batch is not None:
            self.on_batch(1)
        result: Any = None
        error: BaseException | None = None
        try:
            result = job.fn(self.engine)
        except ServiceError as exc:
            error = exc
        except BaseException as exc:  # a bug of ours: keep the worker alive
            log.exception("job failed unexpectedly")
            error = InternalError(f"internal error ({type(exc).__name__})")
        job.info.engine, job.info.compute_s = self.engine, time.monotonic() - start
        if error is None:
            self._remember(job, result, 1, job.info.compute_s)
        _resolve(job, result, error)
        return error is None


def _resolve(job: _Job, result: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class Scheduler:
    """Dispatches jobs to the least-loaded device worker."""

    def __init__(
        self,
        engines: Sequence[Engine],
        max_queue: int,
        max_batch: int = 1,
        batch_wait_s: float = 0.0,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.workers = [_Worker(engine, i, max_batch, batch_wait_s, on_batch) for i, engine in enumerate(engines)]
        self.max_queue = max_queue

    @property
    def engines(self) -> list[Engine]:
        return [w.engine for w in self.workers]

    def depth(self) -> int:
        return sum(w.depth() for w in self.workers)

    def start(self) -> None:
        for worker in self.workers:
            worker.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            worker.thread.join(timeout)

    async def run(
        self,
        fn: Callable[[Engine], Any],
        *,
        deadline: float,
        admitted: bool = False,
        worker: int | None = None,
        batch: Batchable | None = None,
    ) -> tuple[Any, JobInfo]:
        """Run ``fn(engine)`` on a worker thread; ``admitted`` jobs (the later chunks of a
        stream already under way) skip the queue bound, and ``worker`` pins the device."""
        if not admitted and self.depth() >= self.max_queue:
            raise Overloaded(
                f"the queue holds {self.depth()} requests (limit {self.max_queue}); retry shortly",
                headers={"Retry-After": "1"},
            )
        target = self.workers[worker] if worker is not None else min(self.workers, key=_Worker.depth)
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop, loop.create_future(), deadline, batch)
        target.put(job)
        remaining = deadline - time.monotonic()
        try:
            # The worker enforces the deadline between chunks; a chunk in progress cannot be
            # interrupted, so the caller is answered 504 at the deadline regardless and the
            # late result is dropped. Leaving (timeout, or the client gone) cancels the
            # future, so a job still queued is skipped.
            async with asyncio.timeout(max(remaining, 0)):
                result = await job.future
        except TimeoutError:
            raise Timeout("the request ran past its deadline") from None
        return result, job.info

