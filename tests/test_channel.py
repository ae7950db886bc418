"""The front end <-> engine channel (``channel``): framing over a byte stream, and the
engine's listener with the front end's connection over a real Unix socket."""

from __future__ import annotations

import asyncio
import os
import random
import select
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jacobian_service import ipc
from jacobian_service.channel import _BIG_FRAME, _STAGE_BYTES, Connection, FrameReader, Listener, encode_messages


def _feed(reader: FrameReader, data: bytes, cuts: list[int]) -> None:
    """Give ``data`` to the reader as a socket would: in pieces ending at ``cuts``, each
    piece written into the buffers the reader lends (several, when a piece spans them)."""
    start = 0
    for end in [*cuts, len(data)]:
        while start < end:
            buf = reader.buffer()
            n = min(len(buf), end - start)
            buf[:n] = data[start:start + n]
            reader.updated(n)
            start += n


def _wire(messages: list[list[bytes]]) -> bytes:
    buffers, total = encode_messages(messages)
    data = b"".join(bytes(memoryview(b)) for b in buffers)
    assert len(data) == total
    return data


@pytest.mark.parametrize("seed", range(6))
def test_messages_survive_any_split_of_the_stream(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [0, 1, 7, 500, _BIG_FRAME - 1, _BIG_FRAME, _BIG_FRAME + 3, _STAGE_BYTES + 5, 3 * _STAGE_BYTES]
    messages = [
        [rng.randbytes(rng.choice(sizes)) for _ in range(rng.randint(1, 5))]
        for _ in range(12)
    ]
    # Many-frame messages too: their prefix alone may not fit what is left of the stage.
    messages.append([rng.randbytes(3) for _ in range(3000)])
    data = _wire(messages)
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    reader = FrameReader()
    _feed(reader, data, cuts)
    got = reader.take()
    assert [[bytes(f) for f in m] for m in got] == messages
    assert reader.take() == []


def test_large_frames_arrive_as_read_only_views_without_a_copy() -> None:
    arr = np.arange(100_000, dtype=np.float32)
    reader = FrameReader()
    _feed(reader, _wire([[b"{}", memoryview(arr).cast("B")]]), [10, 5000])
    (message,) = reader.take()
    frame = message[1]
    assert isinstance(frame, memoryview) and frame.readonly
    out = np.frombuffer(frame, dtype=np.float32)
    np.testing.assert_array_equal(out, arr)
    assert not out.flags.writeable


def test_a_call_and_its_reply_round_trip_through_the_codec_and_the_frames() -> None:
    from jacobian_service.types import JobInfo, Result

    result = Result(value=np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32),
                    aux={"loss": np.float64(1.5), "nan": float("nan")}, has_aux=True, output=None, chunk_size=64, mode="rev")
    frames = ipc.encode_reply(7, result, JobInfo(device="cpu", batch_size=3))
    reader = FrameReader()
    _feed(reader, _wire([frames, ipc.encode_cancel(8)]), [3, 100])
    first, second = reader.take()
    header, arrays = ipc.parse(first)
    got, info = ipc.decode_reply(header, arrays)
    np.testing.assert_array_equal(got.value, result.value)
    assert got.aux["loss"] == 1.5 and np.isnan(got.aux["nan"]) and info.batch_size == 3
    assert ipc.parse(second)[0] == {"t": "cancel", "id": 8, "sid": None}


def test_small_arrays_travel_as_copies_in_c_order_and_large_ones_as_views() -> None:
    """A small array's frame is a copy (bytes, cheaper to make than a view of its buffer
    and never changed by a later write to the array: an engine function that rewrites
    the tensor it returned); a large one's is a view (no copy of megabytes). Either
    way the other side reads the values and layout sent: non-contiguous, 0-d and empty
    arrays included."""
    cases = [np.arange(128, dtype=np.float32), np.arange(12.0).reshape(3, 4).T, np.float32(2.5), np.zeros((0, 3)),
             np.arange(3000, dtype=np.int16)[::3], np.arange(100_000, dtype=np.float32).reshape(100, 1000)]
    frames: list = []
    nodes = [ipc.pack(np.asarray(c), frames) for c in cases]
    for case, node, frame in zip(cases, nodes, frames):
        small = np.asarray(case).nbytes <= 4096
        assert isinstance(frame, bytes) == small, (np.asarray(case).shape, type(frame))
        back = ipc.unpack(node, frames)
        assert back.dtype == np.asarray(case).dtype and back.shape == np.asarray(case).shape
        np.testing.assert_array_equal(back, case)
    source = np.arange(128, dtype=np.float32)
    frames = []
    node = ipc.pack(source, frames)
    source[:] = -1  # written again after it was packed (before it left)
    np.testing.assert_array_equal(ipc.unpack(node, frames), np.arange(128, dtype=np.float32))


