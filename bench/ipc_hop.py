"""One front end <-> engine round trip: ZeroMQ (as v1 of the process layout had it)
against the Unix-socket channel the service uses now (``jacobian_service.channel``).

The same message both ways (a 300-byte JSON header and one 512-byte array frame, a
small Jacobian call's size), one at a time from a client blocked on the reply, against
an echo loop in another process written the way each engine loop is written: ZeroMQ's
DEALER -> ROUTER over ``ipc://`` with a ``Poller``, and ``channel.Listener``. Medians of
``--calls`` round trips after a warm-up; the two are interleaved round by round.

    python -m bench.ipc_hop [--rounds 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import tempfile
import time
from pathlib import Path

_HEADER = b'{"t":"job","id":1,' + b'"pad":"' + b"x" * 270 + b'"}'
_FRAME = bytes(512)


def _zmq_echo(address: str) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(address)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        while poller.poll(100):
            frames = sock.recv_multipart(copy=False)
            if frames[1].bytes == b"stop":
                return
            sock.send_multipart(frames, copy=False)


def _channel_echo(path: str) -> None:
    from jacobian_service.channel import Listener

    listener = Listener(Path(path))
    while True:
        for peer, frames in listener.poll(0.1):
            if frames is None:
                return
            listener.send(peer, [frames])


def _zmq_round_trips(address: str, calls: int) -> list[float]:
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(address)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        sock.send_multipart([_HEADER, _FRAME], copy=False)
        sock.recv_multipart(copy=False)
        times.append(time.perf_counter() - t)
    sock.send_multipart([b"stop"])
    sock.close(linger=1000)
    return times


def _channel_round_trips(path: str, calls: int) -> list[float]:
    from jacobian_service.channel import FrameReader, encode_messages

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(200):
        try:
            sock.connect(path)
            break
        except OSError:
            time.sleep(0.01)
    reader = FrameReader()
    times = []
    wire = b"".join(encode_messages([[_HEADER, _FRAME]])[0])
    for _ in range(calls):
        t = time.perf_counter()
        sock.sendall(wire)
        while not reader.messages:
            reader.updated(sock.recv_into(reader.buffer()))
        reader.take()
        times.append(time.perf_counter() - t)
    sock.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    medians: dict[str, list[float]] = {"zeromq": [], "channel": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, echo, client, where in (
                ("zeromq", _zmq_echo, _zmq_round_trips, f"ipc://{tmp}/z{r}.sock"),
                ("channel", _channel_echo, _channel_round_trips, f"{tmp}/c{r}.sock"),
            ):
                proc = ctx.Process(target=echo, args=(where,))
                proc.start()
                time.sleep(0.5)
                times = client(where, args.calls)
                proc.join(10)
                medians[name].append(statistics.median(times[len(times) // 5:]) * 1e6)
    z, c = statistics.median(medians["zeromq"]), statistics.median(medians["channel"])
    print(f"# front end <-> engine round trip, {args.rounds} rounds x {args.calls} calls, medians")
    print(f"zeromq DEALER/ROUTER ipc://: {z:.0f} us  (rounds: {', '.join(f'{m:.0f}' for m in medians['zeromq'])})")
    print(f"channel (Unix socket):       {c:.0f} us  (rounds: {', '.join(f'{m:.0f}' for m in medians['channel'])})")
    print(f"zeromq / channel: {z / c:.1f}x")


if __name__ == "__main__":
    main()
