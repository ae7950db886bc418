"""The queue in front of one device's engine: deadlines, request batching, streams.

Torch-free: it drives an :class:`~jacobian_service.engine.Engine` it is handed, on the
one thread that owns the device. Two drivers run it:

- :class:`ThreadedWorker`, a thread beside the event loop (the in-process mode, used by
  the fast tests and for debugging);
- the engine process's socket loop (:mod:`jacobian_service.engine.process`).

A job is settled exactly once through its ``settle`` callback, whatever the driver.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

from .errors import InternalError, OutOfMemory, Overloaded, ResultTooLarge, ServiceError, Timeout, Unavailable
from .types import HELD_ANSWER_BYTES, Call, JobInfo, Result, never_cancelled

__all__ = ["Job", "StreamHead", "ThreadedWorker", "Worker", "engine_error"]

log = logging.getLogger("jacobian_service.scheduler")

# A stacked Jacobian's working set, in multiples of its results (basis, grads, copies).
_BATCH_WORKSET_FACTOR = 4
_REFILL_WAIT_MAX_S = 0.002
# A batch's expected cost (``BatchStats.cost``: a fixed part plus a part per request, fitted
# from its key's batches) stays within this share of the time left to the earliest deadline
# in it (the margin: a batch's time varies), and, while another client's jobs wait behind
# it, within this slice.
_DEADLINE_SHARE = 0.5
_SHARED_BATCH_S = 1.0
# ... and so for this long after the engine last took jobs of two clients in a row: a
# client whose next request was not queued yet when a batch began is sharing the engine
# all the same.
_SHARED_RECENT_S = 10.0
# A job whose time left is less than what one like it is expected to take alone, divided by
# this, is refused before it runs (``Worker._cannot_finish``). Not 1: one run of a key can
# take twice another's on a loaded machine (the first, cold, 1.4 s; the next 0.74 s).
_LATE_MARGIN = 2.0
_TIDY_EVERY_S = 1.0  # an idle in-process engine thread closes idle streams this often
_KINDS = frozenset({"jacobian", "jacobian_npy", "hessian", "hessian_npy", "evaluate", "vjp", "jvp", "hvp",
                    "stream_next", "warmup", "sparsity_jacobian", "sparsity_hessian"})

Settle = Callable[[Any, "BaseException | None", JobInfo], None]


@dataclass
class StreamHead:
    """The answer to a ``jacobian_npy`` (or ``hessian_npy``) job whose result is streamed: ask for its rows
    with ``stream_next`` jobs naming ``stream_id``, one chunk each, until ``None``."""

    stream_id: int
    shape: tuple[int, ...]
    dtype: str
    chunk_size: int
    nbytes: int
    engine: int = 0  # which engine holds it (set by the engine client)
    function: str = ""  # whose stream it is (set by the engine client): its chunks' jobs are that function's
    meta: dict[str, list[bool]] | None = None  # the engine's Streamed.meta: its bfloat16 flags (None: unsaid)


def engine_error(exc: BaseException, what: str) -> ServiceError:
    """What a request is answered for an error raised by the engine's own code (not by
    the function, which the engine maps itself): its 500, logged with its traceback;
    but an allocation that failed is out of memory (507), as it is in a function. Under
    ``ENGINE_MEMORY_LIMIT_BYTES`` the engine's own copies (staging a request's inputs,
    say) meet the limit too, and such a request was a 500 ``internal_error`` with a
    traceback in the log, where the same request failing in the function was a 507."""
    if isinstance(exc, MemoryError):
        log.warning("%s: out of memory (%s)", what, exc)
        return OutOfMemory(f"out of memory: the engine could not hold what this request needs ({type(exc).__name__}); "
                           "send less at a time, or give the engine more memory")
    log.error("%s", what, exc_info=exc)
    return InternalError(f"internal error ({type(exc).__name__})")


@dataclass(eq=False)  # identity: deque.remove must find this job, not an equal one
class Job:
    kind: str
    call: Call | None
    settle: Settle
    deadline: float
    stream_id: int | None = None
    tag: str = ""  # the caller's name for it (the supervisor reports culprits by tag)
    enqueued: float = field(default_factory=time.monotonic)
    info: JobInfo = field(default_factory=JobInfo)
    key: Hashable | None = None  # its batch key: None where it runs alone
    # What one like it cost is learned under (``_cannot_finish``, ``_remember``): its batch
    # key, or the key it would have had where it runs alone for its answer room.
    cost_key: Hashable | None = None
    done: bool = False  # settled, or its caller has gone

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        if self.call is not None:
            # The call's cancel check refers back to this job: a cycle that only the
            # garbage collector would free, once per request. A settled job needs none.
            self.call.cancelled = never_cancelled
        try:
            self.settle(result, error, self.info)
        except Exception:  # the caller's side is gone (a closed loop or socket)
            log.debug("could not settle a job", exc_info=True)


class Worker:
    """One engine, one queue (taken in turns among clients, FIFO within one: ``_next_job``);
    stacks batchable jobs that share a key. Not thread-safe:
    a driver calls ``submit``, ``take`` and ``run`` from one thread (or under a lock)."""

    def __init__(
        self,
        engine: Any,
        *,
        max_queue: int,
        max_batch: int = 1,
        batch_wait_s: float = 0.0,
        stream_threshold: int = 8 << 20,
        stream_idle_s: float = 60.0,
        on_batch: Callable[[int], None] = lambda size: None,
        on_run: Callable[[list[Job]], None] = lambda jobs: None,
        cancelled_for: Callable[[Job], Callable[[], bool]] = lambda job: (lambda: job.done),
        on_settled: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.stream_threshold = stream_threshold
        self.stream_idle_s = stream_idle_s
        self.on_batch = on_batch
        self.on_run = on_run
        self.cancelled_for = cancelled_for  # how a running job learns its caller has gone
        self.on_settled = on_settled  # a batch's jobs are settled: their answers can leave
        self.jobs: collections.deque[Job] = collections.deque()
        self.running = 0
        self._running_chunk = False  # the group running is a stream's next chunk
        self.device = str(engine.device)
        self._streams: dict[int, tuple[Iterator[Any], float, Call]] = {}  # id -> (chunks, last used, call)
        self._stream_ids = itertools.count(1)
        self._closing: list[int] = []  # appended from any thread (list.append is atomic)
        # Turns among clients (Call.client): the count of jobs taken when each client's
        # last one was taken, the least recent first; and whether the queue has held
        # jobs of more than one client since it was last empty (else it is plain FIFO).
        self._turns: collections.OrderedDict[str | None, int] = collections.OrderedDict()
        self._taken = 0
        self._mixed = False
        self._last_client: str | None = None
        self._shared_until = -math.inf  # (time.monotonic(): when another client's job was last taken, + _SHARED_RECENT_S)

    # ----------------------------------------------------------------- queue

    def depth(self) -> int:
        """Jobs waiting or running; jobs whose callers have gone do not count."""
        return sum(1 for job in self.jobs if not job.done) + self.running

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once (429) when the queue is full. The chunks
        of a stream already under way skip the bound: refusing them would waste the
        rows already sent. Open streams count against it: each holds its forward pass
        (the function's saved activations) until its reader has taken the last row, and
        readers that take their time must not hold an unbounded number of them."""
        if job.kind not in _KINDS:
            raise InternalError(f"unknown job kind {job.kind!r}")
        if job.kind != "stream_next":
            while self.jobs and self.jobs[0].done:
                self.jobs.popleft()
            # A stream counts once, whether or not its next chunk is queued or running; one
            # whose caller has gone is closed on the engine's thread, and not counted.
            running = 0 if self._running_chunk else self.running
            streams = max(0, len(self._streams) - len(self._closing))
            # Counted only when the queue's length alone could reach the bound: a job at
            # a time, the count walked the whole queue, O(queue) per request under load.
            depth = len(self.jobs) + running
            if depth + streams >= self.max_queue:
                depth = sum(1 for j in self.jobs if not j.done and j.kind != "stream_next") + running
            if depth + streams >= self.max_queue:
                self._make_room(job, depth, streams)
        job.key = self._batch_key(job)
        self.jobs.append(job)
        if not self._mixed and self._client(job) != self._client(self.jobs[0]):
            self._mixed = True

    def _make_room(self, job: Job, depth: int, streams: int) -> None:
        """The queue is full: ``job`` takes the place of the newest queued job of the
        client holding the most, where that client would still hold more than ``job``'s;
        else it is refused (429). One client that filled the queue (a lone client may use
        it all) had every other client refused until its jobs drained; now each other
        client gets in, up to an equal share, and the one pushed out is answered as it
        would have been a moment later: 429, Retry-After."""
        held: dict[str | None, list[Job]] = {}
        for queued in self.jobs:
            if not queued.done and queued.kind not in ("stream_next", "warmup"):
                held.setdefault(self._client(queued), []).append(queued)
        mine = len(held.get(self._client(job), ()))
        most = max(held.values(), key=len, default=[])
        if len(most) < mine + 2:  # (pushing out at mine + 1 would only swap the two)
            raise Overloaded(
                f"the engine holds {depth} requests and {streams} open streams (limit {self.max_queue} in all); "
                "retry shortly",
                headers={"Retry-After": "1"},
            )
        pushed = most[-1]
        self.jobs.remove(pushed)
        pushed.finish(error=Overloaded(
            f"the engine's queue is full (limit {self.max_queue}) and this client held {len(most)} of its places: "
            "its newest request gave its place to another client's; retry shortly",
            headers={"Retry-After": "1"}))

    def _client(self, job: Job) -> str | None:
        call = self.call_of(job)
        return None if call is None else call.client

    def _next_job(self) -> Job:
        """The next job to run (the queue holds a live one first): the first queued of
        the client whose last job was taken longest ago (one never seen first of all),
        FIFO within a client. First come first served, one client's many requests (40
        Hessians of 1.3 s each from tiny bodies) queued every other client's behind them:
        another client's one-element Jacobian waited behind all of them. Now a client
        waits for one job (or batch) of each other client at most. The queue is walked
        only while it holds jobs of several clients (a benchmark's one client pays
        nothing)."""
        if not self._mixed:
            return self.jobs.popleft()
        best, best_turn, seen = self.jobs[0], math.inf, set()
        for job in self.jobs:
            if job.done:
                continue
            client = self._client(job)
            if client in seen:
                continue
            seen.add(client)
            turn = self._turns.get(client, -1)
            if turn < best_turn:
                best, best_turn = job, turn
                if turn < 0:  # never taken (or long ago): none comes before it
                    break
        self.jobs.remove(best)
        self._mixed = bool(self.jobs)
        return best

    def _took(self, job: Job) -> None:
        """``job``'s client had its turn."""
        self._taken += 1
        client = self._client(job)
        self._turns[client] = self._taken
        self._turns.move_to_end(client)
        if client is not None:  # (None: the engine's own warm-up, no client's)
            if self._last_client is not None and client != self._last_client:
                self._shared_until = time.monotonic() + _SHARED_RECENT_S
            self._last_client = client
        if len(self._turns) > 1024:  # (the least recent: one never seen, when it comes back)
            self._turns.popitem(last=False)

    def _batch_key(self, job: Job) -> Hashable | None:
        """Requests that may share one vmap: same function, options and per-example shapes."""
        call, kind = job.call, job.kind
        if call is None or call.batched or self.max_batch <= 1:
            return None
        key = job.cost_key = self._key(call, kind)
        if key is not None and call.answer_room is not None and not self._small(call, key):
            # Its client's room bounds its own answer, which a batch computes before any
            # member's size could refuse it (engine.core.check_result_size). A room is
            # sent whenever anything is held on its front end's stream budget, so refusing
            # every such job a batch turned batching off for all while one large answer
            # was being sent: only one whose answer could be held on the budget (1 MiB
            # or more, or not known yet) runs alone. Its cost is still known and learned by
            # its key (``cost_key``): one queued while a large answer was being sent skipped
            # the refusal of a request that cannot finish (``_cannot_finish``), ran whole
            # and was a 504 at its deadline, every other client waiting behind it.
            return None
        return key

    def _small(self, call: Call, key: Hashable) -> bool:
        """Whether a request of ``key`` is known to answer below ``HELD_ANSWER_BYTES``
        (never held on a stream budget, so no room refuses it)."""
        profiles = getattr(self.engine, "profiles", None)  # (a test's stand-in engine has none)
        stats = profiles[call.spec.name].batches.get(key) if profiles is not None else None  # its last batch
        return stats is not None and stats.result_bytes < HELD_ANSWER_BYTES

    def _key(self, call: Call, kind: str) -> Hashable | None:
        if call.sparsity != "dense":  # one pattern and colouring for all, products vmapped over the points
            if kind not in ("jacobian", "hessian"):  # jacobian_npy: a dense .npy, maybe streamed
                return None
            return (kind, call.signature(), call.chunk_size, call.mode, call.return_output, call.rows,
                    call.sparsity, call.sparse_format)
        if call.rows is not None or kind not in ("jacobian_npy", "jacobian", "evaluate", "hessian"):
            return None
        signature = call.signature()  # once: a nested tuple of the shapes, built per request
        if kind == "jacobian_npy":  # batchable only once earlier calls showed it is small
            rows = self.engine.profiles[call.spec.name].output_rows.get(signature)
            if rows is None or call.mode == "fwd" or rows * call.row_nbytes() > call.gathered_at_most(self.stream_threshold):
                return None
            kind = "jacobian"
        return (kind, signature, call.chunk_size, call.mode, call.return_output)

    def has_work(self) -> bool:
        while self.jobs and self.jobs[0].done:
            self.jobs.popleft()
        return bool(self.jobs)

    def take(self, wait: Callable[[float], None]) -> list[Job]:
        """The first live job and the queued jobs it can be stacked with.

        What accumulated while the engine was busy is taken at once (Triton's default);
        ``batch_wait_s`` optionally waits longer for batch-mates. Clients in a closed
        loop come back together, a few at a time: when the last batch of this key was
        larger than what is queued now, the worker waits a moment (at most half that
        batch's compute time, and 2 ms) for it to refill; a lone client never waits.
        ``wait(seconds)`` lets the driver take in new jobs meanwhile.

        A key seen for the first time runs alone: its result size is unknown, and the
        memory budget bounds a batch by it.
        """
        if not self.has_work():
            self._mixed = False
            return []
        first = self._next_job()
        self._took(first)
        group = [first]
        if first.key is None or not self.engine.can_batch(first.call.spec.name):  # type: ignore[union-attr]
            return group
        stats = self.engine.profiles[first.call.spec.name].batches.get(first.key)  # type: ignore[union-attr]
        if stats is None:
            return group
        limit = self.max_batch
        if stats.result_bytes:  # the batch's working set stays inside the memory budget
            limit = max(1, min(limit, self.engine.memory_budget // (_BATCH_WORKSET_FACTOR * stats.result_bytes)))
        target = min(limit, stats.batch_size)
        refill_s = min(_REFILL_WAIT_MAX_S, stats.compute_s / 2)
        earliest = first.deadline
        start = time.monotonic()
        while True:
            mates, others = self._mates(first)
            # While other clients' jobs wait, this batch is their wait: a time slice at most;
            # so too while another client was served a moment ago. Bounded only while one
            # was queued, a client sending one request at a time (its next sent as the last
            # is answered) found the other's batch formed without it: 13 slow Jacobians
            # batched (4.5 s), its 2-element Jacobian waiting all of it (504 at 3 s).
            slice_s = _SHARED_BATCH_S if others or start < self._shared_until else math.inf
            for job in mates:
                if len(group) >= limit:
                    break
                if not _fits(stats.cost(len(group) + 1), min(earliest, job.deadline) - start, slice_s):
                    continue  # (not break: a later job may have a later deadline)
                earliest = min(earliest, job.deadline)
                self.jobs.remove(job)
                group.append(job)
            waited = time.monotonic() - start
            if len(group) >= limit:
                return group
            if waited >= self.batch_wait_s and (len(group) >= target or waited >= refill_s):
                return group
            wait(max(self.batch_wait_s, refill_s) - waited)

    def _mates(self, first: Job) -> tuple[list[Job], bool]:
        """The live queued jobs ``first`` may be stacked with, and whether a job of
        another client waits besides them (one walk; a lone client's queue, all of one
        key, asks no job its client)."""
        mates, others, client = [], False, self._client(first)
        for job in self.jobs:
            if job.done:
                continue
            if job.key == first.key:
                mates.append(job)
            elif not others and self._client(job) != client:
                others = True
        return mates, others

    # ----------------------------------------------------------------- running

    def run(self, group: list[Job]) -> None:
        """Run a group taken by :meth:`take`; every job in it is settled."""
        start = time.monotonic()
        live = []
        for job in group:
            if job.done:  # the caller gave up while the job was queued
                continue
            job.info.queue_s = start - job.enqueued
            job.info.device = self.device
            if start > job.deadline:
                job.finish(error=Timeout("the request waited in the queue past its deadline"))
            elif (late := self._cannot_finish(job, start)) is not None:
                job.finish(error=late)
            else:
                live.append(job)
        if not live:
            return
        self.running = len(live)
        self._running_chunk = live[0].kind == "stream_next"
        self.on_run(live)
        # The engine's own context for its work (engine/dual_level.py); none for a test's engine.
        computing = getattr(self.engine, "computing", contextlib.nullcontext)
        try:
            with computing():
                if len(live) > 1:
                    self._run_batch(live, start)
                else:
                    self._run_alone(live[0])
        except Exception as exc:  # ours, after the function returned: its jobs fail, the engine lives on
            error = engine_error(exc, f"the engine failed a batch of {len(live)}")
            for job in live:
                job.finish(error=error)
        finally:
            self.running = 0
            call = self.call_of(live[0])
            function = call.spec.name if call is not None else ""
            # In the in-process layout the caller's code runs on in the same process as
            # soon as it is answered: the settings a function changed and the names it
            # rebound are put back before then, or what the caller set once answered (a
            # test's monkeypatch of a service module, its default dtype) was put back as
            # the function's change.
            early = getattr(self.engine, "restore_early", None)
            if early is not None:
                early(function)
            # An engine process's answers leave before the tidying below, which is no
            # caller's business: putting the settings back takes ~80 us a batch on the
            # 2-core VM, and sat between a small Jacobian and its caller.
            self.on_settled()
            # What the function changed of the process-wide settings must not reach the
            # next batch, another function's (engine/process_settings.py).
            restore = getattr(self.engine, "restore_settings", None)
            if restore is not None:
                restore(function)
            self.tidy()

    def _cannot_finish(self, job: Job, now: float) -> Timeout | None:
        """The 504 of a job whose time left is less than half of what one like it (its
        batch key's) took in its last batch, or None. A batch's other jobs fit its
        deadlines (``_fits``), but the first of a group always ran: a slow Jacobian that
        waited until too little time was left ran whole, every other client waiting
        behind it, for an answer its front end had given up on (a 504 at the deadline)."""
        profiles = getattr(self.engine, "profiles", None)  # (a test's stand-in engine has none)
        if job.cost_key is None or profiles is None:
            return None
        stats = profiles[job.call.spec.name].batches.get(job.cost_key)  # type: ignore[union-attr]
        if stats is None:
            return None
        each_s, left_s = stats.cost(1), job.deadline - now  # (one run alone: its fixed part too)
        # A last run longer than this job's whole time is no estimate of it: a function that
        # patched time.monotonic (put back after its batch) left its key's run at 1e6 s, and
        # every later request of that key was refused so, never run to be measured again.
        if each_s <= _LATE_MARGIN * left_s or each_s > job.deadline - job.enqueued:
            return None
        return Timeout(f"the request would not finish before its deadline: the last like it took {each_s:.3f} s of "
                       f"the engine and {left_s:.3f} s were left when its turn came; not computed (give it more "
                       "time: X-Request-Timeout)")

    def call_of(self, job: Job) -> Call | None:
        """The call a job runs: its own, or for a stream's next chunk, its stream's (while
        the stream is open): what a crash or a hang in that chunk is blamed on."""
        if job.call is not None:
            return job.call
        return self._streams.get(job.stream_id, (None, None, None))[2]  # type: ignore[arg-type]

    def _run_batch(self, live: list[Job], start: float) -> None:
        kind = live[0].key[0]  # type: ignore[index]
        for job in live:
            # Each member's own deadline and caller, which the stacked call weighs together
            # (types.stacked_liveness: it stops once no member can use it). Never set here
            # before: a batch whose callers had all gone ran on, and an engine process read
            # no cancel and took in no job until the batch ended.
            job.call.deadline = job.deadline  # type: ignore[union-attr]
            job.call.cancelled = self.cancelled_for(job)  # type: ignore[union-attr]
        try:
            results = self.engine.run_batch(kind, [j.call for j in live])
        except BaseException as exc:  # one bad request must not fail its batch-mates
            # Those past their deadlines are answered so now, not run again for nothing.
            left = [job for job in live if not self._expired(job)]
            if isinstance(exc, Timeout) and 1 < len(left) < len(live):
                # Stopped for members now gone (an engine that stops at the earliest
                # deadline): the rest are one batch again, not each alone (a Timeout says
                # nothing of vmap). Each alone, the other client of a short-deadline
                # request paid 1.17 s for 0.4 s of work.
                log.info("batch of %d stopped (%s); %d left run again as one", len(live), type(exc).__name__, len(left))
                self._run_batch(left, time.monotonic())
                return
            log.info("batch of %d failed (%s); running each alone", len(live), type(exc).__name__)
            alone_ok = [self._run_alone(job) for job in left]
            from .engine.batched import deterministic_failure  # only reached with an engine

            # All fine alone: vmap is the problem. Only where every member ran alone: one left
            # out (past its deadline, or gone) may be the one whose input failed the batch (a
            # data error), and the function was marked unbatchable for good for it.
            if len(left) == len(live) and all(alone_ok) and deterministic_failure(exc):
                self.engine.mark_unbatchable(live[0].call.spec.name, exc)  # type: ignore[union-attr]
            return
        elapsed = time.monotonic() - start
        self.on_batch(len(live))
        # One key, one batch: its statistics once (they were written for each job in
        # turn, each overwriting the last, a result's size walked per request).
        answered = [(job, result) for job, result in zip(live, results) if not isinstance(result, ServiceError)]
        if answered:
            self._remember(*answered[-1], len(live), elapsed)
        for job, result in zip(live, results):
            job.info.batch_size, job.info.compute_s = len(live), elapsed
            if self._expired(job):  # its batch ran on for the others: its front end has answered 504
                continue
            if isinstance(result, ServiceError):  # its own failure, its batch-mates answered (engine.sparse._each)
                job.finish(error=result)
                continue
            try:
                result = _within_limit(job.call, result)  # type: ignore[arg-type]
            except ResultTooLarge as exc:  # this request's aux alone: its batch-mates are answered
                job.finish(error=exc)
                continue
            job.finish(result)

    def _expired(self, job: Job) -> bool:
        """Whether a batch member's caller has gone or its deadline has passed; the latter
        is answered as any request past its deadline is (504 ``timeout``)."""
        if not job.done and time.monotonic() > job.deadline:
            job.finish(error=Timeout("the request ran past its deadline"))
        return job.done

    def _run_alone(self, job: Job) -> bool:
        """Run one job; whether it succeeded. Every failure settles the job: a function
        that raises BaseException (SystemExit, KeyboardInterrupt) fails its request,
        never the worker."""
        if job.done:
            return True
        start = time.monotonic()
        if job.call is not None:  # every engine call of a request counts, batchable or not
            self.on_batch(1)
        result: Any = None
        error: BaseException | None = None
        try:
            result = self._execute(job)
        except ServiceError as exc:
            # Its code and message are what is answered. Its traceback and the cause's
            # (the function's own error) hold the frames down to the function, with their
            # arrays, and reach back to this frame, which holds the error: a cycle that
            # only the garbage collector would free. They go now.
            error = exc.with_traceback(None)
            error.__cause__ = error.__context__ = None
        except BaseException as exc:  # not raised by a function (the engine maps those): ours
            error = engine_error(exc, "job failed unexpectedly")
        job.info.compute_s = time.monotonic() - start
        if error is None:
            self._remember(job, result, 1, job.info.compute_s)
        elif job.stream_id is not None:
            self._streams.pop(job.stream_id, None)
        job.finish(result, error)
        return error is None

    def _execute(self, job: Job) -> Any:
        if job.kind == "stream_next":
            return self._next_chunk(job)
        call = job.call
        assert call is not None
        call.deadline = job.deadline
        call.cancelled = self.cancelled_for(job)
        if job.kind == "warmup":
            return self.engine.warm_up(call)
        if job.kind in ("jacobian_npy", "hessian_npy"):  # a dense .npy, maybe streamed
            out = getattr(self.engine, job.kind)(call, self.stream_threshold)
            if hasattr(out, "chunks"):  # Streamed: keep the rows for stream_next jobs
                sid = next(self._stream_ids)
                self._streams[sid] = (out.chunks, time.monotonic(), call)
                nbytes = out.dtype.itemsize * _prod(out.shape)
                return StreamHead(sid, tuple(out.shape), out.dtype.str, out.chunk_size, nbytes, meta=out.meta)
            return _within_limit(call, out)
        return _within_limit(call, getattr(self.engine, job.kind)(call))

    def _next_chunk(self, job: Job) -> Any:
        entry = self._streams.get(job.stream_id)  # type: ignore[arg-type]
        if entry is None:
            raise Timeout("the stream was closed (its deadline passed or its caller left)")
        chunks, _, call = entry
        # A stream that keeps making progress is not timed out: each chunk gets its own
        # deadline, checked between chunks by the row loop, and its own caller.
        call.deadline = job.deadline
        call.cancelled = self.cancelled_for(job)
        arr = next(chunks, None)
        if arr is None:
            self._streams.pop(job.stream_id, None)  # type: ignore[arg-type]
        else:
            self._streams[job.stream_id] = (chunks, time.monotonic(), call)  # type: ignore[index]
        return arr

    def close_stream(self, stream_id: int) -> None:
        """Drop a stream whose caller has gone. Only marked here: the generator may be
        running on the engine's thread right now; it is closed between jobs."""
        self._closing.append(stream_id)

    def tidy(self) -> None:
        """Close the streams whose callers have gone, or that sat idle past
        ``stream_idle_s``: each holds its forward pass. On the engine's thread: after
        each batch, and while it waits for work (else an idle engine would hold them
        until its next job, and refuse that job for them)."""
        now = time.monotonic()
        while self._closing:
            entry = self._streams.pop(self._closing.pop(), None)
            if entry is not None:
                getattr(entry[0], "close", lambda: None)()
        for sid, (chunks, used, _) in list(self._streams.items()):
            if now - used > self.stream_idle_s:
                del self._streams[sid]
                getattr(chunks, "close", lambda: None)()

    def _remember(self, job: Job, result: Any, batch_size: int, compute_s: float) -> None:
        """What a batch of this key cost, for sizing the next. A keyed ``jacobian_npy``
        job was expected small, but a function whose output size depends on its input's
        values can still make it a stream: its head gives the size."""
        if job.cost_key is None:
            return
        if isinstance(result, StreamHead):
            nbytes = result.nbytes
        elif hasattr(result, "nbytes"):
            nbytes = result.nbytes()
        else:
            return
        from .engine.profile import BatchStats  # only reached with an engine

        batches = self.engine.profiles[job.call.spec.name].batches  # type: ignore[union-attr]
        stats = batches.get(job.cost_key)
        if stats is None:
            stats = batches[job.cost_key] = BatchStats()
        stats.observe(nbytes, batch_size, compute_s)


def _within_limit(call: Call, result: Any) -> Any:
    """``result``, checked whole against the call's result limit before it leaves the
    engine. The engine checks a derivative's size before computing it; aux and output are
    the function's own, known only now: a 1 GB aux was sent to the front end (a second
    of the engine, a gigabyte of the front end, other requests past their deadlines)
    before the front end refused it."""
    if isinstance(result, Result) and call.max_result_bytes is not None:
        nbytes = result.nbytes()
        if nbytes > call.max_result_bytes:
            raise ResultTooLarge(f"the result takes {nbytes} bytes with its aux and output; the limit is "
                                 f"{call.max_result_bytes}")
    return result


def _fits(cost: float, left_s: float, slice_s: float) -> bool:
    """Whether a batch expected to take ``cost`` (``BatchStats.cost`` of its size) ends
    within half the time left to its earliest deadline (``left_s``) and within
    ``slice_s``. Bounded by size and memory alone, 40 softmax Hessians one client sent at
    once (1.3 s each) ran as one batch past their 60 s deadline: every one of them a 504,
    and another client's request that came meanwhile too."""
    return cost <= _DEADLINE_SHARE * left_s and cost <= slice_s


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class ThreadedWorker:
    """A :class:`Worker` driven by its own thread (the in-process mode).

    The answers of a group it runs leave once the group has run (the worker's
    ``on_settled``), as an engine process sends its replies, not from inside the engine's
    ``computing()`` context: that context nests the engine's forward mode under a dual
    level the caller's thread holds by raising torch.func's ``JVP_NESTING``, a module
    global every thread shares (``engine/dual_level.py``). An answer settled inside it let
    the caller's thread run on while the count was still raised: its next
    ``torch.func.jvp`` / ``jacfwd`` took itself for a nested one, entered no dual level, and
    failed "Trying to create a dual Tensor for forward AD but no level exists" (a remote
    function's jacfwd against the in-process server, now and then)."""

    def __init__(self, worker: Worker, name: str) -> None:
        self.worker = worker
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._held: list[tuple[Settle, Any, BaseException | None, JobInfo]] | None = None  # while a group runs
        then = worker.on_settled

        def on_settled() -> None:
            self._send_held()
            then()

        worker.on_settled = on_settled

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, job: Job) -> None:
        settle = job.settle
        job.settle = lambda result, error, info: self._settle(settle, result, error, info)
        with self.cond:
            self.worker.submit(job)
            self.cond.notify()

    def _settle(self, settle: Settle, result: Any, error: BaseException | None, info: JobInfo) -> None:
        """Held while a group runs on this thread (see the class); at once otherwise (a
        job failed as the worker stops, a caller's own thread)."""
        held = self._held
        if held is not None and threading.current_thread() is self.thread:
            held.append((settle, result, error, info))
        else:
            settle(result, error, info)

    def _send_held(self) -> None:
        held, self._held = self._held, ([] if self._held is not None else None)
        for settle, result, error, info in held or ():
            try:
                settle(result, error, info)
            except Exception:  # the caller's side is gone (a closed loop), as Job.finish takes it
                log.debug("could not settle a job", exc_info=True)

    def depth(self) -> int:
        # Under the lock: the worker's thread takes jobs off the queue meanwhile, and a
        # deque changed while it is counted raises (a 500 under load, before this).
        with self.cond:
            return self.worker.depth()

    def cancel(self, job: Job) -> None:
        job.done = True  # a queued job is skipped; a running one stops at its next chunk

    def close_stream(self, stream_id: int) -> None:
        with self.cond:
            self.worker.close_stream(stream_id)
            self.cond.notify()  # closed now, not at the next job

    def stop(self, timeout: float = 5.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def _loop(self) -> None:
        enter = getattr(self.worker.engine, "enter_thread", None)
        if enter is not None:  # per-thread engine state (CUDA's current device)
            enter()
        while True:
            with self.cond:
                if not self.worker.has_work() and not self.stopping:
                    self.cond.wait(_TIDY_EVERY_S)  # woken by a job, a stream closed, or the clock
                if self.stopping:
                    for job in self.worker.jobs:
                        job.finish(error=Unavailable("the engine is stopping", headers={"Retry-After": "1"}))
                    return
                if not self.worker.has_work():
                    group = None
                else:
                    group = self.worker.take(lambda seconds: self.cond.wait(max(seconds, 0)))
            if group is None:
                self.worker.tidy()
                continue
            self._held = []
            try:
                self.worker.run(group)
            finally:
                self._send_held()  # on_settled has sent them; this, whatever it could not
                self._held = None
            del group  # not kept while waiting: the jobs hold their requests' arrays
