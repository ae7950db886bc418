"""The messages between front ends, engines and the supervisor: one codec, no torch.

A message is a list of frames: one JSON header (orjson), then one raw frame per array,
in the order the header's skeletons name them. Between a front end and an engine it
travels on a Unix socket (``channel``); the supervisor's events and the front ends'
control messages are ZeroMQ multiparts. Arrays are never pickled or copied into the
header: a frame is the array's own buffer on send and becomes a read-only numpy view of
the received frame on the other side.

Trees (aux, nested results, vectors) travel as tagged skeletons, so tuples stay tuples,
dict keys stay strings of any spelling, and non-finite floats survive JSON:

    ["a", index, dtype, shape]   an array, the index-th frame
    ["t", [...]] / ["l", [...]]  a tuple / a list
    ["d", {key: ...}]            a dict
    ["f", "nan" | "inf" | "-inf"] a non-finite float
    ["s", fmt, shape, {name: array}] a sparse matrix (scipy CSR, CSC or COO): its index and
                                 value arrays as frames; scipy is imported only to read one
    ["v", value]                 any other JSON value
"""

from __future__ import annotations

import errno
import math
import struct
import mmap
import os
import select
import stat
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import orjson

from jacobian_client.wire import SPARSE_FIELDS

from .errors import ServiceError
from .registry import FunctionSpec
from .scheduler import StreamHead
from .types import Call, JobInfo, Result, is_sparse_matrix

__all__ = [
    "EXIT_LEAVING",
    "ISOLATE_ENV",
    "LOG_FD_ENV",
    "NO_WARMUPS_ENV",
    "SKIP_WARMUP_ENV",
    "SPARE_WARM",
    "StatusBoard",
    "as_left",
    "budget_path",
    "clear_notes",
    "decode_call",
    "decode_reply",
    "encode_call",
    "encode_cancel",
    "encode_error",
    "encode_reply",
    "engine_path",
    "events_address",
    "heard",
    "names_env",
    "names_from_env",
    "parse",
    "read_run_file",
    "recycle_reason",
    "say_warm",
    "say_warming",
    "warming_path",
]


def engine_path(run_dir: Path, index: int) -> Path:
    """The Unix socket of engine ``index`` (``channel``)."""
    return run_dir / f"engine-{index}.sock"


# Function names the supervisor hands a new engine process, in its environment: those
# to run alone (they crashed inside a batch) and those whose warm-up to skip (it hung).
ISOLATE_ENV = "JACOBIAN_SERVICE_ISOLATE"
SKIP_WARMUP_ENV = "JACOBIAN_SERVICE_SKIP_WARMUP"
# "1": the new engine skips every warm-up (one ended or hung an engine with no note left
# to name the function: ``Supervisor._warm_ups_off``).
NO_WARMUPS_ENV = "JACOBIAN_SERVICE_NO_WARMUPS"
# The descriptor an engine writes its own log lines to (a pipe to serve: output_relay).
LOG_FD_ENV = "JACOBIAN_SERVICE_ENGINE_LOG_FD"
# The exit status of an engine that leaves on its own (``EngineProcess._leave``; EX_TEMPFAIL),
# its board saying why. A board's leave under any other death was written by a function.
EXIT_LEAVING = 75


def names_env(names: set[str]) -> str:
    return ",".join(sorted(names))


def names_from_env(variable: str) -> list[str]:
    return [n for n in os.environ.get(variable, "").split(",") if n]


def budget_path(run_dir: Path, index: int) -> Path:
    """The memory budget engine ``index`` computes in (bytes, as text): written as it starts
    serving, read by /v1/info (a GPU's is half its free memory, known only there)."""
    return run_dir / f"engine-{index}.budget"


