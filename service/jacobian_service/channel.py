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
after another in one write (a front end's lone job, nothing else in flight to that engine,
as it is sent: the engine waits for it alone). The framing delimits them, so the other side wakes once and
reads them all. Small frames are cut out of a staging buffer, so a batch of small
replies costs one read; a large frame is read straight into a buffer of its size.

Large arrays go through shared memory instead, both ways. A front end offers each engine,
once connected, a segment of its own (a ``memfd``) for inputs; its descriptor rides with
its offer (``SCM_RIGHTS``): a confined engine (``engine.confinement``) may not open
another process's ``/proc/<pid>/fd``. Once the engine has mapped it, a frame of
``_SHARED_FRAME`` bytes or more is copied into a free block of the segment and only its
place crosses the socket (a frame size with ``_SHARED`` set: the frame is its place, 16
bytes of offset and length). The reader takes the array where it lies, and the block is
the writer's again when the last view of it (the numpy array, a job) is gone: a
finalizer gives it back. A full segment, or none, sends frames on the socket as before.
Measured on the 2-core VM: 4 MB through the socket took 0.80 ms and 0.58 ms of the
reader's CPU; a copy into a mapped segment takes 0.10 ms.

Only the writer can write a segment: it is sealed (``F_SEAL_FUTURE_WRITE``, no shrinking
or growing) before it is offered, and the reader maps it read-only, which the seal keeps
so (``mprotect`` cannot make it writable). An engine's functions run where its mapping of
the front end's segment is: mapped read-write, a function (ctypes, ``/proc/self/maps``)
rewrote the large inputs of other callers' requests queued behind it.

An engine's results take no segment: a writer's own mapping of one stays writable, and
its functions run there. Each result of ``_SEALED_FRAME`` bytes or more goes in a memfd
of its own, written and then sealed against all writing (``Sealed``); its place (24
bytes: descriptor, inode, length) crosses the socket, and the front end opens, checks
and maps it (``SealedFrames``) and gives the descriptor back.

The channel's own messages (an offer, its answer, blocks given back) have ``_CONTROL``
set in their frame count and one frame: a kind byte, then its data.

A function runs in the engine, where its socket is (``/proc/self/fd``): one that read
from it took the messages queued there, other clients' jobs, which the engine never saw.
Their requests waited for their deadlines (504), and the engine, never answering their
cancels, was killed as hung in the victim's function, which was struck (quarantined the
third time) while the reader went free. Each write of a front end now begins with how
many messages it has sent on the connection before (``_SENT``): the engine, counting
what it read, knows when some went elsewhere and which functions ran meanwhile.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import fcntl
import functools
import logging
import mmap
import os
import select
import selectors
import socket
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy

from .procfs import descriptor_identity, living, set_dumpable

__all__ = ["Connection", "FrameReader", "Listener", "Mapped", "Peer", "Sealed", "SealedFrames", "Segment", "Sharing",
           "encode_control", "encode_messages"]


log = logging.getLogger("jacobian_service.channel")

_COUNT = struct.Struct("<I")
_STAGE_BYTES = 1 << 18
_BIG_FRAME = 1 << 16  # frames this large are read into their own buffer, not staged
_MAX_IOV = 512  # buffers per sendmsg (the kernel's limit is 1,024)
_SOCKET_BUFFER = 4 << 20  # asked for; the kernel caps it at net.core.[rw]mem_max

_CONTROL = 1 << 31  # in a frame count: the channel's own message
_SHARED = 1 << 63  # in a frame size: the frame lies in shared memory, this (the rest: its length) is its place
_PLACE = struct.Struct("<QQ")  # a block of the writer's segment: offset, length
_SEALED_PLACE = struct.Struct("<QQQ")  # a sealed memfd of its own: its descriptor in the writer, inode, length
# Frames this large go through shared memory when there is some. 16 KiB takes a small
# mlp Jacobian (32 KB): 3-6 % more of them a second under wrk than at 64 KiB in two runs
# side by side; against shared memory off, the final build served as many (2,384 vs
# 2,396 req/s): for small frames it is a wash, never a loss measured.
_SHARED_FRAME = 1 << 14
# An engine's results this large go in a sealed memfd each (``Sealed``); smaller ones on
# the socket. A memfd's pages are new each time, and it is mapped and unmapped by the
# front end: measured on the 2-core VM (CPU, best of 5), the engine's pwrite and seals
# took 101 us for 256 KiB, 418 us for 1 MiB, 2.0 ms for 4 MiB; the front end's open, map
# and read 61 us, 186 us, 0.80 ms, against 36 us, 115 us, 0.83 ms to read them from the
# socket, and 6.0 ms against 27 ms for 32 MiB (a streamed chunk). From 4 MiB on, the
# front end (one event loop for every caller) spends less; below it, the socket costs
# both sides less (a 32 KiB result: 5 us against 54 us), and its 4 MiB buffers take it.
# The engine's own instructions for small mlp Jacobians (bench.engine_callgrind, the
# segment's copy gone, the kernel's not counted): 2,671,207 -> 2,636,986 a lone request,
# 1,276,035 -> 1,230,015 a request in batches of 32.
_SEALED_FRAME = 4 << 20
_BLOCK = 4096  # blocks of the segment start on page boundaries
# Blocks given back ride with the next message the other way; alone only after this long
# without one. Alone at once, they woke the other side once more per request: one client's
# small Jacobian took 2.33 ms against 2.21 ms with shared memory off (medians, side by side).
_GIVE_BACK_AFTER_S = 0.01
# Control kinds: one side offers its segment, the other takes or declines it, and
# gives blocks back; a front end that closes its connection on purpose says so first
# (``_BYE``): any other end of a connection whose front end lives was not its doing.
# An engine offers sealed memfds (``_OFFER_SEALED``) for its results, not a segment.
_OFFER, _OFFER_SEALED, _TAKE, _DECLINE, _GIVE_BACK, _BYE = b"o", b"s", b"t", b"d", b"g", b"b"
# A front end's count of the messages it has sent on the connection before the ones that
# follow (``_SENT``, with each write): fewer read here were read by another reader of the
# engine's socket, a function (``FrameReader.missing``, ``Listener.robbed``).
_SENT = b"n"
_SENT_COUNT = struct.Struct("<Q")
# Seals on a segment before it is offered: no new writable mapping, no write(2), and a fixed
# size (a reader that shrank it would fault the writer's copies). F_SEAL_FUTURE_WRITE
# (Linux 5.1) has no name in Python's fcntl.
_SEALS = 0x0010 | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# A result's memfd, once written: no writing at all, by anyone (F_SEAL_WRITE, which a
# writable mapping would refuse: the engine never maps it), nor a change of size.
_FROZEN = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_HUNG_UP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)

