"""What engine processes write to their standard output and error, relayed into
``serve``'s own, line by line, under a byte budget per process.

An engine's descriptors 1 and 2 were ``serve``'s: whatever a function wrote there
landed whole in serve's log (a function's 64 MB ``os.write(1, ...)`` grew it by 64 MB;
a loop of them fills a disk or a log pipeline). Now each engine and spare writes into
pipes of its own, which one thread here reads at once, whatever it then does with the
bytes, so a function never waits on serve's log:

- a line passes whole while its engine's budget (a token bucket: ``bytes_per_s``,
  holding at most ``burst_bytes``, full when the engine's first process starts) has
  room for it, and is dropped otherwise; a line longer than ``max_line`` is cut there,
  marked, the rest dropped. The bucket is the engine's (its index), not a process's:
  the spare that takes a dead engine's place, and every process after it, draws on
  what the dead one left. With a bucket per process, a function that printed its
  16 seconds' worth and crashed its engine had a full one again in the promoted spare
  at once: it printed its way through each restart;
- lines wait for a second thread, the only one that writes to serve's descriptors, in
  a queue of at most ``queue_bytes``: a slow reader of serve's log (a terminal, a
  collector) costs the lines it has no room for, never an engine blocked in a write;
- what was dropped is counted per engine (``dropped``: the ``/metrics`` gauge
  ``jacobian_service_engine_output_dropped_bytes``), and said in serve's log at most
  once a second per process, when it ends, or when the relay stops.

The engine's own log lines come through a pipe of their own, under a budget of their
own (``logs.FdStream``): a function that floods its stdout and stderr, or leaves a line
there unended (which took the engine's next line into it), costs them nothing.

Every line relayed is marked as the process's (``log_format``): a function writes what
it likes on its stdout, stderr and its engine's log pipe (descriptor 3, in
/proc/self/fd), and a line there that read as an access line or the supervisor's ("POST
/v1/functions/sin/jacobian 200", "engine 0 died: sin hung") passed whole, as serve's own.
In the text log each line begins with its process and stream ("engine 0 (pid 7)
stdout: "), its control characters escaped (a carriage return or an ESC sequence
rewrote the mark on a terminal); in the JSON log each is an object of its own, the
process's JSON lines given its fields (``engine``, ``pid``, ``stream``).
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import re
import selectors
import threading
import time
from dataclasses import dataclass, field

import orjson

__all__ = ["OutputRelay"]

log = logging.getLogger("jacobian_service.supervisor")

_READ_BYTES = 1 << 20
_PIPE_BYTES = 1 << 20  # a pipe as large as an unprivileged process may ask (fs.pipe-max-size's default)
_SAY_EVERY_S = 1.0
# Control characters but tab, as the text log's formatter escapes them (``logs._CONTROLS``).
_CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass
class _Budget:
    """A token bucket: bytes that may pass now, as of ``refilled``."""
    tokens: float
    refilled: float


@dataclass
class _Process:
    """One engine or spare: the budget it draws on, what it lost, its label in serve's log."""
    key: int  # the engine index it serves (what ``dropped`` counts by)
    label: str
    budget: _Budget  # its engine's (shared with the processes before and after it)
    pid: int | None = None
    dropped: int = 0  # bytes, since it was last said
    said: float = 0.0
    open: int = 0  # its pipes not yet at their end


@dataclass
class _Pipe:
    process: _Process
    stream: int  # 1 or 2: where its lines go
    name: str = ""  # "stdout", "stderr", "log": what its lines are marked with
    partial: bytearray = field(default_factory=bytearray)
    cutting: bool = False  # the line being read was cut: the rest of it is dropped


