"""How a front end reaches its engines: in this process (a thread) or over Unix sockets.

Both clients answer the same few calls, so the routes cannot tell them apart:

    run(kind, call)          -> (Result | StreamHead, JobInfo)   raises ServiceError
    next_chunk(head, call)   -> the stream's next rows (np.ndarray), or None at its end
    close_stream(head)       a stream whose caller has gone
    readiness()              None when ready, else why not
    quarantined(name)        seconds left for a quarantined function, else None

:class:`InProcessEngines` is vLLM's in-process client: the fast tests and ``serve
--in-process`` use it. :class:`RemoteEngines` talks to the engine processes the
supervisor runs; it never imports torch.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import orjson

from . import ipc
from .channel import Connection
from .connections import Expiry
from .errors import FunctionError, FunctionQuarantined, Timeout, Unavailable
from .procfs import living
from .registry import FunctionSpec, Registry
from .scheduler import Job, StreamHead
from .settings import Settings
from .supervision import MAX_GIVEN_UP, OVERDUE_AFTER_MIN_S, Channel, HeldOutbox
from .types import Call, JobInfo, Result

__all__ = ["InProcessEngines", "RemoteEngines"]

log = logging.getLogger("jacobian_service")


async def _await(fut: asyncio.Future, deadline: float, on_abandon: Any, on_slow: Any = None) -> Any:
    """Await ``fut`` until ``deadline``; leaving early (timeout, or the caller cancelled)
    tells the engine, which stops at its next chunk. (One loop timer: ``asyncio.timeout``
    costs several times more, on every request.) ``on_slow``'s callback runs if it waits
    longer than its seconds, on the same timer."""
    try:
        with Expiry(deadline - time.monotonic(), early=on_slow):
            try:
                return await fut
            except BaseException:
                on_abandon()
                raise
    finally:
        # A failed future holds its exception, whose traceback holds this frame: a
        # cycle (with the request's objects) until the garbage collector runs.
        del fut
    # Only the timer's own cancellation, swallowed by the Expiry, ends the block here.
    raise Timeout("the request ran past its deadline")


_FIRST_STATE_S = 10.0
_OVERDUE_EVERY_S = 1.0
# A job unanswered for longer is told to the supervisor (``oldest``: a suspect, should the
# engine be found hung); quicker ones, nearly all, cost no message.
_OLDEST_AFTER_S = 0.25
_MAX_CANCELLED = 4096  # cancels awaiting their engine's answer, kept (a hung engine's pile, bounded)
# A stream's next chunk's client, which its job does not carry here: counted as a client
# of its own (the engine takes it as its stream's client's), so that a front end holding it
# beside other jobs says "several clients" (the cautious side: no blame by order).
_UNKNOWN_CLIENT = "\x00a stream's chunk"


class _Pending(NamedTuple):
    """A job sent to an engine and not yet answered (``RemoteEngines._pending``)."""

    fut: asyncio.Future
    engine: int  # its index
    tag: str
    sent: float  # time.monotonic()
    movable: bool  # whether another engine may take it (none was named)
    function: str
    client: str | None  # Call.client (_UNKNOWN_CLIENT: a stream's chunk)


class _Cancelled(NamedTuple):
    """A job cancelled (deadline, client gone) whose engine has not answered yet
    (``RemoteEngines._cancelled``; see ``_overdue``)."""

    engine: int
    pid: int | None  # the engine's process when it was cancelled
    since: float  # when cancelled
    sent: float
    tag: str
    function: str
    client: str | None


def _client_marks(clients: set[str | None]) -> list[str]:
    """Short stable marks of (at most two of) the clients whose jobs a front end holds on
    an engine: enough for the supervisor to tell one client from several, across front
    ends (a digest, not the API key or address itself)."""
    return sorted(hashlib.blake2b(repr(c).encode(), digest_size=6).hexdigest() for c in clients)[:2]
_LOST_GRACE_S = 2.0  # after a broken engine connection, for the supervisor's word to come first
# The supervisor states twice a second: a front end that has heard nothing for this long
# takes it as silent (readiness "no word"; a broken connection's requests then answered).
_SILENT_S = 5.0
_RESENDS = 3  # tries of a request whose engines leave as planned before starting it
# A request that finds no engine up waits this long for one before its 503: a spare's
# promotion takes well under a second, and a front end starved of CPU (start-up on a
# busy machine) may not yet have read the state message saying the engine is up while
# connections hashed to its socket already arrive.
_READY_WAIT_S = 1.0
# A job whose ``held`` word found the supervisor's queue full waits this long at most for
# it to go (``HeldOutbox.settled``): past it, the word trails the job, as on zmq.
_HELD_SETTLE_S = 1.0


class _Resend(Exception):
    """The engine a request was sent to left as planned without starting it."""


def _seconds(estimate: float) -> str:
    """A Retry-After value: the supervisor's estimate, whole seconds, 1 to 30."""
    return str(min(30, max(1, math.ceil(estimate))))