Place = Callable[[memoryview], "bytes | None"]


def encode_messages(messages: Sequence[Sequence[Any]], place: Place | None = None) -> tuple[list[Any], int]:
    """The buffers that carry ``messages`` on the socket, one after another (each its
    prefix, then its frames as they are), and their total size in bytes. ``place`` puts
    a large frame in shared memory and says where (None: no room), for the frame's
    place to travel instead of its bytes."""
    buffers: list[Any] = []
    total = 0
    for frames in messages:
        sizes = [memoryview(f).nbytes for f in frames]
        if place is not None and max(sizes, default=0) >= _SHARED_FRAME:
            frames = list(frames)
            for i, size in enumerate(sizes):
                if size >= _SHARED_FRAME and (where := place(memoryview(frames[i]).cast("B"))) is not None:
                    frames[i], sizes[i] = where, _SHARED | len(where)
        prefix = struct.pack(f"<I{len(sizes)}Q", len(sizes), *sizes)
        buffers += (prefix, *frames)
        total += len(prefix) + sum(size & ~_SHARED for size in sizes)
    return buffers, total


def encode_control(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<IQ", _CONTROL | 1, len(kind) + len(data)) + kind + data


def _room(size: int) -> memoryview:
    """A buffer of ``size`` bytes for a frame (or frame sizes) the other side says it is
    sending, whose pages are taken as its bytes arrive, not as it is claimed. A
    ``bytearray`` writes all its zeros at once: an engine's function that wrote a frame
    size of 16 GiB on its connection (its socket is in ``/proc/self/fd``) had its front
    end fill 16 GiB with zeros, for bytes that never came, out of the memory every client
    of that front end needed. An anonymous map has the kernel's zero pages until written
    (a size past what the kernel will map is an OSError: the connection is dropped).
    Below ``_SEALED_FRAME`` (what a legitimate large frame uses instead of the socket),
    the claim costs little, and malloc reuses freed memory without new page faults."""
    if size < _SEALED_FRAME:
        return memoryview(bytearray(size))
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))


class FrameReader:
    """Messages out of a byte stream, for a reader that fills ``buffer()`` and then says
    how much it wrote with ``updated(n)`` (asyncio's ``BufferedProtocol`` contract).

    Completed messages collect in ``messages``, the channel's own in ``controls`` (their
    one frame). A frame of ``_BIG_FRAME`` bytes or more gets its own buffer, which the
    socket fills directly: it reaches the array decoder without a copy (as a read-only
    view). Smaller frames are copied out of the staging buffer, one ``bytes`` each. A
    frame in shared memory becomes what ``shared(place)`` returns (its place: the bytes sent)."""

    def __init__(self, shared: Callable[[bytes], Any] | None = None) -> None:
        self._stage = memoryview(bytearray(_STAGE_BYTES))
        self._start = self._end = 0
        self._sizes: list[int] | None = None  # as sent: _SHARED may be set
        self._control = False
        self._frames: list[Any] = []
        self._big: memoryview | None = None  # the large frame being filled, and how far
        self._big_got = 0
        self._shared = shared
        self.messages: list[list[Any]] = []
        self.controls: list[bytes] = []
        self.received = 0  # messages completed (not the channel's own)
        self.missing = 0  # messages the other side counted as sent before a ``_SENT`` that never came here
        self.counted = False  # a ``_SENT`` has come that matched what was read (the reader resets it)

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
        stage = _room(2 * (tail + need))
        stage[:tail] = self._stage[self._start:self._end]
        self._stage, self._start, self._end = stage, 0, tail

    def _parse(self) -> None:
        while True:
            avail = self._end - self._start
            if self._sizes is None:
                if avail < _COUNT.size:
                    break
                (count,) = _COUNT.unpack_from(self._stage, self._start)
                self._control, count = bool(count & _CONTROL), count & ~_CONTROL
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
                if not self._control:
                    self.messages.append(self._frames)
                    self.received += 1
                elif bytes(self._frames[0][:1]) == _SENT and len(self._frames[0]) == 1 + _SENT_COUNT.size:
                    (sent,) = _SENT_COUNT.unpack_from(self._frames[0], 1)
                    if sent > self.received:
                        self.missing += sent - self.received
                    else:
                        self.counted = True
                    self.received = max(self.received, sent)
                else:
                    self.controls.append(self._frames[0])
                self._sizes, self._frames = None, []
                continue
            size = self._sizes[len(self._frames)]
            if size & _SHARED:
                size &= ~_SHARED
                if self._shared is None or size > _SEALED_PLACE.size:
                    raise ConnectionError("a frame in shared memory, on a connection without any")
                if avail < size:
                    break
                self._frames.append(self._shared(bytes(self._stage[self._start:self._start + size])))
                self._start += size
                continue
            if size <= avail:
                self._frames.append(bytes(self._stage[self._start:self._start + size]))
                self._start += size
                continue
            if size >= _BIG_FRAME:
                big = _room(size)
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

    def take_controls(self) -> list[bytes]:
        controls, self.controls = self.controls, []
        return controls


# --------------------------------------------------------------------------- shared memory


