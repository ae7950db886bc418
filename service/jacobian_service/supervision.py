"""The supervisor's two ZeroMQ sockets, and who may use them (no torch).

- **events** (PUB, supervisor -> front ends): the engines' state, their deaths;
- **control** (PULL, front ends -> supervisor): "release this function from
  quarantine" (the operator's ``DELETE .../quarantine``, through a front end's API-key
  check), "this engine has held my cancelled request past its grace" (``overdue``),
  "my oldest job unanswered on this engine" (``oldest``: whom a hang is put down to),
  "the functions I hold unanswered on this engine" (``held``: whom the engine's status
  board may name for a death), which on Linux comes on a socket of its own
  (``HeldInbox``): in the supervisor's queue before the job reaches the engine.

Why not a token the engine writes on its board beside the function's name (a secret the
supervisor gives each engine, or one carried with each job): the function runs in the
engine process and reads whatever the engine holds (``gc.get_objects``, ``/proc/self/mem``)
and the board itself (a file), so it would copy the token beside any name. One signed by
a front end (the channel's key, which no engine holds) would prove only that a job of that
function was sent there at some time: the function can replay another's, answered long
since or queued behind it. The supervisor must hear it from the front end before the
engine has the job, which a kernel queue gives (``HeldInbox``).

Functions run in the engines as the service's user. Both sockets were files in the run
directory: a function connected to ``control.sock`` (pyzmq, or a plain ``AF_UNIX``
socket speaking ZMTP) and lifted any quarantine with a well-formed message, no API key
asked; or it unlinked ``events.sock`` and bound its own there, which a front end started
again connected to: forged deaths failed its requests, a forged state refused them.
Now:

- On Linux the sockets have abstract names, random per ``serve`` (``@jacobian-service-
  <hex>/...``): no file to unlink or bind over, and a name is never bound twice. With
  Landlock's scope (Linux 6.12+, ``confinement``) an engine cannot connect to them at
  all; ``IPC_FILTER_UID`` keeps other users off them, as the run directory's mode 0700
  did for the files.
- Every control message carries an HMAC-SHA256 under a key that only ``serve`` and its
  front ends hold: made at start-up, handed to each front end through its start-up pipe
  (``multiprocessing``'s spawn), never in an environment, a file or an engine. The
  supervisor drops any message without it.

What remains (no Landlock): a function can still connect to the events socket and read
the engines' state and deaths (function names, request tags), and read a front end's
memory (``/proc/PID/mem``, where the kernel's ptrace rules let the same user), key
included. Elsewhere than Linux the sockets are files in the run directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import orjson

from .confinement import seccomp_filters

__all__ = ["MAX_GIVEN_UP", "OVERDUE_AFTER_MIN_S", "Channel", "HeldInbox", "HeldOutbox"]

_MAC = hashlib.sha256().digest_size
# A cancel an engine has not answered for this long at least (or HANG_GRACE_S, if longer)
# is overdue (``Supervisor._overdue``): an idle engine reads its socket every few
# milliseconds, but a grace of 0 must not make a healthy engine that has not looked yet
# a hung one.
OVERDUE_AFTER_MIN_S = 1.0
# Tags of requests given up past the grace that one overdue word names, at most (a batch
# holds far fewer): what a word can make the supervisor keep is bounded.
MAX_GIVEN_UP = 256


@dataclass(frozen=True)
class Channel:
    """Where the supervisor's sockets are, and the key that signs what front ends tell it."""

    events: str
    control: str
    key: bytes

    @classmethod
    def new(cls, run_dir: Path) -> Channel:
        """A fresh channel for one ``serve``: abstract sockets on Linux, a new key."""
        if sys.platform.startswith("linux"):
            base = f"ipc://@jacobian-service-{secrets.token_hex(12)}"
            return cls(f"{base}/events", f"{base}/control", secrets.token_bytes(32))
        return cls(f"ipc://{run_dir}/events.sock", f"ipc://{run_dir}/control.sock", secrets.token_bytes(32))

    @classmethod
    def in_run_dir(cls, run_dir: Path) -> Channel:
        """The files of a run directory, without a key: what a front end started on its own
        (the tests') reaches."""
        return cls(f"ipc://{run_dir}/events.sock", f"ipc://{run_dir}/control.sock", b"")

    @property
    def held(self) -> str | None:
        """Where the front ends' ``held`` words go (``HeldInbox``): a ``SOCK_SEQPACKET``
        socket with an abstract name beside the control socket's; None where there is no
        abstract name (not Linux, a channel made by hand): they go on the control socket."""
        prefix = "ipc://@"
        if not self.control.startswith(prefix) or not hasattr(socket, "SOCK_SEQPACKET"):
            return None
        return "\0" + self.control[len(prefix):] + "-held"

    def guard(self, sock: Any) -> None:
        """Before a bind: only processes of this user may connect."""
        import zmq

        try:
            sock.setsockopt(zmq.IPC_FILTER_UID, os.getuid())
        except (zmq.ZMQError, AttributeError):  # a libzmq without peer credentials: the abstract name stands alone
            pass

    def sign(self, message: dict[str, Any]) -> bytes:
        body = orjson.dumps(message)
        return hmac.new(self.key, body, hashlib.sha256).digest() + body

    def verify(self, raw: bytes) -> dict[str, Any] | None:
        """The message, if a holder of the key signed it (and it is a JSON object); else None."""
        mac, body = raw[:_MAC], raw[_MAC:]
        if len(mac) < _MAC or not hmac.compare_digest(mac, hmac.new(self.key, body, hashlib.sha256).digest()):
            return None
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return message if isinstance(message, dict) else None


