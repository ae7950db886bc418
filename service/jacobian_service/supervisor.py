"""The supervisor: starts one engine process per device, watches them, restarts them.

Torch-free; it runs in the ``serve`` process beside the front ends it starts. Every
``_TICK_S`` it looks at each engine:

- the process exited (a signal, ``os._exit``, the kernel's out-of-memory killer): the
  requests it was running crashed it;
- it runs a job past that job's deadline plus ``hang_grace_s``: a hang, killed;
- it has not looked up for ``engine_heartbeat_s`` (a deadlock that holds the GIL): killed;
- it left, naming a function that left a thread running, using a core (``engine.strays``),
  or saying its resident memory went over ``engine_max_rss_bytes`` (``engine.memory_watch``)
  or its open descriptors near their limit (``engine.descriptor_watch``), its functions'
  temporary files over ``engine_max_tmp_bytes`` (``engine.disk_watch``) or too many
  threads that functions started alive (``engine.strays``): no function is struck, and
  the restart is at once; what it had not started, the
  front ends send to the engine that takes over;
- one function's warm-up has run past ``warmup_timeout_s``: the engine, or the spare,
  is killed, and the engines started after it skip that function's warm-up (nothing
  cuts a warm-up inside the engine: see ``EngineServer.warm_up``). A warm-up that ends
  its engine or spare (a crash, ``os._exit``) is found by the note it left, and skipped
  the same way. It restarts at once: each such death is progress, one function fewer
  to warm up, not a crash loop (before, one function that crashed on the warm-up input
  kept every engine from ever being ready).
  The note is in the run directory, the functions' to remove: a cold engine that ends
  before it is ready with no note, or has none for ``warmup_timeout_s`` plus its
  start-up's length, turns warm-ups off for every engine started from then on (no one
  is struck: nothing names the function; its own requests will); a death with no note
  does so only the second in a row (the first may be a kill -9, the OOM killer, before
  any warm-up began).

With ``engine_standby`` a spare engine process per device waits, loaded and warmed up,
and a dead engine's replacement is that spare, promoted (then a new spare starts).

A dead engine's process group is killed, and with it what its functions forked; what
they started in a session of their own (out of the group's reach) comes to ``serve``,
a child subreaper, when the engine dies, and is killed then (``orphans``).

Each death is published to the front ends (which engine, which request tags were
running, why), counted against the function that was running, and the engine restarts
with exponential backoff: a crash loop must not spend the machine on cold starts (a
torch import and a warm-up each). A spare, warm or warming up, is promoted at once, as
it costs no start (it waited out a backoff of 1 to 10 s before: 503s beside a spare
ready to serve); the backoff delays the next spare's start instead. An engine that has
run a batch to its end works: its backoff is reset then, and a spare it waits for
starts (a crash loop's engines end none).

A function that takes its engine down ``quarantine_after`` times within
``quarantine_window_s`` is quarantined (so is one whose temporary files alone took half
the disk bound or more as often: ``_disk_filler``): the front ends refuse it until
``quarantine_cooldown_s`` passes or an operator releases it. A function that crashed
inside a batch is isolated (its requests run alone from then on), so a retried batch
finds the one culprit and spares its batch-mates.

State (engines up, generations, restarts, quarantines) is published twice a second, so
a front end that missed an event still learns of a new generation.
"""

from __future__ import annotations

import collections
import contextlib
import getpass
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import zmq

from . import ipc
from .fork_server import Forked, ForkServer, start_engine
from .orphans import become_subreaper, kill_adopted, reap_adopted, remove_segments
from .output_relay import OutputRelay
from .procfs import start_ticks, stopped
from .settings import FRONT_END_ONLY, Settings
from .supervision import MAX_GIVEN_UP, OVERDUE_AFTER_MIN_S, Channel, HeldInbox

__all__ = ["Supervisor"]

log = logging.getLogger("jacobian_service.supervisor")

_TICK_S = 0.05
_STATE_EVERY_S = 0.5
_BACKOFF_MAX_S = 10.0
_STABLE_S = 60.0  # an engine up this long has its backoff reset
_PROMOTION_S = 1.0  # a warm spare's take-over, as a Retry-After says it (whole seconds)
# How long a spare promoted on its word that it was warm may take to be ready: a warm
# one binds the engine's socket within milliseconds (seconds under a heavy load). Its word
# is on its stdin, which the functions it warms up hold too: one that wrote "warm" there
# and hung had the spare counted warm, never killed as hung; promoted, it was waited for
# WARMUP_TIMEOUT_S plus a start-up (its note removed), every request 503 with a
# Retry-After of 1 s (measured: not ready after 60 s; 120 s by default).
_WARM_PROMOTION_MAX_S = 10.0
_CONTROL_PER_TICK = 64  # control messages taken per tick: a flood cannot keep the engines from being watched
_REAP_EVERY_S = 1.0  # how often adopted processes that ended are collected (a few /proc reads)
# Adopted processes running at once past this are a leak (a function that starts a daemon
# at every call): killed, as the engines recycle themselves past as many children.
_MAX_ADOPTED = 512
# Front ends whose oldest jobs are kept per engine (``_told_oldest``): a bound on what
# signed words can make the supervisor hold; serve starts far fewer.
_MAX_FRONT_ENDS = 256
# A front end tells its oldest job once a second while it has one; older news is stale
# (that front end gone, or its word lost).
_OLDEST_FRESH_S = 3.0
# A function a front end no longer holds unanswered on an engine is still taken as held
# there this long (``_told_held``): a crash just after the answers left (a ``__del__``
# as the batch is put away) is still its function's, and the front end's word that it
# was answered may have come first.
_HELD_GRACE_S = 2.0
# A death the board lied about, where the front ends held several functions (some answered
# within the grace): their word of what they held as they read of the death is waited for
# (``_held_at_death``) until each front end that held any has told, or this long: a bound
# for a front end gone, not the time the word takes, which on a busy machine can be a
# second or more.
_VERDICT_S = 5.0
_MAX_HELD = 4096  # functions one front end's ``held`` word names, at most (a registry holds far fewer)
# A front end tells ``held`` as it sends a job, on its control socket, whose bytes its zmq
# I/O thread writes while the job itself goes straight to the engine: on a busy machine
# the engine can run the job and crash before that thread has run. A death whose board
# names a function no front end has told of waits this long for their word before it is
# taken as the board's lie (a crash's caller then got a retryable 503, not its 500, and
# the function went unstruck). 2 s, not 0.5 s: a loaded machine (a load of 20 on two
# cores) can leave that thread unscheduled that long. Only a board that lies, or a word
# that trails, waits it out; an engine that never said it was ready had no job of any
# front end (they send only to engines stated ready), and its death waits for none.
_HELD_WAIT_S = 2.0
_SPARE_LINE_MAX = 4096  # a spare's line kept while it is unfinished (a warm-up's "w NAME")
_MAX_KILLED_AFTER = 64  # functions a book of _again remembers
_MAX_RESENT = 256  # requests _resent remembers (the board names them: the functions can write it)


def _signal_group(proc: subprocess.Popen | Forked, sig: int) -> None:
    """Signal an engine's process group: the engine and whatever it forked (a function's
    multiprocessing pool, say). Each engine leads a session, hence a group, of its own
    (``start_new_session``, which Python 3.10 has too), so nothing else is in it. A child
    left alive would hold copies of the dead engine's sockets and shared memory; the front
    ends do not count on it dying (they drop a connection to an engine the supervisor
    says has gone), but nothing should outlive it."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):  # no one left in the group
        pass


def _marks(msg: dict[str, Any]) -> frozenset[str]:
    """The client marks of a front end's ``oldest``/``overdue`` word (``engine_client._client_marks``:
    at most two, of the clients whose jobs it held on that engine)."""
    marks = msg.get("clients")
    if not isinstance(marks, list):
        return frozenset()
    return frozenset(m for m in marks[:2] if isinstance(m, str) and len(m) <= 32)


def _engine_environ(environ: Any) -> dict[str, str]:
    """An engine's environment: without the settings only front ends use (the API keys),
    matched in any case, as the settings read them. torch.compile's cache stays where it
    was, in serve's temporary directory, not the process's own (``Supervisor._start``),
    removed with it: kernels compiled once serve every engine after."""
    env = {name: value for name, value in environ.items() if name.upper() not in FRONT_END_ONLY}
    try:  # (as torch names it: torch._inductor.runtime.cache_dir_utils)
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{user}"))
    return env


def _disk_filler(status: dict[str, Any]) -> str | None:
    """The function a board leaving over ``ENGINE_MAX_TMP_BYTES`` (``engine.disk_watch``)
    says took at least half of that bound by itself, or, left over its count of files,
    made at least half of the files walked by itself; or None (taken by several)."""
    disk = status.get("disk")
    if not isinstance(disk, dict) or not isinstance(limit := disk.get("limit"), int) or limit <= 0:
        return None
    for key, bound in (("grown", limit), ("made", disk.get("entries"))):
        if key == "made" and not (type(bound) is int and bound > _MAX_FILES):
            continue  # (over by its bytes, not by its files)
        grown = disk.get(key)
        top = grown[0] if isinstance(grown, list) and grown else None
        if isinstance(top, list) and len(top) == 2 and isinstance(top[0], str) and top[0] \
                and type(top[1]) is int and 2 * top[1] >= bound:
            return top[0]
    return None


_MAX_FILES = 20_000  # (``DiskWatch``'s ``max_entries``, as the engine runs it)


def _remove_tree(path: Path) -> None:
    """``path`` and all in it, whatever modes a function gave its directories (one left
    without write or search permission kept what was in it)."""
    try:
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                where = os.path.join(root, name)
                if not os.path.islink(where):  # (a link's target is not its to change)
                    with contextlib.suppress(OSError):
                        os.chmod(where, 0o700)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class _Engine:
    index: int
    device: str
    proc: subprocess.Popen | Forked | None = None
    board: ipc.StatusBoard | None = None
    generation: int = 0
    started: float = 0.0
    ready: bool = False
    # Its process has said it is ready (the board, seen once): past its warm-ups for good.
    # A warm-up note under its pid is then a function's, written to have another function
    # blamed for its own crash or hang: never believed (the board's flag alone is not: a
    # function can write the board).
    was_ready: bool = False
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float = 0.0  # no process (an engine's cold start, a spare) starts before this
    killed_for: str = ""  # why we killed it ("hang", "overdue", "heartbeat", "warm-up", "unnoted", "not warm", "stopped"), else ""
    stopped_since: float = 0.0  # when it was first seen stopped by a signal (0: it was not)
    running: dict[str, Any] = field(default_factory=dict)
    startup_s: float = 5.0  # the last cold start-up's measured length (spawn to ready)
    promoted: bool = False  # the running process was a spare (its start-up says nothing of a cold one)
    spare: subprocess.Popen | Forked | None = None  # warmed up, waiting on stdin to take over
    spare_at: float = 0.0  # when a spare may be started next
    spare_started: float = 0.0
    ready_by: float = 0.0  # when the running process should say it is ready (set as it starts)
    noted_at: float = 0.0  # when a warm-up note of the running process was last read (or it started)
    nameless: int = 0  # its processes that ended in a row soon after their start, nothing named (``_died``)
    # The running process is a spare promoted on its word that it was warm (a function's
    # word, maybe: ``_WARM_PROMOTION_MAX_S``), and the last warm-up it had named then.
    promised_warm: bool = False
    promised_by: str = ""

    def ready_in(self, now: float) -> float:
        """Seconds until this engine should be ready again: what a 503's Retry-After says,
        so that clients (the SDK honours it) come back when it is up, not before."""
        if self.ready and self.proc is not None:
            return 0.0
        if self.proc is None:
            if self.spare is not None and self.spare.poll() is None:  # promoted at once; one warming up finishes first
                return max(0.2, self.startup_s - (now - self.spare_started))
            return max(0.0, self.restart_at - now) + self.startup_s
        return max(0.0, self.ready_by - now)


class _StruckBeside(NamedTuple):
    """A threads' owner struck at a death while another function ran (``Supervisor._died``)."""

    owner: str
    ran: str  # the function that ran as the engine died
    skipped: bool  # whether that strike had engines skip the owner's warm-up
    when: float  # the strike's own time: only that strike is taken back, where it still stands