class Segment:
    """Shared memory a side writes its large frames into: a ``memfd`` and the blocks of
    it that hold frames the other side has not given back yet.

    Pages are reserved (``posix_fallocate``) as blocks are first used, so a machine out
    of memory refuses a block here, and the frame goes on the socket, instead of the
    write faulting. First fit over the free blocks: a few frames are out at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("jacobian-shared", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)  # its length only: no page is taken yet
            self.map = mmap.mmap(self.fd, size)  # this side's mapping, made before the seals: writable
            # The other side maps it read-only and cannot make it writable. A kernel
            # without the seal fails here: no segment, the frames go on the socket.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            if hasattr(self, "map"):
                self.map.close()
            os.close(self.fd)
            raise
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"  # where the other side opens it
        self.free: list[tuple[int, int]] = [(0, size)]  # (offset, size), by offset
        self.used: dict[int, int] = {}
        self.reserved = 0  # pages exist below this offset
        self.said_full = False

    def place(self, frame: memoryview) -> bytes | None:
        """Copy ``frame`` into a free block; its place, or None when no block is free."""
        n = frame.nbytes
        need = -(-n // _BLOCK) * _BLOCK
        for i, (offset, size) in enumerate(self.free):
            if size >= need:
                break
        else:
            if not self.said_full:  # once: a sign to raise SHARED_MEMORY_BYTES, not an error
                self.said_full = True
                log.info("a shared-memory segment (%d bytes) is full; large frames go on the socket meanwhile", self.size)
            return None
        if offset + need > self.reserved:
            try:
                os.posix_fallocate(self.fd, self.reserved, offset + need - self.reserved)
            except OSError:
                return None
            self.reserved = offset + need
        self.free[i:i + 1] = [(offset + need, size - need)] if size > need else []
        self.used[offset] = need
        self.map[offset:offset + n] = frame
        return _PLACE.pack(offset, n)

    def give_back(self, offset: int) -> None:
        size = self.used.pop(offset, None)
        if size is None:
            return  # not a block: the other side is wrong, the segment stays right
        i = bisect.bisect_left(self.free, (offset,))
        self.free.insert(i, (offset, size))
        # merge with the next block, then with the previous one
        if i + 1 < len(self.free) and offset + size == self.free[i + 1][0]:
            self.free[i:i + 2] = [(offset, size + self.free[i + 1][1])]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == offset:
            self.free[i - 1:i + 1] = [(self.free[i - 1][0], self.free[i - 1][1] + self.free[i][1])]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Sealed:
    """Where an engine puts its large results: each in a ``memfd`` of its own, written
    through its descriptor (``pwrite``: never mapped here), then sealed against any
    writing (``_FROZEN``) before the front end is told its descriptor's number and inode.
    The descriptor stays open until the front end, having opened and mapped it through
    ``/proc/<pid>/fd``, gives it back (with its next message).

    Not a segment: the writer's mapping of a segment is writable for as long as it lives,
    and an engine's functions run where it is. A function found it in ``/proc/self/maps``
    and wrote NaN over it while the front end still sent a slow reader's 8 MB answer from
    it: that caller's 200 had 500,288 of 1,000,000 values NaN. Sealed so, a memfd cannot
    be written by anyone: ``/proc/self/fd`` opens it again, but ``write`` and a writable
    mapping fail (EPERM), and it cannot be shrunk or grown. (``F_SEAL_FUTURE_WRITE``
    would leave a mapping made before it writable.)

    The probe offered (``path``) is such a memfd, empty: the front end takes the offer
    when it can open it and finds it sealed."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("jacobian-result", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _FROZEN)
        except BaseException:
            os.close(self.fd)
            raise
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        self.used: dict[int, tuple[int, int]] = {}  # descriptor -> (device, inode), of the results not given back yet

    def place(self, frame: memoryview) -> bytes | None:
        """``frame`` in a sealed memfd of its own; its place, or None: it goes on the socket
        (smaller than ``_SEALED_FRAME``, or no descriptor or no memory left)."""
        if frame.nbytes < _SEALED_FRAME:
            return None
        try:
            fd = os.memfd_create("jacobian-result", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            return None
        try:
            done = 0
            while done < frame.nbytes:
                done += os.pwrite(fd, frame[done:], done)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _FROZEN)
            identity = descriptor_identity(fd)
        except OSError:
            os.close(fd)
            return None
        assert identity is not None  # (open: made above)
        self.used[fd] = identity
        # The front end opens it through /proc/<engine>/fd, which only a dumpable process
        # lets a process of its user open: a function that had cleared the flag
        # (prctl(PR_SET_DUMPABLE, 0)) made the next large answer, another caller's, a 503
        # and blamed that caller's function for the broken connection (under a non-root
        # user, as in the image; root opens it anyway). An engine is dumpable (fork_server).
        set_dumpable(True)
        return _SEALED_PLACE.pack(fd, identity[1], frame.nbytes)

    def give_back(self, fd: int) -> None:
        """The front end has it mapped: its descriptor here is closed, if it is still that
        memfd's (a number closed under it, and taken since, is not this side's to close)."""
        identity = self.used.pop(fd, None)
        if identity is not None and descriptor_identity(fd) == identity:
            os.close(fd)

    def close(self) -> None:
        for fd in list(self.used):
            self.give_back(fd)
        os.close(self.fd)


