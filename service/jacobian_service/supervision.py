"""The supervisor's two ZeroMQ sockets, and who may use them (no torch).

- **events** (PUB, supervisor -> front ends): the engines' state, their deaths;
- **control** (PULL, front ends -> supervisor): "release this function from
  quarantine" (the operator's ``DELETE .../quarantine``, through a front end's API-key
  check), "this engine has held my cancelled request past its grace" (``overdue``),
  "my oldest job unanswered on this engine" (``oldest``: whom a hang is put down to),
  "the functions I hold unanswered on this engine" (``held``: whom the engine's status
  board may name for a death).

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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ["MAX_GIVEN_UP", "OVERDUE_AFTER_MIN_S", "Channel"]

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
