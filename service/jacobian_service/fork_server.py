"""A fork server ("zygote") for engine processes: torch imported once per ``serve``.

An engine started with ``exec`` spends ~3 s of CPU before it runs a line of its own:
~2.7 s of it imports (torch ~1.0 s, ``torch._dynamo`` ~1.2 s, which ``engine.namespaces``
takes on purpose, the service's own modules), where the warm-up of the functions takes
~0.1 s. Every engine and every spare paid it, and a crash-looping function's restarts
paid it each time. As Chromium's and Android's zygotes and ``multiprocessing``'s
forkserver do, one process per ``serve`` (started by the supervisor) imports all that
once, then forks an engine or a spare on request; the engine then loads the functions'
modules itself, as before: the zygote never imports a user's module, so no function
ever runs in it (a hostile module cannot subvert it for the engines after).

A forked engine is what an exec'd one is:

- **its process**: forked twice, the middle process exiting at once, so that the
  engine is handed to ``serve``, a child subreaper (``orphans``), which collects its exit
  status itself (a signal, ``os._exit``, the OOM kill, told apart as before) through a
  Popen-like :class:`Forked`. It goes on only once the zygote has collected the middle
  process (so its parent is ``serve`` from its first line on: ``stop_with_parent``,
  ``confinement.in_force``) and said go (a zygote that died first never lets it run).
  ``serve`` counts it among its own (``Supervisor._own``), never among the orphans.
- **its descriptors**: stdin (a spare's socket, ``spare_stdin``; ``serve``'s own otherwise), stdout, stderr
  and its own log pipe, sent over the zygote's socket (``SCM_RIGHTS``) and put at 0-3;
  every other descriptor closed, the zygote's socket with them. A new session.
- **its environment, directory, argv and command line**: the supervisor's, per start
  (API keys removed, ``ipc.LOG_FD_ENV`` naming descriptor 3); ``/proc/PID/cmdline``
  names the engine's command (written over the room the zygote's command line keeps for
  it: operators and tests find engines and spares by it). The engine's module runs as
  ``__main__``, as ``python -m`` runs it, and Python shuts down as it would.
- **its confinement**: the same seccomp filter and Landlock scope (``confinement``),
  made from what ``serve`` sends (its pid, group and threads now) plus the zygote's pid.
- **nothing of the zygote's**: the random generators seeded anew (Python's own,
  numpy's global one; torch's, by the engine itself as it starts, exec'd or forked;
  ``multiprocessing``'s authentication key); Python's string hash key is the zygote's
  (fixed at exec).

The zygote holds no thread when it forks (numpy's OpenBLAS starts its threads as it is
imported, and stops them at a fork: one fork at start-up does that) and never
initialises CUDA (each GPU engine makes its own context after the fork); one that finds
either otherwise refuses to serve. Where fork serving does not work (the zygote is down,
starting, stuck or refuses; ``serve`` is no subreaper; the environment changed since the
zygote started), the engine starts as before (``subprocess.Popen`` and exec): never
worse. A zygote that died (a function killed it, the OOM killer) is started again.
``ENGINE_FORK_SERVER=false`` turns it off.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import orjson

from . import ipc
from .confinement import confiner, protected
from .procfs import set_dumpable

__all__ = ["ForkServer", "Forked", "start_engine"]

log = logging.getLogger("jacobian_service.supervisor")

# The zygote's command line is followed by this many empty arguments: room (one NUL
# byte each) that a forked engine writes its own command line over.
_ROOM = 2048
_BOOT = "from jacobian_service.fork_server import main; main()"
_MAX_MESSAGE = 1 << 20
_FDS = 4  # stdin, stdout, stderr, the engine's own log
_LOG_FD = 3
_REPLY_S = 10.0  # a zygote that does not answer a start in this long is stuck: killed
_BACKOFF_MAX_S = 60.0
_ENV_CHANGES = 3  # the environment changed more often than this: no zygote from then on
# Set per start, not at the zygote's: what may differ from the zygote's environment.
_PER_START = frozenset({ipc.ISOLATE_ENV, ipc.SKIP_WARMUP_ENV, ipc.NO_WARMUPS_ENV, ipc.LOG_FD_ENV, "TMPDIR"})  # (TMPDIR: its own)


# ------------------------------------------------------------------ serve's side


class Forked:
    """An engine the zygote forked, as ``serve``'s child: what the supervisor uses of
    ``subprocess.Popen`` (``pid``, ``poll``, ``wait``, ``returncode``, ``stdin``,
    ``send_signal``, ``kill``, ``args``)."""

    def __init__(self, pid: int, args: list[str], stdin: Any) -> None:
        self.pid, self.args, self.stdin = pid, args, stdin
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # collected elsewhere: its status is lost
                self.returncode = 255
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:  # as Popen.wait with a timeout does
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
            time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a pid collected already (it may be another's now)
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def __repr__(self) -> str:
        return f"<Forked pid={self.pid} returncode={self.returncode}>"


class ForkServer:
    """``serve``'s side of the zygote: starts it (again, with a backoff, after it died)
    and asks it for engines. Thread-safe; :meth:`start` never waits for a zygote that is
    still importing unless told to."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)  # the zygote's, hence every forked engine's, but for _PER_START
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._backoff_s = 1.0
        self._launch_at = 0.0
        self._env_changes = 0
        self._launch()

    def _launch(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(theirs.fileno()), *[""] * _ROOM],
                                          stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), env=self.env)
        except OSError as exc:
            ours.close()
            self._proc = None
            log.warning("could not start the fork server (%s); engines start the old way", exc)
        finally:
            theirs.close()
        self._sock = ours if self._proc is not None else None
        self._ready = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ready(self, wait_s: float = 0.0) -> bool:
        """Whether the zygote serves (its imports done), waiting up to ``wait_s`` for it."""
        with self._lock:
            return self._ready_now(wait_s)

    def _ready_now(self, wait_s: float) -> bool:
        if self._proc is None or self._sock is None:
            return False
        if self._ready:
            return self._proc.poll() is None
        readable, _, _ = select.select([self._sock], [], [], max(0.0, wait_s))
        if not readable:
            return False
        try:
            said = orjson.loads(self._sock.recv(_MAX_MESSAGE))
        except (OSError, orjson.JSONDecodeError):  # it died importing (EOF), or said nothing we know
            said = {}
        if said.get("ready"):
            self._ready, self._backoff_s = True, 1.0
            log.info("fork server ready (pid %d): engines start forked from it", self._proc.pid)
        else:
            self._down(said.get("refused") or f"it exited with status {self._proc.wait()}")
        return self._ready

    def _down(self, why: str) -> None:
        """The zygote is of no use (dead, stuck, refused): put down; another is started
        after a backoff."""
        log.warning("fork server (pid %s): %s; engines start the old way until it is back",
                    self._proc.pid if self._proc else None, why)
        self._close()
        self._launch_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(_BACKOFF_MAX_S, self._backoff_s * 2)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # (its EOF: a zygote still alive exits)
            self._sock = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._ready = False

    def tend(self) -> None:
        """A zygote that died is noticed (and put down), and one is started again once
        its backoff has passed; one that is done importing is taken as ready: called at
        each supervisor tick (a ``poll`` and a ``select``, no wait)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is not None:
                self._down(f"it exited with status {self._proc.returncode}")
            if self._proc is None and time.monotonic() >= self._launch_at:
                self._launch()
            elif not self._ready:
                self._ready_now(0.0)

    def start(self, argv: Sequence[str], env: Mapping[str, str], stdout: int, stderr: int, log_fd: int,
              standby: bool, confine: bool, wait_s: float = 0.0, run_dir: Path | None = None) -> Forked | None:
        """An engine forked from the zygote (``argv``: its command, ``python -m module
        args``), or None where the zygote cannot give one now (the caller starts it
        the old way)."""
        with self._lock:
            if not self._ready_now(wait_s):
                return None
            base = {k: v for k, v in env.items() if k not in _PER_START}
            if base != {k: v for k, v in self.env.items() if k not in _PER_START}:
                # What torch and the service read as they import was another environment:
                # a zygote for this one is started; this engine is exec'd.
                self.env = dict(env)
                self._close()
                self._env_changes += 1
                if self._env_changes > _ENV_CHANGES:  # it changes at every start: a zygote would be of no use
                    log.warning("the environment changed since the fork server started, %d times: engines start "
                                "the old way from now on", self._env_changes)
                    self._launch_at = float("inf")
                else:
                    log.info("the environment changed since the fork server started: starting it again")
                    self._launch()
                return None
            return self._fork(argv, env, stdout, stderr, log_fd, standby, confine, run_dir)

    def _fork(self, argv: Sequence[str], env: Mapping[str, str], stdout: int, stderr: int, log_fd: int,
              standby: bool, confine: bool, run_dir: Path | None) -> Forked | None:
        assert self._sock is not None and self._proc is not None
        stdin_r = stdin_w = None
        if standby:
            stdin_r, stdin_w = spare_stdin()
            stdin = stdin_r
        else:  # serve's own, as an exec'd engine inherits it
            stdin = 0 if _valid(0) else os.open(os.devnull, os.O_RDONLY)
        request = {"argv": list(argv), "env": {**env, ipc.LOG_FD_ENV: str(_LOG_FD)}, "cwd": os.getcwd(),
                   "umask": _umask(), "serve": os.getpid(),
                   "confine": list(protected()) if confine else None,
                   "run_dir": str(run_dir) if run_dir is not None else None}
        try:
            socket.send_fds(self._sock, [orjson.dumps(request)], [stdin, stdout, stderr, log_fd])
            readable, _, _ = select.select([self._sock], [], [], _REPLY_S)
            reply = orjson.loads(self._sock.recv(_MAX_MESSAGE)) if readable else None
        except (OSError, orjson.JSONDecodeError) as exc:
            reply, why = None, f"its socket failed ({exc})"
        else:
            why = "it closed its socket"
            if not readable:
                why = f"it did not answer within {_REPLY_S:g} s"
                self._late()
        finally:
            if stdin_r is not None:
                os.close(stdin_r)
            elif stdin != 0:
                os.close(stdin)
        pid = reply.get("pid") if isinstance(reply, dict) else None
        if not isinstance(pid, int):
            if stdin_w is not None:
                stdin_w.close()
            if isinstance(reply, dict) and "refused" in reply:  # this one start (its command line too long)
                log.info("fork server: %s; this engine starts the old way", reply["refused"])
                return None
            self._down(why)
            return None
        if _parent(pid) != os.getpid():  # never: the zygote collects the middle process before it answers
            log.error("fork server: engine pid %d is not serve's child; killed, started the old way", pid)
            _kill_quietly(pid)
            if stdin_w is not None:
                stdin_w.close()
            return None
        return Forked(pid, list(argv), stdin_w)

    def _late(self) -> None:
        """A zygote that did not answer in time is killed; an answer it sent meanwhile
        names an engine serve never took (the zygote's go may have reached it): killed."""
        assert self._sock is not None and self._proc is not None
        self._proc.kill()
        self._proc.wait()
        try:
            while select.select([self._sock], [], [], 0)[0] and (data := self._sock.recv(_MAX_MESSAGE)):
                if isinstance(pid := orjson.loads(data).get("pid"), int) and _parent(pid) == os.getpid():
                    _kill_quietly(pid)
        except (OSError, orjson.JSONDecodeError, AttributeError):
            pass

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None
            self._launch_at = float("inf")


def spare_stdin() -> tuple[int, Any]:
    """A spare's stdin: a socket pair, its end (a descriptor, for the spare's 0) and
    the supervisor's (a file, unbuffered): the promotion's line goes one way, the
    spare's word that it is warm (``ipc.say_warm``) the other. No other process holds
    either end (``/proc/PID/fd`` opens no socket), so no function can say it for a
    spare, as one could make its flag file in the run directory."""
    theirs, ours = socket.socketpair()
    return theirs.detach(), open(ours.detach(), "wb", buffering=0)


def start_engine(forks: ForkServer | None, argv: list[str], env: Mapping[str, str], stdout: int, stderr: int,
                 log_fd: int, standby: bool, confine: bool, wait_s: float = 0.0, run_dir: Path | None = None) -> Any:
    """An engine process (``standby``: a spare, its stdin a socket, ``spare_stdin``): forked by the zygote
    where it can, else exec'd, as before it (``subprocess.Popen``): confined, in a
    session of its own, its log on ``log_fd``. With ``run_dir``, the notes there under
    its pid (``ipc.clear_notes``: a function's, left for the processes after its engine)
    are taken away before it runs, and before ``serve`` learns its pid: by the zygote,
    or exec'd, between fork and exec."""
    if forks is not None:
        forked = forks.start(argv, env, stdout, stderr, log_fd, standby, confine, wait_s, run_dir)
        if forked is not None:
            return forked
    confine_it = confiner() if confine else None

    def before_exec() -> None:
        if run_dir is not None:
            ipc.clear_notes(run_dir, os.getpid())
        if confine_it is not None:
            confine_it()

    theirs, ours = spare_stdin() if standby else (None, None)
    try:
        proc = subprocess.Popen(argv, stdin=theirs, stdout=stdout, stderr=stderr,
                                pass_fds=(log_fd,), env={**env, ipc.LOG_FD_ENV: str(log_fd)}, start_new_session=True,
                                preexec_fn=before_exec if run_dir is not None or confine_it is not None else None)
    except BaseException:
        if ours is not None:
            ours.close()
        raise
    finally:
        if theirs is not None:
            os.close(theirs)
    proc.stdin = ours
    return proc


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _umask() -> int:
    """This process's umask, read (setting it to read it back would change it for a
    moment under serve's other threads)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):  # before Linux 4.7: set and put back
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])  # field 4
    except (OSError, IndexError, ValueError):
        return None


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass


# ------------------------------------------------------------------ the zygote


class _Engine:
    """In a forked engine, once it is set up: what to run (the zygote's loop returns it)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv


def main() -> None:
    """The zygote: ``python -c _BOOT FD "" "" ...`` (FD: its socket to ``serve``)."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # serve's terminal's ^C is serve's to handle
    # Not dumpable: a process of the same user may not open its /proc/PID/mem nor trace
    # it (an engine's function, where no Landlock domain keeps it off); each engine is
    # made dumpable again, as an exec'd one is.
    set_dumpable(False)
    refused = _load()
    if refused:
        sock.send(orjson.dumps({"refused": refused}))
        return
    sock.send(orjson.dumps({"ready": os.getpid()}))
    engine = _serve(sock)
    if engine is None:  # serve has gone (EOF): out at once, as a forked engine leaves
        # (the interpreter's own exit tore down torch's modules for ~1 s, and serve's
        # stop waits for this process: every SIGTERM'd server took that long more).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    _run(engine)


def _load() -> str:
    """Import what every engine imports (never a user's module), then check the zygote
    may fork: why not, or ''."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (engine.namespaces takes it; ~1.2 s)

    # What engine/process.py imports, and what its main() imports later; not that module
    # itself, which each engine runs as __main__, as python -m does (imported here too,
    # an engine would hold two copies of it).
    from . import channel, errors, heap, ipc, logs, metrics, orphans, procfs, registry, scheduler  # noqa: F401
    from .engine import core, descriptor_watch, devices, memory_watch, namespaces, strays  # noqa: F401
    from .engine.sparse import preload

    # Sparse requests' imports (scipy.sparse, the tracer, the colourings): made by each
    # engine's warm-up, a forked engine's start took 0.61 CPU-s, 0.39 with them made here
    # once per serve (python -m bench.engine_start).
    preload()

    # (No gc.freeze() here, though it would keep more pages shared: frozen objects are out
    # of gc.get_referrers' sight, which the engine's process_settings use to find the
    # interpreter's fork-hook lists, and the engine freezes its heap itself once warm.)
    if len(os.listdir("/proc/self/task")) > 1:
        # numpy's OpenBLAS started its threads as it was imported; its fork handler
        # stops them: one fork, and the zygote holds none.
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    threads = os.listdir("/proc/self/task")
    if len(threads) > 1:
        names = sorted(_comm(t) for t in threads if int(t) != os.getpid())
        return f"it holds {len(threads) - 1} thread(s) after its imports ({', '.join(names)})"
    if torch.cuda.is_initialized() or _maps_cuda_driver():
        return "CUDA was initialised in it (each engine must make its own context)"
    return ""


def _comm(task: str) -> str:
    try:
        with open(f"/proc/self/task/{task}/comm") as f:
            return f.read().strip()
    except OSError:
        return task


def _maps_cuda_driver() -> bool:
    with open("/proc/self/maps") as f:
        return "libcuda.so" in f.read()


def _serve(sock: socket.socket) -> _Engine | None:
    """Fork an engine per request: None once ``serve`` has gone; in a forked engine, what
    it runs."""
    room = _room()
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, _FDS)
        except OSError:
            return None
        if not data:
            return None
        try:
            request = orjson.loads(data)
            if len(fds) != _FDS:
                raise ValueError(f"{len(fds)} descriptors, not {_FDS}")
            if len(_cmdline(request["argv"])) > room:
                sock.send(orjson.dumps({"refused": f"the engine's command line is over {room} bytes"}))
                continue
            engine = _fork(request, fds, sock)
        except Exception as exc:  # serve's bug: it is told, and starts that engine the old way
            engine = None
            sock.send(orjson.dumps({"refused": f"{type(exc).__name__}: {exc}"}))
        if isinstance(engine, _Engine):
            return engine
        for fd in fds:  # the engine has its copies
            os.close(fd)


def _fork(request: dict[str, Any], fds: list[int], sock: socket.socket) -> _Engine | int:
    """Fork twice; in the zygote the engine's pid, in the engine what it runs. The
    middle process exits at once: the engine is handed to ``serve`` (a subreaper).
    The engine waits for the zygote's go, which comes once the middle process is
    collected (the engine is ``serve``'s child by then) and ``serve`` has its pid."""
    confine = None
    if request.get("confine") is not None:  # made before the fork, as Popen's preexec_fn is
        pid, group, threads = request["confine"]
        confine = confiner(target=(pid, group, [*threads, os.getpid()]))
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(pid_r)
            os.close(go_w)
            engine = os.fork()
            if engine != 0:
                os.write(pid_w, b"%d" % engine)
                os._exit(0)
            os.close(pid_w)
            go = os.read(go_r, 1)
            os.close(go_r)
            if go != b"g":  # the zygote died first: serve never learnt of this process
                os._exit(1)
            return _become(request, fds, sock, confine)
        except BaseException:
            os._exit(70)  # never back into the zygote's loop
    os.close(pid_w)
    os.close(go_r)
    try:
        os.waitpid(middle, 0)
        data = os.read(pid_r, 32)
    finally:
        os.close(pid_r)
    if not data:
        os.close(go_w)  # (EOF: nothing runs)
        raise OSError("the middle process did not fork")
    try:
        if request.get("run_dir") is not None:  # before serve reads them, or the engine writes its own
            ipc.clear_notes(Path(request["run_dir"]), int(data))
        sock.send(orjson.dumps({"pid": int(data)}))  # serve has it before it runs
        os.write(go_w, b"g")
    finally:
        os.close(go_w)
    return int(data)


def _become(request: dict[str, Any], fds: list[int], sock: socket.socket, confine: Callable[[], None] | None) -> _Engine:
    """In the forked engine: what exec and Popen would have given it."""
    os.setsid()
    sock.detach()  # its descriptor is closed below with the rest; the object must not close another's
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16) for fd in fds]  # above 0-3, whatever their numbers
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(_LOG_FD + 1, _max_fd())
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "tempfile" in sys.modules:  # its TMPDIR, not one the zygote's imports looked up and kept
        sys.modules["tempfile"].tempdir = None
    signal.signal(signal.SIGINT, signal.default_int_handler)
    set_dumpable(True)
    _reseed()
    _write_cmdline(request["argv"])
    if confine is not None:
        confine()
    return _Engine(request["argv"])


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 65536