class _Engines:
    """What the routes use, whichever way the engines run: ``start``/``stop``, ``run``
    (one job, answered with ``(result, JobInfo)``), stream chunks, ``readiness``,
    ``quarantined``/``release``, ``depth``, ``info`` and ``engine_stats``."""

    async def run(self, kind: str, call: Call | None, *, engine: int | None = None, stream_id: int | None = None,
                  deadline: float | None = None, on_slow: Any = None, function: str = "") -> tuple[Any, JobInfo]:
        """``on_slow``: ``(seconds, callback)``, the callback run once if the job is not
        answered within those seconds (``routes._cancellable``). ``function``: whose job it is
        where ``call`` does not say (a stream's next chunk: the stream's function)."""
        raise NotImplementedError

    async def next_chunk(self, head: StreamHead, deadline: float) -> np.ndarray | None:
        """The next row chunk of a streamed Jacobian, from the engine holding it (None: done)."""
        arr, _ = await self.run("stream_next", None, engine=head.engine, stream_id=head.stream_id, deadline=deadline,
                                function=head.function)
        return arr


# --------------------------------------------------------------------------- in-process


def _settler(fut: asyncio.Future) -> Any:
    """A job's settle for an engine thread: the result or error onto ``fut``'s loop.

    A result's arrays are copied here, on the engine's thread: they are views of the
    tensors the function returned, and the loop encodes them while the engine runs its
    next batch, in which a function that keeps what it returned (a buffer it fills at
    each call, ``out=``, a module's state) writes it again (as the process layout's
    channel copies what its socket cannot take at once)."""
    loop = fut.get_loop()

    def settle(result: Any, error: BaseException | None, info: JobInfo) -> None:
        if isinstance(result, Result):
            result.value, result.aux, result.output = _copied(result.value), _copied(result.aux), _copied(result.output)

        def put() -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result((result, info))

        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass

    return settle


