"""The engine process: one device, one thread, one Unix socket (``channel.Listener``).

Front ends connect to the socket and send jobs (and cancels); the loop takes them into a
:class:`~jacobian_service.scheduler.Worker`, which batches across every front end, and
answers each job on the socket it came from. Between jobs, and between the row chunks
of a long job, the loop takes in new messages, so cancels land at the next chunk.

The status board tells the supervisor when this process last looked up (heartbeat)
and what it is running until when (deadline): a function that does not come back by its
deadline plus a grace period gets the process killed and restarted.

Run as ``python -m jacobian_service.engine.process --index I --device D --run-dir DIR``
by the supervisor; settings come from the environment, as for the server.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from .. import ipc
from ..channel import Listener, Peer
from ..confinement import in_force
from ..errors import (
    FunctionError,
    InternalError,
    OutOfMemory,
    ServiceError,
    Timeout,
    Unavailable,
    exception_text,
)
from ..heap import freeze_heap
from ..logs import FdStream, configure_logging
from ..metrics import Metrics
from ..orphans import become_subreaper, kill_descendants, stop_with_parent
from ..procfs import descendants, status_bytes
from ..registry import FunctionModuleNotFound, Registry
from ..scheduler import Job, StreamHead, Worker, engine_error
from ..settings import Settings
from ..yielding import offer_the_cpu
from .descriptor_watch import DescriptorWatch
from .disk_watch import DiskWatch
from .memory_watch import MemoryWatch, ReservedWatch, limit_of, shared_beyond_resident
from .namespaces import described
from .strays import Strays

log = logging.getLogger("jacobian_service.engine")

_PUMP_EVERY_S = 0.01
# Taken as imported (this module's names are watched; gc's are not): ``gc.collect``
# rebound to a no-op by a function left its garbage, and its ``__del__``, to a later
# collection in another function's batch, that function blamed for what it does.
_collect = gc.collect
_OOM_SCORE_ADJ = 500  # of -1000..1000: before the other processes, not before everything
_IDLE_POLL_MS = 100
_LEAVE_DRAIN_S = 2.0  # an engine about to leave (a stray thread, memory): queued jobs get this long to finish
_EXIT_LEAVING = ipc.EXIT_LEAVING  # the board tells the supervisor why; the status, that the engine itself left
# An engine leaving writes what it still owes its front ends (a reply the socket had not
# taken) for up to this long: what is lost at its exit was answered, the front end none the wiser.
_LEAVE_WRITE_S = 0.5
# The least room an address-space cap must leave above what a loaded engine maps: the
# default memory budget of one chunk of rows on the CPU.
_MIN_ROOM = 256 << 20


class EngineServer:
    """An engine and its batching worker; ``open`` binds its socket and status board (a
    standby engine does that only when promoted, after it has warmed up)."""

    def __init__(self, settings: Settings, registry: Registry, device: Any) -> None:
        from .core import Engine
        from .devices import default_memory_budget, device_memory_watch

        self.settings = settings
        self.registry = registry
        self.engine = Engine(device, settings.memory_budget_bytes or default_memory_budget(device),
                             settings.sparsity_cache_dir, settings.sparsity_cache_max_bytes)
        self.engine.enter_thread()  # this thread runs every batch
        self.device = str(device)
        # Under serve every process writes its samples to PROMETHEUS_MULTIPROC_DIR and a
        # front end's /metrics sums them; batch sizes and device memory are only known here.
        self.metrics = Metrics() if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None
        self.worker = Worker(
            self.engine,
            max_queue=settings.max_queue,
            max_batch=settings.max_batch_size,
            batch_wait_s=settings.max_batch_wait_ms / 1e3,
            stream_threshold=settings.stream_threshold_bytes,
            stream_idle_s=settings.request_timeout_s,
            on_run=self._on_run,
            cancelled_for=self._cancelled,
            on_settled=self._settled,
            on_batch=self.metrics.batch_size.observe if self.metrics else (lambda size: None),
        )
        self.pending: dict[tuple[Peer, int], Job] = {}
        self.strays = Strays()  # after the functions' modules are imported: their threads are not strays
        limit, setting = limit_of(settings.engine_max_rss_bytes, settings.engine_memory_limit_bytes)
        self.memory = MemoryWatch(limit, setting=setting, beyond=shared_beyond_resident)
        self.reserved = ReservedWatch(settings.engine_memory_limit_bytes)
        self.device_watch = device_memory_watch(device, settings.engine_max_device_bytes)  # None on the CPU
        # With ENGINE_MAX_DEVICE_BYTES unset the watch acts only once a request has run out
        # of memory: what is held may be a model a function loads on its first call, which
        # a new engine would load again, recycled after each request, for ever.
        self._ran_out = settings.engine_max_device_bytes is not None
        self.descriptors = DescriptorWatch()
        self.disk = DiskWatch(None, settings.engine_max_tmp_bytes,  # its directory: open()
                              shared=(self.engine.sparsity_cache.directory,))
        self._ran = ""  # the function of the last batch run
        self._ran_tags: list[str] = []  # its requests
        self._answers: list[tuple[Peer, str]] = []  # the batch's answers, to whom (``_unanswered``)
        self._left: list[str] = []  # functions whose threads are alive (strays.left)
        self._left_clocks: dict[int, int] | None = None  # their CPU clocks at the last look (``_acted_idle``)
        self._batch_clocks: dict[int, int] | None = None  # other functions' threads' clocks as the batch began
        self._acted: dict[str, Any] | None = None  # why to leave after the batch (``_patched``: another's thread)
        self._moved: dict[str, set[str]] = {}  # namespaces each function's own batches move (``_transient``)
        self._outbox: dict[Peer, list[list[Any]]] = {}  # replies not yet sent, by front end
        self._refusal: ServiceError | None = None  # the batch's answers refused (``_patched``)
        self._last_pump = 0.0
        self._lost_warming: dict[str, Any] | None = None  # a warm-up closed the channel's descriptors: _lost

    def isolate(self, names: list[str]) -> None:
        for name in names:
            if name in self.registry:  # crashed inside a batch before: run its requests alone
                self.engine.profiles[name].vmap_function = False

    def open(self, run_dir: Path, index: int) -> None:
        self.board = ipc.StatusBoard(run_dir / f"engine-{index}.status")
        self.listener = Listener(ipc.engine_path(run_dir, index), self.settings.shared_memory_bytes)
        # Its temporary directory is watched only where it is its own (``serve`` makes one
        # under the run directory for each engine, removed as it ends), never a shared /tmp.
        tmp = os.environ.get("TMPDIR", "")
        if tmp and Path(tmp).parent == run_dir and Path(tmp).name.startswith("tmp-engine-"):
            self.disk.directory = tmp

    # ----------------------------------------------------------------- messages

    def pump(self, timeout_s: float = 0.0) -> None:
        """Take in every message that has arrived, waiting up to ``timeout_s`` for one."""
        while events := self.listener.poll(max(0.0, timeout_s)):
            timeout_s = 0.0
            for peer, frames in events:
                if frames is None:
                    self._hung_up(peer)
                else:
                    self._handle(peer, frames)
        self._last_pump = time.monotonic()
        self.flush()

    def _hung_up(self, peer: Peer) -> None:
        """A front end has gone (it died or stopped): nobody waits for its jobs."""
        for key in [k for k in self.pending if k[0] is peer]:
            self.pending.pop(key).done = True
        self._outbox.pop(peer, None)

    def _handle(self, peer: Peer, frames: list[Any]) -> None:
        header, arrays = ipc.parse(frames)
        msg_id = header["id"]
        if header["t"] == "cancel":
            job = self.pending.pop((peer, msg_id), None)
            if job is not None:
                job.done = True
                # Answered, as any job is: the front end, which has given up on it, waits
                # for this to know the engine reads its socket (a hung engine never does,
                # whatever its board says: ``Supervisor._overdue``). One that is running
                # answers again when it stops; the front end drops what it no longer waits for.
                self._send(peer, ipc.encode_error(msg_id, Timeout("cancelled by the front end")))
            if header.get("sid") is not None:
                self.worker.close_stream(header["sid"])
            return
        try:
            call = None
            if header.get("fn") is not None:
                spec = self.registry.get(header["fn"])
                call = ipc.decode_call(header, arrays, spec)
            tag = header.get("tag", "")
            job = Job(header["kind"], call, self._settle(peer, msg_id, tag), deadline=_deadline(header, call),
                      stream_id=header.get("sid"), tag=tag)
            self.worker.submit(job)
            self.pending[(peer, msg_id)] = job
        except ServiceError as exc:
            self._send(peer, ipc.encode_error(msg_id, exc))
        except Exception as exc:  # a malformed message is our bug (or memory ran out): answer, never die of it
            self._send(peer, ipc.encode_error(msg_id, engine_error(exc, "could not take a job")))

    def _cancelled(self, job: Job) -> Any:
        def cancelled() -> bool:
            if not job.done and time.monotonic() - self._last_pump > _PUMP_EVERY_S:
                self.pump()  # cancels and new jobs land between chunks
            return job.done

        return cancelled

    def _settle(self, peer: Peer, msg_id: int, tag: Any) -> Any:
        def settle(result: Any, error: BaseException | None, info: Any) -> None:
            self.pending.pop((peer, msg_id), None)
            if tag in self._ran_tags:  # not a job refused from the queue (a 429, a 504): never run, owed its own answer
                self._answers.append((peer, tag))
            if error is None:
                error = self._patched(result)
            if isinstance(error, OutOfMemory):
                self._ran_out = True
            try:
                if error is not None:
                    err = error if isinstance(error, ServiceError) else InternalError(f"internal error ({type(error).__name__})")
                    frames = ipc.encode_error(msg_id, err)
                else:
                    frames = ipc.encode_reply(msg_id, result, info)
            except BaseException as exc:  # an answer the wire cannot carry: said, never dropped
                # (dropped, the caller waited for its deadline and got a 504, with no line
                # in any log: the job's settle swallows what it raises)
                log.error("could not encode the answer to a request (%s: %s)", type(exc).__name__, exception_text(exc))
                frames = ipc.encode_error(msg_id, InternalError(f"internal error: the answer could not be encoded "
                                                                f"({type(exc).__name__})"))
            self._send(peer, frames)

        return settle

    def _patched(self, result: Any) -> ServiceError | None:
        """The function's 500 in place of an answer computed, packed or sent under names
        it rebound in what the engine and torch call (``namespaces``; put back after the
        batch): ``ipc._NONE`` rebound packed its own evaluate's output as 1.0, a
        ``sendmsg`` of its own on ``socket.socket`` sent its own Jacobian as zeros, a
        doubled ``torch._VF.einsum`` ran in torch.func's work on it, all with a 200. What
        it changed here cannot be told from what changed its answer: refused, naming
        the change, once it is put back. (The version tags alone, as the put-back reads them.)"""
        if self._refusal is None:
            found = self.engine.namespaces.patched()
            if not found and self._transient() is None:
                return None
        if self._refusal is None:
            self.engine.namespaces.restore(self._ran)  # now: the refusal itself is packed and sent by the engine's own code
            if (others := self._others_ran()) is not None:
                # A thread another function left ran during the batch: it may have made
                # the change (one polling for the victim's batch, measured: 6 of 20 of
                # victim50's requests 500s naming victim50, which had changed nothing).
                # Which did cannot be told: the engine restarts after the batch, taking
                # the thread with it, and the requests are retried there.
                what = "; ".join(described(label, names) for label, names in found)
                self._acted = {"acted": {"by": others, "what": f"rebound or deleted {what} during a batch of "
                                                              f"{self._ran or 'a function'}"}}
                self._refusal = Unavailable(f"the engine restarts: {what} changed during the batch, while a thread "
                                            "another function left ran", headers={"Retry-After": "1"})
                return self._refusal
            # (kept for the batch: its other answers were computed under it too)
            self._refusal = FunctionError(
                f"{self._ran or 'the function'} rebound or deleted "
                f"{'; '.join(described(label, names) for label, names in found)}, which the engine's work on its "
                f"answer goes through: not answered (put back after each of its calls)")
        if isinstance(result, StreamHead):  # its rows are never asked for
            self.worker.close_stream(result.stream_id)
        return self._refusal

    def _transient(self) -> ServiceError | None:
        """A retryable 503 in place of the batch's answers, and the engine restarting after
        it, where a name the engine's work goes through was rebound and put back within the
        batch (``Namespaces.transient``) while a thread another function left ran: a thread
        that rebound ``torch.sin`` to a doubler for 5 ms at each of victim50's batches had
        it answer twice its sine with a 200, the name torch's own again by the batch's end
        (round 53). Where no other function's thread ran, the change was the function's
        own (or a module's own state): those namespaces are passed by in its own batches
        from then on, not in others': learnt for every batch, a function that rebound and
        put back ``torch.sin`` in its own first call had ``torch`` passed by for good, and
        the thread it left then doubled another function's sine unseen (a 200)."""
        if not (moved := self.engine.namespaces.transient(self._moved.get(self._ran, ()))):
            return None
        if (others := self._others_ran()) is None:
            self._moved.setdefault(self._ran, set()).update(moved)
            return None
        what = f"names in {', '.join(moved)} rebound and put back"
        self._acted = {"acted": {"by": others, "what": f"{what} during a batch of {self._ran or 'a function'}"}}
        self._refusal = Unavailable(f"the engine restarts: {what} during the batch, while a thread another "
                                    "function left ran", headers={"Retry-After": "1"})
        return self._refusal

    def _others_ran(self) -> list[str] | None:
        """The other functions whose threads (or processes) ran since the batch began
        (their CPU clocks, ``_batch_clocks``), or None."""
        others = [f for f in self._left if f != self._ran]
        if not others:
            return None
        return others if _clocks_moved(self._batch_clocks, self.strays.left_clocks(besides=self._ran)) else None

    def _send(self, peer: Peer, frames: list[Any]) -> None:
        self._outbox.setdefault(peer, []).append(frames)

    def flush(self) -> None:
        """Send what is waiting, one write per front end. Runs after every pump and every
        batch, so replies wait at most for the batch they belong to."""
        outbox, self._outbox = self._outbox, {}
        for peer, messages in outbox.items():
            self.listener.send(peer, messages)  # arrays go from their own buffers
        if len(outbox) == 1 and len(next(iter(outbox.values()))) == 1:
            # A lone answer (a client at a time: the latency case) only. Under load a
            # batch's answers wake front ends with work queued anyway, and a yield would
            # hand the core between batches to whatever else is runnable (the load
            # generator on this VM), which no throughput run has weighed yet.
            offer_the_cpu()  # (why: yielding.py)

    def _settled(self) -> None:
        """A batch's answers leave, the board saying so first: the send offers the CPU
        (a lone answer), and its caller could have its 200, and the engine be killed,
        before a line after it ran. Dead between the two, its requests are answered by
        the supervisor's word as any it held (a 503), the function no more struck."""
        self.board.answered(time.monotonic())
        self.flush()

    def _on_run(self, jobs: list[Job]) -> None:
        call = self.worker.call_of(jobs[0])  # a stream's chunk: its stream's function takes the blame
        function = call.spec.name if call is not None else ""
        self._ran, self._ran_tags, self._answers = function, [j.tag for j in jobs], []
        self.listener.ran(function)
        self.engine.process_settings.before(function)  # (its random generators: no other function's state)
        self._refusal = None  # (``_patched``: per batch)
        # (what the other functions' left threads had used as it began: ``_others_ran``)
        self._batch_clocks = self.strays.left_clocks(besides=function) if any(
            f != function for f in self._left) else None
        # The hang watch's deadline: a batch of several is hung once it runs past its
        # EARLIEST member's deadline plus the grace. It may run past that deadline for the
        # others (types.stacked_liveness), but was formed only if its measured cost fit it
        # (scheduler._fits). With the latest member's, one member's input that hung the
        # stacked call held every batch-mate to its own deadline: 504s at 20 s for work of
        # milliseconds; now they get a 503 at the earliest deadline plus the grace, and
        # their retry runs alone (the function is isolated) and is answered.
        deadlines = [j.deadline for j in jobs]
        self.board.running(time.monotonic(), min(deadlines) if len(jobs) > 1 else deadlines[0], function,
                           [j.tag for j in jobs], self._left)

    # ----------------------------------------------------------------- loop

    def warm_up(self, note: Path, skip: set[str], say: Callable[[str], None] | None = None) -> None:
        """The first jacrev of a function costs ~1 s: pay it before saying ready.

        A function that never returns on the warm-up input would keep the engine, hence
        every function, from ever being ready. Nothing here cuts it: an exception raised
        into running code (a timer signal's) can stop it half-way through an import,
        and the half-imported package then stays broken for every later call (seen:
        torch's own lazy imports, cut on a slow machine, broke every function's
        jacrev). ``note`` says which function is warming since when; the supervisor
        kills an engine (or spare) stuck past ``warmup_timeout_s`` and has the ones
        started after it ``skip`` that function's warm-up. It then serves unwarmed, and
        its requests meet the hang detection like any other's. A spare also ``say``s
        each (``ipc.say_warming``): its supervisor believes that, not the note."""
        from ..registry import FunctionSpec, Input
        from .devices import warmup_call

        # torch's lazy imports and first-call set-up, on a function of our own, before the
        # first note starts the supervisor's clock: they are no user function's time
        # (1-2 s on a slow machine).
        try:
            self.engine.jacobian(warmup_call(FunctionSpec("_prime", _sin, (Input("x", shape=(3,)),))))
        except Exception as exc:  # the functions' own warm-ups will say more
            log.warning("warm-up of torch itself failed: %s", exc)
        try:  # (no user function's time either: the first sparse request's imports)
            from .sparse import preload

            preload()
        except Exception as exc:  # sparse requests import it again, and say why it fails
            log.warning("preloading sparse derivatives failed: %s", exc)
        try:
            for spec in self.registry:
                if spec.name in skip:
                    log.warning("warm-up of %s skipped: it hung or ended an engine's warm-up before", spec.name)
                    continue
                _publish(note, note.with_suffix(".tmp"), f"{time.monotonic()} {spec.name}".encode())  # whole
                if say is not None:
                    say(spec.name)
                try:
                    # Making the call is inside too: a function with no inputs has nothing
                    # to differentiate (warmup_call's argnums raised), and that ended every
                    # engine at its warm-up, so the service was never ready.
                    call = warmup_call(spec)
                    call.deadline = time.monotonic() + self.settings.warmup_timeout_s  # cut between chunks, where it is safe
                    self.engine.warm_up(call)  # (leaving the state it keeps across calls as found)
                except Exception as exc:  # a function that needs special inputs still serves
                    log.warning("warm-up of %s failed: %s", spec.name, exception_text(exc))  # (bounded: its words are user code)
                self.engine.restore_settings(spec.name)
                self.strays.after_run(spec.name)
                if hasattr(self, "listener"):  # opened before the warm-up (not a spare's)
                    self._lost_warming = self._lost(spec.name)
                if self.engine.process_settings.unrestorable is not None or self._lost_warming is not None:
                    break  # serve() leaves at once: a later warm-up would run under it
        finally:
            note.unlink(missing_ok=True)

    def serve(self) -> None:
        self.board.set_ready(time.monotonic())
        self._suspect(self.strays.left())  # what the warm-ups left running, each put down to its function
        self.board.idle(time.monotonic(), self._left)
        self.memory.start()
        self.reserved.start()
        if self.device_watch is not None:
            self.device_watch.start()
        self.descriptors.start()
        self.disk.start()
        leaving: dict[str, Any] | None = None  # why this engine is about to leave (the board says it)
        since = 0.0
        if (changed := self._unrestorable() or self._lost_warming) is not None:
            self._leave(changed)  # a warm-up did it: its descriptors may be gone, so before any read
        while True:
            now = time.monotonic()
            self.board.beat(now)
            self.pump(0.0 if self.worker.has_work() else _IDLE_POLL_MS / 1e3)
            if (robbed := self._robbed()) is not None:
                self._leave(robbed)  # (before any job it read runs: the front ends send them to the spare)
            ran = self.worker.has_work()
            if ran and self._left and (acted := self._acted_idle()) is not None:
                self._leave(acted)  # (before the batch runs: the front ends send it to the spare)
            if not ran:
                self.worker.tidy()  # streams whose callers have gone: not held until the next job
            else:
                self.worker.run(self.worker.take(self.pump))  # no name keeps the jobs (and their arrays) after
                self.flush()
                # The batch's cyclic garbage, collected while the board still names its
                # function (~7 us): a __del__ that ends the process or hangs is then that
                # function's, not whichever function's request a later collection falls in
                # (an innocent one was blamed, and quarantined).
                _collect(1)
                acted, self._acted = self._acted, None
                if acted is not None:
                    log.error("the engine restarts: %s", ipc.recycle_reason(acted))
                if (gone := self._lost(self._ran) or self._unrestorable() or self._robbed() or acted) is not None:
                    # At once: a request queued here would run under what the function
                    # changed (as nobody, under its seccomp filter: can_uname answered 0
                    # with a 200), or the next poll fail on a descriptor it closed. The
                    # front ends send what was not started to the spare. A connection
                    # closed first: the reason that says the batch's answers went with
                    # it (a function that closed every socket changes descriptors 0-2
                    # too, where they are sockets: a promoted spare's).
                    self._leave(gone)
                self.board.idle(time.monotonic(), self._left)
            if _INTERRUPTS[0] != _INTERRUPTS[1]:
                _INTERRUPTS[1] = _INTERRUPTS[0]
                log.warning("SIGINT sent to the engine (by a function's thread or process: _thread.interrupt_main, "
                            "kill -INT; last ran: %s); let be: no KeyboardInterrupt raised", self._ran or "nothing")
            try:
                found = self._watch(now, ran)
                # (the leak checks read /proc too; looked at only where nothing else has the engine leaving)
                stray = found is not None and found.thread_function is not None
                leak = self._leak(found, now) if leaving is None and not stray else None
            except Exception as exc:
                # The engine's own reads of /proc failed: a function's audit hook
                # (sys.addaudithook, which nothing can remove) that refuses them, say.
                # Without its watchers this engine is blind: it leaves, naming the last
                # function that ran, instead of dying of it between requests unnamed.
                log.error("the engine's own checks failed after %s ran (%s: %s); the engine restarts", self._ran or
                          "nothing", type(exc).__name__, exception_text(exc))
                self._leave({"stray": self._ran, "left": f"the engine's own checks failed ({type(exc).__name__})"})
            if found is not None:
                for pid, functions in found.processes.items():
                    _kill_stray(pid, functions)
                if leaving is None and found.thread_function is not None:
                    log.error("%s left a thread running after it returned, using a core; the engine restarts (a "
                              "thread cannot be stopped)", found.thread_function)
                    leaving, since = {"stray": found.thread_function}, now
            if leaving is None and leak is not None:
                log.error("the engine restarts: %s", ipc.recycle_reason(leak))
                leaving, since = leak, now
            if leaving is not None and (not self.pending or now - since > _LEAVE_DRAIN_S):
                self._leave(leaving)

    def _watch(self, now: float, ran: bool) -> Any:
        """The watchers after a batch (when one just ran), then the strays' check: what
        they found."""
        if ran:
            self._device_memory()
            self.strays.after_run(self._ran)
            if (left := self.strays.left()) != self._left:  # the suspects, should the engine die idle
                self._suspect(left)
                self.board.idle(time.monotonic(), left)
            self.memory.after_run(self._ran)
            self.reserved.after_run(self._ran)
            if self.device_watch is not None:
                self.device_watch.after_run(self._ran)
            self.descriptors.after_run(self._ran)
            self.disk.after_run(self._ran)
        return self.strays.check(now)

    def _suspect(self, left: list[str]) -> None:
        """The functions whose threads are alive: named for what this engine finds changed
        (a death while idle, a setting changed in a later batch) beside what ran."""
        self._left = left
        self.engine.process_settings.suspects = left

    def _leak(self, found: Any, now: float) -> dict[str, Any] | None:
        """A resource the functions leaked past its limit, as the board says it
        (``ipc.recycle_reason``): threads or processes (``strays``, in ``found``), memory,
        descriptors. The watches are asked in turn, only until one says so."""
        if found is not None and found.threads_left is not None:
            return {"threads": found.threads_left}
        if found is not None and found.processes_left is not None:
            return {"processes": found.processes_left}
        if (over := self.memory.check(now)) is not None:
            return {"memory": over}
        if (over := self.reserved.check(now)) is not None:
            return {"reserved": over}
        if self.device_watch is not None and self._ran_out and (over := self.device_watch.check(now)) is not None:
            return {"device_memory": {**over, "device": self.device}}
        if (over := self.descriptors.check(now)) is not None:
            return {"descriptors": over}
        if (over := self.disk.check(now)) is not None:
            return {"disk": over}
        return None

    def _acted_idle(self) -> dict[str, Any] | None:
        """Why to leave, before a batch, when names the engine and the functions share were
        rebound, or process-wide settings changed, while no function ran
        (``Namespaces.restore_idle``, ``ProcessSettings.restore_idle``): a thread or process a
        function left (``_left``) did it, asleep between requests (no stray), and would do
        it again in the middle of a later batch, whose put-back names only the function
        that ran. Put back, and the engine restarts (a thread cannot be stopped): its one
        suspect is struck as for a thread left spinning; several, none (a recycle)."""
        found = self.engine.namespaces.restore_idle(self._left)
        # The settings' pass costs more (~50-500 us): only where a left thread ran since the
        # last look (its CPU clock moved), or one cannot tell (a left child process).
        clocks, self._left_clocks = self._left_clocks, self.strays.left_clocks()
        # (a kernel registered cannot be put back: the engine leaves all the same)
        settings = self.engine.process_settings.restore_idle(self._left) if _clocks_moved(clocks, self._left_clocks) \
            else []
        if not found and not settings:
            return None
        what = "; ".join([*(f"rebound or deleted {described(label, names)}" for label, names in found),
                          *(f"changed {setting}" for setting in settings)])
        log.error("while no function ran, a thread or process left by %s %s; put back, and the engine restarts (a "
                  "thread cannot be stopped)", ", ".join(self._left), what)
        if len(self._left) == 1:
            return {"stray": self._left[0], "left": f"a thread running after it returned, which {what}"}
        return {"acted": {"by": list(self._left), "what": f"{what} while no function ran"}}

    def _unrestorable(self) -> dict[str, Any] | None:
        """Why to leave, when a function changed a setting this engine cannot put back."""
        if (changed := self.engine.process_settings.unrestorable) is None:
            return None
        function, setting = changed
        log.error("%s changed %s, which this engine cannot put back; the engine restarts", function, setting)
        return {"stray": function, "left": f"{setting} changed, which cannot be put back"}

    def _lost(self, function: str) -> dict[str, Any] | None:
        """Why to leave, when a function closed a descriptor of the engine's own channel,
        or removed its socket file (``Listener.lost``): a front end's connection cannot be made again from this
        side, and the spare has a whole channel. A connection closed, with the batch's
        requests (``tags``): their answers went with it, and the front end, taking them
        for never started, sent them to the spare, whose connection the function closed
        in turn, and the next engine's, until their deadlines (504 for them and for the
        other functions' requests caught in between). (Not otherwise: an answer sent and
        not yet read would be failed.)"""
        if (what := self.listener.lost()) is None:
            return None
        done = "removed or replaced" if what == "socket file" else "closed"  # (the path front ends connect to)
        log.error("%s %s the engine's %s (what it does not own); the engine restarts", function or "a function",
                  done, what)
        why = {"stray": function, "left": f"the engine's {what} {done}"}
        return {**why, "tags": self._ran_tags} if what == "connection to a front end" else why

    def _robbed(self) -> dict[str, Any] | None:
        """Why to leave, when messages a front end sent here were read off its connection
        by another reader (``Listener.robbed``): a function, which took other clients'
        jobs. Before, their requests waited for their deadlines (504) and the engine, never
        answering their cancels, was killed as hung in the victim's function, which was
        struck. The one function that ran since is struck (several: none, the engine is
        recycled); the requests it held go to the spare, the stolen ones with them while
        their callers wait (the front ends' count comes once a second while they hold one)."""
        if (robbed := self.listener.robbed()) is None:
            return None
        n, ran = robbed
        log.error("%d message(s) a front end sent to this engine were read off its connection by another reader "
                  "(%s ran meanwhile); the engine restarts", n, ", ".join(ran) or "no function")
        if len(ran) == 1:
            return {"stray": ran[0], "left": f"{n} message(s) a front end sent to the engine read off its connection "
                                             "(other clients' jobs, which the engine never saw)"}
        return {"robbed": {"messages": n, "ran": ran}}

    def _leave(self, why: dict[str, Any]) -> None:
        """Restart, for a thread a function left running (``strays``), a setting it
        changed that cannot be put back (``process_settings``), memory over its limit
        (``memory_watch``), descriptors near theirs (``descriptor_watch``) or too many
        threads (``strays``), between batches: the queue has drained, or waited long
        enough (what is left was never started: the front ends send it to the engine that
        takes over); for a setting that cannot be put back or a descriptor of its channel
        closed, at once after the batch (what is queued would run under it). The board
        says why, for the supervisor.

        What its functions started goes first: orphaned by this exit, a process in a
        session of its own (out of reach of the supervisor's group kill) would outlive
        every engine after it."""
        self.board.leave(time.monotonic(), why)
        try:
            self.flush()
            self.listener.write_out(_LEAVE_WRITE_S)
        except OSError:  # its channel's descriptors closed under it (a function): nothing more to send
            pass
        if lost := self._unanswered(why):
            self.board.leave(time.monotonic(), {**why, "tags": lost})
        try:
            for pid in descendants(os.getpid()):  # its children, alive or zombies: no pid here can be another's
                _kill_quietly(pid)
        except Exception:  # /proc refused (an audit hook): the supervisor's group kill still reaches most
            pass
        os._exit(_EXIT_LEAVING)  # not sys.exit: shutting the interpreter down would wait for a stray thread

    def _unanswered(self, why: dict[str, Any]) -> list[str]:
        """The requests of the last batch whose answers this engine, leaving, could not
        get to their front ends (its connection closed or broken under it, a reply the
        socket had not taken), with those ``why`` names already, or none when it names
        them all: the board names them.
        The front ends take a request a leaving engine does not name for one it never
        started, and send it to the next engine: a function that closed its engine's
        sockets (on an engine whose descriptors 0-2 were sockets too, a promoted spare's,
        the change to them was found first, naming no request) had its request sent on,
        to close the spare's sockets, and the next engine's, until its 503 "engines left
        one after another", where the first engine's culprit got its 500."""
        named = list(why.get("tags", []))
        lost = [tag for peer, tag in self._answers
                if (peer.gone or peer.out) and isinstance(tag, str) and tag and tag not in named]
        return named + lost if lost else []

    def _device_memory(self) -> None:
        if self.metrics is not None and self.device.startswith("cuda"):
            import torch

            self.metrics.device_memory.labels(self.device).set(torch.cuda.memory_allocated(self.device))


def _clocks_moved(before: dict[int, int] | None, now: dict[int, int] | None) -> bool:
    """Whether a thread of those ``Strays.left_clocks`` read ran between the two readings
    (its CPU clock moved, or it is new), or it cannot be told (either reading None)."""
    return before is None or now is None or any(before.get(tid) != used for tid, used in now.items())


def _sin(x: Any) -> Any:
    return x.sin()


def _kill_stray(pid: int, functions: str) -> None:
    """A process a function left running, using a core (``strays``): unlike a thread,
    it can be stopped, and the engine goes on."""
    log.error("a process (pid %d) that %s left running after it returned used a core; killed", pid, functions)
    _kill_quietly(pid)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:  # gone just now
        pass


def _confinement_said(landlock: bool, seccomp: bool, asked: bool) -> str:
    """What keeps this engine's functions off the server's other processes (``confinement``)."""
    if landlock:
        return "its functions reach no process but its own (Landlock)"
    if seccomp:
        return "its functions cannot signal serve (seccomp; Landlock's signal scope needs Linux 6.12+)"
    return ("not confined: ENGINE_CONFINE=false" if not asked else
            "not confined: the kernel refused; a function can signal serve")


def _deadline(header: dict[str, Any], call: Any) -> float:
    if call is not None:
        return call.deadline
    return header.get("deadline") or time.monotonic() + 60


def _limit_memory(limit: int | None, device: str) -> None:
    """An address-space cap: a function that allocates without end fails its request
    with out-of-memory (507) instead of taking the machine's memory.

    The kernel takes a cap below what the process already maps, and then every new
    mapping fails: each request would get 507, the warm-up too, in every engine after.
    A CUDA context alone maps tens of GB of address space that is never resident, so a
    cap sized for the CPU does that on a GPU host. Such a cap is refused here, before
    the engine names itself ready, so ``serve`` stops with this message instead."""
    if not limit:
        return
    mapped = status_bytes(os.getpid(), "VmSize") or 0
    if limit < mapped + _MIN_ROOM:
        what = "torch, the functions and the CUDA context" if device.startswith("cuda") else "torch and the functions"
        raise SystemExit(f"ENGINE_MEMORY_LIMIT_BYTES={limit} leaves no room to compute: the engine on {device} "
                         f"already maps {mapped} bytes of address space ({what}); set it to at least "
                         f"{mapped + _MIN_ROOM} (that plus {_MIN_ROOM >> 20} MiB), or unset it and use "
                         f"ENGINE_MAX_RSS_BYTES, which counts resident memory only")
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _no_core_files() -> None:
    """No core file when the engine crashes: one is as large as the engine's heap (a
    segfault wrote 536 MB into its working directory, and took 2 s more to be seen), and
    the supervisor restarts the engine anyway. Only the soft limit: a function that
    raises it again is put back after its batch (process_settings)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (OSError, ValueError):
        pass


# SIGINTs the engine took (and let be), and those the log has said: see ``_no_keyboard_interrupts``.
_INTERRUPTS = [0, 0]


def _interrupted(signum: int, frame: Any) -> None:
    _INTERRUPTS[0] += 1  # nothing else: no I/O in a handler, which runs between any two bytecodes


def _no_keyboard_interrupts() -> None:
    """SIGINT no longer raises KeyboardInterrupt here. The engine leads a session of its
    own (no terminal's ^C reaches it) and is stopped by SIGTERM; only its functions sent
    it SIGINT: a ``threading.Timer`` one left calling ``_thread.interrupt_main()``, or a
    child left sleeping then ``kill -INT``-ing its engine, raised KeyboardInterrupt into
    whichever function's request ran then (another client's, a 500 ``function_error``
    "KeyboardInterrupt" for that innocent function, at every call, the sender never
    named). A handler of Python's that does nothing, not SIG_IGN: a program a function
    runs gets SIGINT's default again at its exec (an ignored signal stays ignored across
    exec). A function that sets its own has it for its batch (process_settings puts this
    one back)."""
    signal.signal(signal.SIGINT, _interrupted)


def _first_for_the_oom_killer() -> None:
    """Without an address-space cap, the kernel's out-of-memory killer ends a function
    that allocates without end: this process is made its first choice, as the one
    process of the server that is restarted without loss; the supervisor and the front
    ends keep the default."""
    try:
        with open("/proc/self/oom_score_adj", "r+") as f:  # raising it needs no privilege
            if int(f.read()) < _OOM_SCORE_ADJ:  # never lowered (a BestEffort pod's 1000)
                f.seek(0)
                f.write(str(_OOM_SCORE_ADJ))
    except (OSError, ValueError):  # not Linux, or /proc read-only
        pass


def _own_log() -> FdStream | None:
    """The pipe serve gave this engine for its own log lines (``output_relay``), kept
    from the programs its functions start; None where it was given none (stderr, then)."""
    try:
        fd = int(os.environ.get(ipc.LOG_FD_ENV, ""))
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        return None
    return FdStream(fd)


def _publish(path: Path, tmp: Path, data: bytes) -> None:
    """``data`` in ``path``, written to ``tmp`` and renamed (no reader sees half of it).
    What an engine writes so is for others to read at their leisure (the registry, for a
    front end made without ``serve``; the memory budget ``/v1/info`` shows), never what
    it needs to serve: on a full file system (a function filled the temporary directory,
    where the run directory is) the write's ENOSPC ended every engine started after, and
    the service stayed down until the space came back. Now it is said, and the engine
    serves."""
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        log.error("could not write %s (%s); serving without it", path.name, exc)
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jacobian-service-engine")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--standby", action="store_true",
                        help="load and warm up, then wait for a line on stdin before serving (a spare)")
    args = parser.parse_args(argv)
    settings = Settings()
    # Its stdout is a pipe to serve (``output_relay``), which Python buffers by the block:
    # a function's print reached the log only 8 KiB later, or never if the engine died.
    if sys.stdout is not None:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    own_log = _own_log()
    configure_logging(settings.log_format, own_log)
    # What its functions detach (fork, setsid, fork) stays this engine's, to kill as it
    # stops with its parent: handed to init instead, it outlived a killed `serve`.
    become_subreaper()
    stop_with_parent(grace_s=5.0, first=kill_descendants)
    _no_keyboard_interrupts()
    import torch

    from .devices import keep_free_heap, resolve_devices

    keep_free_heap()

    threads = settings.torch_threads if settings.torch_threads is not None else max(1, (os.cpu_count() or 2) // 2)
    if threads:
        torch.set_num_threads(threads)
    try:
        registry = Registry.from_modules(settings.function_modules)
    except FunctionModuleNotFound as exc:
        log.error("%s", exc)
        return 1
    # torch's generators seeded from the OS's entropy, once the functions' modules are
    # loaded and before any request runs. A forked engine had the zygote's state
    # (fork_server), the same in every engine, spare and restart: a client that saw one
    # engine's first draws (x + torch.rand(3)) knew the next engine's. After the modules,
    # not before: what a module draws as it loads (an unseeded nn.Linear's weights) is
    # what any fresh Python process draws from torch's fixed start seed, the same in every
    # engine (one per GPU), restart and spare, so an answer does not depend on which
    # engine gave it; seeded first, every restart changed such a function's weights, and
    # its Jacobians. CUDA's is queued for its start (it had torch's fixed default seed).
    # No seed is pinned: the engine seeds afresh after any batch that draws anyway
    # (process_settings); a function that wants the same draws each time keeps a
    # generator of its own.
    torch.cuda.manual_seed_all(torch.default_generator.seed())
    configure_logging(settings.log_format, own_log)  # again: a module may have configured logging as it was imported
    devices = resolve_devices(args.device)
    server = EngineServer(settings, registry, devices[0])  # on a GPU: its CUDA context
    _limit_memory(settings.engine_memory_limit_bytes, str(devices[0]))  # before the registry: a bad cap stops `serve`
    if args.index == 0 and not args.standby:  # the front ends learn the registry and the devices from engine 0
        doc = {"functions": [spec.describe() for spec in registry], "devices": [str(d) for d in devices],
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        _publish(args.run_dir / "registry.json", args.run_dir / "registry.json.tmp", orjson.dumps(doc))
    _first_for_the_oom_killer()
    _no_core_files()
    server.engine.take_settings(server.registry)  # with the memory limit: it is no function's change to undo
    skip = set(ipc.names_from_env(ipc.SKIP_WARMUP_ENV))
    warm_up = settings.warmup and os.environ.get(ipc.NO_WARMUPS_ENV) != "1"  # (the supervisor may have turned them off)
    if args.standby:
        # A spare: everything slow (torch, the functions, warm-up) is done before the
        # engine it replaces dies; the supervisor's line says go, and which functions
        # to run alone. An empty line (EOF) means the supervisor has gone.
        if warm_up:
            server.warm_up(ipc.warming_path(args.run_dir, os.getpid()), skip, say=ipc.say_warming)
        freeze_heap()  # now, not at promotion: its full collection takes ~0.2 s
        ipc.say_warm()  # the supervisor's sign that it is warm (on its stdin, a socket only the supervisor shares)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        server.isolate(orjson.loads(line).get("isolate", []))
        server.open(args.run_dir, args.index)
    else:
        server.isolate(ipc.names_from_env(ipc.ISOLATE_ENV))
        server.open(args.run_dir, args.index)  # jobs queue in the socket while warming up
        if warm_up:
            server.warm_up(ipc.warming_path(args.run_dir, os.getpid()), skip)
        freeze_heap()
    budget = ipc.budget_path(args.run_dir, args.index)  # the one in force from now: this engine's
    _publish(budget, budget.with_suffix(".tmp"), str(server.engine.memory_budget).encode())
    landlock, seccomp = in_force()
    log.info("engine %d ready on %s (%d functions; %s)", args.index, devices[0], len(registry),
             _confinement_said(landlock, seccomp, settings.engine_confine))
    server.serve()
    return 0


def _run_and_end(run: Callable[[], int]) -> None:
    """Run ``run`` (``main``) and end the process with its status, as ``sys.exit`` would,
    but without Python's shutdown: that runs the ``atexit`` hooks the functions (or their
    modules, as they were imported) registered, user code at a time nothing bounds (no
    request, no deadline, no board naming it), and waits for their non-daemon threads. A
    spare told to stop (its stdin closed), or an engine whose loop failed, ran them.
    What its functions started goes first, as at a leave (``EngineServer._leave``)."""
    try:
        code = run()
    except SystemExit as exc:  # (a message, such as _limit_memory's, is printed as Python prints it)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # (closed, or not a stream: nothing more to write)
            pass
    logging.shutdown()  # (the engine's own handlers: flushed)
    try:
        for pid in descendants(os.getpid()):
            _kill_quietly(pid)
    except Exception:  # /proc refused: the supervisor's group kill still reaches most
        pass
    os._exit(code)


if __name__ == "__main__":
    _run_and_end(main)
