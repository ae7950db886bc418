"""One large Jacobian split by rows across several servers, fetched concurrently.

Why: rows of a Jacobian are independent (row ``r`` is the pullback of the ``r``-th basis
cotangent), so a Jacobian too slow or too large for one GPU can be cut into row blocks
(``rows=(start, stop)`` over the flattened output, SPEC 3.1) that several replicas
compute at once. Each block is streamed as ``.npy`` straight into its place in the
result: a preallocated array, or a ``.npy`` file written at offsets (``out=``; never
memory-mapped while writing, so the client's memory stays O(one network read)).

Blocks are handed out from one queue, so a faster server simply takes more of them. A
server that fails at the transport level, or stays overloaded/unavailable after the
client's own retries, is dropped and its block goes back to the queue for the others;
any other error (bad input, the function raised) would fail everywhere and is raised at
once. The result equals the single-server one: same rows, same bytes.

::

    from jacobian_client.split import jacobian_split
    J = jacobian_split(["http://gpu0:8000", "http://gpu1:8000"], "softmax", x, out="J.npy")
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._arrays import Plain, as_wire_value
from ._async import AsyncClient
from ._decoding import too_large
from ._errors import Overloaded, TransportError, Unavailable
from ._npystream import NpyHeader, RegionSink, check_out_path, commit_partial, discard_partial, open_partial
from ._progress import Progress
from ._protocol import bind_inputs, check_option_clash, own_options
from .wire import npy_header

__all__ = ["ajacobian_split", "jacobian_split"]

#: the keywords that are AsyncClient's options, not inputs by name
_CLIENT_OPTIONS = frozenset(own_options(AsyncClient.__init__))

#: errors after which a server is dropped and its block handed to the others
_DROP_SERVER = (TransportError, Overloaded, Unavailable)


class _Assembler:
    """The result being assembled: allocated when the first block's header tells the
    dtype (the server decides it: a float32-declared function casts float64 inputs)."""

    def __init__(self, out_shape: tuple[int, ...], in_shape: tuple[int, ...], out: Path | None,
                 cap: int | None = None, what: str = "jacobian_split") -> None:
        self.shape = out_shape + in_shape
        self.cap, self.what = cap, what  # the clients' max_response_bytes, for a result assembled in memory
        self.in_shape = in_shape
        self.row_elems = math.prod(in_shape)
        self.out = out
        self.dtype: np.dtype | None = None
        self._array: np.ndarray | None = None
        self._fp: Any = None
        self._tmp: str | None = None
        self._data_offset = 0

    def region(self, start: int, stop: int) -> Callable[[NpyHeader], Callable[[int, memoryview], None]]:
        def open_region(header: NpyHeader) -> Callable[[int, memoryview], None]:
            want = (stop - start, *self.in_shape)
            if header.shape != want:
                raise TransportError(f"rows {start}:{stop} came back shaped {header.shape}; expected {want}")
            self._allocate(header.dtype)
            if header.dtype != self.dtype:
                raise TransportError(f"rows {start}:{stop} came back as {header.dtype}; others as {self.dtype}")
            base = start * self.row_elems * header.dtype.itemsize
            if self._array is not None:
                flat = self._array.reshape(-1).view(np.uint8)

                def write(offset: int, data: memoryview) -> None:
                    flat[base + offset : base + offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

                return write
            fp, origin = self._fp, self._data_offset + base

            def write_file(offset: int, data: memoryview) -> None:
                # One event-loop thread: no await between seek and write, so no interleaving.
                fp.seek(origin + offset)
                fp.write(data)

            return write_file

        return open_region

    def _allocate(self, dtype: np.dtype) -> None:
        if self.dtype is not None:
            return
        self.dtype = dtype
        if self.out is None:
            # each block is within the cap; their sum, held here, must be too (a server can
            # make the output of its evaluate, and so the rows, as many as it likes)
            nbytes = math.prod(self.shape) * dtype.itemsize
            if self.cap is not None and nbytes > self.cap:
                raise too_large(self.what, nbytes, self.cap, declared=True)
            self._array = np.empty(self.shape, dtype=dtype)
            return
        self._fp, self._tmp = open_partial(self.out, "x+b")
        header = npy_header(self.shape, dtype)
        self._fp.write(header)
        self._data_offset = len(header)
        self._fp.truncate(len(header) + math.prod(self.shape) * dtype.itemsize)

    def finish(self) -> np.ndarray:
        if self.dtype is None:  # no rows at all (an empty output): nothing told the dtype
            self._allocate(np.dtype("float32"))
        if self._array is not None:
            return self._array
        assert self.out is not None and self._tmp is not None
        tmp, self._tmp = self._tmp, None
        return commit_partial(self._fp, tmp, self.out)

    def abort(self) -> None:
        discard_partial(self._fp, self._tmp)
        self._tmp = None
        self._array = None


def _input_shape(value: Any) -> tuple[int, ...]:
    wire_value = as_wire_value(value)
    if isinstance(wire_value, Plain):
        return tuple(np.shape(wire_value.value))
    return tuple(wire_value.shape)


async def ajacobian_split(
    urls: Sequence[str],
    name: str,
    /,
    *inputs: Any,
    argnums: int | str = 0,
    chunk_rows: int | None = None,
    chunk_size: int | None = None,
    mode: str | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
    **options: Any,
) -> np.ndarray:
    """The Jacobian of a single-output function, its rows split across ``urls``.

    Inputs go in order or by the function's input names, as :meth:`Client.jacobian`
    takes them. ``chunk_rows`` rows per request (default: an equal share per server);
    the :class:`AsyncClient`'s own options (``api_key``, ``timeout``,
    ``max_retries``, ...) go to each client; any other keyword is an input. An input
    named as one of these options goes by position.
    Returns an array, or with ``out=`` the ``.npy`` file memory-mapped read-only.
    """
    client_options = {k: v for k, v in options.items() if k in _CLIENT_OPTIONS}
    named = {k: v for k, v in options.items() if k not in _CLIENT_OPTIONS}
    if not urls:
        raise ValueError("jacobian_split needs at least one server URL")
    if isinstance(argnums, (tuple, list)):
        raise TypeError("jacobian_split differentiates one input: argnums is an int or a parameter name")
    if out is not None:
        check_out_path(out)  # before every server's work, not at the rename after it
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(AsyncClient(url, **client_options)) for url in urls]
        info, inputs, names, output = await _describe(clients, name, inputs, named, {
            "argnums": argnums, "chunk_rows": chunk_rows, "chunk_size": chunk_size, "mode": mode, "out": out,
            "progress": progress, **client_options})
        index = argnums
        if isinstance(argnums, str):
            names = [i.name for i in info.inputs]
            if argnums not in names:
                raise ValueError(f"{name!r} has no parameter {argnums!r}; it takes {names}")
            index = names.index(argnums)
        if -len(info.inputs) <= index < len(info.inputs) and info.inputs[index].tree is not None:
            raise TypeError(f"jacobian_split differentiates one array; {info.inputs[index].name!r} is a pytree parameter "
                            "(use Client.jacobian, which nests over it)")
        in_shape = _input_shape(inputs[index])
        total_rows = output.size
        assembler = _Assembler(tuple(output.shape), in_shape, Path(out) if out is not None else None,
                               clients[0]._proto.max_response_bytes, f"jacobian_split {name!r}")
        share = chunk_rows or max(1, math.ceil(total_rows / len(clients)))
        blocks: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for start in range(0, total_rows, share):
            blocks.put_nowait((start, min(start + share, total_rows)))
        bar = Progress(f"{name} jacobian ({len(clients)} servers)") if progress else None
        row_bytes = 0
        done_rows = 0
        dropped: list[BaseException] = []

        async def worker(client: AsyncClient) -> None:
            nonlocal done_rows, row_bytes
            while True:
                try:
                    start, stop = blocks.get_nowait()
                except asyncio.QueueEmpty:
                    return
                sink = RegionSink(assembler.region(start, stop))
                call = client._proto.compute_call(
                    "jacobian", name, inputs,
                    {"argnums": argnums, "chunk_size": chunk_size, "rows": (start, stop), "mode": mode},
                    sink=sink, names=names,
                )
                try:
                    await client._execute(call)
                except _DROP_SERVER as exc:
                    blocks.put_nowait((start, stop))  # another server takes it
                    dropped.append(exc)
                    return
                done_rows += stop - start
                if bar is not None and assembler.dtype is not None:
                    row_bytes = assembler.row_elems * assembler.dtype.itemsize
                    bar(done_rows * row_bytes, total_rows * row_bytes)

        tasks = [asyncio.ensure_future(worker(c)) for c in clients]
        try:
            await _all_or_first_error(tasks)
            if not blocks.empty():
                raise dropped[-1]
            return assembler.finish()
        except BaseException:
            assembler.abort()
            raise
        finally:
            if bar is not None:
                bar.close()


#: every option of jacobian_split (and of its clients), with its default: an input named
#: so goes by position (check_option_clash)
_OPTIONS = {**own_options(ajacobian_split), **own_options(AsyncClient.__init__)}


async def _describe(
    clients: list[AsyncClient], name: str, inputs: tuple[Any, ...], named: dict[str, Any], values: dict[str, Any],
) -> tuple[Any, tuple[Any, ...], tuple[str, ...] | None, np.ndarray]:
    """The function's description, the inputs in its order (keyword ones placed by its
    names, which they then go by on the wire: None, by position) and its output, from
    the first server that answers. ``values``: jacobian_split's options as the call set
    them, for an input named as one of them (``check_option_clash``)."""
    error: BaseException | None = None
    for client in clients:
        try:
            info = await client.function(name)
            names = tuple(i.name for i in info.inputs)
            label = f"jacobian_split({name!r})"
            check_option_clash(label, name, _OPTIONS, values, names, inputs, named)
            if named:
                inputs = bind_inputs(label, names, inputs, named)
            if info.has_aux:
                raise ValueError(f"{name!r} has aux: its rows cannot stream as bare .npy blocks; use Client.jacobian")
            output = await client._execute(client._proto.compute_call(
                "evaluate", name, inputs, {}, names=names if named else None))
        except _DROP_SERVER as exc:
            error = exc
            continue
        if not isinstance(output, np.ndarray):
            raise ValueError(f"{name!r} has several outputs; a row split needs a single-output function")
        return info, inputs, names if named else None, output
    assert error is not None
    raise error


async def _all_or_first_error(tasks: list[asyncio.Future[None]]) -> None:
    """Wait for every task; on the first error cancel the rest and raise it."""
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def jacobian_split(urls: Sequence[str], name: str, /, *inputs: Any, **options: Any) -> np.ndarray:
    """Blocking form of :func:`ajacobian_split` (runs its own event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(ajacobian_split(urls, name, *inputs, **options))
    raise RuntimeError("jacobian_split() called from a running event loop; await ajacobian_split() instead")