# ``held`` words a front end's connection may bring per look (``HeldInbox.take``): one
# that floods its own (a function's, where no Landlock keeps it off the socket) cannot
# starve the others.
_HELD_PER_PEER = 16
_HELD_GONE_WORDS = 64  # words read from a connection whose front end has already ended (``HeldInbox._who``)
_HELD_MAX_BYTES = 1 << 18  # one word, at most (4096 names of 60 bytes, signed): a longer one goes on zmq


def _queued(peer: socket.socket, most: int) -> list[bytes]:
    """Up to ``most`` words waiting on ``peer`` (non-blocking), to its end."""
    words = []
    for _ in range(most):
        try:
            word = peer.recv(_HELD_MAX_BYTES)
        except OSError:  # (BlockingIOError included: nothing more now)
            break
        if not word:
            break
        words.append(word)
    return words


class HeldInbox:
    """The supervisor's end of the front ends' ``held`` words (``Channel.held``).

    A front end tells the supervisor which functions it sent an engine (``held``), for
    the engine's status board, which a function can write, is believed only where a
    front end's word agrees. That word went on the zmq control socket, whose bytes the
    front end's zmq I/O thread writes later, while the job itself went straight to the
    engine: a function that ended its front end right after its job (or any end of the
    front end then) took the word along, and its crash or stray thread was read as the
    board's lie, the function unnamed and unstruck. On a ``SOCK_SEQPACKET`` connection
    the word is in this socket's queue, in the kernel, once the front end's ``send``
    returns, before the job is written: the front end's end after that loses nothing
    (the queue is the receiver's). A connection of each front end's own: one peer's
    flood fills only its own queue. Bounded: ``max_peers`` connections (more are closed:
    that front end falls back to zmq), ``_HELD_PER_PEER`` words from each per look.

    A connection from a confined process (an engine, or anything its functions started:
    each runs under one more seccomp filter than ``serve``, ``confinement``, and cannot
    drop it) is closed as it is taken, counting for nothing; one whose process has ended
    already (a front end killed just after its word) is read to its end and closed. Where Landlock's scope does
    not keep an engine off this socket (Linux before 6.12), a function held 255 of its 256
    places (measured: /tmp/h50/probe_held.py), and every front end started after (one
    the function killed, say) was refused and sent its words on zmq, behind its job,
    where its end right after the job lost them (round 49): a crash or stray thread was
    then put down to no one."""

    def __init__(self, address: str, max_peers: int) -> None:
        self._max_peers = max_peers
        self._own_filters = seccomp_filters(str(os.getpid()))
        self._peers: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._listener.bind(address)
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise

    def take(self) -> list[bytes]:
        """The words that came since the last look (new connections taken first)."""
        words: list[bytes] = []
        while True:
            try:
                peer, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            who = self._who(peer)
            if who == "gone":  # a front end that ended just after its word: what it said, and no place kept
                peer.setblocking(False)
                words += _queued(peer, _HELD_GONE_WORDS)
                peer.close()
                continue
            if len(self._peers) >= self._max_peers or who == "confined":
                peer.close()
                continue
            peer.setblocking(False)
            self._peers.append(peer)
        for peer in list(self._peers):
            for _ in range(_HELD_PER_PEER):
                try:
                    word = peer.recv(_HELD_MAX_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    word = b""
                if not word:  # that front end is gone
                    self._peers.remove(peer)
                    peer.close()
                    break
                words.append(word)
        return words

    def _who(self, peer: socket.socket) -> str:
        """"confined": the process that connected ``peer`` runs under more seccomp filters
        than this one (an engine's, or its functions' children's); "gone": it has ended
        (a front end killed just after its word: the word is read, no place kept, so a
        process that connects and leaves its descendant the socket holds none); else "ok"."""
        if self._own_filters is None or not hasattr(socket, "SO_PEERCRED"):
            return "ok"  # (no /proc to read: nothing told apart, as before)
        try:
            pid, _, _ = struct.unpack("3i", peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        except OSError:
            return "gone"
        theirs = seccomp_filters(str(pid))
        return "gone" if theirs is None else "confined" if theirs > self._own_filters else "ok"

    def close(self) -> None:
        for peer in self._peers:
            peer.close()
        self._peers.clear()
        self._listener.close()


class HeldOutbox:
    """A front end's end of ``HeldInbox``: ``send`` puts a word in the supervisor's queue
    before it returns, where it can. Where it cannot at once (that queue full: the
    supervisor has not looked for a while), words wait here, the last per engine (each
    names all that engine's functions), and go as the socket can take them, in order;
    ``settled`` awaits that. No connection (no abstract name, refused, broken): each word
    goes to ``fallback`` (the zmq control socket), as before."""

    def __init__(self, address: str | None, fallback: Callable[[bytes], None]) -> None:
        self._fallback = fallback
        self._waiting: dict[int, bytes] = {}
        self._loop: Any = None
        self._sock: socket.socket | None = None
        if address is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setblocking(False)  # (a listener whose backlog is full: EAGAIN, not a wait)
            sock.connect(address)
        except OSError:
            sock.close()
            return
        self._sock = sock

    @property
    def direct(self) -> bool:
        """Whether words go on the supervisor's own socket (else on zmq, trailing)."""
        return self._sock is not None

    def send(self, index: int, word: bytes) -> bool:
        """Tell the supervisor ``word`` (engine ``index``'s). True: it is in the
        supervisor's queue now."""
        if self._sock is None or len(word) > _HELD_MAX_BYTES:
            self._fallback(word)
            return False
        if not self._waiting:
            try:
                self._sock.send(word)
                return True
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # the supervisor closed it (too many peers) or is gone
                self._broken()
                self._fallback(word)
                return False
        self._waiting.pop(index, None)
        self._waiting[index] = word
        self._watch()
        return False

    async def settled(self, index: int, within: float) -> None:
        """Until engine ``index``'s waiting word has gone (at most ``within`` s)."""
        import asyncio

        until = time.monotonic() + within
        while index in self._waiting and time.monotonic() < until:
            await asyncio.sleep(0.005)

    def _watch(self) -> None:
        if self._loop is not None or self._sock is None:
            return
        import asyncio

        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test's front end): they go on zmq
            self._broken()
            return
        self._loop.add_writer(self._sock.fileno(), self._flush)

    def _flush(self) -> None:
        while self._waiting and self._sock is not None:
            index, word = next(iter(self._waiting.items()))
            try:
                self._sock.send(word)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._broken()
                return
            del self._waiting[index]
        self._unwatch()

    def _unwatch(self) -> None:
        if self._loop is not None and self._sock is not None:
            self._loop.remove_writer(self._sock.fileno())
        self._loop = None

    def _broken(self) -> None:
        self._unwatch()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        waiting, self._waiting = self._waiting, {}
        for word in waiting.values():
            self._fallback(word)

    def close(self) -> None:
        self._broken()