@dataclass
class _SpareWord:
    """What a spare has said on its stdin (``Supervisor._hear``)."""

    warm: bool = False
    warming: tuple[float, str] | None = None  # (since, function): the warm-up it is in
    rest: bytes = b""  # a line not yet ended
    # The warm-ups it will say, in order (the registry's, less those skipped as it started;
    # None: not known). Its stdin is its functions' to write too: a function whose warm-up
    # wrote "w victim39" there and ended the spare had victim39 struck at each spare, and
    # quarantined within seconds (measured). A word out of this order is not believed:
    # the warm-up it came from (the last believed) is the one running.
    order: list[str] | None = None
    said: int = 0  # how many of ``order`` it has said
    last: str = ""  # the last warm-up it was believed to begin (kept once it says it is warm)


class Supervisor:
    def __init__(self, settings: Settings, run_dir: Path, channel: Channel | None = None) -> None:
        self.settings = settings
        self.run_dir = run_dir
        # The sockets front ends reach this by, and the key their word is signed with
        # (``supervision``): out of the engines' reach.
        self.channel = channel if channel is not None else Channel.new(run_dir)
        self.engines: list[_Engine] = []
        self.strikes: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.quarantined: dict[str, float] = {}  # function -> until (time.time())
        # When engines were SIGKILLed from outside just after each function's answers
        # (``_died``): one such kill strikes no one, a second within the quarantine window
        # strikes the function. At most _MAX_KILLED_AFTER names (the board, which names
        # them, is the functions' to write).
        self._killed_after: dict[str, collections.deque[tuple[float, str]]] = {}
        # When each function's threads were alive as an engine died running another
        # function, and which (``_died``): the same rule, a second time strikes; a time
        # is forgotten once the function that ran then is struck for a crash of its own.
        self._threads_at_death: dict[str, collections.deque[tuple[float, str]]] = {}
        # The requests sent on to the next engine after a death put down to other functions'
        # threads: tag -> (when, the function that ran). Should the next engine die running
        # one of them too, the crash is that function's own (``_died``).
        self._resent: dict[str, tuple[float, str]] = {}
        # Threads' owners struck at such a death (their second). Taken back once the
        # function that ran then is struck for a crash of its own (``_let_off``).
        self._struck_beside: list[_StruckBeside] = []
        self._words: dict[int, _SpareWord] = {}  # what each spare (pid) has said on its stdin (``_hear``)
        self._order: list[str] | None = None  # the functions, in the order engines warm them up (the registry's)
        self.quarantines = 0
        self.isolate: set[str] = set()
        self.skip_warmup: set[str] = set()  # functions whose warm-up hung an engine
        # Whether new engines warm the functions up: turned off for good once one hung an
        # engine with no note left to name the function, or two cold engines in a row
        # ended with none (``_warm_ups_off``; the first may be a kill -9 before any note).
        self.warm_ups = settings.warmup
        # What engines write to stdout/stderr, into serve's own under a budget: a function's
        # 64 MB write grew serve's log by 64 MB.
        self.output = OutputRelay(settings.engine_output_bytes_per_s, log_format=settings.log_format)
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.channel.guard(self.pub)
        self.pub.bind(self.channel.events)
        self.control = self.ctx.socket(zmq.PULL)  # front ends: "release this function", "this engine is overdue"
        self.control.setsockopt(zmq.LINGER, 0)
        self.channel.guard(self.control)
        self.control.bind(self.channel.control)
        # The front ends' ``held`` words come on a socket of their own, in the kernel's
        # queue before their jobs reach an engine (``HeldInbox``, bound as this starts:
        # ``listen_held``); None: on ``control``.
        self.held_inbox: HeldInbox | None = None
        self._stop = threading.Event()
        self._go = threading.Event()  # start(): the thread, begun before any engine, ticks from then on
        self._thread: threading.Thread | None = None
        self._last_state = 0.0
        self._reaped_at = 0.0
        self._said_malformed = -1e9  # when a malformed control message was last logged
        # Each front end's oldest unanswered job per engine, as it last told (``oldest``):
        # engine index -> {front end pid: (engine pid, sent, tag, function, when told, the
        # marks of the clients whose jobs it held there then: ``_marks``)}.
        self._oldest: dict[int, dict[int, tuple[int, float, str, str, float, frozenset[str]]]] = \
            collections.defaultdict(dict)
        # Requests the front ends gave up on past the grace (``overdue`` words' ``given_up``):
        # engine index -> {tag: (engine pid, when told)}, kept _OLDEST_FRESH_S.
        self._given_up: dict[int, dict[str, tuple[int, float]]] = collections.defaultdict(dict)
        # The functions each front end has sent each engine and not had answered, as it
        # told (``held``): engine index -> {front end pid: {function: held until, inf while
        # unanswered}}. What the status board names as running is
        # believed only where a front end confirms it (``_confirmed``): the board is the
        # functions' to write.
        self._held: dict[int, dict[int, dict[str, float]]] = collections.defaultdict(dict)
        # engine index -> every function the front ends have said they sent it, since it
        # started: those whose threads it can hold (when there are no warm-ups).
        self._sent: dict[int, set[str]] = collections.defaultdict(set)
        # (engine index, the pid of the engine process that died) -> (until when, the
        # functions the front ends held there as it died, the function struck meanwhile, the
        # front ends yet to tell: pids, whether that strike isolated it). By process, not index alone: the next death of that
        # index can come before the front ends' words of this one (a spare takes over at
        # once; on a busy machine a word trails by a second), and each death is judged by
        # its own words.
        self._verdicts: dict[tuple[int, int | None],
                             tuple[float, set[str], str, set[int], bool]] = {}
        # When each engine and spare process started (clock ticks since boot, by pid):
        # what ties an orphan to the engine that died (``orphans.kill_adopted``).
        self._ticks: dict[int, int | None] = {}
        self._born: dict[int, float] = {}
        self._tmp: dict[int, Path] = {}  # each engine or spare process's temporary directory, by pid
        # The zygote engines are forked from (``fork_server``), started with the first
        # engine. A forked engine is handed to this process as a subreaper: not one here.
        self.forks: ForkServer | None = None
        self._subreaper = become_subreaper()
        if not self._subreaper:
            log.warning("not a child subreaper here: a process a function starts in a session of its own "
                        "may outlive its engine")

    # ----------------------------------------------------------------- start-up

    def start_first(self, timeout: float = 300.0) -> dict[str, Any]:
        """Start engine 0, wait for it to load the functions; it names the devices.

        A bad user module fails here, with the engine's own message on stderr, and the
        server exits rather than restart a process that can never start."""
        first = _Engine(0, self.settings.device)
        self.engines = [first]
        self._begin()  # its thread exists before any engine does: a thread of serve's the filter names
        if (forks := self._fork_server()) is not None:
            forks.ready(wait_s=timeout / 2)  # its imports are the engine's own: the first engine is forked too
        self._spawn(first)
        registry = self.run_dir / "registry.json"
        deadline = time.monotonic() + timeout
        while not registry.is_file():  # (a FIFO a module put there as it was imported is no registry)
            if first.proc.poll() is not None:  # type: ignore[union-attr]
                self.output.flush(2.0)  # its own message first
                raise RuntimeError(f"the engine process exited with status {first.proc.returncode} while loading functions")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise RuntimeError("the engine process did not load the functions in time")
            time.sleep(0.05)
        doc = orjson.loads(ipc.read_run_file(registry, 1 << 30))
        self._order = [f["name"] for f in doc["functions"] if isinstance(f, dict) and isinstance(f.get("name"), str)]
        devices = doc["devices"]
        first.device = devices[0]
        for index, device in enumerate(devices[1:], start=1):
            engine = _Engine(index, device)
            self.engines.append(engine)
            self._spawn(engine)
        return doc

    def _command(self, engine: _Engine) -> list[str]:
        return [sys.executable, "-m", "jacobian_service.engine.process", "--index", str(engine.index),
                "--device", engine.device, "--run-dir", str(self.run_dir)]

    def _spawn(self, engine: _Engine) -> None:
        board_path = self.run_dir / f"engine-{engine.index}.status"
        if engine.board is None:
            engine.board = ipc.StatusBoard(board_path, create=True)
        else:  # a fresh page: the dead engine's "running" must not be read as the new one's
            engine.board.close()
            engine.board = ipc.StatusBoard(board_path, create=True)
        spare, engine.spare = engine.spare, None
        warm = spare is not None and self._is_warm(spare)
        last = ""
        if spare is not None and (word := self._words.pop(spare.pid, None)) is not None:
            last = word.last
        now = time.monotonic()
        if spare is not None and spare.poll() is None and self._promote(spare):
            engine.proc = spare
            engine.promoted, how = True, "spare promoted"
            # A 503's Retry-After while it takes over: a warm spare serves as soon as it
            # has bound the engine's socket (milliseconds); one still warming up, once
            # it is done. Not a cold start's length: that sent clients away for 18 s
            # where the spare was serving within one.
            warming_left = engine.startup_s - (now - engine.spare_started)
            engine.ready_by = now + (_PROMOTION_S if warm else max(_PROMOTION_S, warming_left))
            engine.promised_warm, engine.promised_by = warm, last
        elif spare is not None and now < engine.restart_at:
            engine.spare = spare  # it died just now: put down at the next tick; a cold start waits out the backoff
            return
        else:
            engine.promoted = engine.promised_warm = False
            engine.proc = self._start(engine, standby=False)
            how = "started" + (" (forked)" if isinstance(engine.proc, Forked) else "")
            engine.ready_by = now + engine.startup_s
        engine.generation += 1
        engine.started = engine.noted_at = now
        engine.ready = engine.was_ready = False
        engine.killed_for = ""
        engine.stopped_since = 0.0
        log.info("engine %d (%s) %s, generation %d, pid %d", engine.index, engine.device, how, engine.generation,
                 engine.proc.pid)

    def _start(self, engine: _Engine, standby: bool) -> subprocess.Popen | Forked:
        """An engine process (``standby``: a spare, told to take over on its stdin), its
        output relayed (``output_relay``): not serve's own descriptors, where a function's
        writes landed whole. Its own log lines come through a third pipe (its descriptor
        named in ``ipc.LOG_FD_ENV``), apart from what its functions write. Forked from
        the zygote where it serves, else exec'd (``fork_server``); confined either way:
        its functions then cannot signal (nor renice, pin, limit, trace) ``serve``, its
        threads (the ones now: the filter is made at each start) and group, every process
        at once, nor, with Landlock, any process but its own (``confinement``)."""
        # A temporary directory of its own (TMPDIR), removed as it ends (``_ended``): a
        # function that filled the disk with temporary files left it full after its engine
        # was replaced, for every later function and engine start.
        tmp = Path(tempfile.mkdtemp(prefix=f"tmp-engine-{engine.index}-", dir=self.run_dir))
        out, err, own = self.output.pipe(), self.output.pipe(), self.output.pipe()
        try:
            proc = start_engine(self._fork_server(), [*self._command(engine), *(["--standby"] if standby else [])],
                                {**self._env(), "TMPDIR": str(tmp)}, out[1], err[1], own[1], standby,
                                self.settings.engine_confine,
                                run_dir=self.run_dir)  # (notes a function left under its pid: taken away)
        except BaseException:
            for fd in (out[0], err[0], own[0]):
                os.close(fd)
            _remove_tree(tmp)
            raise
        finally:
            for fd in (out[1], err[1], own[1]):
                os.close(fd)
        label = f"engine {engine.index} (pid {proc.pid})"
        self.output.watch(engine.index, label, [(out[0], 1), (err[0], 2)], pid=proc.pid)
        # (the engine's budgets: a spare promoted after a crash draws on what the dead one left)
        self.output.watch(engine.index, f"{label}'s own log", [(own[0], 2)], budget="log",  # a budget of its own
                          pid=proc.pid, own_log=True)
        self._ticks[proc.pid] = start_ticks(proc.pid)
        self._born[proc.pid] = time.time() - 1.0  # (its SysV semaphore sets: those made since, remove_segments)
        self._tmp[proc.pid] = tmp
        if standby and self._order is not None:
            skipped = set(self.skip_warmup)  # (as its environment said)
            self._words[proc.pid] = _SpareWord(order=[n for n in self._order if n not in skipped] if self.warm_ups else [])
        return proc

    def _fork_server(self) -> ForkServer | None:
        """The zygote (started at the first call), where engines are forked: None with
        ``engine_fork_server`` off, or where this process is no subreaper (a forked
        engine would be handed to init, its exit status lost)."""
        if self.forks is None and self.settings.engine_fork_server and self._subreaper:
            self.forks = ForkServer(_engine_environ(os.environ))
        return self.forks

    def _env(self) -> dict[str, str]:
        """A new engine's environment (a spare reads only what to skip: which functions
        to run alone it learns when promoted). Without the API keys: only the front ends
        check them, and a function reads its engine's environment (``os.environ``,
        ``/proc/self/environ``), where they were there for the taking."""
        return {**_engine_environ(os.environ), ipc.ISOLATE_ENV: ipc.names_env(self.isolate),
                ipc.SKIP_WARMUP_ENV: ipc.names_env(self.skip_warmup), ipc.NO_WARMUPS_ENV: "" if self.warm_ups else "1"}

    def _warm_up_hung(self, engine: _Engine, now: float) -> str | None:
        """The function whose warm-up in the engine's process has run past its limit,
        added to those the engines started from now on skip."""
        proc = engine.proc
        try:
            note = ipc.read_run_file(ipc.warming_path(self.run_dir, proc.pid))  # type: ignore[union-attr]
            since, _, function = note.decode("utf-8", "replace").partition(" ")
            started = float(since)
        except (OSError, ValueError):  # not warming up (any more)
            return None
        engine.noted_at = now
        if now > started + self.settings.warmup_timeout_s:
            self.skip_warmup.add(function)
            ipc.warming_path(self.run_dir, proc.pid).unlink(missing_ok=True)  # type: ignore[union-attr]
            return function
        return None

    def _unnoted_too_long(self, engine: _Engine, now: float) -> bool:
        """Whether the engine, warming up (cold started, not yet ready), has had no
        warm-up note for longer than a warm-up may take plus its start-up's length
        (the torch import and module loads before the first note): its note is the
        functions' to remove (the run directory is theirs), and one that removed it and
        hung had the engine wait for ever, the service never ready (measured). A spare
        promoted while warming up too: its word on its stdin is not read once promoted."""
        return self.warm_ups and now > engine.noted_at + self.settings.warmup_timeout_s + engine.startup_s

    def _warm_ups_off(self) -> None:
        """No more warm-ups, in any engine or spare started from now on: one ended or hung
        an engine before it was ready, and no note named the function (a
        function can remove its note: the engine's were started again and again, each
        dying in the same warm-up, and the service was never ready). Without them an
        engine is ready at once, and the function meets the crash and hang handling on
        its own requests, where the front ends' word names it. Only the first call of
        each function pays its compile (~1 s) instead."""
        self.warm_ups = False  # (the engine's death, logged next, says so)

    def _warm_up_crashed(self, pid: int) -> str | None:
        """The function whose warm-up process ``pid`` was in when it died (its note, which
        an engine removes once its warm-ups are done, was left behind), added to those
        the engines started from now on skip: else each new engine would die on the
        same warm-up, and no engine would ever be ready."""
        note = ipc.warming_path(self.run_dir, pid)
        try:
            function = ipc.read_run_file(note).decode("utf-8", "replace").partition(" ")[2]
        except OSError:  # not warming up
            return None
        note.unlink(missing_ok=True)
        if not function:
            return None
        self.skip_warmup.add(function)
        return function

    def all_ready(self) -> bool:
        """Every engine up and warmed: what /readyz reports (read by serve's start-up line)."""
        return all(e.ready and e.proc is not None for e in self.engines)

    def spare_warm(self, engine: _Engine) -> bool:
        return engine.spare is not None and self._is_warm(engine.spare)

    def _is_warm(self, spare: subprocess.Popen | Forked) -> bool:
        """Whether the spare has said it is warm, on its stdin (``ipc.say_warm``): its
        own word, which no function of another process can say for it."""
        return spare.poll() is None and self._hear(spare, time.monotonic()).warm

    def _hear(self, spare: subprocess.Popen | Forked, now: float) -> _SpareWord:
        """What the spare has said on its stdin so far: which warm-up it is in, since when
        (``ipc.say_warming``, timed here), and whether it is warm. Its warm-up notes in
        the run directory are not read: a running function wrote one for it."""
        word = self._words.setdefault(spare.pid, _SpareWord())
        if said := ipc.heard(spare.stdin):
            *lines, word.rest = (word.rest + said).split(b"\n")
            word.rest = word.rest[-_SPARE_LINE_MAX:]  # (no line of its word is longer: a flood's tail)
            for line in lines:
                if line == ipc.SPARE_WARM.strip():
                    word.warm, word.warming = True, None
                elif line.startswith(b"w ") and not word.warm:
                    function = line[2:].decode("utf-8", "replace")
                    if word.order is not None:
                        if word.said >= len(word.order) or word.order[word.said] != function:
                            log.error("a spare (pid %d) said it began the warm-up of %s out of its order: a function "
                                      "wrote it; not believed", spare.pid, function[:200])
                            continue
                        word.said += 1
                    word.warming, word.last = (now, function), function
        return word

    def _spare_hung(self, spare: subprocess.Popen | Forked, now: float) -> str | None:
        """The function whose warm-up in the spare has run past its limit (as
        ``_warm_up_hung``, from the spare's own word), added to those skipped from now on."""
        word = self._hear(spare, now)
        if word.warming is None or now <= word.warming[0] + self.settings.warmup_timeout_s:
            return None
        function, word.warming = word.warming[1], None
        self.skip_warmup.add(function)
        return function

    def _spare_crashed(self, spare: subprocess.Popen | Forked) -> str | None:
        """The function whose warm-up the dead spare was in (as ``_warm_up_crashed``, from
        its own word), added to those skipped from now on."""
        word = self._hear(spare, time.monotonic())
        ipc.clear_notes(self.run_dir, spare.pid)  # (its file notes: read by no one)
        if word.warming is None or not word.warming[1]:
            return None
        self.skip_warmup.add(word.warming[1])
        return word.warming[1]

    def _promote(self, spare: subprocess.Popen | Forked) -> bool:
        try:
            spare.stdin.write(orjson.dumps({"isolate": sorted(self.isolate)}) + b"\n")  # type: ignore[union-attr]
            spare.stdin.flush()  # type: ignore[union-attr]
            return True
        except OSError:  # it died just now
            return False

    def _tend_spare(self, engine: _Engine, now: float) -> None:
        """Keep one spare per device once its engine is up (never while it starts: the
        two would compete for the same cores and memory)."""
        if not self.settings.engine_standby:
            return
        spare = engine.spare
        if spare is not None:
            code = spare.poll()
            if code is None and (function := self._spare_hung(spare, now)) is not None:
                log.error("engine %d: the spare's warm-up of %s did not return; killing pid %d (the next "
                          "spare skips it)", engine.index, function, spare.pid)
                _signal_group(spare, signal.SIGKILL)
                spare.wait()
                engine.spare_at = now
            elif code is None:
                return
            elif (function := self._spare_crashed(spare)) is not None:
                log.error("engine %d: the spare's warm-up of %s ended it (status %s); the next spare skips it",
                          engine.index, function, code)
                _signal_group(spare, signal.SIGKILL)  # what it forked goes with it
                self._strike(function, batch=False)
                engine.spare_at = now
            else:
                log.warning("engine %d: the spare exited with status %s", engine.index, code)
                _signal_group(spare, signal.SIGKILL)  # what it forked goes with it
                engine.spare_at = now + 30.0
            self._words.pop(spare.pid, None)
            engine.spare = None
            self._ended(spare)  # a warm-up's function may have started some too
        if engine.ready and now >= max(engine.spare_at, engine.restart_at):
            engine.spare = self._start(engine, standby=True)
            engine.spare_at = now + 5.0
            engine.spare_started = now

    def _own(self) -> set[int]:
        """The engine and spare processes this supervisor started and has not yet
        collected: its children in sessions of their own that are not orphans."""
        return {p.pid for e in self.engines for p in (e.proc, e.spare) if p is not None}

    def _ended(self, proc: subprocess.Popen | Forked) -> None:
        """An engine or spare (``proc``, its group killed) died: what it leaves here goes,
        its temporary directory with what its functions wrote there, and the SysV shared
        memory segments it made and never removed. A promoted spare's stdin socket was left open (a descriptor of ``serve``'s per
        promotion, until its Popen was collected)."""
        if proc.stdin is not None:
            proc.stdin.close()
        self._kill_orphans(proc)
        # (its SysV segments and queues: memory no process holds, kept by the kernel past its end)
        if (left := remove_segments(proc.pid, self._born.pop(proc.pid, None)))[0]:
            log.warning("removed %d SysV shared memory segment(s), message queue(s) or semaphore set(s) (%d MiB) left by the functions "
                        "of pid %d",
                        left[0], left[1] >> 20, proc.pid)
        if (tmp := self._tmp.pop(proc.pid, None)) is not None:  # (after what it started: none writes there now)
            _remove_tree(tmp)

    def _kill_orphans(self, proc: subprocess.Popen | Forked) -> None:
        """After an engine or spare (``proc``, its group killed) died: what its functions
        started in sessions of their own, handed to this process as their subreaper."""
        after = self._ticks.pop(proc.pid, None)
        if after is not None and (killed := kill_adopted(self._own(), after, group=proc.pid)):
            log.warning("killed %d process(es) left by the functions of pid %d", killed, proc.pid)

    # ----------------------------------------------------------------- watching

    def listen_held(self) -> None:
        """Bind the front ends' ``held`` socket (``HeldInbox``), before any front end starts."""
        if self.held_inbox is None and self.channel.held is not None:
            try:
                self.held_inbox = HeldInbox(self.channel.held, _MAX_FRONT_ENDS)
            except OSError as exc:
                log.warning("the front ends' held words go on the control socket (%s)", exc)

    def _begin(self) -> None:
        """Start the watching thread, which ticks once ``start`` says so. A signal to any
        thread of a process reaches the process: the engines' seccomp filter names
        ``serve``'s threads as it starts them, so this one must be there before."""
        self.listen_held()
        self.output.start()  # (its threads too)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
            self._thread.start()

    def start(self) -> None:
        self._begin()
        self._go.set()

    def _loop(self) -> None:
        while not self._go.is_set():
            if self._stop.wait(_TICK_S):
                return
        while not self._stop.wait(_TICK_S):
            try:
                self.tick()
            except Exception:  # the supervisor must outlive its own bugs
                log.exception("supervisor tick failed")

    def running_functions(self) -> str:
        """What each engine's board says it runs now ("engine 0: f"), for a log line about
        what some function did; the functions' own word. (Read from serve's thread: a
        board replaced meanwhile is skipped.)"""
        named = []
        for i, engine in enumerate(list(self.engines)):
            try:
                status = engine.board.read() if engine.board is not None else {}
            except (ValueError, OSError):  # closed just now: that engine is starting again
                continue
            if status.get("deadline") and status.get("function"):
                named.append(f"engine {i}: {status['function']}")
        return ", ".join(named)

    def tick(self) -> None:
        now = time.monotonic()
        self._drain_control()
        if self.forks is not None:
            self.forks.tend()  # a zygote that died is started again
        for engine in self.engines:
            if engine.proc is None:
                # A spare that died waiting is put down first, with what its warm-up did
                # (no new one starts: the engine is not ready). One alive takes over at
                # once; a cold start waits out the backoff.
                self._tend_spare(engine, now)
                if engine.spare is not None or now >= engine.restart_at:
                    self._spawn(engine)
                continue
            self._tend_spare(engine, now)
            status = engine.board.read()  # type: ignore[union-attr]
            if status.get("served") and engine.backoff_s:
                # It ran a batch to its end: it works, whatever killed the engines before
                # it. A crash loop's engines never get this far; without the reset, a
                # server whose engine died a few times in a minute, each time for a
                # different request's fault, kept its next spare waiting up to 10 s.
                engine.backoff_s = 0.0
                engine.restart_at = min(engine.restart_at, now)
            if status.get("tags"):
                engine.running = status
            elif status["deadline"] == 0.0:
                engine.running = {}
            if status["ready"] and not engine.ready:
                if not engine.promoted:
                    engine.startup_s = now - engine.started
                self._last_state = 0.0  # tell the front ends now, all at once, not within 0.5 s
            engine.ready = status["ready"]
            engine.was_ready = engine.was_ready or engine.ready
            code = engine.proc.poll()
            if code is not None:
                self._died(engine, code, engine.board.read())  # its last word, written just before it went
                continue
            # A process stopped by a signal (a function that sent its own engine SIGSTOP)
            # never beats and never answers: its request waited for its deadline, every
            # other client's request behind it too, and /readyz said 200 all along. A
            # stop that lasts past the hang grace is taken as a hang, at once.
            if not stopped(engine.proc.pid):
                engine.stopped_since = 0.0
            elif not engine.stopped_since:
                engine.stopped_since = now
            if engine.stopped_since and now - engine.stopped_since > self.settings.hang_grace_s:
                self._kill(engine, "stopped")
            elif status["deadline"] and now > status["deadline"] + self.settings.hang_grace_s:
                self._kill(engine, "hang")
            elif engine.ready and not status["deadline"] and now - status["beat"] > self.settings.engine_heartbeat_s:
                self._kill(engine, "heartbeat")
            elif not engine.was_ready and (function := self._warm_up_hung(engine, now)) is not None:
                engine.running = {"function": function, "tags": []}
                self._kill(engine, "warm-up")
            elif not engine.was_ready and self._unnoted_too_long(engine, now):
                self._kill(engine, "unnoted")
            elif not engine.was_ready and engine.promised_warm and now > engine.started + _WARM_PROMOTION_MAX_S:
                self._kill(engine, "not warm")
        if now - self._reaped_at >= _REAP_EVERY_S:  # a subreaper's duty: no zombies
            self._reaped_at = now
            if (running := reap_adopted(self._own())) > _MAX_ADOPTED:
                # Each holds a pid: left to grow, they would use up the pids (a container's
                # pids limit first), and no process of the server could start again.
                killed = kill_adopted(self._own(), None)
                log.error("%d processes that functions started in sessions of their own were running while their "
                          "engines lived, over %d: %d killed", running, _MAX_ADOPTED, killed)
        self._judge(now)
        self._expire_quarantines()
        if now - self._last_state >= _STATE_EVERY_S:
            self.publish_state()

    def _drain_control(self) -> None:
        """What the front ends have said and this has not read yet (a tick's worth)."""
        if self.held_inbox is not None:
            for word in self.held_inbox.take():
                self._control(word)
        for _ in range(_CONTROL_PER_TICK):
            if not self.control.poll(0):
                break
            self._control(self.control.recv())

    def _await_held(self, index: int, named: set[str], wait: float = _HELD_WAIT_S) -> set[str]:
        """The functions the front ends have sent engine ``index`` (``_sent``, and those
        held there: ``_confirmed``), once they include every one of ``named`` (what its
        board names, and what this last saw it run) or ``wait`` has passed
        (``_HELD_WAIT_S``: their word can trail the job). Read at a death, before the
        board is judged.

        Every one, not any: the names include what this last saw the engine run
        (``engine.running``), stale where it ran a job and died between two looks. A
        function that removed its engine's socket file, sent just after ``sin``, left the
        engine before its word came; ``sin``'s (told a moment before) ended the wait at
        once, and the board's true "stray" was read as a lie, the function unnamed and
        unstruck (round 37's socket-file test, 2 of 5 full runs); a crash so was put on
        ``sin``, answered within the grace, the one function held. Only a board naming
        one no front end sent waits it out, as it did."""
        self._drain_control()
        until = time.monotonic() + wait
        while True:
            ran = self._sent.get(index, set()) | self._confirmed(index)
            left = until - time.monotonic()
            if not named or named <= ran or left <= 0:
                return ran
            # (10 ms at most: the held words' socket is looked at between polls)
            if self.control.poll(max(1, int(min(left, 0.01) * 1000))):
                self._control(self.control.recv())
            if self.held_inbox is not None:
                for word in self.held_inbox.take():
                    self._control(word)

    def _control(self, raw: bytes) -> None:
        """A front end's word, signed with the channel's key (``supervision``):
        ``{"t": "release", "fn": name}``, ``{"t": "overdue", ...}`` (``_overdue``), ``oldest``
        (``_told_oldest``) or ``held`` (``_told_held``).
        A function in an engine that reached the socket lifted any quarantine with a
        well-formed message: one without the key's signature is dropped, as is one that
        is not of those shapes (a message that was not JSON raised out of the tick
        before the engines were looked at, and a stream of them kept every hang and crash
        from being seen), said once in a while."""
        msg = self.channel.verify(raw)
        if msg is not None and msg.get("t") == "release" and isinstance(msg.get("fn"), str):
            self.release(msg["fn"])
            return
        if msg is not None and msg.get("t") == "overdue" and self._overdue(msg):
            return
        if msg is not None and msg.get("t") == "oldest" and self._told_oldest(msg):
            return
        if msg is not None and msg.get("t") == "held" and self._told_held(msg):
            return
        if msg is not None and msg.get("t") == "held_at_death" and self._held_at_death(msg):
            return
        now = time.monotonic()
        if now - self._said_malformed > 60:
            self._said_malformed = now
            log.warning("ignored a control message that no front end sends (%d bytes%s)", len(raw),
                        ", not signed with the front ends' key" if msg is None else "")

    def _told_oldest(self, msg: dict[str, Any]) -> bool:
        """A front end's oldest job unanswered on an engine: ``{"t": "oldest", "from": its
        pid, "engine": i, "pid": pid, "sent": when (monotonic), "tag": t, "function": f}``,
        or ``"sent": None`` once it has none. Should the engine be found hung
        (``_overdue``), the oldest job of all is the one it hangs in. True: well-formed."""
        index, sender, sent = msg.get("engine"), msg.get("from"), msg.get("sent")
        if not (isinstance(index, int) and isinstance(sender, int) and 0 <= index < len(self.engines)):
            return False
        if sent is None:
            self._oldest[index].pop(sender, None)
            return True
        pid, tag, function = msg.get("pid"), msg.get("tag", ""), msg.get("function", "")
        if not (isinstance(pid, int) and isinstance(sent, (int, float)) and isinstance(tag, str)
                and isinstance(function, str)):
            return False
        told, now = self._oldest[index], time.monotonic()
        if sender not in told and len(told) >= _MAX_FRONT_ENDS:  # front ends gone (restarted) say no more
            for stale in [k for k, v in told.items() if now - v[4] >= _OLDEST_FRESH_S]:
                del told[stale]
        if sender in told or len(told) < _MAX_FRONT_ENDS:
            told[sender] = (pid, float(sent), tag, function, now, _marks(msg))
        return True

    def _told_held(self, msg: dict[str, Any]) -> bool:
        """The functions a front end has sent an engine and not had answered: ``{"t":
        "held", "from": its pid, "engine": i, "functions": [...]}``, all of them, told as a
        new one is sent there (once per function since the engine last restarted, not per
        request) and, once a second, as some are answered (``RemoteEngines._tell_held``).
        A function no longer named stays held for ``_HELD_GRACE_S``. Kept per engine index
        and forgotten as that engine dies: a front end does not know which process a job
        will reach (its connection may not be made yet), and a word of before the death
        read after it names only functions sent there just before. True: well-formed."""
        index, sender, functions = msg.get("engine"), msg.get("from"), msg.get("functions")
        if not (isinstance(index, int) and isinstance(sender, int) and isinstance(functions, list)
                and 0 <= index < len(self.engines)):
            return False
        told, now = self._held[index], time.monotonic()
        if sender not in told and len(told) >= _MAX_FRONT_ENDS:  # front ends gone say no more: their word lapses
            for stale in [k for k, held in told.items() if all(until <= now for until in held.values())]:
                del told[stale]
        if sender not in told and len(told) >= _MAX_FRONT_ENDS:
            return True
        held = {f: min(until, now + _HELD_GRACE_S) for f, until in told.get(sender, {}).items() if until > now}
        for function in functions[:_MAX_HELD]:
            if isinstance(function, str):
                held[function] = math.inf
        told[sender] = held
        sent = self._sent[index]
        sent.update(f for f in functions[:_MAX_HELD] if isinstance(f, str) and (f in sent or len(sent) < _MAX_HELD))
        return True

    def _held_at_death(self, msg: dict[str, Any]) -> bool:
        """A front end's word, as it read of engine ``i``'s death, of the functions it
        still held there: ``{"t": "held_at_death", "from": its pid, "engine": i, "pid": the
        engine process that died, "functions": [...]}``. Taken where that death awaits a
        verdict (``_verdicts``): the
        board lied, and the front ends' ``held`` named several functions, those answered
        within the grace among them; the one function still unanswered is the one that
        ran. True: well-formed."""
        index, sender, functions = msg.get("engine"), msg.get("from"), msg.get("functions")
        if not (isinstance(index, int) and isinstance(functions, list)):
            return False
        verdict = self._verdicts.get((index, msg.get("pid")))
        if verdict is not None:
            _, held, _, waiting, _ = verdict
            held.update(f for f in functions[:_MAX_HELD] if isinstance(f, str) and f)
            waiting.discard(sender)  # (all told: judged at the next tick)
        return True

    def _judge(self, now: float) -> None:
        """Deaths whose verdict is due (``_held_at_death``): the function struck for one
        (or none) that the front ends did not hold as it died is let off that strike, and
        the one function they did hold is struck in its place. (No word at all: as
        judged.)"""
        for (index, pid), (due, held, struck, waiting, isolated) in list(self._verdicts.items()):
            if now < due and waiting:
                continue
            del self._verdicts[index, pid]
            if not held or struck in held:
                continue
            blamed = next(iter(held)) if len(held) == 1 else ""
            log.error("engine %d: the front ends held %s unanswered as it died, not %s, which its status board named: "
                      "%s", index, ", ".join(sorted(held)), struck or "the function it named",
                      f"{blamed} struck" + (f" in place of {struck}" if struck else "") if blamed else
                      f"{struck} let off" if struck else "no one struck")
            if struck:
                self._unstrike(struck, isolated)
            if blamed:
                self._strike(blamed, batch=False)
            self.publish_state()

    def _unstrike(self, function: str, isolated: bool = False, at: float | None = None) -> None:
        """Take back ``function``'s last strike (``at``: the one given then), and the
        quarantine it brought; ``isolated``: and the isolation (a batch's strike: its
        requests run alone from then on)."""
        if isolated:
            self.isolate.discard(function)
        strikes = self.strikes.get(function)
        if strikes:
            if at is None:
                strikes.pop()
            else:
                strikes.remove(at)
        if function in self.quarantined and len(strikes or ()) < self.settings.quarantine_after:
            del self.quarantined[function]
            log.info("function %s released from quarantine (the strike was not its)", function)

    def _confirmed(self, index: int) -> set[str]:
        """The functions some front end held unanswered on engine ``index`` as it went,
        or within ``_HELD_GRACE_S`` of it."""
        now = time.monotonic()
        return {f for held in self._held.get(index, {}).values() for f, until in held.items() if until > now and f}

    def _hung_in(self, index: int, pid: int, msg: dict[str, Any]) -> dict[str, Any]:
        """What engine ``index`` (process ``pid``), found hung on ``msg`` (an ``overdue``
        word), hangs in: the oldest job any front end has sent it and not had answered
        (the engine takes its jobs in order, and answers a cancel at its next look at its
        socket). The word's own front end said its oldest (``hung``: its function); the
        others told theirs within the last seconds (``_told_oldest``). A word that names
        no job stands for the cancelled request's function.

        A front end that told of an older job and has said nothing since for
        ``_OLDEST_FRESH_S`` (it tells once a second while it holds one: its loop was
        starved, by a loaded machine or its own work, or it went) may still wait for that
        job, the hang's: its word was dropped, and the job queued behind it, of a request
        with a short deadline, was struck for the hang (quarantined the third time) while
        the function that hung went free. Nor is its job surely the hang's (answered since,
        unsaid): with such a word about, no one is blamed (the engine is replaced all the
        same; its requests are retryable), as where the front ends held several."""
        sent, tag, function = msg.get("sent"), msg.get("tag", ""), msg.get("hung", msg.get("function", ""))
        function = function if isinstance(function, str) else ""
        best = (float(sent) if isinstance(sent, (int, float)) else math.inf, tag if isinstance(tag, str) else "", function)
        now = time.monotonic()
        stale = (math.inf, "", 0.0)  # the oldest job told of by a front end silent since (sent, function, silent for)
        for sender, (engine_pid, other_sent, other_tag, other_function, told, _) in self._oldest.get(index, {}).items():
            # The word's own front end's last ``oldest`` is older news than the word: a
            # job answered since (then the oldest) was struck for a hang that came after it.
            if engine_pid != pid or other_sent >= best[0] or sender == msg.get("from"):
                continue
            if now - told < _OLDEST_FRESH_S:
                best = (other_sent, other_tag, other_function)
            elif other_sent < stale[0]:
                stale = (other_sent, other_function, now - told)
        if stale[0] < best[0]:
            log.warning("engine %d: a front end told %.1f s ago of a job of %s older than %s's, and has said nothing "
                        "since: it may still wait for it; the hang is put down to no function", index, stale[2],
                        stale[1] or "a function", best[2] or "any other")
            return {"function": "", "tags": []}
        # The engine takes its queue in turns among clients (scheduler.Worker), first come
        # first served only within one: where the front ends held jobs of several clients
        # there, the oldest job may wait behind a later one of another client, the one it
        # hangs in (a function that hung and wrote its board had the oldest, another
        # client's innocent function, struck). Then only a function that every job held
        # there ran is surely the hang's; with several, no one is blamed (the engine is
        # replaced all the same; its requests are retryable).
        clients = set(_marks(msg))
        for engine_pid, _, _, _, told, marks in self._oldest.get(index, {}).values():
            if engine_pid == pid and now - told < _OLDEST_FRESH_S:
                clients |= marks
        if len(clients) > 1:
            held = self._confirmed(index) | ({best[2]} if best[2] else set())
            if len(held) != 1:
                log.warning("engine %d held jobs of several clients and of %s: it takes them in turns, so its "
                            "oldest (of %s) is not surely the one it hangs in; the hang is put down to no function",
                            index, ", ".join(sorted(held)) or "no function told", best[2] or "a function")
                return {"function": "", "tags": []}
        return {"function": best[2], "tags": [best[1]] if best[1] else []}

    def _overdue(self, msg: dict[str, Any]) -> bool:
        """A front end cancelled a request at its deadline (or its client left) and the
        engine has not taken the cancel in ``hang_grace_s`` since: ``{"t": "overdue",
        "from": its pid, "engine": i, "pid": pid, "since": when it cancelled (monotonic), "function": the
        cancelled request's, "sent", "tag", "hung": that front end's oldest job there}``.

        An engine reads its socket between batches and between a long job's chunks, and
        answers a cancel there. The supervisor's own watch trusts the engine's status
        board, which a function's thread can write: "idle", fresh beats, while the
        engine's thread hangs in the function. Its requests were cut at their deadlines
        (504) and nothing restarted it, until ``serve`` restarted. Now, on a front end's
        word: an engine whose board says idle while it holds a cancel past the grace is
        hung (an idle engine reads its socket every few milliseconds), and so is one
        holding it past the longest time any batch may legitimately run from then on
        (a batch running when the cancel came ends by its deadline, at most
        ``request_timeout_s`` after it, plus the grace, or the board's own watch kills
        it): a board that says "running" for ever is not believed for ever. Killed as a
        hang, put down to the job it hangs in (``_hung_in``), not to the cancelled
        request, which may have waited behind it. True: a well-formed word."""
        index, pid, since, function = msg.get("engine"), msg.get("pid"), msg.get("since"), msg.get("function", "")
        if not (isinstance(index, int) and isinstance(pid, int) and isinstance(since, (int, float))
                and isinstance(function, str) and 0 <= index < len(self.engines)):
            return False
        engine = self.engines[index]
        if engine.proc is None or engine.proc.pid != pid or engine.proc.poll() is not None:
            return True  # gone already: the word is late
        now, grace = time.monotonic(), self.settings.hang_grace_s
        status = engine.board.read()  # type: ignore[union-attr]
        if now - since < max(grace, OVERDUE_AFTER_MIN_S):
            return True
        idle = status["deadline"] == 0.0
        if not idle and now < status["deadline"] and self._for_nobody(index, pid, msg.get("given_up"), status, now):
            # Every request of its batch given up past the grace, before the batch's
            # deadline (the hang watch's, strikes and all, once it passes): a call no
            # cancel interrupts (one evaluate) held the engine to that deadline, 60 s by
            # default, every request behind it waiting, for clients long gone. Replaced
            # now, as planned: nobody's fault, and what it had not started goes on to
            # the next engine.
            log.warning("engine %d runs %s only for requests cancelled %.1f s ago or more (their clients left): "
                        "replaced", index, status.get("function") or "a function", now - since)
            self._kill(engine, "abandoned")
            return True
        if not idle and now - since < self.settings.request_timeout_s + 2 * grace + 1.0:
            return True  # perhaps a long batch, whose own deadline the board's watch keeps
        engine.running = self._hung_in(index, pid, msg)
        log.error("engine %d held a cancelled request of %s for %.1f s while its status board said it was %s: "
                  "a function wrote the board, or the engine hangs (in %s, the oldest job it had not answered)",
                  index, function or "a function", now - since,
                  "idle" if idle else f"running {status.get('function') or 'something'}",
                  engine.running["function"] or "a function")
        self._kill(engine, "overdue")
        return True

    def _for_nobody(self, index: int, pid: int, given_up: Any, status: dict[str, Any], now: float) -> bool:
        """Whether engine ``index`` (process ``pid``) runs a batch (``status``, its board)
        whose every request some front end has given up on (this word's ``given_up``
        tags, or another front end's within ``_OLDEST_FRESH_S``: a batch may hold
        requests of several)."""
        known = self._given_up[index]
        for tag, (engine_pid, told) in list(known.items()):
            if engine_pid != pid or now - told >= _OLDEST_FRESH_S:
                del known[tag]
        if isinstance(given_up, list):
            for tag in given_up[:MAX_GIVEN_UP]:
                if isinstance(tag, str) and (tag in known or len(known) < _MAX_FRONT_ENDS * MAX_GIVEN_UP):
                    known[tag] = (pid, now)
        tags = status.get("tags")
        return isinstance(tags, list) and bool(tags) and all(isinstance(t, str) and t in known for t in tags)

    def _kill(self, engine: _Engine, why: str) -> None:
        log.warning("engine %d: %s; killing pid %d", engine.index, why, engine.proc.pid)  # type: ignore[union-attr]
        engine.killed_for = why
        _signal_group(engine.proc, signal.SIGKILL)  # type: ignore[arg-type]
        engine.proc.wait()  # type: ignore[union-attr]
        self._died(engine, engine.proc.returncode, engine.board.read())  # type: ignore[union-attr]

    def _died(self, engine: _Engine, code: int, status: dict[str, Any]) -> None:
        # The functions the board says left threads behind ("stray", "left") are believed
        # only if they can have run in it: a front end sent it one of their jobs, or the
        # engines warm every function up. A function that wrote another's name there as
        # a stray had that one struck, and its warm-up skipped for good.
        # What the front ends said just before (a job's ``held``), read first.
        if (believed := ipc.as_left(status, code)) is not status:
            log.error("engine %d's status board said it was leaving on its own, but it ended otherwise (%s): a "
                      "function wrote the board; not believed", engine.index,
                      f"killed: {engine.killed_for}" if engine.killed_for else f"status {code}")
        status, forged_leave = believed, believed is not status
        left = status.get("left")
        filler = _disk_filler(status)  # (a name the board gives: believed only where the front ends sent it)
        board = ({status.get("stray"), *(left if isinstance(left, list) else ())} if not self.warm_ups
                 else set()) | {status.get("function"), engine.running.get("function"), filler}
        ran = self._await_held(engine.index, {f for f in board if isinstance(f, str) and f},
                               _HELD_WAIT_S if engine.was_ready else 0.0)
        stripped = forged_leave  # (whom the front ends held decides, as for any word of the board not believed)
        if (not self.warm_ups and isinstance(stray := status.get("stray"), str) and stray
                and stray not in ran):
            log.error("engine %d's status board said %s left a thread running, but no front end had sent it a job "
                      "of %s: a function wrote the board; not believed", engine.index, stray, stray)
            status, stripped = {k: v for k, v in status.items() if k not in ("stray", "left")}, True
        if not self.warm_ups and isinstance(left := status.get("left"), list) \
                and (kept := [f for f in left if isinstance(f, str) and f in ran]) != left:
            log.error("engine %d's status board said threads left by %s were running, but no front end had sent it "
                      "a job of %s: a function wrote the board; not believed", engine.index,
                      ", ".join(map(str, left)), ", ".join(str(f) for f in left if f not in kept))
            status, stripped = {**status, "left": kept}, stripped or not kept  # (none believed: as a forged stray)
        recycled = ipc.recycle_reason(status)  # planned: no function's fault, no backoff
        if engine.killed_for == "abandoned":  # (_overdue) its requests' clients left: planned too
            recycled = (f"it ran {status.get('function') or 'a function'} only for requests whose clients had left "
                        "(or given up) before their deadlines")
        planned = bool(status.get("stray")) or recycled is not None
        # A warm-up that ended the engine (a crash; one it killed is on its own record).
        # Not while its board names jobs, nor once it has said it is ready (it then has
        # no warm-up left, and a thread a function left can end it while idle): a note
        # found then is a function's, written to have another function struck for its own
        # crash (which went free, its request a retryable 503; or, while idle, the
        # function named was struck and its warm-up skipped for good): taken away unread.
        past_warm_ups = bool(status.get("tags")) or engine.was_ready or status.get("ready", False)
        if past_warm_ups:
            ipc.clear_notes(self.run_dir, engine.proc.pid)  # type: ignore[union-attr]
        warming = None if planned or past_warm_ups else self._warm_up_crashed(engine.proc.pid)  # type: ignore[union-attr]
        # Ended (or hung) before it was ready, and no note names a warm-up: a function
        # removed its note, or the process went before its first (a kill -9, the OOM
        # killer, an import that crashed). Nothing tells which: no one is struck. One
        # such death turned warm-ups off for the rest of the run (measured: one kill -9
        # of a cold engine, 0.3 s into its torch import): a transient event, a permanent
        # loss. Now it takes the second in a row (``engine.nameless``, reset by any other
        # death), or a hang past WARMUP_TIMEOUT_S with no note (ours, not transient):
        # a warm-up that removes its note costs one cold start more, not a crash loop.
        # (A promoted spare's own death is not read so: it may go before its board says ready.)
        cold_nameless = (warming is None and not planned and not past_warm_ups and self.warm_ups
                         and (engine.killed_for == "unnoted"
                              or not engine.promoted and engine.killed_for in ("", "stopped")))
        unnamed = cold_nameless and (engine.killed_for == "unnoted" or engine.nameless >= 1)
        if unnamed:
            self._warm_ups_off()
        # A spare promoted on its word that it was warm, and never ready: a warm-up said
        # it (a function's word), the last it had named, unless a note names another.
        # Its warm-up is skipped from now on; no one is struck (a forger can name its
        # successor in the warm-up order first).
        unwarm = engine.killed_for == "not warm" and warming is None and not planned
        if unwarm and engine.promised_by:
            self.skip_warmup.add(engine.promised_by)
        # What it ran when it went: its board says. An engine that left as planned, or
        # went with its board saying idle, ran nothing: what this supervisor last saw it
        # run is stale, and those requests may be answered already, their replies not yet
        # read by the front ends, which would fail them if named. A warm-up it killed is
        # on its own record. A SIGKILL not ours after the batch's answers left (the OOM
        # killer, an operator: ``kill -9`` just after a 200) is no more the function's
        # than one while idle: its function was struck and, one strike from quarantine,
        # refused to every caller, its caller holding a 200.
        killed_outside = (code == -signal.SIGKILL and not engine.killed_for and bool(status.get("answered"))
                          and not planned and warming is None)
        after, repeated = "", False  # (such a kill: after whose answers, and whether again: _again)
        running: dict[str, Any]
        if planned:  # its requests answered, but those it names: their answers could not reach their front ends
            running = {"tags": status["tags"]} if status.get("tags") else {}
        elif warming is not None:
            running = {"function": warming, "tags": []}
        elif cold_nameless:
            running = {}
        elif engine.killed_for == "overdue":  # its board was not believed: the front end's word names the function
            running = engine.running
        elif killed_outside:
            running = {}
        elif status.get("tags") or status.get("answered"):  # (answered: tidying after its batch, a __del__ say)
            running = status
        elif engine.killed_for == "warm-up" or status.get("deadline") != 0.0:
            running = engine.running
        else:
            running = {}
        function = status.get("stray", "") if planned else running.get("function", "")
        # Whom the board names as running is believed only where the front ends confirm
        # it: a function that wrote another's name there ("function", "tags") and then
        # crashed had the innocent one struck, and quarantined, while it went free. The
        # front ends tell which functions they sent this engine and had not had answered
        # (``held``, once per function, not per request); where they and the board
        # disagree, they are trusted: the one function they held is struck, or, holding
        # several, none, and the board's other claims (threads left) are not read either.
        named, forged, checked = function, False, False
        if (function or stripped) and not planned and warming is None \
                and engine.killed_for not in ("overdue", "warm-up"):
            held, checked = self._confirmed(engine.index), True
            if function not in held:
                forged, function = True, (next(iter(held)) if len(held) == 1 else "")
                running = {"function": function, "tags": list(running.get("tags", [])) if function else []}
                log.error("engine %d's status board named %s as running when it died, but no front end had sent it "
                          "a job of %s unanswered (they held %s): a function wrote the board; %s", engine.index,
                          named or "no function", named or "it", ", ".join(sorted(held)) or "none",
                          f"{function} is blamed" if function else
                          f"whom the front ends still held as it died decides, within {_VERDICT_S:g} s")
        tags = list(running.get("tags", []))
        # Dead while it ran nothing: its board names the functions whose threads were
        # alive then. A thread can sleep, unseen, and end the engine later (a timer that
        # calls os._exit): without this, nothing was blamed, and a warm-up that left one
        # ended every engine for ever.
        suspects = [] if planned or function or warming or forged else [
            f for f in status.get("left", []) if isinstance(f, str) and f]
        if status.get("stray"):
            left = status.get("left", "a thread running after it returned, using a core")
            reason = f"{function} left {left}; engines skip its warm-up"
            self.skip_warmup.add(function)  # a warm-up would leave one again
        elif recycled is not None:
            reason = recycled
            # A function that fills the disk bound again and again cost a restart (a
            # torch start-up, the spare's) each time and was never quarantined, where one
            # that crashes or hangs its engine as often is: the one that took at least
            # half of the bound by itself, and that a front end sent this engine (the
            # board is the functions' to write), is struck for it, as for a crash.
            if filler is not None and filler in ran and engine.killed_for == "":
                reason += f"; {filler} struck (its files alone took half the bound or more)"
            else:
                filler = None
        elif engine.killed_for == "hang":
            reason = f"{function or 'a function'} did not return by its deadline (plus {self.settings.hang_grace_s:g} s)"
        elif engine.killed_for == "overdue":
            reason = (f"{function or 'a function'} hung: the engine did not take a cancelled request within "
                      f"{max(self.settings.hang_grace_s, OVERDUE_AFTER_MIN_S):g} s, and its status board, which a "
                      "function can write, said otherwise")
        elif engine.killed_for == "warm-up":
            reason = (f"the warm-up of {function} did not return within {self.settings.warmup_timeout_s:g} s "
                      "(WARMUP_TIMEOUT_S); engines skip it from now on")
        elif engine.killed_for == "unnoted":
            reason = (f"it was not ready within {self.settings.warmup_timeout_s + engine.startup_s:.1f} s of its start "
                      "or its last warm-up note (WARMUP_TIMEOUT_S plus its start-up), and no note named a warm-up")
        elif engine.killed_for == "not warm":
            reason = (f"a spare promoted on its word that it was warm was not ready within {_WARM_PROMOTION_MAX_S:g} s "
                      "(a function in its warm-up can say that word)")
            if unwarm:
                reason += (f"; engines skip the warm-up of {engine.promised_by}, the last it began, from now on"
                           if engine.promised_by else "; no warm-up was named")
        elif engine.killed_for == "stopped":
            reason = (f"{function or 'a function'} stopped the engine process (a stop signal, such as SIGSTOP) "
                      f"for more than {self.settings.hang_grace_s:g} s")
        elif engine.killed_for == "heartbeat":
            reason = f"the engine stopped answering for {self.settings.engine_heartbeat_s:g} s"
        elif code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            reason = f"the engine process was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
            if killed_outside:
                after = status.get("function") or "a function"
                repeated = self._again(self._killed_after, after)
                reason += (f" after {after} had answered its requests" +
                           (f", the second time within {self.settings.quarantine_window_s:g} s (struck)" if repeated
                            else " (not blamed)"))
        else:
            reason = f"the engine process exited with status {code}"
        if forged:
            reason += (f"; its status board, which a function can write, named {named or 'threads of functions'}, "
                       "which no front end had sent it" + (" unanswered" if named else ""))
        if warming is not None:
            reason = f"the warm-up of {warming} ended the engine ({reason}); engines skip it from now on"
        elif unnamed:
            reason = (f"a warm-up {'hung' if engine.killed_for == 'unnoted' else 'ended'} the engine ({reason}), its note gone (a function may have removed it); "
                      + ("" if engine.killed_for == "unnoted" else "the second engine in a row to end before it was ready "
                         "with no note: ") + "engines start without warm-ups from now on")
        elif cold_nameless:
            reason = (f"it ended before it was ready ({reason}) with no warm-up note naming a function (it went before "
                      "its first, or a function removed its note); no one is struck, warm-ups stay on: a second such "
                      "death in a row turns them off")
        if suspects:
            reason += (f"; {', '.join(suspects)} left threads running, which are blamed (and engines skip "
                       "their warm-ups)")
            self.skip_warmup.update(suspects)
        # Dead while it ran a function, with other functions' threads alive: one of them
        # may have done it (a timer that calls os._exit, a segfault, a SIGKILL of its own
        # process), and nothing tells which thread did. Blaming the running function
        # struck an innocent one: another's thread ended every engine it ran in, and it was
        # quarantined. So such a death (its own, not a kill of ours), where the running
        # function left no thread of its own alive, strikes no one the first time: its
        # requests run again on the next engine (``planned``), where those threads are
        # not, and a crash there is the function's own. The threads' owners are struck
        # the second time within the quarantine window (``_again``): else a timer left
        # at each call replaced engines for ever. A time is forgotten once the function
        # that ran then crashes alone (struck: it was its own crash), so a library's idle
        # pool, alive beside another function's crashes again and again, is not struck.
        # Not when the request had been sent on here after such a death already: a
        # library's idle pool that every warm-up starts is alive in every engine, and the
        # request that crashed went on ending them (three, then its 503, the pool's owner
        # struck at the second, and quarantined, its warm-up skipped for good). A request
        # that ends the engine it was sent on to as well is the culprit, whatever threads
        # were alive: its 500, its function struck, those threads' owners let be.
        sent_on = self._sent_on(tags, function)
        others = [f for f in running.get("left", []) if isinstance(f, str) and f and f != function] if function else []
        # A stop (SIGSTOP past the grace, killed by us) is read as a death by itself: a child
        # one function left sleeping that stopped the engine during another's request had
        # that innocent struck, quarantined at the second such stop (measured).
        theirs = bool(others) and engine.killed_for in ("", "stopped") and not killed_outside and recycled is None \
            and warming is None and function not in running.get("left", [])
        if theirs and sent_on:
            theirs = False
            reason += (f"; this request of {function} had ended the engine before, and was sent on here as that "
                       f"death was put down to other functions' threads: the crash is {function}'s own")
        blamed = [f for f in others if self._again(self._threads_at_death, f, function)] if theirs else []
        newly_skipped = {owner for owner in blamed if owner not in self.skip_warmup}  # (by these strikes: _let_off)
        if theirs:
            reason += (f"; threads left running by {', '.join(others)} were alive, and {function} left none: " +
                       (f"{', '.join(blamed)} struck (their threads were alive at such a death before, within "
                        f"{self.settings.quarantine_window_s:g} s), and engines skip their warm-ups" if blamed else
                        "no one is struck the first time") + f"; {function}'s requests run again on the next engine")
            self.skip_warmup.update(blamed)
            now_s = time.monotonic()
            for tag in tags:  # sent on: should one end the next engine too, it is the culprit
                self._resent.pop(tag, None)
                self._resent[tag] = (now_s, function)
            while len(self._resent) > _MAX_RESENT:
                del self._resent[next(iter(self._resent))]
        # Its board's word that it was ready (past its warm-ups) is the functions' to write
        # too: a warm-up that said so, removed its note and ended the engine was taken for
        # an idle engine's death, nothing named, again and again (measured). A second such
        # death in a row, soon after its start, is taken for a warm-up's as well.
        early = (not unnamed and warming is None and not planned and not function and not suspects and not theirs
                 and not killed_outside and self.warm_ups and not engine.promoted
                 and engine.killed_for in ("", "stopped")
                 and time.monotonic() - engine.started < self.settings.warmup_timeout_s + engine.startup_s)
        engine.nameless = engine.nameless + 1 if early or (cold_nameless and not unnamed) else 0
        if early and engine.nameless >= 2:
            unnamed = True
            self._warm_ups_off()
            reason += ("; the second engine in a row to end soon after its start with nothing named (a warm-up "
                       "whose note was removed, its board saying it was ready?): engines start without warm-ups "
                       "from now on")
        log.error("engine %d died: %s (running %s for %d requests%s)", engine.index, reason, function or "nothing",
                  len(tags), f"; threads left running by {', '.join(others)} were alive" if others and not theirs
                  else "")
        dead, pid = engine.proc, engine.proc.pid  # type: ignore[union-attr]
        _signal_group(engine.proc, signal.SIGKILL)  # type: ignore[arg-type]  # its children, if any, go too
        if theirs:
            for suspect in blamed:
                when = self._strike(suspect, batch=False)
                self._struck_beside.append(_StruckBeside(suspect, function, suspect in newly_skipped, when))
            del self._struck_beside[:-_MAX_KILLED_AFTER]
        elif function and recycled is None:
            isolating = len(tags) > 1 and function not in self.isolate  # (taken back with the strike: _judge)
            self._strike(function, batch=len(tags) > 1)
            if checked and (forged or status.get("tags")):
                # Named with its requests, the function must be one the front ends still
                # held as they read of the death: one answered a moment before (within the
                # grace) passed the check too. Their word decides (``_judge``).
                self._verdicts[engine.index, pid] = (time.monotonic() + _VERDICT_S, set(), function,
                                                     set(self._held.get(engine.index, {})), isolating)
            for times in self._threads_at_death.values():  # its own crash: not theirs, those times
                for entry in [e for e in times if e[1] == function]:
                    times.remove(entry)
            if let_off := self._let_off(function):
                log.warning("engine %d: %s let off the strike their threads brought, alive as engines died running "
                            "%s, whose crash it was", engine.index, ", ".join(let_off), function)
        elif engine.killed_for == "abandoned" and status.get("function"):
            # Its requests are nobody's failure (their clients left), but the function did
            # not give the engine back within the grace of a cancel, as a hang does not
            # by its deadline: struck. Else a caller that always leaves early (or a
            # function that hangs for callers that do) replaced engines for ever, a
            # torch start-up each, and was never quarantined, where the same caller
            # sending `X-Request-Timeout` instead is.
            self._strike(status["function"], batch=False)
        elif checked and forged:  # several held: the one still held as it died is struck (``_judge``)
            self._verdicts[engine.index, pid] = (time.monotonic() + _VERDICT_S, set(), "",
                                                 set(self._held.get(engine.index, {})), False)
        elif killed_outside and repeated:
            self._strike(after, batch=False)
        elif recycled is not None and filler is not None:
            self._strike(filler, batch=False)
        for suspect in suspects:
            self._strike(suspect, batch=False)
        engine.proc = None
        self._oldest.pop(engine.index, None)  # its jobs are answered now, by the word just sent
        self._held.pop(engine.index, None)
        self._sent.pop(engine.index, None)
        engine.ready = False
        engine.running = {}
        engine.restarts += 1
        now = time.monotonic()
        if now - engine.started > _STABLE_S:
            engine.backoff_s = 0.0
        if engine.killed_for == "warm-up" or warming is not None or unnamed or unwarm or recycled is not None:  # progress or a plan
            engine.restart_at = now
        else:
            engine.restart_at = now + engine.backoff_s
            engine.backoff_s = min(_BACKOFF_MAX_S, max(0.5, engine.backoff_s * 2))
        self.pub.send(orjson.dumps({
            "t": "died", "engine": engine.index, "generation": engine.generation, "pid": pid,
            "tags": [] if theirs else tags,  # (none failed: they run again)
            "function": function, "reason": reason, "hang": engine.killed_for in ("hang", "overdue"),
            # It left between batches (a stray thread, its memory limit), or died warming
            # up: what it did not answer it never started, and the front ends send it to
            # the next engine.
            # A death with another function's threads alive: its requests go to the next
            # engine too (the running function's own crash ends that one as well).
            "planned": planned or warming is not None or cold_nameless or unwarm or theirs,
            "ready_in": engine.ready_in(now),
        }))
        self.publish_state()
        self._ended(dead)  # type: ignore[arg-type]  # and those that left its group (after the word: ~20 ms)

    def _let_off(self, ran: str) -> list[str]:
        """Take back the strikes (and the warm-ups skipped) of threads' owners struck at a
        death while ``ran`` ran (``_struck_beside``), now that ``ran`` is struck for a
        crash of its own: two requests of a function that crashes, beside a library's idle
        pool that every warm-up starts, each ended an engine before the front ends sent it
        on, and the pool's owner, alive at two such deaths, was struck (quarantined at
        the third, its warm-up skipped for good) for crashes not its own."""
        let_off = [e for e in self._struck_beside if e.ran == ran]
        self._struck_beside = [e for e in self._struck_beside if e.ran != ran]
        for owner, _, skipped, when in let_off:
            # That strike alone, where it still stands: one released with its quarantine, or
            # gone out of the window, is no more, and the last strike was the owner's own
            # later crash's (it was released from that quarantine, "the strike was not its").
            if when in self.strikes.get(owner, ()):
                self._unstrike(owner, at=when)
            if skipped:
                still = next((i for i, e in enumerate(self._struck_beside) if e.owner == owner), None)
                if still is None:
                    self.skip_warmup.discard(owner)
                else:  # struck beside another function too: that strike keeps its warm-up skipped
                    self._struck_beside[still] = self._struck_beside[still]._replace(skipped=True)
        return sorted({owner for owner, *_ in let_off})

    def _sent_on(self, tags: list[str], function: str) -> bool:
        """Whether one of ``tags`` (the requests engine ran as it died) is a request of
        ``function`` sent on to it after a death put down to other functions' threads
        (``_resent``), within the quarantine window (a front end keeps a request's tag
        at each try)."""
        now, found = time.monotonic(), False
        for tag in tags:
            when, ran = self._resent.pop(tag, (0.0, "")) if isinstance(tag, str) else (0.0, "")
            found = found or (bool(function) and ran == function
                              and now - when <= self.settings.quarantine_window_s)
        return found

    def _again(self, book: dict[str, collections.deque[tuple[float, str]]], function: str, ran: str = "") -> bool:
        """Whether ``book`` names ``function`` before, within the quarantine window (this
        time counted). Books: ``_killed_after``, engines SIGKILLed from outside just after
        ``function``'s answers (once is the OOM killer's or an operator's ``kill -9``, the
        function not struck: its caller holds a 200; again and again, the function itself,
        a ``__del__`` that kills its engine, or allocates until the OOM killer does, after
        each answer: else it replaced engines for ever, a torch start-up each, never
        quarantined); ``_threads_at_death``, engines that died running another function
        (``ran``) while ``function``'s threads were alive. At most _MAX_KILLED_AFTER names a book
        (the board, which names them, is the functions' to write)."""
        now = time.time()
        times = book.pop(function, None) or collections.deque()
        times.append((now, ran))
        while now - times[0][0] > self.settings.quarantine_window_s:
            times.popleft()
        book[function] = times  # (the newest last: the oldest named go first)
        while len(book) > _MAX_KILLED_AFTER:
            del book[next(iter(book))]
        return len(times) > 1

    def _strike(self, function: str, batch: bool) -> float:
        """Strike ``function`` (quarantined at ``quarantine_after`` within the window); the
        strike's time (``_let_off`` takes back that one)."""
        if batch:
            self.isolate.add(function)
        now = time.time()
        strikes = self.strikes[function]
        strikes.append(now)
        while strikes and now - strikes[0] > self.settings.quarantine_window_s:
            strikes.popleft()
        if len(strikes) >= self.settings.quarantine_after and function not in self.quarantined:
            self.quarantined[function] = now + self.settings.quarantine_cooldown_s
            self.quarantines += 1
            log.error("function %s quarantined for %g s after %d engine failures", function,
                      self.settings.quarantine_cooldown_s, len(strikes))
        return now

    def _expire_quarantines(self) -> None:
        now = time.time()
        for function, until in list(self.quarantined.items()):
            if now >= until:
                self.release(function)

    def release(self, function: str) -> None:
        if self.quarantined.pop(function, None) is not None:
            log.info("function %s released from quarantine", function)
        self.strikes.pop(function, None)
        self.publish_state()

    def publish_state(self) -> None:
        self._last_state = mono = time.monotonic()
        now = time.time()
        dropped = self.output.dropped()
        self.pub.send(orjson.dumps({
            "t": "state",
            "engines": [{"index": e.index, "device": e.device, "generation": e.generation, "up": e.proc is not None,
                         "ready": e.ready and e.proc is not None, "restarts": e.restarts, "spare": self.spare_warm(e),
                         "pid": e.proc.pid if e.proc is not None else None,
                         "ready_in": round(e.ready_in(mono), 2),
                         "output_dropped": dropped.get(e.index, 0)} for e in self.engines],
            "quarantined": {f: max(0.0, until - now) for f, until in self.quarantined.items()},
            "quarantines": self.quarantines,
        }))

    # ----------------------------------------------------------------- shutdown

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for engine in self.engines:
            for proc in (engine.proc, engine.spare):
                if proc is not None and proc.poll() is None:
                    _signal_group(proc, signal.SIGTERM)
        for engine in self.engines:
            for proc in (engine.proc, engine.spare):
                if proc is not None:
                    try:
                        proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        pass
                    _signal_group(proc, signal.SIGKILL)  # it, if still there, and what it forked
                    proc.wait()
                    remove_segments(proc.pid, self._born.get(proc.pid))  # (as _ended: SysV memory the kernel keeps past serve)
            if engine.board is not None:
                engine.board.close()
        # Processes the functions started in a session of their own (a helper server, a
        # daemon) are out of reach of the engines' group kills above, and came here as
        # their engines died: every engine has, so all of them go.
        kill_adopted((), None)
        if self.forks is not None:
            self.forks.stop()
        self.output.stop(2.0)  # the last of their output, written
        self.pub.close()
        self.control.close()
        if self.held_inbox is not None:
            self.held_inbox.close()
        self.ctx.term()
