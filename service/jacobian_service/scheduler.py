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
from typing import Any, Callable, Sequence

from .engine import Engine
from .errors import InternalError, Overloaded, ServiceError, Timeout

__all__ = ["Scheduler", "Timing"]

log = logging.getLogger("jacobian_service.scheduler")


@dataclass
class Timing:
    queue_s: float = 0.0
    compute_s: float = 0.0


@dataclass
class _Job:
    fn: Callable[[Engine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    timing: Timing = field(default_factory=Timing)


class _Worker:
    """One thread, one engine, one FIFO."""

    def __init__(self, engine: Engine, index: int) -> None:
        self.engine = engine
        self.jobs: collections.deque[_Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.busy = False
        self.thread = threading.Thread(target=self._loop, name=f"jacobian-worker-{index}", daemon=True)

    def depth(self) -> int:
        return len(self.jobs) + int(self.busy)

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
                job = self.jobs.popleft()
                self.busy = True
            try:
                self._run(job)
            finally:
                self.busy = False

    def _run(self, job: _Job) -> None:
        if job.future.done():  # the caller gave up while the job was queued
            return
        start = time.monotonic()
        job.timing.queue_s = start - job.enqueued
        if start > job.deadline:
            _resolve(job, exc=Timeout("the request waited in the queue past its deadline"))
            return
        result: Any = None
        error: BaseException | None = None
        try:
            result = job.fn(self.engine)
        except ServiceError as exc:
            error = exc
        except BaseException as exc:  # a bug of ours: keep the worker alive
            log.exception("job failed unexpectedly")
            error = InternalError(f"internal error ({type(exc).__name__})")
        job.timing.compute_s = time.monotonic() - start
        _resolve(job, result, error)


def _resolve(job: _Job, result: Any = None, exc: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class Scheduler:
    """Dispatches jobs to the least-loaded device worker."""

    def __init__(self, engines: Sequence[Engine], max_queue: int) -> None:
        self.workers = [_Worker(engine, i) for i, engine in enumerate(engines)]
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
    ) -> tuple[Any, Timing]:
        """Run ``fn(engine)`` on a worker thread; ``admitted`` jobs (the later chunks of a
        stream already under way) skip the queue bound, and ``worker`` pins the device."""
        if not admitted and self.depth() >= self.max_queue:
            raise Overloaded(
                f"the queue holds {self.depth()} requests (limit {self.max_queue}); retry shortly",
                headers={"Retry-After": "1"},
            )
        target = self.workers[worker] if worker is not None else min(self.workers, key=_Worker.depth)
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop, loop.create_future(), deadline)
        target.put(job)
        remaining = deadline - time.monotonic()
        try:
            # The worker enforces the deadline between chunks; this bound is the backstop.
            result = await asyncio.wait_for(asyncio.shield(job.future), timeout=max(remaining, 0) + 1.0)
        except asyncio.TimeoutError:
            job.future.cancel()
            raise Timeout("the request ran past its deadline") from None
        except asyncio.CancelledError:
            job.future.cancel()  # the client went away: a queued job is then skipped
            raise
        return result, job.timing