def _copied(tree: Any) -> Any:
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if isinstance(tree, dict):
        return {key: _copied(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copied(value) for value in tree) if not hasattr(tree, "_fields") else \
            type(tree)(*(_copied(value) for value in tree))
    return tree


class InProcessEngines(_Engines):
    """Engines on threads of this process (the v1 layout): for tests and debugging."""

    def __init__(self, settings: Settings, registry: Registry, on_batch: Any = lambda size: None) -> None:
        self.settings = settings
        self.registry = registry
        self.on_batch = on_batch
        self.workers: list[Any] = []
        self.devices: list[str] = []
        self.warm = False
        self._warm_task: asyncio.Task | None = None

    async def start(self) -> None:
        import torch

        from .engine import Engine, default_memory_budget, keep_free_heap, resolve_devices
        from .scheduler import ThreadedWorker, Worker

        keep_free_heap()  # the heap policy of an engine process
        s = self.settings
        threads = s.torch_threads if s.torch_threads is not None else max(1, (os.cpu_count() or 2) // 2)
        if threads:
            torch.set_num_threads(threads)
        devices = resolve_devices(s.device)
        self.devices = [str(d) for d in devices]
        self.workers, self.warm = [], False  # an app may be started again after a stop
        for i, device in enumerate(devices):
            engine = Engine(device, s.memory_budget_bytes or default_memory_budget(device), s.sparsity_cache_dir,
                            s.sparsity_cache_max_bytes)
            worker = Worker(engine, max_queue=s.max_queue, max_batch=s.max_batch_size, batch_wait_s=s.max_batch_wait_ms / 1e3,
                            stream_threshold=s.stream_threshold_bytes, stream_idle_s=s.request_timeout_s, on_batch=self.on_batch)
            self.workers.append(ThreadedWorker(worker, f"jacobian-worker-{i}"))
        for w in self.workers:
            w.start()
        if s.warmup:
            self._warm_task = asyncio.create_task(self._warm_up())
        else:
            self.warm = True

    async def _warm_up(self) -> None:
        from .engine import warmup_call
        from .engine.sparse import preload

        try:  # the first sparse request's imports (engine.sparse.preload), off the event loop
            await asyncio.to_thread(preload)
        except Exception as exc:  # sparse requests import it again, and say why it fails
            log.warning("preloading sparse derivatives failed: %s", exc)
        for spec in self.registry:
            for index in range(len(self.workers)):
                try:  # making the call too: one that cannot be made (no inputs) is no reason to never be ready
                    call = warmup_call(spec)
                    call.deadline = time.monotonic() + self.settings.warmup_timeout_s  # cut between chunks
                    await self.run("warmup", call, engine=index)
                except Exception as exc:  # a function that needs special inputs still serves
                    log.warning("warm-up of %s failed: %s", spec.name, exc)
        self.warm = True
        log.info("ready: %d functions on %s", len(self.registry), ", ".join(self.devices))

    async def stop(self) -> None:
        if self._warm_task is not None:
            self._warm_task.cancel()
            await asyncio.gather(self._warm_task, return_exceptions=True)
        await asyncio.to_thread(lambda: [w.stop() for w in self.workers])

    def readiness(self) -> str | None:
        if not self.warm:
            return "warming up"
        dead = [str(i) for i, w in enumerate(self.workers) if not w.alive()]
        return f"engine worker {', '.join(dead)} has stopped" if dead else None

    def quarantined(self, name: str) -> float | None:
        return None

    def depth(self) -> int:
        return sum(w.depth() for w in self.workers)

    def info(self) -> dict[str, Any]:
        import torch

        return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "memory_budget_bytes": [w.worker.engine.memory_budget for w in self.workers], "engines": "in-process"}

    def engine_stats(self) -> dict[str, Any]:
        return {"restarts": {}, "quarantines": 0, "memory": self._device_memory(), "output_dropped": {}}

    def _device_memory(self) -> dict[str, int]:
        if not any(d.startswith("cuda") for d in self.devices):
            return {}
        import torch

        return {d: torch.cuda.memory_allocated(d) for d in self.devices if d.startswith("cuda")}

    async def run(self, kind: str, call: Call | None, *, engine: int | None = None, stream_id: int | None = None,
                  deadline: float | None = None, on_slow: Any = None, function: str = "") -> tuple[Any, JobInfo]:
        index = engine if engine is not None else min(range(len(self.workers)), key=lambda i: self.workers[i].depth())
        target = self.workers[index]
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        until = deadline if deadline is not None else call.deadline  # type: ignore[union-attr]
        job = Job(kind, call, _settler(fut), deadline=until, stream_id=stream_id)
        target.submit(job)
        try:
            result, info = await _await(fut, until, lambda: target.cancel(job), on_slow)  # noqa: F821  (its cell: emptied below, so a held traceback holds no job)
        finally:
            # A failed future holds its exception, whose traceback holds this frame: it
            # must not hold the future, nor the job (whose settle holds the future). The
            # settle keeps its own reference: a job finished as its caller leaves still
            # settles a live future.
            del fut, job
        if isinstance(result, StreamHead):
            result.engine = index
            result.function = call.spec.name if call is not None else function
        return result, info

    def close_stream(self, head: StreamHead) -> None:
        self.workers[head.engine].close_stream(head.stream_id)

    def release(self, name: str) -> bool:
        return False


# --------------------------------------------------------------------------- remote


class RemoteEngines(_Engines):
    """The engine processes: one connection per engine (``channel.Connection``, its
    replies routed to the waiting requests as they are read), and a ZeroMQ subscription
    to the supervisor's events."""

    def __init__(self, settings: Settings, run_dir: Path, channel: Channel | None = None,
                 registry: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.channel = channel if channel is not None else Channel.in_run_dir(run_dir)
        # The registry as ``serve`` read it at start-up (``registry``), not the run
        # directory's file, which a function can rewrite: a front end started again
        # later (one that died) read the functions, their inputs and descriptions, from
        # whatever was there. (The file: a front end made without serve, in tests.)
        doc = registry if registry is not None else orjson.loads((run_dir / "registry.json").read_bytes())
        self.registry = Registry(FunctionSpec.from_description(d) for d in doc["functions"])
        self.devices: list[str] = doc["devices"]
        self._doc = doc
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}  # msg id -> the job sent
        self._load = [0] * len(self.devices)
        self._state: dict[str, Any] = {"engines": [], "quarantined": {}, "quarantines": 0}
        self._state_at = 0.0
        self._tasks: list[asyncio.Task] = []
        self._prefix = f"{os.getpid()}:"
        self._first_state = asyncio.Event()
        self._any_ready = asyncio.Event()  # set while the last state had an engine ready
        self._waiting = 0  # requests waiting for an engine to come up
        self._pids: dict[int, int | None] = {}  # engine index -> its process, as the last state said
        self._died: dict[int, int] = {}  # engine index -> the last generation whose "died" was read
        self._cancelled: dict[int, _Cancelled] = {}  # msg id -> a cancel its engine has yet to answer
        self._told_oldest: set[int] = set()  # engines whose oldest job this front end last told the supervisor of
        # engine index -> the functions this front end last told the supervisor it holds
        # unanswered there (``held``, see _tell_held), since that engine last restarted
        self._told_held: dict[int, frozenset[str]] = {}
        # engine index -> the engine process its connection last reached (the kernel's
        # word: ``Connection.peer_pid``), and when that connection last broke
        # (``_connection_made``)
        self._reached: dict[int, int | None] = {}
        self._broke: dict[int, float] = {}
        self._control: Any = None  # the supervisor's control socket, once started
        self._held_out: HeldOutbox | None = None  # where ``held`` goes, once started (``_say_held``)

    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        self._socks = [self._connection(index) for index in range(len(self.devices))]
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(self.channel.events)
        self._control = self._ctx.socket(zmq.PUSH)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.connect(self.channel.control)
        self._held_out = HeldOutbox(self.channel.held, self._control.send)
        self._tasks.append(asyncio.create_task(self._events()))
        self._tasks.append(asyncio.create_task(self._overdue()))
        # uvicorn accepts once the lifespan has started, and the kernel has been queueing
        # connections on this front end's socket since the supervisor bound it. Waiting
        # here for the supervisor's first word keeps a new front end from answering 503
        # "no engine is up" while its siblings already serve (the state comes twice a
        # second; run() also waits briefly for an engine, see _engine_for).
        try:
            await asyncio.wait_for(self._first_state.wait(), _FIRST_STATE_S)
        except TimeoutError:
            log.warning("no word from the supervisor after %g s; starting anyway (not ready)", _FIRST_STATE_S)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for p in self._pending.values():
            if not p.fut.done():
                p.fut.set_exception(Unavailable("the server is shutting down", headers={"Retry-After": "1"}))
        for sock in self._socks:
            sock.close()
        if self._held_out is not None:
            self._held_out.close()
        self._ctx.destroy(linger=0)

    def _connection(self, index: int) -> Connection:
        return Connection(ipc.engine_path(self.run_dir, index), self._reply_handler(index),
                          self.settings.shared_memory_bytes, on_lost=functools.partial(self._connection_lost, index),
                          on_made=functools.partial(self._connection_made, index))

    def _connection_made(self, index: int) -> None:
        """The connection to engine ``index`` reached a process (``peer_pid``). A new one:
        the supervisor forgot what was held on the one before as it read of its death,
        before it started or promoted this one (which binds the socket only then), and
        this front end may not have read that word yet: what it told of (``_told_held``)
        is no longer known there. A function told of for the dead engine and sent again
        in between, or queued while no engine was connected, was never told of for this
        one: its crash here, or its leave (a stray thread, its socket file removed), was
        read as the board's lie, the function unnamed and unstruck. Told now, before what
        waited goes: the functions queued since the break (written on this connection
        next), and each other one as it is first sent."""
        sock = self._socks[index] if index < len(getattr(self, "_socks", ())) else None
        pid = sock.peer_pid if sock is not None else None
        if pid is not None and self._reached.get(index) == pid:  # the same engine (its side closed): nothing forgotten
            return
        self._reached[index] = pid
        since = self._broke.get(index, -math.inf)
        queued = frozenset(p.function for p in self._pending.values()
                           if p.engine == index and p.function and not p.fut.done() and p.sent >= since)
        self._told_held[index] = queued
        if queued and self._control is not None:
            self._say_held(index, queued)

    def _connection_lost(self, index: int) -> None:
        """The connection to engine ``index`` broke: nothing sent on it can be answered
        now but by the supervisor's word that the engine died, which names the requests
        it was running (500 or 504). A request sent just after that word was read, but on
        the broken connection, would wait for its deadline: after a grace for the word,
        whatever was sent before the break and is still waiting gets a retryable 503."""
        broke = self._broke[index] = time.monotonic()
        asyncio.get_running_loop().call_later(_LOST_GRACE_S, self._fail_sent_before, index, broke,
                                              self._socks[index].peer_pid)

    def _fail_sent_before(self, index: int, broke: float, pid: int | None = None) -> None:
        """The grace is over. Where the engine process has died and the supervisor, still
        talking, has not yet said so, its word is on its way and names what the engine
        ran (500 for a crash, 504 for a hang): the grace runs again. Failed at the first
        grace, a request whose own function crashed the engine got a retryable 503 where
        the supervisor's tick (reaping the engine, publishing the word) came over 2 s
        after the break: a busy machine's timing, not the request's fault. The
        word already read (it answered what was sent before it), an engine alive (its
        connection closed on its side: no word may come) or a silent supervisor: what
        was sent on the broken connection and still waits gets its 503 now."""
        waiting = [p.fut for p in self._pending.values() if p.engine == index and p.sent <= broke and not p.fut.done()]
        if not waiting:
            return
        if (pid is not None and not self._socks[index].said_gone(pid) and not living(pid)
                and time.monotonic() - self._state_at < _SILENT_S):
            asyncio.get_running_loop().call_later(_LOST_GRACE_S, self._fail_sent_before, index, broke, pid)
            return
        for fut in waiting:
            fut.set_exception(Unavailable("the connection to the engine broke while this request waited; retry",
                                          headers={"Retry-After": "1"}))

    def _reply_handler(self, index: int) -> Any:
        def on_reply(frames: list[Any]) -> None:
            try:
                header, arrays = ipc.parse(frames)
                if type(header["id"]) is not int:  # (an object with an id, or no reply)
                    raise TypeError(f"its id is {type(header['id']).__name__}")
            except Exception:
                # A function may write anything on its engine's connection: JSON that was
                # no reply (``{}``, ``[1]``) raised past here, out of the channel's reader,
                # closing the connection (the request waiting on it a 503) with asyncio's
                # "Fatal error on transport" traceback. (Said once per interval: logs.RepeatFilter.)
                log.exception("unreadable reply from engine %d", index)
                return
            # Only the engine a job was sent to answers it. Message ids count up per front
            # end, over all its engines: a function on one GPU's engine that wrote a reply
            # on its own connection (its socket is in /proc/self/fd) under the next ids
            # answered requests of other clients waiting on another GPU's engine, with a 200
            # (and, answering a cancel, hid that engine's hang from the overdue watch).
            sent, cancelled = self._pending.get(header["id"]), self._cancelled.get(header["id"])
            to = sent.engine if sent is not None else cancelled.engine if cancelled is not None else index
            if to != index:
                log.error("engine %d answered a request sent to engine %d (a function wrote on its connection?); "
                          "not taken", index, to)
                return
            self._cancelled.pop(header["id"], None)  # a cancel taken (or a late answer): the engine reads its socket
            # Answered: no longer pending, even where its caller has just given up (its
            # future cancelled, its abandon yet to run): see ``abandon`` in _run_once.
            entry = self._pending.pop(header["id"], None)
            if entry is not None and not entry.fut.done():
                entry.fut.set_result((header, arrays))

        return on_reply

    async def _events(self) -> None:
        # The only way the supervisor's word reaches this front end: a bad message (or a
        # bug of ours handling one) is logged and skipped, never the end of the task,
        # which would leave the front end serving on a state that no longer changes.
        while True:
            data = await self._sub.recv()
            try:
                self._event(orjson.loads(data))
            except Exception:
                log.exception("could not handle the supervisor's message %.200r", data)

    def _event(self, msg: dict[str, Any]) -> None:
        if msg["t"] == "state":
            engines = msg["engines"]  # (a state without them is not taken)
            self._first_state.set()
            before = {e["index"]: e["generation"] for e in self._state.get("engines", [])}
            self._state, self._state_at = msg, time.monotonic()
            if any(e["ready"] for e in engines):
                self._any_ready.set()
            else:
                self._any_ready.clear()
            for e in engines:
                # An engine process the state named and names no more has gone, whether or
                # not its "died" came through (a PUB socket drops what a slow reader misses).
                known, self._pids[e["index"]] = self._pids.get(e["index"]), e.get("pid")
                if known is not None and known != e.get("pid"):
                    self._socks[e["index"]].gone(known)
                # A new generation whose predecessor's "died" never came (the word, sent
                # just before, answers what the dead engine held; and what was sent on
                # since went to this new engine, which failing it here would wrong).
                if e["index"] in before and e["generation"] != before[e["index"]] \
                        and self._died.get(e["index"], 0) < e["generation"] - 1:
                    self._fail_engine(e["index"], set(), "", hang=False, ready_in=e.get("ready_in", 1.0), pid=known)
        elif msg["t"] == "died":
            self._died[msg["engine"]] = msg["generation"]
            if msg.get("pid") is not None:  # its connection may never close by itself (a child holds it)
                self._socks[msg["engine"]].gone(msg["pid"])
            self._fail_engine(msg["engine"], set(msg["tags"]), msg["reason"], msg["hang"], msg.get("ready_in", 1.0),
                              planned=msg.get("planned", False), function=msg.get("function", ""),
                              pid=msg.get("pid") or self._pids.get(msg["engine"]))

    def _fail_engine(self, index: int, tags: set[str], reason: str, hang: bool, ready_in: float,
                     planned: bool = False, function: str = "", pid: int | None = None) -> None:
        """Answer every request the dead engine held: the ones it was running when it
        died were the cause (504 for a hang, 500 for a crash), unless several were
        running together (a batch: the culprit is unknown, so all are retried, and the
        supervisor has the function run alone from now on; a hung batch too: it is killed
        at its earliest member's deadline, the others' still ahead); the rest are retryable.

        An engine that left as planned (a stray thread, its memory limit) left between
        batches, having sent every answer it had: what it did not answer it never
        started, and goes to the engine that takes over, unseen by the client. (Not a
        stream's next chunk: the stream was that engine's.)

        A request named as running (``tags``, from the engine's status board, which a
        function can write) whose function is not the one blamed (``function``) was not
        running: retryable, not the crash's 500. ``pid``: the engine process that died.

        A planned leave names the requests whose answers it could not send (a function
        closed its connection: that function's 500, as a crash's); one that names no
        function (a leak recycled) lost its answer through no function's fault: retryable."""
        self._told_held.pop(index, None)  # the supervisor forgets what was held there as it restarts it
        if self._control is not None:  # what was held there as it died (``Supervisor._held_at_death``)
            # (the cancelled jobs that engine process had yet to answer count, as in
            # ``held``: the job it died in may be one; left out, the verdict struck the
            # request queued behind it, which had not run, in place of the function that crashed)
            held = self._holding(lambda _: pid).get(index, set())
            self._control.send(self.channel.sign({"t": "held_at_death", "from": os.getpid(), "engine": index,
                                                  "pid": pid, "functions": sorted(held)}))
        alone = len(tags) == 1
        for fut, engine, tag, _, movable, of, _ in list(self._pending.values()):  # (every field of _Pending)
            if engine != index or fut.done():
                continue
            if tag in tags and not planned and function and of and of != function:
                tag = ""
            if planned and movable and tag not in tags:
                fut.set_exception(_Resend())
            elif tag in tags and hang and alone:
                fut.set_exception(Timeout(f"{reason}; the engine was restarted"))
            elif tag in tags and alone and (function or not planned):
                fut.set_exception(FunctionError(f"{reason} while running this request; the engine was restarted"))
            else:
                fut.set_exception(Unavailable("the engine restarted while this request waited; retry",
                                              headers={"Retry-After": _seconds(ready_in)}))

    # ----------------------------------------------------------------- state

    def _engines(self) -> list[dict[str, Any]]:
        return self._state.get("engines", [])

    def readiness(self) -> str | None:
        engines = self._engines()
        if not engines or time.monotonic() - self._state_at > _SILENT_S:
            return "no word from the supervisor"
        down = [f"{e['index']} ({e['device']})" for e in engines if not e["ready"]]
        return f"engine {', '.join(down)} is not up" if down else None

    def quarantined(self, name: str) -> float | None:
        left = self._state.get("quarantined", {}).get(name)
        return None if left is None else float(left)

    def depth(self) -> int:
        return len(self._pending)

    def info(self) -> dict[str, Any]:
        return {"torch": self._doc.get("torch"), "torch_threads": self._doc.get("torch_threads"),
                "memory_budget_bytes": [self._budget(e["index"]) for e in self._engines()], "engines": "processes",
                "spares": [bool(e.get("spare")) for e in self._engines()],
                "engine_pids": [e.get("pid") for e in self._engines()]}

    def _budget(self, index: int) -> int | None:
        """What engine ``index`` computes in (the setting, or its device's default: 256 MiB on
        the CPU, half a GPU's free memory), as it wrote it; None until it first serves."""
        try:
            return int(ipc.read_run_file(ipc.budget_path(self.run_dir, index), 32))
        except (OSError, ValueError):
            return None

    def engine_stats(self) -> dict[str, Any]:
        engines = self._engines()
        restarts = {str(e["device"]): e["restarts"] for e in engines}
        dropped = {str(e["device"]): e.get("output_dropped", 0) for e in engines}
        return {"restarts": restarts, "quarantines": self._state.get("quarantines", 0), "memory": {},
                "output_dropped": dropped}

    def release(self, name: str) -> bool:
        if self.quarantined(name) is None:
            return False
        self._control.send(self.channel.sign({"t": "release", "fn": name}))
        return True

    async def _overdue(self) -> None:
        """Tell the supervisor about engines that hold a cancelled request past the hang
        grace (``Supervisor._overdue``): an engine takes a cancel at its next look at its
        socket, between batches or chunks, and answers it. The supervisor's own watch
        reads the engine's status board, which a function's thread can write ("idle"
        while the engine hangs in the function): the front end's word does not depend
        on it. Once a second, per engine.

        Which function hangs is the one the engine took first of those it has not
        answered: the oldest job sent, cancelled or not, of any front end. The word named
        the cancelled request's function, so a request with a short deadline queued
        behind a hang with a long one (``X-Request-Timeout: 1`` behind the default 60 s)
        was struck for it, and quarantined at the third time, while the function that
        hung went free. Now the word names this front end's oldest job on that engine,
        and each front end holding a job older than a quarter second tells the supervisor
        of its oldest (``oldest``), which weighs them all: the hang's request may have come
        through another front end. (At the word, the hang's job is older than the overdue
        cancel, hence than the grace, a second at least: each front end's last look, at
        most a second before, already saw it.)

        The word also names the requests cancelled past the grace (``given_up``: their
        tags): an engine running only such requests computes for nobody (their clients
        left, or their deadlines passed), and the supervisor replaces it at once rather
        than at its batch's own deadline (``Supervisor._overdue``)."""
        while True:
            await asyncio.sleep(_OVERDUE_EVERY_S)
            try:
                self._tell_overdue(time.monotonic())
                self._tell_held(None)
            except Exception:  # never the end of the task
                log.exception("could not tell the supervisor of an overdue engine")

    def _tell_overdue(self, now: float) -> None:
        overdue_after = max(self.settings.hang_grace_s, OVERDUE_AFTER_MIN_S)
        overdue: dict[int, tuple[float, str]] = {}  # engine -> its earliest cancel overdue (when, function)
        given_up: dict[int, list[str]] = {}  # engine -> the tags of its overdue cancels
        oldest: dict[int, tuple[int, float, str, str]] = {}  # engine -> (its pid, sent, tag, function): the oldest job
        # engine -> the clients of the jobs held there: an engine takes its queue in turns
        # among clients (scheduler.Worker), so where it holds several clients' jobs its
        # oldest is not surely the one it runs; the supervisor weighs that (``_hung_in``).
        clients: dict[int, set[str | None]] = {}

        def consider(index: int, pid: int | None, sent: float, tag: str, function: str, client: str | None) -> None:
            if pid is not None:
                clients.setdefault(index, set()).add(client)
            if pid is not None and sent < oldest.get(index, (0, math.inf))[1]:
                oldest[index] = (pid, sent, tag, function)

        for msg_id, (index, pid, since, sent, tag, function, client) in list(self._cancelled.items()):  # (_Cancelled)
            if pid is None or self._pids.get(index) != pid:  # that engine has gone: nothing to wait for
                del self._cancelled[msg_id]
                continue
            consider(index, pid, sent, tag, function, client)
            if now - since > overdue_after:
                given_up.setdefault(index, []).append(tag)
                if since < overdue.get(index, (math.inf, ""))[0]:
                    overdue[index] = (since, function)
        for p in list(self._pending.values()):
            if not p.fut.done():
                consider(p.engine, self._pids.get(p.engine), p.sent, p.tag, p.function, p.client)
        told = set()
        for index, (pid, sent, tag, function) in oldest.items():
            if now - sent > _OLDEST_AFTER_S:  # its count: a job a function read off the engine's socket is then found
                self._socks[index].count()
            if index in overdue:  # "function": the cancelled request's; "hung": the oldest job's
                since, cancelled = overdue[index]
                self._control.send(self.channel.sign({"t": "overdue", "from": os.getpid(), "engine": index, "pid": pid,
                                                      "since": since, "function": cancelled, "sent": sent, "tag": tag, "hung": function,
                                                      "given_up": given_up[index][-MAX_GIVEN_UP:],
                                                      "clients": _client_marks(clients[index])}))
            elif now - sent > _OLDEST_AFTER_S:
                self._control.send(self.channel.sign({"t": "oldest", "from": os.getpid(), "engine": index, "pid": pid,
                                                      "sent": sent, "tag": tag, "function": function,
                                                      "clients": _client_marks(clients[index])}))
                told.add(index)
        for index in self._told_oldest - told:  # answered since: no longer a suspect
            self._control.send(self.channel.sign({"t": "oldest", "from": os.getpid(), "engine": index, "sent": None}))
        self._told_oldest = told

    def _holding(self, pid_of: Callable[[int], int | None]) -> dict[int, set[str]]:
        """The functions of the jobs this front end holds unanswered, by engine: those it
        awaits, and those cancelled that the engine process ``pid_of(index)`` has yet to
        answer (it may be running them)."""
        held: dict[int, set[str]] = {}
        for p in self._pending.values():
            if not p.fut.done() and p.function:
                held.setdefault(p.engine, set()).add(p.function)
        for c in self._cancelled.values():
            if c.function and c.pid == pid_of(c.engine):
                held.setdefault(c.engine, set()).add(c.function)
        return held

    def _say_held(self, index: int, functions: frozenset[str]) -> bool:
        """The ``held`` word for engine ``index``. True: in the supervisor's queue already
        (``HeldOutbox``: before the job that follows is written, so an end of this front
        end just after, a function's doing, cannot take it along)."""
        word = self.channel.sign({"t": "held", "from": os.getpid(), "engine": index, "functions": sorted(functions)})
        if self._held_out is None:  # (a front end made by hand, in tests)
            self._control.send(word)
            return False
        return self._held_out.send(index, word)

    def _tell_held(self, sending: tuple[int, str] | None) -> bool:
        """Tell the supervisor which functions this front end holds unanswered on each
        engine (``Supervisor._told_held``): the engine's status board, which a function
        can write, is believed only where they agree. Told as a function is sent to an
        engine that was not told it since it last restarted (``sending``: the engine and
        function of the job about to go), and, once a second (``_overdue``), as some were
        answered: a few words a second at most, however many requests, not one per
        request. True: no word had to wait (told before, or in the supervisor's queue now:
        ``_say_held``); False: the caller awaits ``HeldOutbox.settled`` before its job."""
        if self._control is None:  # not started (a front end made by hand, in tests)
            return True
        if sending is not None:
            index, function = sending
            told = self._told_held.get(index, frozenset())
            if function in told:
                return True
            self._told_held[index] = now = told | {function}
            return self._say_held(index, now)
        held = self._holding(self._pids.get)
        for index, told in list(self._told_held.items()):
            if told != (now := frozenset(held.get(index, ()))):
                self._told_held[index] = now
                self._say_held(index, now)
        return True

    # ----------------------------------------------------------------- requests

    def _pick(self) -> int:
        ready = [e["index"] for e in self._engines() if e["ready"]]
        if not ready:
            soonest = min((e.get("ready_in", 1.0) for e in self._engines()), default=1.0)
            raise Unavailable("no engine is up right now (starting or restarting); retry",
                              headers={"Retry-After": _seconds(soonest)})
        return min(ready, key=lambda i: self._load[i])

    async def _engine_for(self, deadline: float, on_slow: Any = None, resent: bool = False) -> int:
        """An engine that is up; when none is, wait up to ``_READY_WAIT_S`` (within the
        request's deadline) for one, then 503 with the supervisor's Retry-After. The
        waiters are bounded like an engine queue: past ``max_queue`` the 503 is at once.
        A wait is slow already: ``on_slow``'s callback runs as it begins.

        A request ``resent`` (its engine left as planned without starting it) waits up to
        its deadline: it was taken, and its client is owed its answer, not a 503 for an
        engine start (a fork and a restart backoff, seconds on a busy machine) that the
        client never asked to wait for."""
        try:
            return self._pick()
        except Unavailable:
            wait = deadline - time.monotonic()
            if not resent:
                wait = min(_READY_WAIT_S, wait)
            if wait <= 0 or self._waiting >= self.settings.max_queue:
                raise
        if on_slow is not None:
            on_slow[1]()
        self._waiting += 1
        try:
            await asyncio.wait_for(self._any_ready.wait(), wait)
        except TimeoutError:
            pass
        finally:
            self._waiting -= 1
        return self._pick()

    async def run(self, kind: str, call: Call | None, *, engine: int | None = None, stream_id: int | None = None,
                  deadline: float | None = None, on_slow: Any = None, function: str = "") -> tuple[Any, JobInfo]:
        if call is not None:
            left = self.quarantined(call.spec.name)
            if left is not None:
                raise FunctionQuarantined(
                    f"{call.spec.name} is quarantined after crashing, hanging or filling the disk of its engine repeatedly; "
                    f"refused for {left:.0f} s more, or until an operator releases it",
                    headers={"Retry-After": str(max(1, round(left)))},
                )
        until = deadline if deadline is not None else call.deadline  # type: ignore[union-attr]
        # One tag for every try: the supervisor knows a request it had sent on to the next
        # engine (a death put down to another function's threads) by its tag, should that
        # engine die running it too (``Supervisor._resent``).
        tag = f"{self._prefix}{next(self._ids)}"
        for resend in range(_RESENDS):
            try:
                result, info, index = await self._run_once(kind, call, engine, stream_id, until, on_slow,
                                                           resent=resend > 0, function=function, tag=tag)
                break
            except _Resend:  # its engine left as planned before starting it: the next one takes it
                continue
        else:
            raise Unavailable("engines left one after another while this request waited; retry",
                              headers={"Retry-After": "1"})
        if isinstance(result, StreamHead):
            result.engine = index
            result.function = call.spec.name if call is not None else function
        return result, info

    async def _run_once(self, kind: str, call: Call | None, engine: int | None, stream_id: int | None,
                        until: float, on_slow: Any = None, resent: bool = False,
                        function: str = "", tag: str = "") -> tuple[Any, JobInfo, int]:
        """One try on one engine: its answer, and which engine gave it (``tag``: the
        request's, the same at each try)."""
        index = engine if engine is not None else await self._engine_for(until, on_slow, resent)
        msg_id = next(self._ids)
        frames = ipc.encode_call(msg_id, kind, call, tag=tag, stream_id=stream_id, deadline=until)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        function = call.spec.name if call is not None else function
        if function and not self._tell_held((index, function)) and self._held_out is not None \
                and self._held_out.direct:
            # Its word waits for room in the supervisor's queue (not looked at for a
            # while): the job waits for it, a second at most, else it would trail the job.
            await self._held_out.settled(index, min(_HELD_SETTLE_S, max(0.0, until - time.monotonic())))
        sent = time.monotonic()
        client = call.client if call is not None else _UNKNOWN_CLIENT
        self._pending[msg_id] = _Pending(fut, index, tag, sent, engine is None, function, client)
        self._load[index] += 1
        sock = self._socks[index]

        def abandon() -> None:
            # A cancelled await cancels ``fut`` too, so "no reply yet" is "not done, or
            # cancelled, and still pending": the engine's answer can be read between the
            # cancellation and this (a deadline already past, an X-Request-Timeout of
            # 1e-9, or a client leaving as the answer comes). A cancel sent then was never
            # answered (the engine had finished the job), and the front end, waiting for
            # that answer, reported the engine as hung: the supervisor killed it, every
            # request it held got a 503, and one client could do that at will.
            if msg_id in self._pending and (not fut.done() or fut.cancelled()):
                sock.send(ipc.encode_cancel(msg_id, stream_id if kind == "stream_next" else None))
                if len(self._cancelled) < _MAX_CANCELLED:  # the engine answers it (see _overdue)
                    self._cancelled[msg_id] = _Cancelled(index, self._pids.get(index), time.monotonic(),
                                                         sent, tag, function, client)

        try:
            # Alone in flight there (its engine, as far as this front end knows, idle):
            # written at once, not at the end of the loop's tick (Connection.send).
            sock.send(frames, now=self._load[index] == 1)
            header, arrays = await _await(fut, until, abandon, on_slow)
        finally:
            self._pending.pop(msg_id, None)
            self._load[index] -= 1
        result, info = ipc.decode_reply(header, arrays)
        return result, info, index

    def close_stream(self, head: StreamHead) -> None:
        self._socks[head.engine].send(ipc.encode_cancel(0, head.stream_id))
