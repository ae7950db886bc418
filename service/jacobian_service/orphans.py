"""Processes left without their parent, both ways round.

- **Served processes stop when ``serve`` has gone** (:func:`stop_with_parent`). Engines
  and front ends are children of ``serve``. Killed outright (SIGKILL, the out-of-memory
  killer), it cannot stop them, and each engine leads a process group of its own (so
  that the supervisor can kill what it forked), out of reach of a signal to the
  server's group. A child left behind would hold the port, or the memory of a model,
  with nobody to supervise it: each watches its parent instead.
- **What a dead engine's functions started comes to ``serve``** (:func:`become_subreaper`,
  :func:`kill_adopted`). A function may start a process in a session of its own (a
  helper daemon, ``start_new_session=True``): out of the engine's process group, the
  supervisor's kill of that group misses it. When the engine dies, Linux hands such an
  orphan to its nearest ancestor that is a *child subreaper*, which ``serve`` makes
  itself, instead of to init: the supervisor finds it among its own children, and
  kills it. (Before, the supervisor noted each engine's descendants once a second and
  missed a process started in the second before a crash.)
- **What a function detached stops with ``serve`` too**, even when ``serve`` is killed
  outright: an orphan then goes to init, beyond anyone's reach. Each engine is itself
  the subreaper of what its functions start (:func:`become_subreaper` in the engine),
  so a daemon stays an engine's descendant while the engine lives, and the engine kills
  its descendants as it stops with its parent (:func:`kill_descendants`). It collects
  those that ended when it can tell they are no child it forked (:func:`reap_detached`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection

from .procfs import children, descendants, session, start_ticks, sysv_queues, sysv_segments, sysv_semaphores

__all__ = ["adopted", "become_subreaper", "kill_adopted", "kill_descendants", "kill_detached", "reap_adopted",
           "reap_detached", "remove_segments", "stop_with_parent"]

log = logging.getLogger("jacobian_service")

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def stop_with_parent(grace_s: float, every_s: float = 0.5, first: Callable[[], object] | None = None) -> None:
    """SIGTERM to this process once its parent has gone (checked every ``every_s``, on a
    daemon thread): a front end drains and stops, an engine stops. Still here
    ``grace_s`` later (the signal came before its handler was set, or a user function
    set one that ignores it), the process exits outright. ``first`` runs just before
    the signal (an engine kills what its functions started)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        log.warning("the server process (pid %d) has gone; pid %d stops", parent, os.getpid())
        if first is not None:
            try:
                first()
            except Exception:  # /proc refused (a function's audit hook): stop all the same
                log.exception("could not stop what pid %d started", os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


def become_subreaper() -> bool:
    """Make this process the one orphaned descendants are handed to (Linux 3.4+);
    whether it now is. Elsewhere they go to init, as before."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def adopted(own: Collection[int]) -> list[int]:
    """This process's children that it did not start: those it took in as a subreaper.

    ``own`` are the children it started in sessions of their own (the engines and
    spares). Everything else it starts (the front ends, multiprocessing's resource
    tracker) stays in its session, while no descendant of an engine can ever be in it
    (an engine leads its own session, and a process can only leave a session for a new
    one): a child in another session that is not one of ``own`` came from an engine."""
    return [pid for pid, _ in _adopted(own)]


def _adopted(own: Collection[int]) -> list[tuple[int, bool]]:
    """(pid, ended) of each adopted child."""
    mine, found = os.getsid(0), []
    for pid in children(os.getpid()):
        if pid not in own and (s := session(pid)) is not None and s[0] != mine:
            found.append((pid, s[1]))
    return found


def reap_adopted(own: Collection[int]) -> int:
    """Collect the exit status of adopted children that have ended (else zombies); how
    many are still running."""
    running = 0
    for pid, ended in _adopted(own):
        if ended:
            _collect(pid)
        else:
            running += 1
    return running


def _collect(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # collected already
        pass


def kill_adopted(own: Collection[int], after: int | None, group: int | None = None, settle_s: float = 1.0) -> int:
    """Kill the adopted children that started at ``after`` (clock ticks since boot) or
    later, all of them with ``after`` None; how many. An orphan names no parent, so the
    time is what ties it to the engine that died: one started before that engine was
    not its.

    With ``group`` (a dead engine's process group, killed just before), this waits up
    to ``settle_s`` for the group to be gone: its members' own children in sessions of
    their own are handed here only as those members die. What the killed processes had
    started comes here in turn, and is killed in the next round."""
    killed: set[int] = set()
    deadline = time.monotonic() + settle_s
    while True:
        found = [(pid, ended) for pid, ended in _adopted(own) if after is None or (start_ticks(pid) or 0) >= after]
        for pid, ended in found:
            if ended:  # killed in an earlier round, or ended by itself
                _collect(pid)
                continue
            if _kill(pid):
                killed.add(pid)
        if (not found and not _alive(group)) or time.monotonic() > deadline:
            return len(killed)
        time.sleep(0.01)


_SEMAPHORES_ASKED = 1 << 16  # semctl(GETPID) calls at most per death (~0.3 us each): 32,000 sets of 32,000 cannot stall it


def remove_segments(creator: int, since: float | None = None) -> tuple[int, int]:
    """Remove the SysV shared memory segments a dead engine (``creator``) made and left
    (``shmget`` with no ``IPC_RMID``), the message queues it was the last to send to, and,
    given when it started (``since``, seconds of the epoch), the semaphore sets made or
    set since then (their ``ctime``) in which it was the last to operate on or set a
    semaphore, or, made private (``IPC_PRIVATE``) and never touched, that no process
    can have found but one it handed the id: how many, and the bytes of memory the
    segments and queues held. Such an object belongs to no process: the kernel keeps it,
    its memory with it, after its maker has gone (for segments, unless
    ``kernel.shm_rmid_forced``, off by default): five segments of 16 MiB a function left
    stayed after its engine was replaced, and after ``serve`` stopped, for as long as the
    machine ran; a semaphore set stayed as well (one of the machine's ``SEMMNI`` sets, 32,000
    by default: a function making them at each call took them from every program of the
    machine). A segment still mapped somewhere goes at its last unmapping."""
    found = [(shmid, resident, "shm") for shmid, resident, _ in sysv_segments(creator)]
    found += [(msqid, held, "msg") for msqid, held in sysv_queues(creator)]
    sets = sysv_semaphores(os.getuid()) if since is not None else []
    if not found and not sets:
        return 0, 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0, 0
    budget = _SEMAPHORES_ASKED
    for semid, nsems, key, operated, changed in sets:
        if changed < int(since or 0) or budget <= 0:  # (whole seconds: one made in its first second counts)
            continue
        asked = min(nsems, budget)
        budget -= asked
        pids = {libc.semctl(ctypes.c_int(semid), ctypes.c_int(i), ctypes.c_int(11)) for i in range(asked)}  # GETPID
        # (-1: GETPID refused, a set its maker gave no read permission, as semget(IPC_PRIVATE,
        # n, IPC_CREAT) with no mode bits does: unless root, the private one never operated on
        # was left, the way round for a function filling SEMMNI)
        if creator in pids or (key == 0 and operated == 0 and pids <= {0, -1} and asked == nsems):
            found.append((semid, 0, "sem"))
    removed, held = 0, 0
    for ident, size, kind in found:
        control = {"shm": libc.shmctl, "msg": libc.msgctl, "sem": libc.semctl}[kind]
        if control(ctypes.c_int(ident), ctypes.c_int(0), None) == 0:  # IPC_RMID (a semaphore set: semnum 0, cmd IPC_RMID)
            removed, held = removed + 1, held + size
    return removed, held


def _kill(pid: int) -> bool:
    """SIGKILL to ``pid``; False when it had gone just now."""
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


def _alive(group: int | None) -> bool:
    if group is None:
        return False
    try:
        os.killpg(group, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_descendants(settle_s: float = 1.0) -> int:
    """SIGKILL to every descendant of this process, again until none is left (one
    forking in a loop, or orphans coming in as their parents die) or ``settle_s`` has
    passed; how many. In a subreaper, what its descendants detached is among them."""
    killed: set[int] = set()
    deadline = time.monotonic() + settle_s
    while True:
        found = [pid for pid in descendants(os.getpid()) if (s := session(pid)) is not None and not s[1]]
        for pid in found:
            if _kill(pid):
                killed.add(pid)
        if not found or time.monotonic() > deadline:
            return len(killed)
        time.sleep(0.01)


def _detached() -> list[tuple[int, bool]]:
    """(pid, ended) of this process's children that it surely did not fork itself (see
    :func:`reap_detached`)."""
    mine, found = os.getsid(0), []
    for pid in children(os.getpid()):
        if (s := session(pid)) is not None and s[0] not in (mine, pid):
            found.append((pid, s[1]))
    return found


def kill_detached() -> int:
    """SIGKILL to the running children this subreaper surely took in (daemons whose
    parents have exited); how many."""
    killed = 0
    for pid, ended in _detached():
        if not ended:
            killed += _kill(pid)
    return killed


def reap_detached() -> int:
    """In a subreaper, collect the exit status of the children that ended and that it
    surely did not fork itself; how many. A child forked here is in this process's
    session, or leads one of its own (``setsid``, ``start_new_session``): its status
    belongs to whoever waits for it (``Popen.wait``), and taking it would make that
    report 0 for a failure. A child in a third session (the daemon of a fork, ``setsid``,
    fork) was taken in. One in this session that was taken in (a shell's ``cmd &``)
    cannot be told apart from one forked here, and stays a zombie until this process
    goes."""
    reaped = 0
    for pid, ended in _detached():
        if ended:
            _collect(pid)
            reaped += 1
    return reaped
