"""Prometheus collectors, one registry per app (never the process-global default).

Under ``serve`` several front-end processes answer on one port, and a scrape reaches
just one of them. ``serve`` therefore sets ``PROMETHEUS_MULTIPROC_DIR`` before it starts
them: every process writes its samples to files there (prometheus_client's multiprocess
mode) and ``/metrics`` sums them, so any front end tells the whole server's story.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import logging
import os
import struct
import threading
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio.to_thread

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, mmap_dict, values
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["Metrics", "process_id"]

log = logging.getLogger("jacobian_service")

_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def process_id() -> int:
    """``os.getpid()`` without its system call (glibc no longer caches it): kept, and
    renewed in a forked child."""
    return _pid[0]


_pack_sample = struct.Struct("dd").pack  # a sample as the library's files hold it: value, timestamp
_sample_lock = threading.Lock()


def _quick_values(library: Any) -> Any:
    """``library`` (prometheus_client's multiprocess value class) with an ``inc`` that
    writes the short way.

    A computing request writes 9 samples (its count, and each of the four latency
    histograms' bucket and sum): ~2 us each the library's way (its lock, its fork check
    through two calls, ``write_value``'s two dict look-ups, a helper's call) where the
    write itself, 16 bytes into the file's map, is ~0.15 us. Here each value learns its
    place in its file once, from the library's own attributes, checked by reading its
    sample back through the library; then an increment is the lock and that write. A
    value whose attributes are not where this release keeps them, or whose process
    forked (the library then starts new files), goes the library's way."""

    class QuickValue(library):  # type: ignore[misc, valid-type]
        _quick: tuple[int, Any, int] | None = None  # (pid, file, place of the sample) once learnt

        def inc(self, amount: float) -> None:
            QuickValue.inc_all([(self, amount)])

        @staticmethod
        def inc_all(pairs: list[tuple[Any, float]]) -> None:
            """``value.inc(amount)`` for each pair, under the lock once: a computing
            request's eight latency samples (each its lock and its call, the long way)."""
            pid = _pid[0]
            with _sample_lock:
                for value, amount in pairs:
                    quick = value._quick
                    if quick is None or quick[0] != pid:
                        library.inc(value, amount)
                        value._quick = _place(value)
                        continue
                    value._value = total = value._value + amount
                    value._timestamp = 0.0
                    at = quick[2]
                    quick[1]._m[at:at + 16] = _pack_sample(total, 0.0)

        def set(self, value: float, timestamp: float | None = None) -> None:
            with _sample_lock:  # (one lock for every write here: a set cannot interleave an inc)
                super().set(value, timestamp)

    return QuickValue


def _place(value: Any) -> tuple[int, Any, int] | None:
    """(pid, file, place) of ``value``'s sample in its file, where the library keeps
    them (0.19-0.26 do) and the sample read there is the value's; else None."""
    try:
        file = value._file
        at = file._positions[value._key]
        written = struct.unpack_from("dd", file._m, at)
        if written != file.read_value(value._key) or written[0] != value._value:
            return None
    except Exception:  # (AttributeError, KeyError, TypeError, struct.error: not this release's layout)
        return None
    return _pid[0], file, at


class _ReservingFile:
    """The file prometheus_client keeps a process's samples in, as its ``MmapedDict``
    uses it (``fileno``, ``truncate``, ``close``), its blocks reserved before they are
    written.

    The library makes that file, and grows it, with ``truncate`` (a hole) and writes it
    through a shared map: on a full file system the first write to a page of the hole is
    a SIGBUS. A function that filled the file system of its engine's temporary directory
    (where serve's run directory is) ended the front end at its next request (exit -7),
    and every front end started again the same way: the service down until the space
    came back. Here a growth is ``posix_fallocate`` (the blocks exist, or ENOSPC); where
    none can be had, the samples go on in memory (a memfd, said once in the log): this
    process's samples from then on are left out of ``/metrics``, and it serves."""

    def __init__(self, file: Any, in_memory: bool = False) -> None:
        self._file = file
        self.in_memory = in_memory
        # The library opens its file to append ("a+b"), and never writes it but through
        # its map. Where the file system has no fallocate (NFSv3, many FUSE file systems)
        # glibc's posix_fallocate writes a byte in each block instead, and refuses a file
        # open to append (EBADF): every process's samples went to memory, and /metrics
        # had none of them. The descriptor is made a plain read-write one.
        fd = file.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)

    def fileno(self) -> int:
        return self._file.fileno()

    def truncate(self, size: int) -> None:
        fd = self._file.fileno()
        if self.in_memory:
            os.ftruncate(fd, size)
            return
        try:
            # Only the growth: glibc's emulation reads and rewrites each block's first
            # byte, which for a block in use could undo a sample written meanwhile.
            start = os.fstat(fd).st_size
            if size > start:
                os.posix_fallocate(fd, start, size - start)
            return
        except OSError as exc:
            log.error("no room for this process's metrics file (%s): its samples are kept in memory from now on, "
                      "left out of /metrics", exc)
        memory = os.fdopen(os.memfd_create("metrics", os.MFD_CLOEXEC), "a+b")
        kept = os.pread(fd, os.fstat(fd).st_size, 0)
        os.pwrite(memory.fileno(), kept, 0)
        os.ftruncate(memory.fileno(), max(size, len(kept)))
        self._file.close()
        self._file, self.in_memory = memory, True

    def close(self) -> None:
        self._file.close()


class _ReservedDict(mmap_dict.MmapedDict):
    """``MmapedDict`` over a ``_ReservingFile``: its first pages reserved before the
    library maps and writes them, and each growth after."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if read_mode:
            super().__init__(filename, read_mode)
            return
        first = _ReservingFile(open(filename, "a+b"))
        try:
            if os.fstat(first.fileno()).st_size == 0:
                first.truncate(mmap_dict._INITIAL_MMAP_SIZE)
                if first.in_memory:  # an empty file, which every scrape would find unreadable
                    os.unlink(filename)
            super().__init__(f"/proc/self/fd/{first.fileno()}")  # the file, or the memory, reserved
        finally:
            first.close()
        self._f = _ReservingFile(self._f, first.in_memory)


# (the name MultiProcessValue's files are made by; only where the library is as this was
# written against: its first size and its file kept as ``_f``; otherwise its own class)
if hasattr(mmap_dict, "_INITIAL_MMAP_SIZE") and getattr(values, "MmapedDict", None) is mmap_dict.MmapedDict:
    values.MmapedDict = _ReservedDict

if getattr(values.ValueClass, "_multiprocess", False):
    # In multiprocess mode every sample written (several per request) first asks the
    # pid, to notice a fork: ~10 system calls per request in a front end. The same check
    # with the kept pid; increments written the short way. (Set before any metric
    # exists: a metric takes the class when it is made.)
    values.ValueClass = _quick_values(values.MultiProcessValue(process_identifier=process_id))

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self._scrape_lock = asyncio.Lock()  # (remade for each event loop that serves: see scrape)
        self._scrape_loop: Any = None
        self._renders_begun = 0
        self._last_render: tuple[int, bytes] = (0, b"")
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "jacobian_service_requests",
            "Requests answered, by function, endpoint, status and problem code (preflight: a CORS preflight; options: a plain OPTIONS; redirect: a path with a trailing slash sent to its route).",
            ["function", "endpoint", "status", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "jacobian_service_latency_seconds",
            "Time spent per request, split by phase (queue, compute, encode, total).",
            ["endpoint", "phase"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "jacobian_service_batch_size",
            "Requests stacked into one engine call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.queue_depth = Gauge(
            "jacobian_service_queue_depth", "Requests waiting on engines (summed over live front ends).",
            registry=r, multiprocess_mode="livesum",
        )
        self.streamed_bytes = Counter(
            "jacobian_service_streamed_bytes", "Bytes of .npy results streamed chunk by chunk.", registry=r
        )
        self.body_bytes = Gauge(
            "jacobian_service_body_bytes_in_flight",
            "Bytes of request bodies being received and parsed (JSON at its parse cost), held against "
            "body_budget_bytes (summed over live front ends).",
            registry=r, multiprocess_mode="livesum",
        )
        self.stream_bytes = Gauge(
            "jacobian_service_stream_bytes_held",
            "Bytes of large answers being sent (streamed Jacobians' two row chunks, gathered answers of 1 MiB "
            "or more) held against the stream budget, /v1/info's stream_budget_bytes (summed over live front ends).",
            registry=r, multiprocess_mode="livesum",
        )
        self.connection_timeouts = Counter(
            "jacobian_service_connection_timeouts",
            "Connections cut off by a timeout: slow headers, a stalled body, a client not reading.",
            ["phase"], registry=r,
        )
        for phase in ("header", "body", "send"):  # each series from the start, at 0, as the README lists them:
            self.connection_timeouts.labels(phase)  # a labelled counter is exported only once touched
        self.device_memory = Gauge(
            "jacobian_service_device_memory_bytes", "Memory allocated by torch on each device.", ["device"], registry=r,
            multiprocess_mode="mostrecent",
        )

        self.engine_restarts = Gauge(
            "jacobian_service_engine_restarts", "Engine process restarts since start, by device.", ["device"], registry=r,
            multiprocess_mode="mostrecent",
        )
        self.output_dropped = Gauge(
            "jacobian_service_engine_output_dropped_bytes",
            "Bytes engine processes wrote to stdout/stderr that serve's log did not take (over "
            "ENGINE_OUTPUT_BYTES_PER_S, or read slower), since start, by device.", ["device"], registry=r,
            multiprocess_mode="mostrecent",
        )
        self.quarantines = Gauge(
            "jacobian_service_quarantines", "Functions quarantined since start (crashing or hanging engines).", registry=r,
            multiprocess_mode="mostrecent",
        )

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: prometheus_client checks and converts the
        values on every call, microseconds on the per-request path. The label values are
        bounded (functions of the registry, endpoints, statuses, codes), so is this."""
        key = (id(metric), values)  # the metrics live as long as this object
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def observe(self, histogram: Any, amount: float, *values: str) -> None:
        """``histogram.labels(*values).observe(amount)``, the same samples written the
        short way (:meth:`observe_all`)."""
        self.observe_all(histogram, [(amount, values)])

    def observe_all(self, histogram: Any, observations: list[tuple[float, tuple[str, ...]]]) -> None:
        """``histogram.labels(*values).observe(amount)`` for each ``(amount, values)``,
        the same samples written the short way: the bucket found by bisection, not by
        prometheus_client's walk over the bounds (with its checks, per call), its value
        and the sum incremented as ``observe`` increments them, all under one lock
        (``inc_all``, where the values are this module's). Four per computing request
        (queue, compute, encode, total). A NaN, which no bucket takes, goes the long way."""
        pairs: list[tuple[Any, float]] = []
        for amount, labels in observations:
            child = self.child(histogram, *labels)
            try:
                bounds, buckets, total = child._upper_bounds, child._buckets, child._sum
            except AttributeError:
                bounds = None
            if bounds is None or amount != amount:
                child.observe(amount)
                continue
            pairs.append((total, amount))
            pairs.append((buckets[bisect_left(bounds, amount)], 1))
        inc_all = getattr(type(pairs[0][0]), "inc_all", None) if pairs else None
        if inc_all is not None:
            inc_all(pairs)
            return
        for value, amount in pairs:
            value.inc(amount)

    def update_engines(self, depth: int, stats: dict[str, Any]) -> None:
        self.queue_depth.set(depth)
        for device, count in stats["restarts"].items():
            self.engine_restarts.labels(device).set(count)
        self.quarantines.set(stats["quarantines"])
        for device, count in stats.get("output_dropped", {}).items():
            self.output_dropped.labels(device).set(count)
        for device, used in stats["memory"].items():
            self.device_memory.labels(device).set(used)

    async def scrape(self, update: Callable[[], None]) -> bytes:
        """``render()`` for a scrape of ``/metrics``: off the event loop, and shared. In
        the served layout a render reads and merges every process's file (tens of ms);
        it ran on the event loop, once per scrape, so 1,000 concurrent scrapes held the
        loop for a minute and a Jacobian requested meanwhile took 58 s instead of 0.1.
        Now one render runs at a time, in a thread, and the scrapes that arrive while it
        runs share the next one: each scrape still sees a render begun after it arrived
        (a client that reads /metrics after its response sees that response counted).
        ``update`` sets what is read from the front end's state, before each render."""
        loop = asyncio.get_running_loop()
        if self._scrape_loop is not loop:  # (tests serve one app from several loops in turn)
            self._scrape_lock, self._scrape_loop = asyncio.Lock(), loop
        need = self._renders_begun + 1  # a render that begins after this scrape arrived
        async with self._scrape_lock:
            if self._last_render[0] >= need:
                return self._last_render[1]
            self._renders_begun += 1
            index = self._renders_begun
            update()
            body = await anyio.to_thread.run_sync(self.render)
            self._last_render = (index, body)
            return body

    def render(self) -> bytes:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        _ReadableFiles(merged, path=folder)
        return generate_latest(merged)


class _ReadableFiles(MultiProcessCollector):
    """The multiprocess collector, over the files it can read. Every process of the
    server writes its samples to the folder, an engine's functions included: a function
    that wrote junk over the files (or put a file of its own there) made every scrape
    of ``/metrics`` a 500 ``internal_error``, with a traceback in the log, for as long
    as the server lived (the files outlive the engine). A file that does not read and
    merge alone is left out, and said once. (Values a function forges in a file that
    reads are beyond this: the engine's functions can write where the engine can.)"""

    _said: set[str] = set()

    def collect(self) -> Any:
        files = []
        for path in sorted(glob.glob(os.path.join(self._path, "*.db"))):
            try:
                for metric in self.merge([path], accumulate=True):
                    generate_latest(_One(metric))  # each sample as it would be written
            except FileNotFoundError:  # a dead front end's live gauges, removed just now
                continue
            except Exception as exc:  # anything a file's bytes may raise in the library
                if path not in self._said:
                    self._said.add(path)
                    log.error("metrics: %s does not read (%s: %s); left out of /metrics (a function in an engine "
                              "may have written over it)", os.path.basename(path), type(exc).__name__, exc)
                continue
            files.append(path)
        return self.merge(files, accumulate=True)


class _One:
    """A registry of one metric, for ``generate_latest``."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric

    def collect(self) -> Any:
        return [self.metric]
