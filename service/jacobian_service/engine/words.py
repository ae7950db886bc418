"""An error's words made in a child process of the engine, which nothing the words' code
does can keep past its bound.

A function's exception whose ``__str__`` (or its arguments' ``__str__``/``__repr__``) is
the user's code ran in the engine, cut by a SIGALRM timer (``errors._timed_words``). That
code could lift the bound itself: a ``__str__`` that set its own SIGALRM handler, or
cancelled the timer (``signal.alarm(0)``), or caught the timer's exception forever
(``except BaseException`` in a loop), ran as long as it liked (measured: 3.0 s for one
spinning 3 s; forever, the hang watch's 504 at the request's deadline, the engine
replaced and the requests queued behind it 503s). A watchdog thread raising into the
engine's thread (``PyThreadState_SetAsyncExc``) was tried and reverted: an exception left
pending there ended the in-process layout's worker thread.

Here, in an engine process (which owns its process), the words are made in a child
forked for them (``os.fork``: the child has the exception object as it is), which sends
them back through a pipe; past ``errors._WORDS_WITHIN_S`` the child is killed (SIGKILL,
which no code of its can catch or cancel) and the words are the bound's own note. Whatever
the words' code changes (a setting, a module's name, a signal handler) is the child's and
dies with it. A fork costs ~3-25 ms (torch loaded; the 2-core VM idle to loaded), paid only
by an error whose words run user code (a ``ValueError("...")`` of plain arguments is
read directly, ``errors._builtin_words``).

Around the fork: the fork hooks a function registered (``os.register_at_fork``) are set
aside (a ``before`` hook runs in the parent, unbounded), and so is a Python handler a
function set on SIGCHLD (it would run in the engine when the child ends) until the child
is reaped. In the child, the engine's own signal handlers go back to
the default (a SIGTERM sent to the engine's group stops the child, and runs none of the
engine's code there).
"""

from __future__ import annotations

import os
import select
import signal
import struct
import threading
import time
from typing import Any, Callable

__all__ = ["forked_words"]

_HEADER = struct.Struct("<q")  # the words' length in bytes, ahead of them (-1: not text; -2: it raised)


def forked_words(hook_lists: tuple[list[Any], ...], hook_counts: tuple[int, ...], within_s: float,
                 limit: int) -> Callable[[BaseException], str | None]:
    """``words(exc)``: ``str(exc)`` made in a forked child and cut to ``limit`` characters;
    raises ``TimeoutError`` past ``within_s``, ``ValueError`` for words that are not text,
    ``RuntimeError`` where ``__str__`` raised. None where no child could be made (no
    memory, no process left to the engine): then the caller has no words to show.
    ``hook_lists``/``hook_counts``: the interpreter's fork-hook lists and how many hooks
    each held when the engine took its settings (the rest are the functions')."""

    def words(exc: BaseException) -> str | None:
        aside = [hooks[count:] for hooks, count in zip(hook_lists, hook_counts)]
        for hooks, count in zip(hook_lists, hook_counts):
            del hooks[count:]
        # A Python handler on SIGCHLD set aside (SIG_DFL: the signal discarded) until the
        # child is reaped. Blocking the signal in this thread was not enough: the kernel
        # gives a process's signal to any thread that takes it (one of the engine's
        # watchers), and Python then ran the handler here (1 run in 2 hung).
        handler = signal.getsignal(signal.SIGCHLD)
        swapped = callable(handler) and threading.current_thread() is threading.main_thread()
        if swapped:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            try:
                r, w = os.pipe()
            except OSError:
                return None
            try:
                pid = os.fork()
            except OSError:
                os.close(r)
                os.close(w)
                return None
            if pid == 0:  # the child: never returns
                _child(exc, w, limit)
            os.close(w)
            try:
                return _read(r, pid, within_s)
            finally:
                os.close(r)
                _reap(pid)
        finally:
            if swapped:
                signal.signal(signal.SIGCHLD, handler)
            for hooks, added in zip(hook_lists, aside):
                hooks.extend(added)

    return words


def _child(exc: BaseException, w: int, limit: int) -> None:
    try:
        for number in signal.valid_signals():
            try:
                if callable(signal.getsignal(number)):
                    signal.signal(number, signal.SIG_DFL)
            except (OSError, ValueError, RuntimeError):
                pass
        try:
            text = str(exc)
        except BaseException:  # SystemExit from __str__ too
            os.write(w, _HEADER.pack(-2))
            os._exit(0)
        if not isinstance(text, str):
            os.write(w, _HEADER.pack(-1))
            os._exit(0)
        # (a str subclass's own methods are user code too)
        data = str.__str__(text)[:limit].encode("utf-8", "backslashreplace")
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(w, view):]
    finally:
        os._exit(0)


def _read(r: int, pid: int, within_s: float) -> str:
    """The child's words as it sends them; past ``within_s`` (or a child ended without
    them) ``TimeoutError``. The length ahead of them ends the read, not the pipe's end: a
    process the words' code forked may hold the pipe open."""
    deadline = time.monotonic() + within_s
    got = bytearray()
    poller = select.poll()
    poller.register(r, select.POLLIN)
    while True:
        if len(got) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(got)
            if size == -1:
                raise ValueError("its words are not text")
            if size == -2:
                raise RuntimeError("its __str__ raised")
            if len(got) >= _HEADER.size + size:
                return bytes(got[_HEADER.size:_HEADER.size + size]).decode("utf-8")
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
            raise TimeoutError
        chunk = os.read(r, 1 << 16)
        if not chunk:  # the child ended without its words (killed, or os._exit in __str__)
            raise RuntimeError("its child ended without words")
        got += chunk


def _reap(pid: int) -> None:
    """The child killed (it may be done: then a no-op) and waited for. Where it could not
    be killed (no such thing is known; a confinement refusing the signal), it is not
    waited for: the engine's strays watch finds it as a function's child."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # SIGCHLD ignored (a function's doing): the kernel reaped it
        pass