class OutputRelay:
    def __init__(self, bytes_per_s: int, burst_bytes: int | None = None, *, out: int = 1, err: int = 2,
                 max_line: int = 16 << 10, queue_bytes: int = 1 << 20, log_format: str | None = None) -> None:
        """``log_format``: "text" or "json", serve's, which each line relayed is marked
        in; None, lines as written (the budget's own tests)."""
        self.log_format = log_format
        self.bytes_per_s = bytes_per_s
        self.burst_bytes = burst_bytes if burst_bytes is not None else 16 * bytes_per_s
        self.max_line = min(max_line, self.burst_bytes)  # a line that fits nowhere would never pass
        self.queue_bytes = queue_bytes
        self._targets = {1: out, 2: err}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Condition()
        self._new: list[tuple[int, _Pipe]] = []  # added by other threads, registered by the reader
        self._queue: collections.deque[tuple[int, bytes | str]] = collections.deque()  # (stream, line) or (0, notice)
        self._queued = 0  # bytes in the queue
        self._writing = False  # the writer holds lines taken off the queue
        self._pipes = 0  # pipes registered and not at their end
        self._dropped: dict[int, int] = collections.defaultdict(int)  # engine index -> bytes, ever
        self._budgets: dict[tuple[int, str], _Budget] = {}  # (engine index, which budget) -> its bucket
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- interface

    def start(self) -> None:
        """Both threads, started before any engine: the engines' seccomp filter names
        the threads serve has when each starts (``confinement``)."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._read_loop, name="output-relay-read", daemon=True),
                             threading.Thread(target=self._write_loop, name="output-relay-write", daemon=True)]
            for thread in self._threads:
                thread.start()

    def pipe(self) -> tuple[int, int]:
        """(read end, write end) of a pipe for a process about to start, to ``watch`` once
        it has its write end (closed here then)."""
        read, write = os.pipe2(os.O_CLOEXEC)
        try:  # room for a burst while the reader is not scheduled
            fcntl.fcntl(read, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        except OSError:  # above fs.pipe-max-size: the default (64 KiB) serves
            pass
        return read, write

    def watch(self, key: int, label: str, reads: list[tuple[int, int]], budget: str = "output", *,
              pid: int | None = None, own_log: bool = False) -> None:
        """Relay a started process's pipes (``pipe``'s read ends, owned from now on, each
        with the stream, 1 or 2, its lines go to) under engine ``key``'s budget named
        ``budget`` (full the first time it is named; what the engine's earlier processes
        left of it after that), counting what is dropped against that engine. Its lines
        are marked with ``label`` (and ``pid``) and the stream they came on: stdout,
        stderr, or ``own_log``, the engine's own log pipe."""
        now = time.monotonic()
        with self._lock:
            bucket = self._budgets.setdefault((key, budget), _Budget(float(self.burst_bytes), now))
        process = _Process(key, label, bucket, pid=pid, open=len(reads))
        with self._lock:
            self._new += [(fd, _Pipe(process, stream, "log" if own_log else ("stdout", "stderr")[stream == 2]))
                          for fd, stream in reads]
            self._pipes += len(reads)
        self._wake()

    def dropped(self) -> dict[int, int]:
        """Bytes of output dropped so far, by engine index."""
        with self._lock:
            return dict(self._dropped)

    def flush(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) for every pipe to end (the processes gone, with what
        they started) and for the lines read to be written: whether they were."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (self._pipes or self._new or self._queue or self._writing) and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))
            return True

    def stop(self, timeout: float = 2.0) -> None:
        """What is left in the pipes (``timeout`` at most), then the threads."""
        self.flush(timeout)
        self._stop.set()
        self._wake()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        if any(t.is_alive() for t in self._threads):  # the writer blocked on serve's log: leave it be
            return
        for key in list(self._selector.get_map()):
            os.close(key)
        self._selector.close()
        os.close(self._wake_w)
        while self._new:
            os.close(self._new.pop()[0])

    # ----------------------------------------------------------------- reading

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full: it will wake; closed: stopped
            pass

    def _read_loop(self) -> None:
        buffer = bytearray(_READ_BYTES)
        while not self._stop.is_set():
            with self._lock:
                new, self._new = self._new, []
            for fd, pipe in new:
                self._selector.register(fd, selectors.EVENT_READ, pipe)
            for key, _ in self._selector.select(_SAY_EVERY_S):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    n = os.readv(key.fd, [buffer])
                except OSError:
                    n = 0
                if n:
                    self._take(key.data, memoryview(buffer)[:n])
                else:
                    self._ended(key.fd, key.data)
            self._say_dropped(time.monotonic(), None)

    def _ended(self, fd: int, pipe: _Pipe) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        if pipe.partial:  # its last line, without its newline
            self._line(pipe, bytes(pipe.partial) + b"\n")
            pipe.partial.clear()
        pipe.process.open -= 1
        if not pipe.process.open:
            self._say_dropped(time.monotonic(), pipe.process)
        with self._lock:
            self._pipes -= 1
            self._lock.notify_all()

    def _take(self, pipe: _Pipe, data: memoryview) -> None:
        """Split what was read into lines, each relayed or dropped whole."""
        start, end = 0, len(data)
        find = data.obj.find  # type: ignore[union-attr]  # (the read buffer: data is its head)
        while start < end:
            newline = find(b"\n", start, end)
            stop = end if newline < 0 else newline + 1
            passed = True
            if pipe.cutting:  # the rest of a line already cut
                self._drop(pipe.process, stop - start)
                pipe.cutting = newline < 0
            elif len(pipe.partial) + (stop - start) > self.max_line:  # too long a line: its head, marked
                head = self.max_line - len(pipe.partial)
                passed = self._line(pipe, bytes(pipe.partial) + bytes(data[start:start + head]) + b" [line cut]\n")
                self._drop(pipe.process, stop - start - head)
                pipe.partial.clear()
                pipe.cutting = newline < 0
            elif newline < 0:
                pipe.partial += data[start:stop]
            else:
                passed = self._line(pipe, bytes(pipe.partial) + bytes(data[start:stop]))
                pipe.partial.clear()
            if not passed and not pipe.cutting and stop < end:
                # Out of budget (or of room): the rest of this read is dropped at once, up
                # to its last line's start. A flood costs a search here, not a loop per
                # line (a 64 MB write of short lines); the budget refills by the next read.
                last = data.obj.rfind(b"\n", stop, end)  # type: ignore[union-attr]
                if last >= 0:
                    self._drop(pipe.process, last + 1 - stop)
                    stop = last + 1
            start = stop

    def _line(self, pipe: _Pipe, line: bytes) -> bool:
        """Queue one whole line for serve's log if its engine's budget and the queue have
        room for it; else count it dropped. Whether it was queued. (The budgets are read
        and spent by this thread alone: the reader's.)"""
        process = pipe.process
        budget = process.budget
        n = len(line)
        now = time.monotonic()
        budget.tokens = min(float(self.burst_bytes), budget.tokens + (now - budget.refilled) * self.bytes_per_s)
        budget.refilled = now
        queued = False
        if n <= budget.tokens:
            line = self._mark(pipe, line)  # (the budget counts what the process wrote)
            with self._lock:
                if self._queued + len(line) <= self.queue_bytes:  # else serve's log is read slower than this
                    self._queue.append((pipe.stream, line))
                    self._queued += len(line)
                    self._lock.notify_all()
                    queued = True
        if queued:
            budget.tokens -= n
        else:
            self._drop(process, n)
        return queued

    def _mark(self, pipe: _Pipe, line: bytes) -> bytes:
        """``line`` (its newline at its end) as serve's log says it: marked as its
        process's, never one that passes for serve's own (the module's docstring)."""
        if self.log_format is None:
            return line
        process = pipe.process
        body = line[:-1] if line.endswith(b"\n") else line
        if self.log_format == "json":
            fields = {"engine": process.key, "pid": process.pid, "stream": pipe.name}
            doc = None
            if pipe.name == "log":  # the engine's own records: kept, given its fields
                try:
                    doc = orjson.loads(body)
                except orjson.JSONDecodeError:
                    pass
            if not isinstance(doc, dict):
                now = time.time()
                doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
                       "level": "info", "logger": "engine output",
                       "message": body.decode("utf-8", "backslashreplace")}
            return orjson.dumps({**doc, **fields}) + b"\n"
        where = process.label if pipe.name == "log" else f"{process.label} {pipe.name}"
        return where.encode() + b": " + _CONTROLS.sub(lambda m: b"\\x%02x" % m[0][0], body) + b"\n"

    def _drop(self, process: _Process, n: int) -> None:
        if n <= 0:
            return
        process.dropped += n
        with self._lock:
            self._dropped[process.key] += n

    def _say_dropped(self, now: float, ended: _Process | None) -> None:
        """A notice for each process that dropped output and was not said to within a
        second (``ended``: that one, now)."""
        processes = [ended] if ended is not None else {id(k.data.process): k.data.process
                                                       for k in self._selector.get_map().values()
                                                       if k.data is not None}.values()
        for process in processes:
            if process.dropped and (process is ended or now - process.said >= _SAY_EVERY_S):
                notice = (f"{process.label}: {process.dropped} bytes of its standard output and error dropped "
                          f"(over ENGINE_OUTPUT_BYTES_PER_S, {self.bytes_per_s} a second, or serve's log read slower)")
                process.dropped, process.said = 0, now
                with self._lock:
                    self._queue.append((0, notice))  # a notice is never dropped: at most one a second a process
                    self._lock.notify_all()

    # ----------------------------------------------------------------- writing

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop.is_set():
                    self._lock.wait()
                if not self._queue:
                    return
                items = list(self._queue)
                self._queue.clear()
                self._writing = True
            try:
                self._write(items)
            finally:
                with self._lock:
                    self._queued -= sum(len(line) for stream, line in items if stream)
                    self._writing = False
                    self._lock.notify_all()

    def _write(self, items: list[tuple[int, bytes | str]]) -> None:
        run: list[bytes] = []
        stream = 0
        for where, line in items + [(0, "")]:
            if where != stream and run:
                self._write_all(self._targets[stream], b"".join(run))
                run = []
            stream = where
            if where:
                run.append(line)  # type: ignore[arg-type]
            elif line:
                log.warning("%s", line)

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except InterruptedError:
                continue
            except OSError:  # serve's output closed: nowhere to put it
                return