# --------------------------------------------------------------------------- over a socket


class _Echo:
    """An engine-side loop on a thread: echoes each poll's messages back, in one write per front end."""

    def __init__(self, path: Path) -> None:
        self.listener = Listener(path)
        self.hung_up = 0
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop:
            self.once()
        self.listener.close()

    def once(self) -> None:
        """One poll, in a frame of its own: nothing it read is held past it (as in the
        engine, a message's frames go with the job that holds them)."""
        for peer, frames in self.listener.poll(0.02):
            if frames is None:
                self.hung_up += 1
            else:
                self.listener.send(peer, [frames])

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)


async def _round_trips(conn_path: Path, payloads: list[bytes]) -> tuple[list[list[bytes]], Connection]:
    got: list[list[bytes]] = []
    done = asyncio.Event()

    def on_message(frames: list) -> None:
        got.append([bytes(f) for f in frames])
        if len(got) == len(payloads):
            done.set()

    conn = Connection(conn_path, on_message)
    for i, payload in enumerate(payloads):  # one loop tick: they leave in one write
        conn.send([b'{"t":"x","i":%d}' % i, payload])
    await asyncio.wait_for(done.wait(), 10)
    return got, conn


def test_connection_and_listener_carry_small_and_large_messages(tmp_path: Path) -> None:
    path = tmp_path / "e.sock"
    echo = _Echo(path)
    payloads = [b"", b"a" * 10, bytes(range(256)) * 4096, b"z" * (9 << 20)]  # up to 9 MiB: many partial writes

    async def main() -> list[list[bytes]]:
        got, conn = await _round_trips(path, payloads)
        conn.close()
        return got

    try:
        got = asyncio.run(main())
        assert [m[1] for m in got] == payloads
        deadline = time.monotonic() + 5
        while echo.hung_up < 1 and time.monotonic() < deadline:  # the listener saw the front end go
            time.sleep(0.01)
        assert echo.hung_up == 1
    finally:
        echo.close()


def test_a_connection_waits_for_its_engine_and_reconnects_to_a_new_one(tmp_path: Path) -> None:
    """Messages sent before the engine is up leave once it is; after it dies, the next
    engine on the same path is reached without anyone telling the connection."""
    path = tmp_path / "e.sock"

    async def main() -> None:
        got: list[bytes] = []

        def on_message(frames: list) -> None:
            got.append(bytes(frames[1]))

        conn = Connection(path, on_message)
        conn.send([b'{"t":"x"}', b"early"])
        await asyncio.sleep(0.1)  # nobody listens yet
        first = await asyncio.to_thread(_Echo, path)
        await _until(lambda: got == [b"early"])
        await asyncio.to_thread(first.close)  # the engine dies: its socket closes
        second = await asyncio.to_thread(_Echo, path)
        try:
            await asyncio.sleep(0.05)
            conn.send([b'{"t":"x"}', b"later"])
            await _until(lambda: got == [b"early", b"later"])
        finally:
            conn.close()
            await asyncio.to_thread(second.close)

    asyncio.run(main())


