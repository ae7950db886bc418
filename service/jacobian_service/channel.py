"""How messages move between a front end and an engine: one Unix stream socket each.

A message (``ipc``'s list of frames: a JSON header, then raw array frames) travels as

    u32 count | u64 size x count | the frames, back to back     (little-endian)

The engine (:class:`Listener`: non-blocking sockets under ``selectors``, on the engine's
one thread) and the front end (:class:`Connection`: an asyncio protocol on the event loop)
read and write the socket themselves. ZeroMQ did this before, through an I/O thread on
each side: measured on 2 cores, a small round trip took 186 us through ZeroMQ against
53 us on a plain Unix socket (medians, ``python -m bench.ipc_hop``), most of it the two
extra thread wake-ups per direction. A small Jacobian's whole computation is about 1 ms,
so the hop was a good part of the service's overhead.

Each side writes what it has at once: a loop tick's jobs, a batch's replies, one message
after another in one write. The framing delimits them, so the other side wakes once and
reads them all. Large frames are neither joined nor copied in user space on their way:
the engine sends result arrays from their own buffers (``sendmsg``, one buffer per
frame), and a reader (either side) reads a large frame straight into a buffer of its
size. Small frames are cut out of a staging buffer, so a batch of small replies costs
one read.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["Connection", "FrameReader", "Listener", "Peer", "encode_messages"]


_COUNT = struct.Struct("<I")
_STAGE_BYTES = 1 << 18
_BIG_FRAME = 1 << 16  # frames this large are read into their own buffer, not staged
_MAX_IOV = 512  # buffers per sendmsg (the kernel's limit is 1,024)
_SOCKET_BUFFER = 4 << 20  # asked for; the kernel caps it at net.core.[rw]mem_max


def encode_messages(messages: Sequence[Sequence[Any]]) -> tuple[list[Any], int]:
    """The buffers that carry ``messages`` on the socket, one after another (each its
    prefix, then its frames as they are), and their total size in bytes."""
    buffers: list[Any] = []
    total = 0
    for frames in messages:
        sizes = [memoryview(f).nbytes for f in frames]
        prefix = struct.pack(f"<I{len(sizes)}Q", len(sizes), *sizes)
        buffers += (prefix, *frames)
        total += len(prefix) + sum(sizes)
    return buffers, total


class FrameReader:
    """Messages out of a byte stream, for a reader that fills ``buffer()`` and then says
    how much it wrote with ``updated(n)`` (asyncio's ``BufferedProtocol`` contract).

    Completed messages collect in ``messages``. A frame of ``_BIG_FRAME`` bytes or more
    gets its own buffer, which the socket fills directly: it reaches the array decoder
    without a copy (as a read-only view). Smaller frames are copied out of the staging
    buffer, one ``bytes`` each."""

    def __init__(self) -> None:
        self._stage = memoryview(bytearray(_STAGE_BYTES))
        self._start = self._end = 0
        self._sizes: list[int] | None = None
        self._frames: list[Any] = []
        self._big: memoryview | None = None  # the large frame being filled, and how far
        self._big_got = 0
        self.messages: list[list[Any]] = []

    def buffer(self) -> memoryview:
        if self._big is not None:
            return self._big[self._big_got:]
        if self._end == len(self._stage):
            self._make_room(1)
        return self._stage[self._end:]

    def updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_got += nbytes
            if self._big_got == len(self._big):
                self._frames.append(self._big.toreadonly())
                self._big = None
                self._parse()
            return
        self._end += nbytes
        self._parse()

    def _make_room(self, need: int) -> None:
        """Move the unparsed tail to the front of the staging buffer, with ``need`` bytes
        of room past it: in place (nothing else refers to the stage between a read and
        the next ``buffer()``: frames are copied out of it), or in a larger buffer."""
        tail = self._end - self._start
        if tail + need <= len(self._stage):
            self._stage[:tail] = bytes(self._stage[self._start:self._end])  # a copy: the two may overlap
            self._start, self._end = 0, tail
            return
        stage = memoryview(bytearray(2 * (tail + need)))
        stage[:tail] = self._stage[self._start:self._end]
        self._stage, self._start, self._end = stage, 0, tail

    def _parse(self) -> None:
        while True:
            avail = self._end - self._start
            if self._sizes is None:
                if avail < _COUNT.size:
                    break
                (count,) = _COUNT.unpack_from(self._stage, self._start)
                need = _COUNT.size + 8 * count
                if avail < need:
                    if len(self._stage) - self._start < need:
                        self._make_room(need)
                    break
                self._sizes = list(struct.unpack_from(f"<{count}Q", self._stage, self._start + _COUNT.size))
                self._start += need
                self._frames = []
                continue
            if len(self._frames) == len(self._sizes):
                self.messages.append(self._frames)
                self._sizes, self._frames = None, []
                continue
            size = self._sizes[len(self._frames)]
            if size <= avail:
                self._frames.append(bytes(self._stage[self._start:self._start + size]))
                self._start += size
                continue
            if size >= _BIG_FRAME:
                big = memoryview(bytearray(size))
                big[:avail] = self._stage[self._start:self._end]
                self._start = self._end = 0
                self._big, self._big_got = big, avail
                break
            if len(self._stage) - self._start < size:
                self._make_room(size)
            break
        if self._start == self._end:
            self._start = self._end = 0

    def take(self) -> list[list[Any]]:
        messages, self.messages = self.messages, []
        return messages


# --------------------------------------------------------------------------- engine side


class Peer:
    """One front end's connection to an engine: its reader and what waits to be written."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.out: list[memoryview] = []
        self.gone = False

    def write(self) -> None:
        """Write what the socket takes now, without blocking."""
        while self.out and not self.gone:
            try:
                sent = self.sock.sendmsg(self.out[:_MAX_IOV])
            except BlockingIOError:
                return
            except OSError:  # the front end has gone; its requests died with it
                self.gone = True
                self.out = []
                return
            while sent:
                first = self.out[0]
                if sent >= len(first):
                    sent -= len(first)
                    self.out.pop(0)
                else:
                    self.out[0] = first[sent:]
                    sent = 0


class Listener:
    """The engine's socket: accepts front ends and moves their messages, from one thread.

    ``poll(timeout)`` returns the messages that arrived as ``(peer, frames)`` and the
    front ends that hung up as ``(peer, None)``; ``send(peer, messages)`` writes at once
    what the socket takes and the rest as it drains (on later polls)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.unlink()  # a dead engine's socket file: this engine replaces it
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        self._hung_up: list[Peer] = []  # reported by the next poll

    def poll(self, timeout: float) -> list[tuple[Peer, list[Any] | None]]:
        """Wait up to ``timeout`` seconds for something to happen; what did."""
        events: list[tuple[Peer, list[Any] | None]] = []
        for key, mask in self.selector.select(timeout):
            peer: Peer | None = key.data
            if peer is None:
                self._accept()
                continue
            if mask & selectors.EVENT_WRITE:
                peer.write()
            if mask & selectors.EVENT_READ and not self._read(peer):
                peer.gone = True
            events.extend((peer, m) for m in peer.reader.take())
            self._watch(peer)
        events.extend((peer, None) for peer in self._hung_up)
        self._hung_up = []
        return events

    def send(self, peer: Peer, messages: Sequence[Sequence[Any]]) -> None:
        if peer.gone:
            return
        buffers, _ = encode_messages(messages)
        peer.out.extend(view for b in buffers if (view := memoryview(b).cast("B")).nbytes)
        peer.write()
        self._watch(peer)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            _grow_buffers(sock)
            peer = Peer(sock)
            self.selector.register(sock, selectors.EVENT_READ, peer)

    def _read(self, peer: Peer) -> bool:
        """Read what has arrived; False once the front end has hung up."""
        while True:
            try:
                n = peer.sock.recv_into(peer.reader.buffer())
            except BlockingIOError:
                return True
            except OSError:
                return False
            if n == 0:
                return False
            peer.reader.updated(n)

    def _watch(self, peer: Peer) -> None:
        """Ask for write readiness only while there is something left to write; let a
        front end that hung up go."""
        if peer.gone:
            if peer.sock.fileno() >= 0:
                self._drop(peer)
                self._hung_up.append(peer)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.out else 0)
        if self.selector.get_key(peer.sock).events != want:
            self.selector.modify(peer.sock, want, peer)

    def _drop(self, peer: Peer) -> None:
        peer.gone, peer.out = True, []
        try:
            self.selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            if key.data is not None:
                self._drop(key.data)
        self.selector.close()
        self.sock.close()


# --------------------------------------------------------------------------- front-end side


class Connection(asyncio.BufferedProtocol):
    """A front end's connection to one engine, on the event loop; it connects again
    whenever the engine's socket goes away (an engine restarts, or is not up yet).

    ``send`` queues a message; the messages of one loop tick leave together, written by
    one call. Messages queued while no engine is connected wait for the next one, except
    those queued before a connection broke: their requests belonged to the engine that
    died, and the supervisor's word about it answers them."""

    _RETRY_S = (0.005, 0.1)  # first and longest wait between attempts to connect

    def __init__(self, path: Path, on_message: Callable[[list[Any]], None]) -> None:
        self.path = path
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader()
        self._outbox: list[Sequence[Any]] = []
        self._flush_at: asyncio.Handle | None = None
        self._closed = False
        self._connecting: asyncio.Task | None = None
        self._connect()

    # ----------------------------------------------------------------- connecting

    def _connect(self) -> None:
        if not self._closed and (self._connecting is None or self._connecting.done()):
            self._connecting = self._loop.create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        wait = self._RETRY_S[0]
        while not self._closed and self._transport is None:
            try:
                await self._loop.create_unix_connection(lambda: self, str(self.path))
                return
            except OSError:  # not bound yet (starting, restarting): try again shortly
                await asyncio.sleep(wait)
                wait = min(wait * 2, self._RETRY_S[1])

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._reader = FrameReader()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _grow_buffers(sock)
        if self._outbox and self._flush_at is None:
            self._flush_at = self._loop.call_soon(self._flush)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._outbox = []
        self._connect()

    # ----------------------------------------------------------------- reading

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._reader.updated(nbytes)
        for message in self._reader.take():
            self._on_message(message)

    # ----------------------------------------------------------------- writing

    def send(self, frames: Sequence[Any]) -> None:
        """Queue a message; it leaves at the end of this loop tick with the others."""
        self._outbox.append(frames)
        if self._flush_at is None:
            self._flush_at = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        if self._transport is None or not self._outbox:
            return
        buffers, total = encode_messages(self._outbox)
        self._outbox = []
        if total < _BIG_FRAME:
            self._transport.write(b"".join(buffers))  # one write, one system call
        else:
            self._transport.writelines(buffers)

    def close(self) -> None:
        self._closed = True
        if self._flush_at is not None:
            self._flush_at.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._transport is not None:
            self._transport.close()


def _grow_buffers(sock: socket.socket) -> None:
    """Larger kernel buffers: a 4 MB result crosses in a few writes, not twenty."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        except OSError:
            pass