def read_run_file(path: Path, most: int = 4096) -> bytes:
    """The first ``most`` bytes of a file of the run directory that ``serve`` or a front
    end reads by name (a warm-up note, a memory budget, the registry), where it is a
    regular file; else OSError. The directory is the functions' to write, and a FIFO a
    function put there (``os.mkfifo``) had ``open`` wait for a writer for ever: the
    supervisor's thread at a warm-up's note (no engine watched or replaced again, the
    server never ready), a front end's event loop at ``/v1/info`` (every client of it),
    serve's start at the registry. Opened without waiting, read only as a regular file,
    and no more of it than such a file holds."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.pread(fd, min(most, found.st_size), 0)  # (written whole, then renamed into place)
    finally:
        os.close(fd)


def warming_path(run_dir: Path, pid: int) -> Path:
    """``<monotonic time> <function>``: what engine process ``pid`` is warming up, since
    when (written by the engine, read by the supervisor; gone once warm)."""
    return run_dir / f"warming-{pid}"


SPARE_WARM = b"warm\n"  # what a spare writes on its stdin, a socket (``say_warm``)


def say_warming(function: str) -> None:
    """A spare's note that it warms ``function`` up from now, on its stdin (as
    ``say_warm``): the supervisor reads a spare's notes there, not in the run directory,
    where a running function wrote one under the pid of the spare still warming up
    (``0 victim``) and had it killed as hung in that warm-up, which later engines then
    skipped."""
    os.write(0, b"w " + function.encode("utf-8", "replace") + b"\n")


def say_warm() -> None:
    """A spare's word that it is warm, on its stdin: a socket whose other end only the
    supervisor holds (``fork_server.spare_stdin``). It was a flag file in the run
    directory, which the functions write: one made by a running function for the spare
    still warming up had it counted warm (a 503's Retry-After said it would serve at
    once; ``/v1/info`` said a spare was ready)."""
    os.write(0, SPARE_WARM)


# What the supervisor reads of a spare's stdin at one look: a spare's word is a few short
# lines; the functions its warm-up runs hold its end too, and one writing without end kept
# the supervisor's loop reading, every engine unwatched, its memory growing.
HEARD_AT_MOST = 64 << 10


def heard(stdin: Any) -> bytes:
    """What the spare whose stdin (the supervisor's end) is ``stdin`` has said since last
    asked (``say_warming``, ``say_warm``), never blocking: read after its death too. At
    most ``HEARD_AT_MOST`` bytes a call."""
    got = b""
    try:
        fd = stdin.fileno()
        while len(got) < HEARD_AT_MOST and select.select([fd], [], [], 0)[0] and (more := os.read(fd, 4096)):
            got += more
    except (OSError, ValueError):  # closed
        pass
    return got


def clear_notes(run_dir: Path, pid: int) -> None:
    """Take away what says anything of process ``pid`` in the run directory (its warm-up
    note), as the supervisor starts it: the run directory is the
    functions' to write, and notes a function left for the pids after its engine's (the
    next engines', allocated in turn) had each of them killed before it was ready, as
    hung in another function's warm-up, which was struck for it."""
    try:
        warming_path(run_dir, pid).unlink(missing_ok=True)
    except OSError:  # not a file (a directory planted there reads as no note), or the directory refused
        pass


def events_address(run_dir: Path) -> str:
    return f"ipc://{run_dir}/events.sock"


# --------------------------------------------------------------------------- trees


# Arrays up to this size travel as a copy (``tobytes``: ~0.1 us for a page), not as a
# view of their buffer (numpy's buffer export, a reshape and a cast: ~2-3 us): a small
# request's inputs and a small result's arrays, the common case, are that small.
_COPY_BYTES = 4096


def pack(tree: Any, frames: list[Any]) -> Any:
    if tree is None:  # no vectors, no aux, no output: most messages, at once
        return _NONE
    if isinstance(tree, np.ndarray):
        if tree.nbytes <= _COPY_BYTES:
            frames.append(tree.tobytes())  # C order, whatever the array's layout
            return ["a", len(frames) - 1, tree.dtype.str, list(tree.shape)]
        arr = tree if tree.flags.c_contiguous else np.ascontiguousarray(tree)
        frames.append(memoryview(arr.reshape(-1)).cast("B"))
        return ["a", len(frames) - 1, arr.dtype.str, list(arr.shape)]
    if isinstance(tree, list):
        return ["l", [pack(t, frames) for t in tree]]
    if isinstance(tree, tuple):
        return ["t", [pack(t, frames) for t in tree]]
    if isinstance(tree, np.generic):
        return pack(np.asarray(tree), frames)
    if is_sparse_matrix(tree):
        names = (*SPARSE_FIELDS[tree.format], "data")
        return ["s", tree.format, [int(d) for d in tree.shape], {n: pack(np.asarray(getattr(tree, n)), frames) for n in names}]
    if isinstance(tree, dict):
        # str.__str__, not str(): a key may be a str subclass whose own __str__ is the
        # user's code (it raised SystemExit, and the engine exited).
        return ["d", {str.__str__(k) if isinstance(k, str) else str(k): pack(v, frames) for k, v in tree.items()}]
    if isinstance(tree, float) and not math.isfinite(tree):
        return ["f", repr(tree)]
    return ["v", tree]


_NONE = ("v", None)  # what None packs to (orjson writes a tuple as a list: ["v",null])


def unpack(node: Any, frames: Sequence[Any]) -> Any:
    tag, body = node[0], node[1]
    if tag == "a":
        return np.frombuffer(frames[body], dtype=np.dtype(node[2])).reshape(node[3])
    if tag == "t":
        return tuple(unpack(n, frames) for n in body)
    if tag == "l":
        return [unpack(n, frames) for n in body]
    if tag == "d":
        return {k: unpack(v, frames) for k, v in body.items()}
    if tag == "f":
        return float(body)
    if tag == "s":
        import scipy.sparse as sp  # only a front end that receives a sparse result needs it

        arrays = {k: unpack(v, frames) for k, v in node[3].items()}
        shape = tuple(node[2])
        if body in ("csr", "csc"):
            make = sp.csr_array if body == "csr" else sp.csc_array
            return make((arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape)
        return sp.coo_array((arrays["data"], (arrays["row"], arrays["col"])), shape=shape)
    return body


def _header(frames: Sequence[Any]) -> dict[str, Any]:
    return orjson.loads(frames[0])


# --------------------------------------------------------------------------- calls


def encode_call(
    msg_id: int, kind: str, call: Call | None, *, tag: str = "", stream_id: int | None = None, deadline: float | None = None
) -> list[Any]:
    frames: list[Any] = []
    if call is None:
        header: dict[str, Any] = {"t": "job", "id": msg_id, "kind": kind, "tag": tag, "sid": stream_id,
                                  "deadline": deadline}
    else:
        # One dict written out (a job per request): the call's own deadline, as the
        # engine reads it (None for none: JSON has no infinity).
        header = {
            "t": "job", "id": msg_id, "kind": kind, "tag": tag, "sid": stream_id,
            "fn": call.spec.name,
            "args": pack(list(call.args), frames),
            "dtypes": call.dtypes,
            "argnums": list(call.argnums),
            "as_tuple": call.as_tuple,
            "positions": None if call.positions is None else list(call.positions),
            "rows": list(call.rows) if call.rows is not None else None,
            "in_dims": None if call.in_dims is None else list(call.in_dims),
            "vectors": pack(call.vectors, frames),
            "cotangents": pack(call.cotangents, frames),
            "chunk_size": call.chunk_size,
            "batched": call.batched,
            "mode": call.mode,
            "return_output": call.return_output,
            "batched_vectors": call.batched_vectors,
            "max_result_bytes": call.max_result_bytes,
            "sparsity": call.sparsity,
            "sparse_format": call.sparse_format,
            "out_dims": call.out_dims,
            "stream_room": call.stream_room,
            "answer_room": call.answer_room,
            "client": call.client,
            "deadline": call.deadline if math.isfinite(call.deadline) else None,
        }
    return [orjson.dumps(header), *frames]


def decode_call(header: dict[str, Any], frames: Sequence[Any], spec: FunctionSpec) -> Call:
    rows = header["rows"]
    # Each field by name (tests/test_front_end_paths.py checks that every one travels):
    # a dict of them built and merged into the keywords cost ~1/3 of this, per request.
    return Call(
        spec=spec,
        args=unpack(header["args"], frames),
        dtypes=list(header["dtypes"]),
        argnums=tuple(header["argnums"]),
        as_tuple=header["as_tuple"],
        positions=None if header.get("positions") is None else tuple(header["positions"]),
        rows=(rows[0], rows[1]) if rows is not None else None,
        in_dims=None if header.get("in_dims") is None else tuple(header["in_dims"]),
        vectors=unpack(header["vectors"], frames),
        cotangents=unpack(header["cotangents"], frames),
        chunk_size=header["chunk_size"],
        batched=header["batched"],
        mode=header["mode"],
        return_output=header["return_output"],
        batched_vectors=header["batched_vectors"],
        max_result_bytes=header["max_result_bytes"],
        sparsity=header["sparsity"],
        sparse_format=header["sparse_format"],
        out_dims=header["out_dims"],
        stream_room=header["stream_room"],
        answer_room=header["answer_room"],
        client=header["client"],
        deadline=math.inf if header["deadline"] is None else header["deadline"],
    )


def parse(frames: Sequence[Any]) -> tuple[dict[str, Any], Sequence[Any]]:
    """A received message -> (header, array frames)."""
    return _header(frames), frames[1:]


# --------------------------------------------------------------------------- replies


def _info(info: JobInfo) -> dict[str, Any]:
    return {"device": info.device, "batch_size": info.batch_size, "queue_s": info.queue_s, "compute_s": info.compute_s}


def encode_reply(msg_id: int, result: Any, info: JobInfo) -> list[Any]:
    frames: list[Any] = []
    if isinstance(result, Result):
        header = {
            "t": "result",
            "value": pack(result.value, frames),
            "aux": pack(result.aux, frames),
            "has_aux": result.has_aux,
            "output": pack(result.output, frames),
            "chunk_size": result.chunk_size,
            "mode": result.mode,
            "sparse_meta": result.sparse_meta,
            "batch_meta": result.batch_meta,
        }
    elif isinstance(result, StreamHead):
        header = {"t": "head", "sid": result.stream_id, "shape": list(result.shape), "dtype": result.dtype,
                  "chunk_size": result.chunk_size, "nbytes": result.nbytes, "meta": result.meta}
    else:  # a stream's chunk (an array), or None at its end
        header = {"t": "chunk", "arr": None if result is None else pack(result, frames)}
    header.update(id=msg_id, info=_info(info))
    return [orjson.dumps(header), *frames]


def encode_cancel(msg_id: int, stream_id: int | None = None) -> list[Any]:
    return [orjson.dumps({"t": "cancel", "id": msg_id, "sid": stream_id})]


def encode_error(msg_id: int, error: ServiceError) -> list[Any]:
    header = {"t": "error", "id": msg_id, "status": error.status, "code": error.code, "title": error.title,
              "detail": error.detail, "headers": error.headers, "fields": error.fields}
    return [orjson.dumps(header)]


def _remote_error(header: dict[str, Any]) -> ServiceError:
    error = ServiceError(header["detail"], headers=header.get("headers") or {}, fields=header.get("fields") or {})
    error.status, error.code, error.title = header["status"], header["code"], header["title"]
    return error


def decode_reply(header: dict[str, Any], frames: Sequence[Any]) -> tuple[Any, JobInfo]:
    """A reply -> (Result | StreamHead | array | None, JobInfo); errors raise."""
    kind = header["t"]
    if kind == "error":
        # Raised as made, never kept in a local: the traceback holds this frame, and a
        # frame holding its own exception is a cycle left for the garbage collector.
        raise _remote_error(header)
    info = JobInfo(**header["info"])
    if kind == "result":
        result = Result(
            value=unpack(header["value"], frames),
            aux=unpack(header["aux"], frames),
            has_aux=header["has_aux"],
            output=unpack(header["output"], frames),
            chunk_size=header["chunk_size"],
            mode=header["mode"],
            sparse_meta=header.get("sparse_meta"),
            batch_meta=header.get("batch_meta"),
        )
        return result, info
    if kind == "head":
        shape = tuple(header["shape"])
        return StreamHead(header["sid"], shape, header["dtype"], header["chunk_size"], header["nbytes"],
                          meta=header.get("meta")), info
    return (None if header["arr"] is None else unpack(header["arr"], frames)), info


# --------------------------------------------------------------------------- status board


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _leak(*numbers: str) -> Any:
    """A test of a leak's report as the engine writes it (``recycle_reason`` reads it)."""
    def written(value: Any) -> bool:
        grown = value.get("grown", []) if isinstance(value, dict) else None
        return (isinstance(value, dict) and all(type(value.get(n)) is int for n in numbers)
                and all(isinstance(value.get(k, ""), str) for k in ("setting", "device")) and isinstance(grown, list)
                and all(isinstance(g, list) and len(g) == 2 and isinstance(g[0], str) and type(g[1]) is int
                        for g in grown))
    return written


# The fields of the board's document, each as the engine writes it (``StatusBoard``'s
# writers, ``engine.process``'s reasons to leave): what ``read`` gives of it.
_DOC_FIELDS: dict[str, Any] = {
    "function": lambda v: isinstance(v, str), "stray": lambda v: isinstance(v, str), "tags": _strings,
    "left": lambda v: isinstance(v, str) or _strings(v), "answered": lambda v: v is True,
    "memory": _leak("held", "limit"), "reserved": _leak("held", "limit"), "device_memory": _leak("held", "limit"),
    "descriptors": _leak("open", "limit"), "disk": _leak("held", "limit"), "threads": _leak("count", "limit"), "processes": _leak("count", "limit"),
    # (messages read off a connection while several functions ran: ``EngineProcess._robbed``)
    "robbed": lambda v: isinstance(v, dict) and type(v.get("messages")) is int and _strings(v.get("ran")),
}


def _as_written(doc: Any) -> dict[str, Any]:
    """Of a board's document, the fields the engine writes, where each has the type it
    writes it in. The board is a file the functions can write (the same user's), and the
    supervisor took any JSON there for the engine's word: a document that was no object
    (``[1]``), a name that was no string, a leak's report that was none (``{"memory":
    1}``) raised out of its tick before it looked at the engine's process, tick after tick,
    and the engine a function then ended was never replaced (the service down for good).
    Nor may it say the fixed fields (``read`` puts them last)."""
    if not isinstance(doc, dict):
        return {}
    kept = {key: value for key, value in doc.items() if (check := _DOC_FIELDS.get(key)) is not None and check(value)}
    if isinstance(kept.get("left"), str) and "stray" not in kept:  # (said in words only beside a stray)
        del kept["left"]
    return kept


# What only the board of an engine leaving on its own says (``StatusBoard.leave``).
_LEAVE_FIELDS = ("stray", "memory", "reserved", "device_memory", "descriptors", "disk", "threads", "processes", "robbed")


def as_left(status: dict[str, Any], code: int | None) -> dict[str, Any]:
    """``status``, the board of an engine process that ended with ``code``, as believed:
    its word that it left on its own (a stray, a leak, a setting it cannot put back) only
    where it exited as such an engine does (``EXIT_LEAVING``). A function that wrote that
    word and then crashed, or hung until it was killed, was taken for an engine that left
    between batches: its own request, named by no one, went on to the next engine, to do
    the same there. (One that exits with that status too is left to the other checks:
    ``Supervisor._died``.)"""
    if code == EXIT_LEAVING or not any(key in status for key in _LEAVE_FIELDS):
        return status
    kept = {key: value for key, value in status.items() if key not in _LEAVE_FIELDS}
    if isinstance(kept.get("left"), str):  # (said in words only beside a stray)
        del kept["left"]
    return kept


def recycle_reason(status: dict[str, Any]) -> str | None:
    """Why an engine leaves to be recycled (a leak its functions grew past a limit: memory,
    descriptors, threads, processes), from what it puts on its board (``StatusBoard.leave``);
    None when it does not. The engine logs it as it goes, the supervisor as it restarts it."""
    def grown(leak: dict[str, Any], unit: Any) -> str:
        return ", ".join(f"{name} +{unit(size)}" for name, size in leak.get("grown", [])) or "no function seen"

    if (memory := status.get("memory")) is not None:
        return (f"its memory (resident, and shared memory it keeps) reached {memory['held'] >> 20} MiB, over "
                f"{memory.get('setting', 'ENGINE_MAX_RSS_BYTES')} "
                f"({memory['limit'] >> 20} MiB); grown most by {grown(memory, lambda b: f'{b >> 20} MiB')}")
    if (reserved := status.get("reserved")) is not None:
        return (f"it kept {reserved['held'] >> 20} MiB of address space reserved and untouched between requests, "
                f"over {reserved['setting']} ({reserved['limit'] >> 20} MiB), room every request needs; grown most by "
                f"{grown(reserved, lambda b: f'{b >> 20} MiB')}")
    if (device := status.get("device_memory")) is not None:
        return (f"its tensors on {device['device']} held {device['held'] >> 20} MiB between requests, over "
                f"ENGINE_MAX_DEVICE_BYTES ({device['limit'] >> 20} MiB); grown most by "
                f"{grown(device, lambda b: f'{b >> 20} MiB')}")
    if (fds := status.get("descriptors")) is not None:
        return (f"it held {fds['open']} open file descriptors, over {fds['limit']} (3/4 of its open-file limit); "
                f"opened most by {grown(fds, int)}")
    if (disk := status.get("disk")) is not None:
        many = f" in more than {disk['entries'] - 1} files" if type(disk.get("entries")) is int and disk["entries"] > 20_000 else ""
        made = disk.get("made") if many and _leak()({"grown": disk.get("made")}) else None  # (as "grown" is checked)
        many += f" (made most by {grown({'grown': made}, int)})" if made else ""
        return (f"its functions' temporary files took {disk['held'] >> 20} MiB of disk{many}, over ENGINE_MAX_TMP_BYTES "
                f"({disk['limit'] >> 20} MiB, or 20,000 files); grown most by {grown(disk, lambda b: f'{b >> 20} MiB')}")
    if (threads := status.get("threads")) is not None:
        return (f"{threads['count']} threads that functions started were alive, over {threads['limit']}; "
                f"started most by {grown(threads, int)}")
    if (robbed := status.get("robbed")) is not None:
        return (f"{robbed['messages']} message(s) a front end sent to it were read off its connection by another reader "
                f"(a function: one of {', '.join(map(str, robbed['ran'])) or 'none seen'}, which ran then)")
    if (acted := status.get("acted")) is not None:
        by = acted.get("by") if isinstance(acted, dict) else None
        return (f"a thread or process left by one of "
                f"{', '.join(map(str, by)) if isinstance(by, list) else 'its functions'} "
                f"{acted.get('what', 'changed what they share') if isinstance(acted, dict) else 'changed what they share'}"
                " (put back)")
    if (processes := status.get("processes")) is not None:
        return (f"{processes['count']} processes that functions started were alive or unreaped, over "
                f"{processes['limit']}; started while these ran: {grown(processes, int)}")
    return None


class StatusBoard:
    """A page of shared memory (a file, mapped) where an engine says what it is doing.

    The supervisor reads it to tell a hang from a long computation and to name the
    requests a crash took down: writes to a mapped page outlive the writer, so even a
    segfault leaves the culprit's tag behind. A sequence number, odd while a write is
    under way, keeps readers from seeing half a write. The count of batches it has run
    to their end (``served``) tells the supervisor the engine works: a crash loop's
    engines end none (``Supervisor`` resets its restart backoff on one).
    """

    SIZE = 1 << 16
    _FIXED = struct.Struct("<QdBdIQ")  # seq, heartbeat, ready, deadline (0: idle), json length, served

    def __init__(self, path: Path, create: bool = False) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, self.SIZE)
            self._map = mmap.mmap(fd, self.SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd  # what ``read`` reads: never the map (see there)
        self._seq = 0
        self._beat = 0.0
        self._ready = 0
        self._deadline = 0.0
        self._served = 0
        self._doc = b"{}"
        self._running: dict[str, Any] = {}

    def _write(self) -> None:
        self._seq += 1
        struct.pack_into("<Q", self._map, 0, self._seq)  # odd: writing
        doc = self._doc[: self.SIZE - self._FIXED.size]
        self._map[self._FIXED.size : self._FIXED.size + len(doc)] = doc
        self._seq += 1
        self._FIXED.pack_into(self._map, 0, self._seq, self._beat, self._ready, self._deadline, len(doc), self._served)

    def beat(self, now: float) -> None:
        self._beat = now
        self._write()

    def set_ready(self, now: float) -> None:
        self._ready, self._beat = 1, now
        self._write()

    def running(self, now: float, deadline: float, function: str, tags: list[str], left: list[str] | None = None) -> None:
        """Running ``function`` for the requests ``tags``; ``left`` as for :meth:`idle`."""
        self._beat, self._deadline = now, deadline if math.isfinite(deadline) else 1e300
        self._running = {"function": function, "tags": tags, "left": left} if left else {"function": function, "tags": tags}
        self._doc = orjson.dumps(self._running)
        self._write()

    def answered(self, now: float) -> None:
        """The batch's requests are answered; the engine still tidies after it (settings
        put back, its garbage collected), under its function's name: a crash or a hang
        there (a ``__del__``) is still that function's, but its requests are no longer
        held (no tags), and a SIGKILL the supervisor did not send (the OOM killer, an
        operator) strikes it no more than an idle engine's would."""
        self._beat = now
        self._doc = orjson.dumps({**self._running, "tags": [], "answered": True})
        self._write()

    def idle(self, now: float, left: list[str] | None = None) -> None:
        """Running nothing; ``left``: the functions whose threads are still alive (the
        suspects, should the engine die now)."""
        if self._deadline:  # a batch ran to its end
            self._served += 1
        self._beat, self._deadline, self._doc = now, 0.0, orjson.dumps({"left": left}) if left else b"{}"
        self._write()

    def leave(self, now: float, why: dict[str, Any]) -> None:
        """The engine leaves, and says why: ``{"stray": function}`` (it left a thread
        running: ``engine.strays``; with ``"left"``, what else it left: a setting the
        engine cannot put back, ``engine.process_settings``), ``{"memory": ...}`` or
        ``{"device_memory": ...}`` or ``{"reserved": ...}`` (``engine.memory_watch``), ``{"descriptors": ...}``
        (``engine.descriptor_watch``), ``{"disk": ...}`` (``engine.disk_watch``) or ``{"threads": ...}`` or ``{"processes": ...}``
        (``engine.strays``)."""
        self._beat, self._deadline, self._doc = now, 0.0, orjson.dumps(why)
        self._write()

    def read(self) -> dict[str, Any]:
        """What the board says, read from the file (``pread``), not through a map: the
        file is the functions' to truncate, and a read of a mapped page past its end is a
        SIGBUS. One function that truncated its engine's board took ``serve`` down with
        it, the supervisor reading the board, and with it every front end."""
        for _ in range(100):
            head = os.pread(self._fd, self._FIXED.size, 0)
            if len(head) < self._FIXED.size:
                break
            seq, beat, ready, deadline, length, served = self._FIXED.unpack(head)
            doc = os.pread(self._fd, min(length, self.SIZE - self._FIXED.size), self._FIXED.size)
            if seq % 2 == 0 and os.pread(self._fd, 8, 0) == head[:8]:
                try:
                    running = orjson.loads(doc) if length else {}
                except orjson.JSONDecodeError:
                    continue
                return {**_as_written(running), "beat": beat, "ready": bool(ready), "deadline": deadline,
                        "served": served}
        return {"beat": 0.0, "ready": False, "deadline": 0.0, "served": 0}

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