def test_a_connection_lost_as_soon_as_it_is_made_connects_again(tmp_path: Path) -> None:
    """An engine that dies as it accepts: the connection breaks before the task that
    made it has ended. That task must go on connecting, since the loss it could not
    see starts no other (before the fix the front end stayed without an engine)."""
    path = tmp_path / "e.sock"
    echo = _Echo(path)

    class DroppedOnce(Connection):
        dropped = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if not self.dropped:  # lost before create_unix_connection has returned
                self.dropped = True
                transport.close()

    async def main() -> None:
        got: list[bytes] = []
        conn = DroppedOnce(path, lambda frames: got.append(bytes(frames[1])))
        try:
            await _until(lambda: conn.dropped)
            conn.send([b'{"t":"x"}', b"after"])
            await _until(lambda: got == [b"after"], timeout=5.0)
        finally:
            conn.close()

    try:
        asyncio.run(main())
    finally:
        echo.close()


def _echo_process(path: str) -> None:
    _Echo(Path(path)).thread.join()


def test_a_connection_to_an_engine_said_gone_is_dropped_and_not_made_again(tmp_path: Path) -> None:
    """A dead engine's child may hold both its connection and its listening socket open:
    the kernel then says nothing. ``gone(pid)`` drops the connection to that engine (the
    listener's pid, from SO_PEERCRED), refuses that listener while it stays, and what
    is sent meanwhile leaves on the next engine's connection."""
    import multiprocessing
    import os

    path = tmp_path / "e.sock"
    first = _Echo(path)  # this process: its pid is ours
    second = None

    async def main() -> None:
        nonlocal second
        got: list[bytes] = []
        conn = Connection(path, lambda frames: got.append(bytes(frames[1])))
        try:
            conn.send([b'{"t":"x"}', b"one"])
            await _until(lambda: got == [b"one"])
            conn.gone(os.getpid())
            await asyncio.sleep(0.05)
            conn.send([b'{"t":"x"}', b"two"])
            await asyncio.sleep(0.5)  # the gone engine's listener is still there: refused, every try
            assert got == [b"one"] and conn._transport is None
            await asyncio.to_thread(first.close)  # the next engine binds the path (another process)
            second = multiprocessing.get_context("spawn").Process(target=_echo_process, args=(str(path),), daemon=True)
            second.start()
            await _until(lambda: got == [b"one", b"two"], timeout=30.0)
            assert conn._peer_pid == second.pid
        finally:
            conn.close()

    try:
        asyncio.run(main())
    finally:
        first.close()
        if second is not None:
            second.terminate()
            second.join(5)


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_message_sent_now_is_on_the_socket_before_the_loop_runs_again(tmp_path: Path) -> None:
    """``send(now=True)`` (a lone job) writes at once; a plain ``send`` leaves at the end
    of the loop's tick, with whatever else the tick sends (one write)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "e.sock"))
    server.listen(1)

    async def main() -> tuple[bool, bool, bytes]:
        conn = Connection(tmp_path / "e.sock", lambda frames: None)
        await _until(lambda: conn._transport is not None)
        peer, _ = server.accept()
        try:
            # No await between the send and the look: only a write made by send itself is there.
            conn.send([b'{"t":"x"}', b"later"])
            queued = bool(select.select([peer], [], [], 0)[0])
            await _until(lambda: bool(select.select([peer], [], [], 0)[0]))  # the tick's end wrote it
            got = peer.recv(1 << 16)
            conn.send([b'{"t":"x"}', b"at-once"], now=True)
            at_once = bool(select.select([peer], [], [], 0)[0])
            got += peer.recv(1 << 16) if at_once else b""
            return queued, at_once, got
        finally:
            conn.close()
            peer.close()

    try:
        queued, at_once, got = asyncio.run(main())
    finally:
        server.close()
    assert not queued and at_once
    assert b"later" in got and b"at-once" in got


def test_a_listener_reports_a_front_end_that_hangs_up_mid_message(tmp_path: Path) -> None:
    listener = Listener(tmp_path / "e.sock")
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(tmp_path / "e.sock"))
        whole = _wire([[b"{}", b"x" * 1000]])
        client.sendall(whole[:-10])  # a message cut short
        client.close()
        events: list = []
        deadline = time.monotonic() + 5
        while not any(frames is None for _, frames in events) and time.monotonic() < deadline:
            events += listener.poll(0.05)
        assert [frames for _, frames in events] == [None]  # no half message, one hang-up
    finally:
        listener.close()


def test_a_listener_shut_down_under_it_is_lost(tmp_path: Path) -> None:
    """``shutdown`` through a duplicate: the same socket (no descriptor changed), refusing
    every front end, and ready at every poll (the idle engine spun a core)."""
    listener = Listener(tmp_path / "e.sock")
    try:
        assert listener.lost() is None
        socket.socket(fileno=os.dup(listener.sock.fileno())).close()  # a duplicate closed: nothing lost
        assert listener.lost() is None
        with socket.socket(fileno=os.dup(listener.sock.fileno())) as copy:
            copy.shutdown(socket.SHUT_RDWR)
        assert listener.lost() == "listening socket"
    finally:
        listener.close()


@pytest.mark.parametrize("closed", ["listening socket", "selector", "connection to a front end"])
def test_a_listener_tells_which_of_its_descriptors_were_closed_under_it(tmp_path: Path, closed: str) -> None:
    """A function in the engine closed one (``os.close`` of its number); another file
    may then take the number. The engine leaves on it (engine.process)."""
    listener = Listener(tmp_path / "e.sock")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmp_path / "e.sock"))
    while not listener.selector.get_map().keys() - {listener.sock.fileno()}:
        listener.poll(0.05)  # accepted
    assert listener.lost() is None
    fd = {"listening socket": listener.sock.fileno(), "selector": listener.selector.fileno(),
          "connection to a front end": max(listener.selector.get_map().keys())}[closed]
    os.close(fd)
    try:
        with open(tmp_path / "taken", "w") as taken:  # the number, taken by another file
            assert taken.fileno() == fd
            assert listener.lost() == closed
    finally:
        client.close()
        null = os.open(os.devnull, os.O_RDONLY)  # the number held again, for close() to close
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        listener.close()


# --------------------------------------------------------------------------- shared memory


class _SharedEcho(_Echo):
    """The echo loop with shared memory for large frames, as an engine has it."""

    def __init__(self, path: Path, shared_bytes: int) -> None:
        self.listener = Listener(path, shared_bytes)
        self.hung_up = 0
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def segments(self) -> list:
        """The segments of the front ends that have taken theirs."""
        return [key.data.sharing.own for key in list(self.listener.selector.get_map().values())
                if key.data is not None and key.data.sharing.taken]


def _big(seed: int, nbytes: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 255, nbytes, dtype=np.uint8).tobytes()


def _run_beside(echo: _Echo, main) -> None:
    """``main()`` on an event loop, with the echo engine closed after it whatever happens."""
    try:
        asyncio.run(main())
    finally:
        echo.close()


def _result_mappings() -> int:
    """This process's mappings of an engine's sealed results."""
    with open("/proc/self/maps") as f:
        return sum("memfd:jacobian-result" in line for line in f)


def test_large_frames_come_through_sealed_memfds_given_back_once_mapped(tmp_path: Path) -> None:
    """A frame of 4 MiB and more from an engine is read where the engine wrote it: a
    memfd of its own, sealed, mapped read-only here (smaller ones come on the socket);
    the engine's descriptor of it is
    given back (closed) as soon as it is mapped, while the frame is still held. The
    mapping goes when the last view does, here on another thread, as when a large JSON
    encoding drops the result."""
    path = tmp_path / "e.sock"
    echo = _SharedEcho(path, 16 << 20)
    payloads = [_big(1, 4 << 20), b"small" * 3000, _big(2, 70_000), _big(7, 5 << 20)]  # the 2nd, 3rd: on the socket

    async def main() -> None:
        got: list[list] = []
        conn = Connection(path, got.append)
        try:
            await _until(lambda: echo.segments())  # offered, opened, taken
            sealed = echo.segments()[0]
            before = _result_mappings()
            for i, payload in enumerate(payloads):
                conn.send([b'{"i":%d}' % i, payload])
            await _until(lambda: len(got) == 4)
            frames = [m[1] for m in got]
            assert [bytes(f) for f in frames] == payloads
            assert all(isinstance(f, memoryview) and f.readonly for f in (frames[0], frames[3]))
            assert [isinstance(getattr(f, "obj", f), np.ndarray) for f in frames] == [True, False, False, True]
            assert _result_mappings() == before + 2
            await _until(lambda: not sealed.used)  # given back while still held
            array = np.frombuffer(frames[0], np.uint8)  # a view of a view: the mapping stays
            got.clear()
            del frames
            assert _result_mappings() == before + 1 and bytes(array[:64]) == payloads[0][:64]
            await asyncio.to_thread(lambda box: box.clear(), [array])  # the last view goes on another thread
            del array
            assert _result_mappings() == before
        finally:
            conn.close()

    _run_beside(echo, main)


def test_an_engine_made_undumpable_by_a_function_is_dumpable_again_when_it_offers_a_result() -> None:
    """The front end opens a result through ``/proc/<engine>/fd``, which a process of the
    same user may open only while the engine is dumpable. A function that cleared the flag
    (``prctl(PR_SET_DUMPABLE, 0)``) made the next large answer, another caller's, a 503
    (the front end dropped the engine's connection) and struck that caller's function
    (seen with a server run as a non-root user; root opens it anyway). Offering a result
    makes the engine dumpable again."""
    from jacobian_service.channel import Sealed
    from jacobian_service.procfs import dumpable, set_dumpable

    sealed = Sealed()
    try:
        set_dumpable(False)
        assert not dumpable()
        fd = int.from_bytes(sealed.place(memoryview(_big(3, 4 << 20)))[:8], "little")
        assert dumpable()
        sealed.give_back(fd)
    finally:
        set_dumpable(True)
        sealed.close()


def test_an_engines_result_memfd_cannot_be_written_by_anyone(tmp_path: Path) -> None:
    """The engine's descriptor of a result, until the front end gives it back, is in the
    engine, where its functions run: opened again through ``/proc/self/fd`` read-write,
    it takes no write, no writable mapping, no change of size (sealed ``F_SEAL_WRITE``;
    the engine never mapped it, which the seal would have refused)."""
    import errno
    import mmap

    from jacobian_service.channel import Sealed

    sealed = Sealed()
    try:
        payload = _big(5, 4 << 20)
        place = sealed.place(memoryview(payload))
        fd, inode = int.from_bytes(place[:8], "little"), int.from_bytes(place[8:16], "little")
        assert list(sealed.used) == [fd] and os.fstat(fd).st_ino == inode
        with open("/proc/self/maps") as f:
            assert not [line for line in f if line.split()[4:5] == [str(inode)]]  # never mapped here
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            for attempt in (lambda: os.pwrite(rw, b"\xff" * 8, 0), lambda: mmap.mmap(rw, 4 << 20),
                            lambda: os.ftruncate(rw, 0), lambda: os.ftruncate(rw, 1 << 20)):
                with pytest.raises(PermissionError) as raised:
                    attempt()
                assert raised.value.errno == errno.EPERM
            assert os.pread(rw, 4 << 20, 0) == payload
        finally:
            os.close(rw)
        sealed.give_back(fd)
        assert not sealed.used
        with pytest.raises(OSError):  # closed
            os.fstat(fd)
    finally:
        sealed.close()


def test_a_result_memfd_replaced_before_the_front_end_opens_it_is_refused() -> None:
    """A function closes the engine's descriptor of a result not yet opened by the front
    end, and puts a memfd of its own (its own values, sealed as the engine's are) at that number: the front
    end finds another inode and refuses it (the connection breaks), never reading it."""
    import fcntl

    from jacobian_service.channel import _FROZEN, Sealed, SealedFrames

    sealed = Sealed()
    freed: list[int] = []
    try:
        reader = SealedFrames(sealed.path, lambda frames, fd: freed.append(fd))
        payload = _big(6, 4 << 20)
        place = sealed.place(memoryview(payload))
        fd = int.from_bytes(place[:8], "little")
        assert bytes(reader.frame(*reader.PLACE.unpack(place))) == payload and freed == [fd]
        sealed.give_back(fd)
        place = sealed.place(memoryview(payload))
        fd = int.from_bytes(place[:8], "little")
        forged = os.memfd_create("jacobian-result", os.MFD_ALLOW_SEALING)
        os.pwrite(forged, b"\xff" * len(payload), 0)
        fcntl.fcntl(forged, fcntl.F_ADD_SEALS, _FROZEN)  # sealed as the engine's are
        os.dup2(forged, fd)  # the number now the function's memfd
        os.close(forged)
        with pytest.raises(ConnectionError):
            reader.frame(*reader.PLACE.unpack(place))
        assert len(freed) == 1  # the forged one is not given back
        sealed.give_back(fd)  # not the engine's memfd any more: left open, not closed under its owner
        os.fstat(fd)
        os.close(fd)
    finally:
        sealed.close()


def test_a_full_segment_sends_on_the_socket(caplog: pytest.LogCaptureFixture) -> None:
    """A front end's segment (its large inputs) with no block free: None, the frame goes
    on the socket; said once, not per frame."""
    import logging

    from jacobian_service.channel import Segment

    caplog.set_level(logging.INFO, logger="jacobian_service.channel")
    segment = Segment(1 << 20)
    try:
        places = [segment.place(memoryview(_big(i, 600_000))) for i in range(4)]  # 1 MiB holds one of them
        assert [p is not None for p in places] == [True, False, False, False]
        assert caplog.text.count("is full") == 1
    finally:
        segment.close()


def test_results_of_an_engine_that_died_stay_readable(tmp_path: Path) -> None:
    """An engine crash while a response is still being written: the front end's mapping
    keeps the pages, and the next engine's results come as its own."""
    path = tmp_path / "e.sock"

    async def main() -> None:
        got: list[list] = []
        conn = Connection(path, got.append)
        first = await asyncio.to_thread(_SharedEcho, path, 8 << 20)
        payload = _big(3, 4 << 20)
        try:
            await _until(lambda: first.segments())
            conn.send([b"{}", payload])
            await _until(lambda: len(got) == 1)
        finally:
            await asyncio.to_thread(first.close)  # its descriptors close with it
        kept = got.pop()[1]
        assert bytes(kept) == payload
        second = await asyncio.to_thread(_SharedEcho, path, 8 << 20)
        try:
            await _until(lambda: second.segments())
            conn.send([b"{}", payload[::-1]])
            await _until(lambda: len(got) == 1)
            assert bytes(got[0][1]) == payload[::-1] and bytes(kept) == payload
            await _until(lambda: not second.segments()[0].used)
        finally:
            conn.close()
            await asyncio.to_thread(second.close)

    asyncio.run(main())


def test_a_front_end_that_cannot_map_the_segment_declines_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jacobian_service.channel as channel

    path = tmp_path / "e.sock"
    echo = _SharedEcho(path, 8 << 20)
    real_open = channel.os.open

    def refuse(p, *args, **kwargs):
        if str(p).startswith("/proc/"):
            raise PermissionError(13, "Permission denied")  # as where /proc hides other processes
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(channel.os, "open", refuse)
    payloads = [_big(4, 2 << 20)]

    async def main() -> None:
        await asyncio.sleep(0.1)
        got, conn = await _round_trips(path, payloads)
        assert [m[1] for m in got] == payloads
        assert echo.segments() == []  # declined: no segment in use
        conn.close()

    _run_beside(echo, main)


def test_segment_blocks_are_first_fit_and_merge_when_given_back() -> None:
    from jacobian_service.channel import Segment

    segment = Segment(10 * 4096)
    try:
        where = [segment.place(memoryview(bytes([i]) * (4096 * n))) for i, n in enumerate((2, 3, 1))]
        offsets = [int.from_bytes(w[:8], "little") for w in where]
        assert offsets == [0, 8192, 20480]
        assert segment.place(memoryview(bytes(5 * 4096))) is None  # 4 pages are left
        segment.give_back(8192)
        assert segment.place(memoryview(bytes(4096)))[:8] == (8192).to_bytes(8, "little")  # first fit: the hole
        segment.give_back(0)
        segment.give_back(8192)
        segment.give_back(20480)
        segment.give_back(12345)  # not a block: ignored
        assert segment.free == [(0, 10 * 4096)] and not segment.used
        assert bytes(segment.map[20480:20480 + 4096]) == bytes([2]) * 4096  # what was written
    finally:
        segment.close()


def test_large_inputs_go_through_the_front_ends_segment_and_come_back(tmp_path: Path) -> None:
    """The other way: the front end offers its own segment; a large input is read by the
    engine where the front end wrote it, and its block is the front end's again once
    the engine no longer holds it (here: once the echo has been written back)."""
    path = tmp_path / "e.sock"
    echo = _Echo(path)  # the engine offers no segment: the echo goes back on the socket
    payload = _big(5, 3 << 20)

    async def main() -> None:
        got: list[list] = []
        conn = Connection(path, got.append, shared_bytes=8 << 20)
        try:
            await _until(lambda: conn._sharing.taken)
            own = conn._sharing.own
            conn.send([b"{}", payload, b"tiny"])
            await _until(lambda: len(got) == 1)
            assert bytes(got[0][1]) == payload and got[0][2] == b"tiny"
            assert own.reserved == 3 << 20  # it went through the segment
            await _until(lambda: not own.used)  # given back
            assert own.free == [(0, 8 << 20)]
        finally:
            conn.close()

    _run_beside(echo, main)


def test_a_shared_frame_outside_any_segment_closes_that_connection_only(tmp_path: Path) -> None:
    """A peer that names a place in shared memory it was never given (a broken peer):
    its connection is dropped; the engine's loop and its other connections go on."""
    import struct

    from jacobian_service.channel import _PLACE, _SHARED

    listener = Listener(tmp_path / "e.sock")
    try:
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.connect(str(tmp_path / "e.sock"))
        good = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        good.connect(str(tmp_path / "e.sock"))
        bad.sendall(struct.pack("<IQ", 1, _SHARED | _PLACE.size) + _PLACE.pack(0, 1 << 20))
        good.sendall(_wire([[b"{}", b"fine"]]))
        events: list = []
        deadline = time.monotonic() + 5
        while len(events) < 2 and time.monotonic() < deadline:
            events += listener.poll(0.05)
        assert sorted((frames is None, bytes(frames[1]) if frames else None) for _, frames in events) == [
            (False, b"fine"), (True, None)]
        bad.close()
        good.close()
    finally:
        listener.close()


def test_blocks_given_back_ride_with_jobs_under_one_timer_and_go_alone_only_when_owed_long(tmp_path: Path) -> None:
    """Each small request's result frees a block of the engine's segment. Blocks ride with
    the next job; alone only once owed _GIVE_BACK_AFTER_S. The timer that sends them
    alone is left running when a job takes them (it was made and cancelled once per
    request): a stream of requests makes one timer per _GIVE_BACK_AFTER_S at most."""
    from jacobian_service import channel

    async def main() -> None:
        loop = asyncio.get_running_loop()
        conn = Connection(tmp_path / "nobody.sock", lambda frames: None)
        conn._closed = True  # (no engine: this test is the transport)
        conn._connecting.cancel()
        writes: list[tuple[float, bytes]] = []

        class Transport:
            def write(self, data: bytes) -> None:
                writes.append((loop.time(), bytes(data)))

            def writelines(self, pieces: list) -> None:
                self.write(b"".join(bytes(memoryview(p)) for p in pieces))

            def close(self) -> None:
                pass

        conn._transport = Transport()
        mapped = object()
        conn._sharing.mapped = mapped  # (the engine's segment, as mapped)
        timers: list[float] = []
        call_later = loop.call_later

        def counted(delay, callback, *args):
            if getattr(callback, "__self__", None) is conn:  # the connection's own (not the sleeps')
                timers.append(delay)
            return call_later(delay, callback, *args)

        loop.call_later = counted  # type: ignore[method-assign]
        try:
            began = loop.time()
            for i in range(20):  # back to back: each job takes the block the previous answer freed
                conn._give_back(mapped, 4096 * i)
                conn.send([b'{"job": %d}' % i])
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            took = loop.time() - began
            assert len(writes) == 20
            assert all(data.startswith(channel.encode_control(channel._GIVE_BACK, struct.pack("<Q", 4096 * i)))
                       for i, (_, data) in enumerate(writes))  # each block with the next job
            # one per _GIVE_BACK_AFTER_S at most, not one per request
            assert len(timers) <= 2 + took / channel._GIVE_BACK_AFTER_S and len(timers) < 20, (timers, took)
            writes.clear()
            freed = loop.time()
            conn._give_back(mapped, 1 << 20)  # no job follows: it goes alone, once owed long enough
            await asyncio.sleep(4 * channel._GIVE_BACK_AFTER_S)
            assert [data for _, data in writes] == [channel.encode_control(channel._GIVE_BACK, struct.pack("<Q", 1 << 20))]
            assert writes[0][0] - freed >= channel._GIVE_BACK_AFTER_S - 1e-3
            timers.clear()
            await asyncio.sleep(3 * channel._GIVE_BACK_AFTER_S)
            assert timers == [] and conn._give_back_at is None  # nothing owed: the timer stopped
        finally:
            loop.call_later = call_later  # type: ignore[method-assign]
            conn._transport = None
            conn.close()

    asyncio.run(main())


def test_a_mapped_block_is_freed_once_its_last_view_goes_and_not_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame in the other side's segment is a read-only view of its block; the block is
    freed (``freed(mapped, offset)``, once) when the last view of it goes: a numpy array
    over it, a slice, on the loop's thread or another; not while one lives. (A weak
    reference's callback, not weakref.finalize's object per frame.)"""
    import weakref

    from jacobian_service.channel import Mapped

    def no_finalize(*args, **kwargs):
        raise AssertionError("weakref.finalize made per frame")

    monkeypatch.setattr(weakref, "finalize", no_finalize)
    fd = os.memfd_create("mapped-test")
    os.ftruncate(fd, 1 << 16)
    freed: list[tuple[object, int]] = []
    os.pwrite(fd, np.arange(2, dtype=np.float32).tobytes(), 4096)  # the writer's: the mapping here is read-only
    mapped = Mapped(fd, 1 << 16, lambda m, offset: freed.append((m, offset)))
    view = mapped.frame(4096, 8)
    arr = np.frombuffer(view, np.float32)
    piece = view[4:]
    assert view.readonly and list(arr) == [0.0, 1.0]
    del view
    assert freed == []
    del arr
    assert freed == []
    worker = threading.Thread(target=lambda held=[piece]: held.clear())  # the last view, dropped on another thread
    del piece
    worker.start()
    worker.join()
    assert freed == [(mapped, 4096)]
    again = mapped.frame(4096, 8)  # the same block, given out again, is freed again
    del again
    assert freed == [(mapped, 4096), (mapped, 4096)] and not mapped._blocks


def test_a_leaving_engine_writes_out_what_it_owes_for_a_bounded_time(tmp_path: Path) -> None:
    """What a front end's socket had not taken when its engine left (``_leave``: an
    ``os._exit``) was lost with it, and the front end, taking the request for one never
    started, ran it again on the next engine. ``write_out`` writes it while the front
    end reads, and gives up after its timeout on one that does not (``Peer.out`` then
    says what was lost: engine.process names those requests)."""
    listener = Listener(tmp_path / "e.sock")
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(tmp_path / "e.sock"))
        deadline = time.monotonic() + 5
        while not listener._peers:
            assert time.monotonic() < deadline
            listener.poll(0.05)
        (peer,) = listener._peers.values()
        whole = _wire([[b"{}", b"x" * (32 << 20)]])
        listener.send(peer, [[b"{}", b"x" * (32 << 20)]])
        assert peer.out  # more than the socket takes at once
        began = time.monotonic()
        listener.write_out(0.2)  # nobody reads: given up
        assert peer.out and 0.2 <= time.monotonic() - began < 2
        got = bytearray()

        def read() -> None:
            while len(got) < len(whole) and (chunk := client.recv(1 << 20)):
                got.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        listener.write_out(10.0)
        reader.join(10)
        assert not peer.out and not peer.gone and bytes(got) == whole
        client.close()
    finally:
        listener.close()