class SealedFrames:
    """An engine's sealed results (``Sealed``), on the front end: each frame is opened
    through ``/proc/<pid>/fd``, checked (the inode the engine said, and sealed against
    writing), mapped read-only, and given back at once (the mapping holds the memory).
    A descriptor that is not what the engine sealed (a function closed it and opened
    another memfd at its number, before this side opened it) breaks the connection: its
    requests are answered as lost, never with what that memfd holds."""

    PLACE = _SEALED_PLACE

    def __init__(self, probe: str, freed: Callable[[Any, int], None]) -> None:
        fd = os.open(probe, os.O_RDONLY)
        try:
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _FROZEN != _FROZEN:
                raise ValueError("the engine's probe is not sealed")
        finally:
            os.close(fd)
        self._where = probe.rsplit("/", 1)[0]  # /proc/<engine>/fd
        self._freed = freed

    def frame(self, fd: int, inode: int, length: int) -> memoryview:
        try:
            f = os.open(f"{self._where}/{fd}", os.O_RDONLY)
        except OSError as exc:
            raise ConnectionError(f"an engine's result descriptor cannot be opened ({exc})") from None
        try:
            st = os.fstat(f)
            if st.st_ino != inode or st.st_size < length or fcntl.fcntl(f, fcntl.F_GET_SEALS) & _FROZEN != _FROZEN:
                log.warning("an engine's result memfd is not the one it sealed (a function replaced it); "
                            "the connection is dropped")
                raise ConnectionError("an engine's result memfd is not the one it sealed")
            whole = mmap.mmap(f, length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        finally:
            os.close(f)
        self._freed(self, fd)
        # The array holds the mapping as its buffer's owner: unmapped when its last view goes.
        return memoryview(numpy.frombuffer(whole, numpy.uint8, length))


class Mapped:
    """The other side's segment, mapped here read-only (sealed: it stays so): its frames
    as read-only views, each with a finalizer that calls ``freed(self, offset)`` once the
    view's last reference has gone (on whatever thread dropped it, or in the garbage
    collector)."""

    def __init__(self, path: str | int, size: int, freed: Callable[["Mapped", int], None]) -> None:
        fd = os.open(path, os.O_RDONLY) if isinstance(path, str) else path  # a descriptor received: now ours
        try:
            self.map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._freed = freed
        # offset -> a weak reference to the block's view there, whose callback is the
        # finalizer. (weakref.finalize did the same at ~4,500 more instructions a frame:
        # a Python object with its registry and its atexit flag, a frame per request.)
        # The callback holds this object weakly: a mapping nobody holds any more is no
        # connection's, and nothing of it is given back (Sharing.freed).
        self._blocks: dict[int, weakref.ref] = {}
        self._me = weakref.ref(self)

    PLACE = _PLACE

    def frame(self, offset: int, length: int) -> memoryview:
        # A view, not a copy, and read-only as the mapping (ctypes' from_buffer wants a
        # writable one); the array holds the mapping as its buffer's owner.
        block = numpy.frombuffer(self.map, numpy.uint8, length, offset)
        self._blocks[offset] = weakref.ref(block, functools.partial(_block_gone, self._me, self._blocks, offset))
        return memoryview(block)


def _block_gone(mapped: weakref.ref, blocks: dict[int, weakref.ref], offset: int, ref: weakref.ref) -> None:
    """The last view of ``mapped``'s block at ``offset`` has gone (on whatever thread
    dropped it, or in the garbage collector): its ``freed``."""
    if blocks.get(offset) is ref:
        del blocks[offset]
    owner = mapped()
    if owner is not None:
        owner._freed(owner, offset)


class Sharing:
    """One connection's shared memory, both ways: this side's segment (``own``: offered,
    then used once the other side has ``taken`` it) and the other side's (``mapped``),
    with the blocks of it to give back. Both ends of a connection keep one; ``size`` 0
    offers nothing (the other side's offer is still taken)."""

    def __init__(self, size: int, sealed: bool = False) -> None:
        self.size = size
        self.sealed = sealed  # this side's large frames each in a sealed memfd (an engine's results)
        self.own: Segment | Sealed | None = None
        self.taken = False
        self.mapped: Mapped | SealedFrames | None = None
        self.given_back: list[int] = []
        self.received: int | None = None  # the other side's segment's descriptor, sent with its offer

    def offer(self) -> bytes | None:
        """The offer of a new segment, to write once connected; None without one."""
        if not self.size:
            return None
        try:
            self.own = Sealed() if self.sealed else Segment(self.size)
        except (OSError, AttributeError) as exc:  # AttributeError: no memfd on this platform
            log.info("no shared memory for large frames (%s); they go on the socket", exc)
            return None
        if isinstance(self.own, Sealed):
            return encode_control(_OFFER_SEALED, self.own.path.encode())
        return encode_control(_OFFER, f"{self.size} {self.own.path}".encode())

    def place(self) -> Place | None:
        return self.own.place if self.taken and self.own is not None else None

    def control(self, control: bytes, freed: Callable[[Mapped, int], None]) -> bytes | None:
        """The other side's control message; what to answer, if anything."""
        kind, data = control[:1], control[1:]
        if kind == _OFFER:
            size, path = data.decode().split(" ", 1)
            where: str | int = path
            if self.received is not None:
                where, self.received = self.received, None
            try:
                self.mapped = Mapped(where, int(size), freed)
            except (OSError, ValueError) as exc:  # e.g. /proc hidden from this process
                log.info("cannot map the other side's shared memory (%s); its large frames come on the socket", exc)
                return encode_control(_DECLINE)
            return encode_control(_TAKE)
        if kind == _OFFER_SEALED:
            try:
                self.mapped = SealedFrames(data.decode(), freed)
            except (OSError, ValueError) as exc:  # /proc hidden, or a kernel without the seals
                log.info("cannot open the engine's sealed results (%s); its large frames come on the socket", exc)
                return encode_control(_DECLINE)
            return encode_control(_TAKE)
        if kind == _TAKE and self.own is not None:
            self.taken = True
        elif kind == _DECLINE and self.own is not None:
            self.own.close()
            self.own = None
        elif kind == _GIVE_BACK and self.own is not None:
            for offset in struct.unpack_from(f"<{len(data) // 8}Q", data):
                self.own.give_back(offset)
        return None

    def freed(self, mapped: Mapped | SealedFrames, offset: int) -> bool:
        """A view of ``mapped``'s block at ``offset`` has gone: kept to give back, if that
        mapping is still this connection's (a dead peer's blocks are not its successor's)."""
        if mapped is not self.mapped:
            return False
        self.given_back.append(offset)
        return True

    def frame(self, place: bytes) -> memoryview:
        """The frame at ``place`` (as sent: a segment's block, or a sealed memfd)."""
        if self.mapped is None or len(place) != self.mapped.PLACE.size:
            raise ConnectionError("a frame in shared memory the other side did not offer")
        return self.mapped.frame(*self.mapped.PLACE.unpack(place))

    def take_given_back(self) -> bytes | None:
        """The blocks given back since the last call, as a control message."""
        n = len(self.given_back)
        if not n:
            return None
        # A slice, not a swap: a finalizer may append meanwhile (the collector runs on
        # allocation), and what it appends stays for the next call.
        offsets = self.given_back[:n]
        del self.given_back[:n]
        return encode_control(_GIVE_BACK, struct.pack(f"<{n}Q", *offsets))

    def receive(self, fds: list[int]) -> None:
        """Descriptors that came on the socket: the first is the other side's segment
        (its offer follows in the same read); any other is closed."""
        for fd in fds:
            if self.received is None and self.mapped is None:
                self.received = fd
            else:
                os.close(fd)

    def close(self) -> None:
        """The connection has gone. The other side's blocks still out stay mapped (their
        views hold the mapping) until they go; nothing is given back for them."""
        if self.received is not None:
            os.close(self.received)
            self.received = None
        if self.own is not None:
            self.own.close()
        self.own, self.taken, self.mapped, self.given_back = None, False, None, []


# --------------------------------------------------------------------------- engine side


class Peer:
    """One front end's connection to an engine: its reader, what waits to be written,
    and its shared memory."""

    def __init__(self, sock: socket.socket, shared_bytes: int) -> None:
        self.sock = sock
        self.identity = descriptor_identity(sock.fileno())  # what its descriptor is: Listener.lost
        self.pid = _peer_pid(sock)  # the front end's process
        self.said_bye = False  # the front end closes it on purpose (_BYE)
        self.broken = False  # this side ended it: the front end broke the framing
        self.sharing = Sharing(shared_bytes, sealed=True)  # results: each sealed (functions run here)
        self.reader = FrameReader(self.sharing.frame)
        self.out: list[memoryview] = []
        self.gone = False
        self.ran: set[str] = set()  # functions run since the front end's count last matched (``Listener.robbed``)

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
    what the socket takes and the rest as it drains (on later polls). With
    ``shared_bytes``, each front end is offered a segment of that size for large frames
    (results); a front end's own offer (inputs) is taken either way."""

    def __init__(self, path: Path, shared_bytes: int = 0) -> None:
        self.path = path
        self.shared_bytes = shared_bytes
        try:
            path.unlink()  # a dead engine's socket file: this engine replaces it
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self._path_identity = _path_identity(path)  # the file the front ends connect to (``lost``)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        # Its own descriptors, by number and by what they are (an epoll selector has one too).
        self._own = {"listening socket": self.sock.fileno(), "selector": getattr(self.selector, "fileno", lambda: -1)()}
        self._own_identity = {what: descriptor_identity(fd) for what, fd in self._own.items() if fd >= 0}
        # Shut down through a duplicate (``shutdown(SHUT_RDWR)``), the socket is the same
        # one, refusing every connection, and epoll reports it ready at every poll: the idle
        # engine spun a core, for ever. Only poll tells.
        self._listening = select.poll()
        self._listening.register(self.sock.fileno(), select.POLLIN)
        # The front ends' connections, by descriptor: the one list of them (the selector's
        # map holds the same ones), for the hang-up poll, lost() and close().
        self._peers: dict[int, Peer] = {}
        self._dropped_lost = False  # a front end's connection dropped as its descriptor was closed under it
        self._hung_up: list[Peer] = []  # reported by the next poll
        self._owing: set[Peer] = set()  # front ends with blocks to give back
        self._owing_since = 0.0
        self._robbed: list[tuple[int, set[str]]] = []  # messages read off a connection by another, and who ran then

    def poll(self, timeout: float) -> list[tuple[Peer, list[Any] | None]]:
        """Wait up to ``timeout`` seconds for something to happen; what did."""
        events: list[tuple[Peer, list[Any] | None]] = []
        if self._owing and time.monotonic() - self._owing_since >= _GIVE_BACK_AFTER_S:
            owing, self._owing = self._owing, set()
            for peer in owing:  # inputs the jobs no longer hold, and no reply took them
                if not peer.gone and (control := peer.sharing.take_given_back()) is not None:
                    self._write(peer, [memoryview(control)])
        for key, mask in self.selector.select(timeout):
            peer: Peer | None = key.data
            if peer is None:
                self._accept()
                continue
            if mask & selectors.EVENT_WRITE:
                peer.write()
            if mask & selectors.EVENT_READ and not self._read(peer):
                peer.gone = True
            for control in peer.reader.take_controls():
                if control[:1] == _BYE:
                    peer.said_bye = True
                elif (answer := peer.sharing.control(control, functools.partial(self._freed, peer))) is not None:
                    self._write(peer, [memoryview(answer)])
            if peer.reader.missing:
                self._robbed.append((peer.reader.missing, set(peer.ran)))
            if peer.reader.missing or peer.reader.counted:
                peer.reader.missing, peer.reader.counted = 0, False
                peer.ran.clear()
            events.extend((peer, m) for m in peer.reader.take())
            self._watch(peer)
        events.extend((peer, None) for peer in self._hung_up)
        self._hung_up = []
        return events

    def ran(self, function: str) -> None:
        """``function`` runs now: a reader of the socket meanwhile may be it (``robbed``)."""
        for peer in self._peers.values():
            peer.ran.add(function)

    def robbed(self) -> tuple[int, list[str]] | None:
        """How many messages the front ends sent were read off their connections by
        another reader (a function: ``_SENT``), and the functions that ran on this
        engine since each connection's count last matched, one of which read them; None
        when none were."""
        if not self._robbed:
            return None
        robbed, self._robbed = self._robbed, []
        return sum(n for n, _ in robbed), sorted(set().union(*(ran for _, ran in robbed)))

    def lost(self) -> str | None:
        """Which of its descriptors is no longer what it opened, if one is (or its socket
        file, "socket file", removed or another bound at its path): closed by
        a function in the engine (its number free, or taken by a file the function opened
        since). Its listening socket closed, no front end could connect again, and one
        started again (or a new one) waited for its deadline, for as long as the engine
        lived, with /readyz 200; its selector closed, the next poll ended the engine
        naming nothing. A front end's connection first: its answers went with it. An
        fstat each (~1 us).

        Closed or shut down: ``shutdown`` through a duplicate ends a connection with no
        descriptor changed, and the front end, whose requests on it were lost, answered
        them 503 (retryable) after a grace, the function's own included: the SDK sent it
        again, to shut the connection down again, for ever, never quarantined. A
        connection that hung up without its front end's ``_BYE`` while that front end
        lives was ended here. And an epoll's descriptor tells nothing by fstat (every
        epoll, eventfd or timerfd is the one anonymous inode): a selector closed and
        another opened at its number (the lowest free) held none of the engine's sockets,
        and every later request waited for its deadline (504), the engine beating on,
        for as long as it lived. The selector must still hold the listening socket."""
        peers = [peer for peer in self._peers.values() if not peer.gone]
        if self._dropped_lost or any(descriptor_identity(peer.sock.fileno()) != peer.identity for peer in peers):
            return "connection to a front end"
        for what, identity in self._own_identity.items():
            if descriptor_identity(self._own[what]) != identity:
                return what
        if _path_identity(self.path) != self._path_identity:
            # Removed (or another socket bound there): the engine served the connections
            # it had, beating, idle, and a front end started again never reached it, every
            # request of it a 504, for as long as the engine lived. (A stat: ~2 us.)
            return "socket file"
        if not self._selector_holds_listener():
            return "selector"
        ready = self._listening.poll(0)
        if any(events & (select.POLLHUP | select.POLLERR) for fd, events in ready if fd == self._own["listening socket"]):
            return "listening socket"
        for fd, events in ready:
            peer = self._peers.get(fd)
            if peer is not None and not peer.gone and events & _HUNG_UP and self._ended_here(peer, read=True):
                return "connection to a front end"
        return None

    def _selector_holds_listener(self) -> bool:
        """Whether the selector's descriptor is still the epoll that holds the listening
        socket (``epoll_ctl`` on a duplicate: ENOENT in another epoll, EINVAL or EBADF
        in anything else). True for a selector without a descriptor."""
        fd = self._own["selector"]
        if fd < 0 or not hasattr(select, "epoll"):
            return True
        try:
            probe = select.epoll.fromfd(os.dup(fd))
        except OSError as exc:
            # No descriptor free for the duplicate (a function used them all up): no
            # answer, and the descriptor watch recycles such an engine, naming it.
            return exc.errno in (errno.EMFILE, errno.ENFILE)
        try:
            probe.modify(self.sock.fileno(), select.EPOLLIN)  # as registered: nothing changes
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def _ended_here(self, peer: Peer, read: bool = False) -> bool:
        """Whether a connection that hung up was ended on this side (a function in the
        engine shut it down): its front end lives and did not say it was closing it.
        ``read``: what has arrived is read first (into the reader, for the next poll),
        for a ``_BYE`` not read yet."""
        if peer.said_bye or peer.broken:
            return False
        if read:
            self._read(peer)
            if any(control[:1] == _BYE for control in peer.reader.controls):
                return False
        return peer.pid is not None and living(peer.pid)

    def send(self, peer: Peer, messages: Sequence[Sequence[Any]]) -> None:
        if peer.gone:
            return
        buffers, _ = encode_messages(messages, peer.sharing.place())
        if (control := peer.sharing.take_given_back()) is not None:
            buffers.insert(0, control)
        self._write(peer, [view for b in buffers if (view := memoryview(b).cast("B")).nbytes])

    def _write(self, peer: Peer, views: list[memoryview]) -> None:
        peer.out.extend(views)
        peer.write()
        _own(peer.out)
        self._watch(peer)

    def write_out(self, timeout: float) -> None:
        """Write what the front ends still connected are owed, waiting up to ``timeout``
        seconds for their sockets to take it: an engine about to exit (what is left
        unwritten is lost with it; ``Peer.out`` says what was)."""
        end = time.monotonic() + timeout
        while (owed := [p for p in self._peers.values() if p.out and not p.gone and p.sock.fileno() >= 0]) \
                and (left := end - time.monotonic()) > 0:
            writable = select.poll()
            for peer in owed:
                writable.register(peer.sock.fileno(), select.POLLOUT)
            writable.poll(min(left, 0.05) * 1e3)
            for peer in owed:
                peer.write()

    def _freed(self, peer: Peer, mapped: Mapped, offset: int) -> None:
        """A front end's block (an input) is no longer held here: give it back with the
        next reply to it, or alone from a poll ``_GIVE_BACK_AFTER_S`` later."""
        if not peer.gone and peer.sharing.freed(mapped, offset):
            if not self._owing:
                self._owing_since = time.monotonic()
            self._owing.add(peer)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            _grow_buffers(sock)
            peer = Peer(sock, self.shared_bytes)
            self.selector.register(sock, selectors.EVENT_READ, peer)
            self._listening.register(sock.fileno(), select.POLLIN | getattr(select, "POLLRDHUP", 0))
            self._peers[sock.fileno()] = peer
            if (offer := peer.sharing.offer()) is not None:
                self._write(peer, [memoryview(offer)])

    def _read(self, peer: Peer) -> bool:
        """Read what has arrived; False once the front end has hung up."""
        while True:
            try:
                if peer.sharing.mapped is None:  # its offer may come with its segment's descriptor
                    n, ancillary, _, _ = peer.sock.recvmsg_into([peer.reader.buffer()], _ANCILLARY)
                    peer.sharing.receive(_descriptors(ancillary))
                else:
                    n = peer.sock.recv_into(peer.reader.buffer())
            except BlockingIOError:
                return True
            except OSError:
                return False
            if n == 0:
                return False
            try:
                peer.reader.updated(n)
            except (ConnectionError, ValueError):  # a frame's place outside any segment
                log.warning("a front end broke the channel's framing; its connection is closed")
                peer.broken = True
                return False

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
        if descriptor_identity(peer.sock.fileno()) != peer.identity or self._ended_here(peer):
            self._dropped_lost = True  # not its hang-up: closed or shut down under it
        peer.gone, peer.out = True, []
        peer.sharing.close()  # the front end's mapping, if any, lives on without it
        try:
            self.selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        for fd, known in list(self._peers.items()):
            if known is peer:
                del self._peers[fd]
                self._listening.unregister(fd)
        try:
            peer.sock.close()
        except OSError:  # its descriptor closed under it (a function): lost() says so
            pass

    def close(self) -> None:
        for peer in list(self._peers.values()):
            self._drop(peer)
        self.selector.close()
        self.sock.close()


# --------------------------------------------------------------------------- front-end side


class Connection(asyncio.BufferedProtocol):
    """A front end's connection to one engine, on the event loop; it connects again
    whenever the engine's socket goes away (an engine restarts, or is not up yet).

    ``send`` queues a message; the messages of one loop tick leave together, written by
    one call (a lone job, ``now``, at once). Messages queued while no engine is connected wait for the next one, except
    those queued before a connection broke: their requests belonged to the engine that
    died, and the supervisor's word about it answers them. ``on_lost`` is called when a
    connection breaks, for the owner to answer what the word does not; ``on_made`` when
    one is made, before what waited for it is written.

    Large frames go both ways through shared memory (``Sharing``): a result arrives as a
    read-only view of the engine's segment, given back when its last reference goes (on
    whatever thread), with the next messages; blocks of an engine that has gone stay
    mapped until then, and are not given to its successor. Large inputs go into this
    connection's own segment, offered to each engine it connects to.

    A connection does not count on the kernel to say that its engine has died: a child
    the engine forked holds copies of its sockets, so neither the connection nor the
    socket file closes. ``gone(pid)``, the supervisor's word, drops a connection to that
    engine, and refuses any later one to it (its listening socket may still be there)."""

    _RETRY_S = (0.005, 0.1)  # first and longest wait between attempts to connect
    _GONE_KEPT = 64  # engine pids remembered as gone

    def __init__(self, path: Path, on_message: Callable[[list[Any]], None], shared_bytes: int = 0,
                 on_lost: Callable[[], None] = lambda: None, on_made: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self._shared_bytes = shared_bytes
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_made = on_made
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader()
        self._outbox: list[Sequence[Any]] = []
        self._flush_at: asyncio.Handle | None = None
        self._give_back_at: asyncio.TimerHandle | None = None
        self._owed_since = 0.0  # loop time of the first block given back since the last message sent
        self._closed = False
        self._connecting: asyncio.Task | None = None
        self._peer_pid: int | None = None  # the engine's, from the kernel (SO_PEERCRED)
        self._gone: dict[int, None] = {}  # engines the supervisor says have gone, oldest first
        self._refused = False  # the transport being made reached an engine that has gone
        self._sharing = Sharing(0)  # a new one per connection to an engine
        self._sent = 0  # messages written on this connection (``_SENT``)
        self._count_due = False  # a write of the count alone is asked for (``count``)
        self._loop_thread = threading.get_ident()
        self._connect()

    # ----------------------------------------------------------------- connecting

    def _connect(self) -> None:
        if not self._closed and (self._connecting is None or self._connecting.done()):
            self._connecting = self._loop.create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        # The condition is checked again after each connect: a connection can be made
        # and lost (an engine dying as it accepts) before this task has ended, and the
        # ``connection_lost`` of that moment, finding this task still running, starts
        # no other. Leaving then would leave the front end with no engine for good.
        wait, logged = self._RETRY_S[0], False
        while not self._closed and self._transport is None:
            try:
                await self._loop.create_unix_connection(lambda: self, str(self.path))
            except Exception as exc:  # OSError: not bound yet (starting, restarting)
                if not isinstance(exc, OSError) and not logged:  # ours to fix; still no reason to stop trying
                    log.exception("connecting to the engine at %s failed", self.path)
                    logged = True
            if self._transport is None:  # refused, or reached a dead engine's socket
                await asyncio.sleep(wait)
                wait = min(wait * 2, self._RETRY_S[1])

    @property
    def peer_pid(self) -> int | None:
        """The engine process last connected (the kernel's word), kept once its connection broke."""
        return self._peer_pid

    def said_gone(self, pid: int) -> bool:
        """Whether the supervisor has said engine process ``pid`` has gone (``gone``)."""
        return pid in self._gone

    def gone(self, pid: int) -> None:
        """The supervisor says engine process ``pid`` has gone: drop the connection to it,
        if it is the one connected, and refuse to connect to it again."""
        self._gone[pid] = None
        while len(self._gone) > self._GONE_KEPT:
            del self._gone[next(iter(self._gone))]
        if self._transport is not None and self._peer_pid == pid:
            log.info("dropping the connection to engine process %d, which has gone", pid)
            self._transport.abort()  # connection_lost follows: as if the kernel had said so

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        self._peer_pid = _peer_pid(sock)
        if self._peer_pid in self._gone:  # a dead engine's listening socket, kept open by its child
            self._refused = True
            transport.abort()
            return
        self._transport = transport
        self._sent = 0
        self._sharing = Sharing(self._shared_bytes)
        self._reader = FrameReader(self._sharing.frame)
        if sock is not None:
            _grow_buffers(sock)
        try:
            self._on_made()
        except Exception:  # the owner's; the connection stands
            log.exception("after connecting to the engine at %s", self.path)
        if (offer := self._sharing.offer()) is not None:
            transport.write(offer[_send_with_descriptor(sock, offer, self._sharing.own.fd):])  # type: ignore[union-attr]
        if self._outbox and self._flush_at is None:
            self._flush_at = self._loop.call_soon(self._flush)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:  # never taken up: nothing was sent on it; the connect loop goes on
            self._refused = False
            return
        self._transport = None
        self._outbox = []
        try:
            self._sharing.close()
            self._on_lost()  # what was sent on it, and dropped from the outbox, has no answer coming
        finally:  # whatever failed above, the front end must not stay without its engine
            self._connect()

    # ----------------------------------------------------------------- reading

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._reader.updated(nbytes)
        for control in self._reader.take_controls():
            if (answer := self._sharing.control(control, self._give_back)) is not None and self._transport is not None:
                self._transport.write(answer)
        for message in self._reader.take():
            self._on_message(message)

    # ----------------------------------------------------------------- shared memory

    def _give_back(self, mapped: Mapped, offset: int) -> None:
        """The last view of a result's block has gone: give it back to its engine, if it
        is still the one connected (with the next job, or alone ``_GIVE_BACK_AFTER_S``
        later). Runs where the last reference went: on the loop, a worker thread (a
        large JSON encoding) or the garbage collector."""
        try:
            if threading.get_ident() != self._loop_thread:  # the list is the loop's alone
                self._loop.call_soon_threadsafe(self._give_back, mapped, offset)
                return
            if self._sharing.freed(mapped, offset):
                if len(self._sharing.given_back) == 1:  # the first owed since the last message sent
                    self._owed_since = self._loop.time()
                if self._give_back_at is None:  # with the next job, or alone a little later
                    self._give_back_at = self._loop.call_later(_GIVE_BACK_AFTER_S, self._give_back_due)
        except RuntimeError:  # the loop has closed: nothing to give back to
            pass

    def _give_back_due(self) -> None:
        """The give-back timer: blocks owed ``_GIVE_BACK_AFTER_S`` go alone; blocks owed
        for less (a job since took the earlier ones) wait the rest; none owed, it stops.
        A job that takes the blocks leaves the timer running: made and cancelled per
        request (each small request's result frees a block), it cost a loop timer per
        request; kept, it is made once per ``_GIVE_BACK_AFTER_S`` at most."""
        self._give_back_at = None
        if not self._sharing.given_back:
            return
        try:
            left = self._owed_since + _GIVE_BACK_AFTER_S - self._loop.time()
            if left > 0:
                self._give_back_at = self._loop.call_later(left, self._give_back_due)
                return
            self._flush()
        except RuntimeError:  # the loop has closed: nothing to give back to
            pass

    # ----------------------------------------------------------------- writing

    def send(self, frames: Sequence[Any], now: bool = False) -> None:
        """Queue a message; it leaves at the end of this loop tick with the others.

        ``now``: the owner has nothing else in flight on this connection (a lone request:
        the engine waits for nothing but this), so the message leaves at once, unless
        others of this tick already wait to leave together. Left for the next tick, a lone
        job waited for a loop iteration (a poll of its own, then the write) while the
        engine slept: on the latency path, for nothing to go with it. A tick of several
        requests still leaves in one write, but for its first job where none was in
        flight before (the engine takes what came meanwhile after that one)."""
        self._outbox.append(frames)
        if self._flush_at is None:
            transport = self._transport
            if now and transport is not None and not transport.is_closing():
                self._flush()
            else:
                self._flush_at = self._loop.call_soon(self._flush)

    def count(self) -> None:
        """Tell the engine how many messages it was sent, now, with nothing else: a job
        read off its socket by a function is then known while its request still waits
        (the owner asks, once a second, while it holds a job there)."""
        self._count_due = True
        if self._flush_at is None:
            self._flush_at = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        # (Blocks owed go with what is sent; the give-back timer, left running, then finds
        # none owed, or only blocks owed since, which it gives their time.)
        self._flush_at = None
        if self._transport is None or not (self._outbox or self._sharing.given_back or self._count_due):
            return
        buffers, total = encode_messages(self._outbox, self._sharing.place())
        if self._outbox or self._count_due:  # (blocks given back alone need none)
            count = encode_control(_SENT, _SENT_COUNT.pack(self._sent))  # (what came before these)
            buffers.insert(0, count)
            total += len(count)
        self._sent += len(self._outbox)
        self._outbox, self._count_due = [], False
        if (control := self._sharing.take_given_back()) is not None:
            buffers.insert(0, control)
            total += len(control)
        if total < _BIG_FRAME:
            self._transport.write(b"".join(buffers))  # one write, one system call
        else:
            self._transport.writelines(buffers)

    def close(self) -> None:
        self._closed = True
        for handle in (self._flush_at, self._give_back_at):
            if handle is not None:
                handle.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._transport is not None:
            self._transport.write(encode_control(_BYE))  # ours, not the engine's doing (Listener.lost)
            self._transport.close()


def _own(views: list[memoryview]) -> None:
    """Copies of what the socket did not take yet, in place (bytes stay as they are).

    The rest of a reply goes on later polls, after the next batch has run, and an array
    frame is a view of the tensor a function returned: one it keeps and writes again at
    its next call (a buffer it fills, ``out=``, a module's state) was sent as that call
    left it. Six clients of such a function's 64 MiB output, at once: 12 of 18 answers
    (200) held another request's values, some a mix of three. Copied now, as a frame
    placed in shared memory is, it is the answer to its own request."""
    for i, view in enumerate(views):
        if not isinstance(view.obj, bytes):
            views[i] = memoryview(view.tobytes())


_ANCILLARY = socket.CMSG_SPACE(4 * struct.calcsize("i")) if hasattr(socket, "CMSG_SPACE") else 0


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an ``SCM_RIGHTS`` message brought (each now this process's)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{whole // 4}i", data[:whole]))
    return fds


def _send_with_descriptor(sock: Any, data: bytes, fd: int) -> int:
    """Send ``data`` with the descriptor ``fd`` attached (``SCM_RIGHTS``) on the socket
    under an asyncio transport that has written nothing yet; how many bytes went (0: none,
    the transport sends them all, without the descriptor, and the engine opens the path)."""
    if sock is None:
        return 0
    try:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(sock.fileno()))
    except OSError:
        return 0
    try:
        return raw.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    except OSError:  # BlockingIOError cannot happen on a new connection; any other: the path
        return 0
    finally:
        raw.close()  # the duplicate only


def _path_identity(path: Path) -> tuple[int, int] | None:
    """What file ``path`` names now (device, inode), or None: none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _peer_pid(sock: socket.socket | None) -> int | None:
    """The pid of the process that made the listening socket at the other end."""
    if sock is None:
        return None
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):  # AttributeError: no SO_PEERCRED on this platform
        return None
    return pid


def _grow_buffers(sock: socket.socket) -> None:
    """Larger kernel buffers: a 4 MB result crosses in a few writes, not twenty."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        except OSError:
            pass
