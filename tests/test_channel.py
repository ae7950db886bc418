"""The front end <-> engine channel (``channel``): framing over a byte stream, and the
engine's listener with the front end's connection over a real Unix socket."""

from __future__ import annotations

import asyncio
import random
import socket
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
            for peer, frames in self.listener.poll(0.02):
                if frames is None:
                    self.hung_up += 1
                else:
                    self.listener.send(peer, [frames])
        self.listener.close()

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


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


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
