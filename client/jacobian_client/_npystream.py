"""Incremental ``.npy`` reading: bytes arrive in pieces and go straight to their place.

Why: a streamed Jacobian can be larger than memory (SPEC 3.3). Reading the body first
and parsing it after would hold it whole, twice (the bytes, then the array). Here the
header is parsed as soon as its bytes are in, then every data byte is written once into
its final home: a preallocated array (:class:`MemorySink`), a file written under a
temporary name and renamed only when complete (:class:`FileSink`), or a region of a
larger array (:class:`RegionSink`, for row-split assembly).

The receiver is sans-I/O: the sync and async clients feed it what they read. A body
that ends early (fewer bytes than the header declares) raises
:class:`~jacobian_client.IncompleteResponse` and leaves no file behind, not even the
temporary one. A header is checked against the response's ``Content-Length`` before
anything is allocated for it; without one, memory is taken as the bytes arrive (past
a small size), so a header that lies cannot make the client allocate what never comes.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from . import wire
from ._errors import IncompleteResponse, TransportError

__all__ = [
    "FileSink",
    "MemorySink",
    "NpyHeader",
    "NpyReceiver",
    "RegionSink",
    "Sink",
    "check_out_path",
    "commit_partial",
    "discard_partial",
    "open_partial",
]


class NpyHeader:
    """A parsed ``.npy`` header: shape, dtype, order, and its own byte length."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, fortran: bool, raw: bytes) -> None:
        self.shape = shape
        self.dtype = dtype
        self.fortran = fortran
        self.raw = raw
        #: True once the response's Content-Length has confirmed the size it declares
        self.length_checked = False

    @property
    def data_nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def total_nbytes(self) -> int:
        return len(self.raw) + self.data_nbytes


def _parse_header(buf: bytes) -> NpyHeader | None:
    """The header if ``buf`` holds all of it, else None (need more bytes)."""
    try:
        end = wire.npy_header_length(buf)
        if end is None or len(buf) < end:
            return None
        raw = bytes(buf[:end])
        shape, fortran, dtype = wire.parse_npy_header(raw, complex_ok=True)  # (an answer: complex is read)
    except wire.WireError as exc:
        raise TransportError(f"response is not a readable .npy body: {exc}") from None
    return NpyHeader(shape, dtype, fortran, raw)


def check_out_path(path: str | os.PathLike[str]) -> Path:
    """``out=`` checked before any request is sent: a path whose file cannot be made there
    (a directory, a directory that does not exist or cannot be written) raised only once
    the server had computed the result, the directory's case once all of it had been
    received and written beside it (the final rename failed): the same ``OSError``
    subclasses, raised before the work."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, "out= names a directory, not a .npy file to write", str(p))
    parent = p.parent
    if not parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "out= names a file in a directory that does not exist", str(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "out= names a file in a directory this process cannot write",
                              str(parent))
    return p


def open_partial(path: Path, mode: str) -> tuple[Any, str]:
    """A new file beside ``path`` (same file system, so the final rename is atomic),
    created with the process umask like any other output file (``mkstemp`` would make
    it private)."""
    for _ in range(100):
        tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.part"))
        try:
            return open(tmp, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def commit_partial(fp: Any, tmp: str, path: Path) -> np.ndarray:
    """Close a file from :func:`open_partial`, rename it over ``path``, and return it
    memory-mapped read-only: only now does a file that looks whole exist."""
    fp.close()
    try:
        os.replace(tmp, path)
    except BaseException:  # e.g. path is a directory: the complete temporary file must go too
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return np.load(path, mmap_mode="r")


def discard_partial(fp: Any, tmp: str | None) -> None:
    """Close and delete a file from :func:`open_partial` (an aborted transfer)."""
    if fp is not None:
        fp.close()
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class Sink(Protocol):
    def start(self, header: NpyHeader) -> None: ...
    def write(self, offset: int, data: memoryview) -> None: ...
    def finish(self) -> Any: ...
    def abort(self) -> None: ...


#: bytes a :class:`MemorySink` preallocates on a header's word alone (no Content-Length)
UNCHECKED_PREALLOCATION = 16 << 20


class MemorySink:
    """Into one preallocated, writable numpy array (native byte order on return).

    Preallocated only when the header's size is confirmed by the Content-Length (see
    :attr:`NpyHeader.length_checked`) or small: a header claiming terabytes must not
    become a MemoryError (or a huge allocation) before a byte of data arrives. An
    unconfirmed large body is kept in its pieces and joined once all of it is in."""

    def __init__(self) -> None:
        self._bytes: np.ndarray | None = None
        self._pieces: list[bytes] | None = None
        self._header: NpyHeader | None = None

    def start(self, header: NpyHeader) -> None:
        self._header = header
        if header.length_checked or header.data_nbytes <= UNCHECKED_PREALLOCATION:
            self._bytes = np.empty(header.data_nbytes, dtype=np.uint8)
        else:
            self._pieces = []

    def write(self, offset: int, data: memoryview) -> None:
        if self._pieces is not None:
            self._pieces.append(bytes(data))  # in order, as the receiver feeds them
            return
        assert self._bytes is not None
        self._bytes[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def finish(self) -> np.ndarray:
        h = self._header
        assert h is not None
        if self._pieces is not None:  # every byte is in (the receiver checked): now allocate
            self._bytes = np.empty(h.data_nbytes, dtype=np.uint8)
            at = 0
            for piece in self._pieces:
                self._bytes[at : at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                at += len(piece)
            self._pieces = None
        assert self._bytes is not None
        arr = self._bytes.view(h.dtype).reshape(h.shape, order="F" if h.fortran else "C")
        if h.dtype.byteorder not in "=|":
            arr = arr.astype(h.dtype.newbyteorder("="))
        return arr

    def abort(self) -> None:
        self._bytes = None
        self._pieces = None


class FileSink:
    """Into a ``.npy`` file: written under a temporary name beside ``path``, renamed
    over it only once every byte is in, so an aborted stream never leaves a file that
    looks whole. Returns the file memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fp: Any = None
        self._tmp: str | None = None

    def start(self, header: NpyHeader) -> None:
        self._fp, self._tmp = open_partial(self.path, "xb")
        self._fp.write(header.raw)

    def write(self, offset: int, data: memoryview) -> None:
        self._fp.write(data)  # bytes arrive in order: offsets are sequential

    def finish(self) -> np.ndarray:
        assert self._tmp is not None
        # _tmp is cleared only once committed: if the rename fails, abort() still deletes it
        result = commit_partial(self._fp, self._tmp, self.path)
        self._tmp = None
        return result

    def abort(self) -> None:
        discard_partial(self._fp, self._tmp)
        self._tmp = None