def _reseed() -> None:
    """What each exec'd engine drew for itself, drawn again: not the zygote's."""
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()
    if "multiprocessing" in sys.modules:
        sys.modules["multiprocessing"].current_process().authkey = os.urandom(32)


def _cmdline(argv: Sequence[str]) -> bytes:
    return b"".join(os.fsencode(a) + b"\0" for a in argv)


def _room() -> int:
    """Bytes of the zygote's command line (its own and the room after it)."""
    start, end = _arg_span()
    return end - start


def _arg_span() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[45]), int(fields[46])  # fields 48 and 49: arg_start, arg_end


def _write_cmdline(argv: Sequence[str]) -> None:
    import ctypes

    start, end = _arg_span()
    line = _cmdline(argv)
    ctypes.memmove(start, line.ljust(end - start, b"\0"), end - start)


def _run(engine: _Engine) -> None:
    """Run the engine's module as ``python -m`` runs it, in ``__main__``; its exit is
    Python's own (``sys.exit``: atexit, flushes, non-daemon threads joined)."""
    import importlib
    import runpy

    assert engine.argv[1] == "-m"
    sys.argv = ["-m", *engine.argv[3:]]
    sys.path[0] = os.getcwd()  # as -m sets it (-c, the zygote's, sets '')
    importlib.invalidate_caches()  # the functions' modules may be newer than the zygote
    main_globals = sys.modules["__main__"].__dict__
    for name in [n for n in main_globals if n not in ("__builtins__",)]:
        del main_globals[name]
    runpy._run_module_as_main(engine.argv[2], alter_argv=True)  # type: ignore[attr-defined]