class RegionSink:
    """Into a place chosen once the header is known: ``open_region(header)`` returns a
    ``write(offset, data)`` function for exactly ``header.data_nbytes`` bytes. Used to
    assemble row blocks of one Jacobian, fetched from several servers, into one array or
    file (see :mod:`jacobian_client.split`)."""

    def __init__(self, open_region: Callable[[NpyHeader], Callable[[int, memoryview], None]]) -> None:
        self._open_region = open_region
        self._write: Callable[[int, memoryview], None] | None = None

    def start(self, header: NpyHeader) -> None:
        if header.fortran:
            raise TransportError("row blocks must be C-ordered")
        self._write = self._open_region(header)

    def write(self, offset: int, data: memoryview) -> None:
        assert self._write is not None
        self._write(offset, data)

    def finish(self) -> None:
        return None

    def abort(self) -> None:
        self._write = None


class NpyReceiver:
    """Feed it the body's pieces in order, then :meth:`close` for the result.

    ``on_progress(done, total)`` (bytes) is called after each piece once the total is
    known from the header. ``expected_length`` is the response's Content-Length, when it
    has one: a header declaring another size is refused before the sink allocates.
    ``check(header)`` may refuse a header (raising) before the sink starts.
    """

    def __init__(
        self, sink: Sink, on_progress: Callable[[int, int], None] | None = None, *,
        expected_length: int | None = None, check: Callable[[NpyHeader], None] | None = None,
    ) -> None:
        self.sink = sink
        self._check = check
        self.expected_length = expected_length
        self.header: NpyHeader | None = None
        self._prefix = bytearray()
        self._offset = 0  # data bytes written
        self._on_progress = on_progress
        self._failed = False

    def feed(self, piece: bytes) -> None:
        try:
            self._feed(piece)
        except BaseException:
            self.abort()
            raise

    def _feed(self, piece: bytes) -> None:
        if not piece:
            return
        view = memoryview(piece)
        if self.header is None:
            self._prefix += view
            header = _parse_header(self._prefix)
            if header is None:
                return
            self._check_length(header)
            if self._check is not None:  # before the sink takes anything (a file, memory)
                self._check(header)
            self.header = header
            self.sink.start(header)
            view = memoryview(bytes(self._prefix[len(header.raw) :]))
            self._prefix = bytearray()
        room = self.header.data_nbytes - self._offset
        if len(view) > room:
            raise TransportError(f"response carries more bytes than its .npy header declares ({self.header.shape})")
        if len(view):
            self.sink.write(self._offset, view)
            self._offset += len(view)
        if self._on_progress is not None:
            self._on_progress(len(self.header.raw) + self._offset, self.header.total_nbytes)

    def _check_length(self, header: NpyHeader) -> None:
        want = self.expected_length
        if want is None:
            return
        if header.total_nbytes > want:
            raise IncompleteResponse(
                f"the .npy header declares {header.total_nbytes} bytes (shape {header.shape}, {header.dtype}) "
                f"but the response is {want} bytes long")
        if header.total_nbytes < want:
            raise TransportError(
                f"the response is {want} bytes long but its .npy header declares only {header.total_nbytes} "
                f"(shape {header.shape}, {header.dtype})")
        header.length_checked = True

    @property
    def received(self) -> int:
        return self._offset + (len(self.header.raw) if self.header else len(self._prefix))

    def close(self) -> Any:
        """The result, or :class:`IncompleteResponse` if the body was short."""
        if self.header is None or self._offset != self.header.data_nbytes:
            want = f"{self.header.total_nbytes}" if self.header else "a whole .npy header"
            self.abort()
            raise IncompleteResponse(f"response body ended after {self.received} bytes; expected {want}")
        try:
            return self.sink.finish()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self._failed:
            self._failed = True
            self.sink.abort()
