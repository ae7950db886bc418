# Generated from _async.py by scripts/unasync.py (make unasync): edit _async.py, never this file.
"""The synchronous client: a thin loop over :mod:`._protocol` and one ``httpx.Client``.

Generated from ``_async.py`` by ``scripts/unasync.py``: edit that file, then run
``make unasync``.

Everything that decides *what* to send or how to read it lives in :mod:`._protocol`,
without I/O; this module only sends, reads (incrementally for ``.npy``), and sleeps
between retries.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Mapping

import httpx

from ._base import DEFAULT_TIMEOUT, ClientConfig, PerProcess, reduce_client
from ._decoding import decoded
from ._errors import (
    IncompleteResponse, InvalidInput, JacobianServiceError, NotAcceptable, TransportError, error_from_response,
)
from ._headwait import body_deadline, bound_head_reads, head_deadline
from ._models import FunctionInfo
from ._protocol import (
    BINARY, DEFAULT_MAX_RESPONSE_BYTES, MAX_ERROR_BODY, Call, Deadline, RetryPolicy, bind_inputs,
    check_option_clash, client_closed, in_sdk_terms, inputs_in_one_dict, looks_like_input, not_an_answer, out_refused, own_options,
    shapes_of, shown_url, transport_error, with_body,
)

__all__ = ["Client"]

PathLike = str | os.PathLike[str]


class Client:
    """A connection-pooled client of one jacobian-service server.

    >>> with Client("http://localhost:8000") as client:   # doctest: +SKIP
    ...     J = client.jacobian("sin", x)

    Arguments: ``base_url``; ``api_key`` (sent as ``Authorization: Bearer KEY``;
    None: ``$JACOBIAN_SERVICE_API_KEY`` where set, ``""``: no key; printable ASCII, else a
    ValueError here; a ValueError too with ``user:password@`` in
    ``base_url``, which would take the same header); ``timeout`` (below); ``max_retries`` or
    a full :class:`RetryPolicy` as ``retry``; ``transport`` the default wire format,
    ``"binary"`` (npy/npz) or ``"json"``; ``limits`` the connection pool
    (:class:`httpx.Limits`); ``headers`` extra headers on every request;
    ``max_response_bytes`` the most bytes of one answer held in memory (default 1 GiB;
    None: no limit), counted decoded (a gzip body as what it expands to) and, for an
    ``.npy`` or ``.npz``, by the size it declares before any of it is allocated: more
    raises :class:`ResponseTooLarge` (``functions()``, ``function()`` and ``info()`` read
    at most 64 MiB; a result streamed to a file with ``out=`` is not held to it);
    ``http_transport`` an httpx transport (e.g. ``httpx.MockTransport`` in tests).

    ``timeout`` in seconds bounds each attempt of a call, response included: connecting
    gets at most 10 s of it, each MiB of the request must leave within it (a server
    reading it too slowly is cut off; a steady upload of any size goes on), the answer's
    status line and headers must come within it once the request is sent (however they
    are trickled), and then each MiB of the body must come within ``timeout`` seconds (checked as it arrives, so a server that
    trickles its answer ends the call within twice ``timeout`` at worst; a streamed
    Jacobian of any size keeps coming), raising :class:`TransportError`. An :class:`httpx.Timeout` sets httpx's per-operation limits only, with no
    such deadline; ``None`` waits forever. Retries (see :class:`RetryPolicy`) each get
    a deadline of their own.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int | None = None,
        retry: RetryPolicy | None = None,
        transport: str = BINARY,
        limits: httpx.Limits | None = None,
        headers: Mapping[str, str] | None = None,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
        http_transport: httpx.BaseTransport | None = None,
    ) -> None:
        config = ClientConfig(
            base_url, api_key=api_key, timeout=timeout, max_retries=max_retries, retry=retry,
            transport=transport, limits=limits, headers=headers, max_response_bytes=max_response_bytes,
        )
        self._proto = config.protocol
        self._args = config.args if http_transport is None else None
        self._pool = PerProcess(
            lambda kwargs: bound_head_reads(httpx.Client(transport=http_transport, **kwargs)), config.httpx_kwargs
        )

    @property
    def _http(self) -> httpx.Client:
        """This process's httpx client (a forked child makes its own: see PerProcess)."""
        return self._pool.get()

    # ------------------------------------------------------------------ lifecycle

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_client(self, self._args)

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ metadata

    def functions(self) -> list[FunctionInfo]:
        """Every registered function (``GET /v1/functions``)."""
        return self._execute(self._proto.functions_call())

    def function(self, name: str) -> FunctionInfo:
        """One function's description (``GET /v1/functions/{name}``)."""
        return self._execute(self._proto.function_call(name))

    def info(self) -> dict[str, Any]:
        """Version, devices, torch version and limits in force (``GET /v1/info``)."""
        return self._execute(self._proto.info_call())

    def health(self, *, ready: bool = True) -> bool:
        """True when ``/readyz`` (or ``/healthz`` with ``ready=False``) answers 200.

        Never raises and never retries: it is a probe (False once the client is closed).
        """
        return self._probe(ready, None)

    def _probe(self, ready: bool, cap: float | None) -> bool:
        if self._http.is_closed:
            return False
        try:
            # The whole answer within the client's timeout, and by ``cap`` (wait_ready's
            # deadline): a server trickling it held health() (and wait_ready with it) for
            # as long as it liked. Of its body, only what a keep-alive reuse needs is read
            # (httpx's get read an endless one whole: 700 MB in a 3 s probe).
            with head_deadline(self._proto.timeout, cap):
                with self._http.stream("GET", "/readyz" if ready else "/healthz") as response:
                    received = 0
                    with contextlib.closing(decoded(response)) as pieces:
                        for piece in pieces:
                            received += len(piece)
                            if received >= MAX_ERROR_BODY:
                                break
        except (httpx.HTTPError, TransportError):  # an unreadable Content-Encoding too
            return False
        return response.status_code == 200

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.1) -> None:
        """Block until :meth:`health` is true; :class:`TimeoutError` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self._probe(True, deadline):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{shown_url(self._http.base_url)} not ready after {timeout} s")
            time.sleep(interval)

    # ------------------------------------------------------------------ compute

    def jacobian(
        self,
        name: str,
        /,
        *inputs: Any,
        argnums: int | str | tuple[int | str, ...] = 0,
        chunk_size: int | None = None,
        batched: bool = False,
        in_dims: Any = 0,
        out_dims: Any = 0,
        return_output: bool = False,
        rows: tuple[int, int] | None = None,
        mode: str | None = None,
        out: PathLike | None = None,
        progress: bool = False,
        transport: str | None = None,
        sparsity: str | None = None,
        sparse_format: str | None = None,
        **named: Any,
    ) -> Any:
        """The Jacobian of ``name`` at ``inputs``, as ``torch.func.jacrev`` would give it.

        Inputs go in order, or by the names the function declares, as it is called
        in-process (``client.jacobian("mlp", x, params=p)``; every method of a function's
        inputs takes them so): the names are asked once (``GET /v1/functions/{name}``), a
        name it does not take, an input given twice or one left out is a ``TypeError``
        naming its inputs, and the inputs then go by name. An input named as one of the
        method's own options (``argnums``, ``out``, ``mode``...) goes by position.

        Returns a numpy array (a tuple for tuple ``argnums``, nested for several outputs);
        ``(J, aux)`` for has_aux functions; ``(J, output[, aux])`` with
        ``return_output=True``. ``rows=(start, stop)`` computes only those rows of the
        flattened output. ``out=`` streams the result into that ``.npy`` file and returns
        it memory-mapped (read-only), never holding it in memory (``argnums=(i,)``: in a
        tuple, as jacrev's; a result of several arrays is refused); ``progress=True`` shows
        a progress bar meanwhile. ``batched=True`` is ``vmap(jacrev(f), in_dims, out_dims)``,
        with torch's ``in_dims`` / ``out_dims`` (ints, None, tuples and dicts of them).
        Results nest as torch's do: lists where it gives lists (``meta.lists``), else tuples.

        ``sparsity="auto"`` (detected) or a declared pattern's name computes the Jacobian
        from a few compressed products and returns it as one 2-D sparse matrix (output
        elements x input elements, C order): a ``scipy.sparse`` CSR array when scipy is
        installed (``sparse_format="csc"``: CSC, ``"coo"``: COO), else a :class:`~jacobian_client.wire.SparseCOO`;
        ``sparse_format="dense"`` returns that matrix as a numpy array.
        """
        options = {"argnums": argnums, "chunk_size": chunk_size, "batched": batched,
                   "in_dims": in_dims, "out_dims": out_dims,
                   "return_output": return_output, "rows": rows, "mode": mode,
                   "sparsity": sparsity, "sparse_format": sparse_format}
        inputs, names = self._bound("jacobian", name, inputs, named, locals())
        return self._execute(self._proto.compute_call(
            "jacobian", name, inputs, options, transport=transport, out=_path(out), progress=progress, names=names))

    def hessian(
        self,
        name: str,
        /,
        *inputs: Any,
        argnums: int | str | tuple[int | str, ...] = 0,
        chunk_size: int | None = None,
        batched: bool = False,
        in_dims: Any = 0,
        out_dims: Any = 0,
        return_output: bool = False,
        out: PathLike | None = None,
        progress: bool = False,
        transport: str | None = None,
        sparsity: str | None = None,
        sparse_format: str | None = None,
        **named: Any,
    ) -> Any:
        """What ``torch.func.hessian(f, argnums)`` returns (same ``out=`` streaming);
        with ``sparsity`` (``"auto"`` or a declared name) one sparse ``n x n`` matrix from
        star-coloured Hessian-vector products, as :meth:`jacobian` returns them.
        ``return_output=True`` returns ``(H, output[, aux])``, as :meth:`jacobian` does."""
        options = {"argnums": argnums, "chunk_size": chunk_size, "batched": batched,
                   "in_dims": in_dims, "out_dims": out_dims, "return_output": return_output,
                   "sparsity": sparsity, "sparse_format": sparse_format}
        inputs, names = self._bound("hessian", name, inputs, named, locals())
        return self._execute(self._proto.compute_call(
            "hessian", name, inputs, options, transport=transport, out=_path(out), progress=progress, names=names))

    def sparsity(
        self,
        name: str,
        /,
        *shapes_or_arrays: Any,
        kind: str = "jacobian",
        sparsity: str = "auto",
        argnums: int | str | tuple[int | str, ...] = 0,
        mode: str | None = None,
        format: str = "csr",
        **named: Any,
    ) -> dict[str, Any]:
        """The sparsity pattern of ``name``'s Jacobian (``kind="hessian"``: Hessian) at
        these input shapes (``GET /v1/functions/{name}/sparsity``): one shape (a tuple)
        or one array (its shape and dtype) per input, in order or by the function's input
        names, as :meth:`jacobian` takes its inputs (``client.sparsity("f", x=(5,), y=Y)``).
        Returns the server's description (``pattern`` with its ``source``, ``coloring``,
        ``products``, ``picture``) with ``matrix``, the pattern as a sparse matrix of ones."""
        # the query carries shapes by position: keyword ones placed by the declared names
        shapes_or_arrays, _ = self._bound("sparsity", name, shapes_or_arrays, named, locals())
        shapes, dtypes = shapes_of(shapes_or_arrays)
        return self._execute(self._proto.sparsity_call(
            name, shapes, kind=kind, sparsity=sparsity, argnums=argnums, mode=mode, dtypes=dtypes, format=format))

    def evaluate(
        self, name: str, /, *inputs: Any, batched: bool = False, in_dims: Any = 0, out_dims: Any = 0,
        transport: str | None = None, **named: Any,
    ) -> Any:
        """The function's output (``(output, aux)`` for has_aux functions)."""
        inputs, names = self._bound("evaluate", name, inputs, named, locals())
        return self._execute(self._proto.compute_call(
            "evaluate", name, inputs, {"batched": batched, "in_dims": in_dims, "out_dims": out_dims}, transport=transport,
            names=names))

    def vjp(
        self,
        name: str,
        /,
        *inputs: Any,
        cotangents: Any,
        argnums: int | str | tuple[int | str, ...] = 0,
        batched_vectors: bool = False,
        return_output: bool = False,
        transport: str | None = None,
        **named: Any,
    ) -> Any:
        """Vector-Jacobian products: ``cotangents`` shaped like the output (a tuple for
        several outputs), or stacked with a leading dimension and ``batched_vectors``.
        ``return_output=True`` returns ``(vjp, output)``: the value and its derivative in
        one request."""
        options = {"argnums": argnums, "batched_vectors": batched_vectors, "return_output": return_output}
        inputs, names = self._bound("vjp", name, inputs, named, locals())
        return self._execute(self._proto.compute_call(
            "vjp", name, inputs, options, vectors=("cotangents", cotangents), transport=transport, names=names))

    def jvp(
        self,
        name: str,
        /,
        *inputs: Any,
        tangents: Any,
        argnums: int | str | tuple[int | str, ...] = 0,
        batched_vectors: bool = False,
        return_output: bool = False,
        transport: str | None = None,
        **named: Any,
    ) -> Any:
        """Jacobian-vector products: ``tangents`` shaped like the differentiated input
        (a tuple for tuple ``argnums``), or stacked with ``batched_vectors``.
        ``return_output=True`` returns ``(jvp, output)`` from the same request."""
        options = {"argnums": argnums, "batched_vectors": batched_vectors, "return_output": return_output}
        inputs, names = self._bound("jvp", name, inputs, named, locals())
        return self._execute(self._proto.compute_call(
            "jvp", name, inputs, options, vectors=("tangents", tangents), transport=transport, names=names))

    def hvp(
        self,
        name: str,
        /,
        *inputs: Any,
        tangents: Any,
        cotangents: Any = None,
        argnums: int | str | tuple[int | str, ...] = 0,
        batched_vectors: bool = False,
        return_output: bool = False,
        transport: str | None = None,
        **named: Any,
    ) -> Any:
        """Hessian-vector products ``H @ t`` of a scalar (0-d) function, forward-over-reverse
        (``POST .../hvp``): ``tangents`` like :meth:`jvp`'s, the result shaped like the
        differentiated inputs. ``cotangents`` (like :meth:`vjp`'s, shaped like the output)
        ask for ``c . H t`` of any function instead, the jvp of the vjp: with
        ``batched_vectors``, one per tangent, paired by index. ``return_output=True``
        returns ``(hvp, output)``."""
        options = {"argnums": argnums, "batched_vectors": batched_vectors, "return_output": return_output}
        vectors = [("tangents", tangents)] + ([] if cotangents is None else [("cotangents", cotangents)])
        inputs, names = self._bound("hvp", name, inputs, named, locals())
        return self._execute(self._proto.compute_call(
            "hvp", name, inputs, options, vectors=vectors, transport=transport, names=names))

    def _bound(
        self, kind: str, name: str, inputs: tuple[Any, ...], named: dict[str, Any],
        values: Mapping[str, Any] | None = None,
    ) -> tuple[tuple[Any, ...], tuple[str, ...] | None]:
        """A call's inputs in the function's order, and the names they go by on the wire
        (None: by position, for a call without keyword inputs). Keyword inputs are placed
        by the names the function declares (``GET /v1/functions/{name}``, asked once and
        kept; asked again where the kept names do not fit the call: the registry may have
        changed; once for each such call, remembered in ``misfits``), checked as Python
        checks a call (``bind_inputs``); they then go by name, for the service to place
        (kept names out of date would otherwise put an input in another's place, a wrong
        answer with a 200).

        ``values``: the method's own options as the call set them (its ``locals()``), for
        ``check_option_clash``: an input named as one of them (``mode``, ``out``...) given
        by that name set the option. The names are known for it where they are kept or
        asked for keyword inputs, and asked where an option's value is an array."""
        method = getattr(type(self), kind)
        options = own_options(method) if values is not None else {}
        values = values or {}
        label = f"client.{kind}({name!r})"
        kept = self._proto.functions_cache.get(name)
        if not named and kept is None and not any(looks_like_input(values.get(k)) for k in options):
            return inputs, None

        def place(names: tuple[str, ...]) -> tuple[tuple[Any, ...], tuple[str, ...] | None]:
            check_option_clash(label, name, options, values, names, inputs, named)
            return (bind_inputs(label, names, inputs, named), names) if named else (inputs, None)

        shape = (name, len(inputs), tuple(sorted(named)))
        if kept is not None:
            names = tuple(i.name for i in kept.inputs)
            try:
                return place(names)
            except TypeError:
                if (*shape, names) in self._proto.misfits:
                    raise  # asked since this very call failed: the caller's, not the names'
        names = tuple(i.name for i in (self.function(name)).inputs)
        try:
            return place(names)
        except TypeError:
            if len(self._proto.misfits) > 1024:
                self._proto.misfits.clear()
            self._proto.misfits.add((*shape, names))
            raise

    def _parts(
        self, kind: str, name: str, inputs: Any, options: Any, vectors: Any = None, names: Any = None,
    ) -> dict[str, Any]:
        """One compute request whose result comes back by part name (``value``,
        ``output``, ``aux``); for the autodiff adapters, which must not guess aux."""
        return self._execute(self._proto.compute_call(
            kind, name, inputs, options, vectors=vectors, parts=True, names=names))

    def jacrev(
        self, name: str, argnums: int | str | tuple[int | str, ...] = 0, *, chunk_size: int | None = None,
        **options: Any,
    ) -> Callable[..., Any]:
        """A callable like ``torch.func.jacrev(f, argnums, chunk_size=...)``: call it with
        the inputs to get the Jacobian (and aux, for has_aux functions)."""

        unknown = sorted(set(options) - set(own_options(type(self).jacobian)))
        if unknown:
            raise TypeError(f"jacrev() got an unexpected keyword argument {unknown[0]!r}")
        fields = {"argnums": argnums, "chunk_size": chunk_size, **options}
        sent = {k: fields.pop(k) for k in ("transport", "out", "progress") if k in fields}

        def jac(*inputs: Any, **named: Any) -> Any:
            # jac takes no options of its own: every keyword is an input, whatever its name
            # (given to jacobian(), an input called mode or out set that option instead)
            bound, names = self._bound("jacrev", name, inputs, named)
            return self._execute(self._proto.compute_call(
                "jacobian", name, bound, fields, transport=sent.get("transport"), out=_path(sent.get("out")),
                progress=bool(sent.get("progress")), names=names))

        jac.__name__ = jac.__qualname__ = f"jacrev_{name}"
        jac.__doc__ = f"Jacobian of the remote function {name!r} (argnums={argnums!r}) at the given inputs."
        return jac

    # ------------------------------------------------------------------ I/O loop

    def _execute(self, call: Call) -> Any:
        try:
            return self._execute_once(call)
        except NotAcceptable as exc:
            if call.fallback is None:
                if call.out is not None:
                    raise out_refused(call, exc) from None
                raise
            self._proto.learn_npy_refused(call)
            return self._execute_once(call.fallback)
        except InvalidInput as exc:
            said = in_sdk_terms(call, exc) or (self._in_one_dict(call, exc) if call.maps else None)
            if said is None:
                raise
            raise said from None

    def _in_one_dict(self, call: Call, exc: InvalidInput) -> InvalidInput | None:
        """``inputs_in_one_dict``, with the function's description kept, or asked (once)
        where the 422 lists no input names, for a method's own call only: an adapter's
        refused request costs no request more (a pytree parameter's dict is the adapters'
        everyday input)."""
        info = self._proto.functions_cache.get(call.name) if call.name is not None else None
        if info is None and call.name is not None and not call.parts and not isinstance(exc.problem.get("inputs"), list):
            try:
                info = self.function(call.name)
            except JacobianServiceError:
                pass
        return inputs_in_one_dict(call, exc, info)

    def _execute_once(self, call: Call) -> Any:
        response, deadline = self._send(call)
        try:
            if not self._proto.wants_stream(call, response):
                try:
                    body = self._read(call, response, deadline, cap=self._proto.body_cap(call))
                except httpx.HTTPError as exc:
                    raise IncompleteResponse(f"reading the response failed: {exc}") from exc
                return self._proto.read_result(call, response, body)
            receiver, progress = self._proto.receiver(call, response)
            try:
                with body_deadline(deadline):
                    with contextlib.closing(decoded(response)) as pieces:
                        for piece in pieces:
                            receiver.feed(piece)
                            deadline.check(call, receiver.received)
            except httpx.HTTPError as exc:
                receiver.abort()
                deadline.check(call, receiver.received)  # the call's deadline ended the read: say so
                raise IncompleteResponse(f"response stream broke after {receiver.received} bytes: {exc}") from exc
            except BaseException:
                receiver.abort()
                raise
            finally:
                if progress is not None:
                    progress.close()
            return self._proto.read_stream_result(call, receiver, response)
        finally:
            response.close()

    def _read(
        self, call: Call, response: httpx.Response, deadline: Deadline, limit: int | None = None,
        cap: int | None = None,
    ) -> bytes:
        """The whole body (decoded), piece by piece so that the attempt's deadline is
        checked; at most ``limit`` bytes of it (the rest left unread) when one is given;
        :class:`ResponseTooLarge` past ``cap`` bytes."""
        pieces: list[bytes] = []
        received = 0
        try:
            with body_deadline(deadline):
                with contextlib.closing(decoded(response)) as body:
                    for piece in body:
                        pieces.append(piece)
                        received += len(piece)
                        if limit is not None and received >= limit:
                            return b"".join(pieces)[:limit]
                        if cap is not None and received > cap:
                            raise self._proto.too_large(call, received)
                        deadline.check(call, received)
        except httpx.HTTPError:
            deadline.check(call, received)  # the call's deadline ended the read: say so
            raise
        return b"".join(pieces)

    def _send(self, call: Call) -> tuple[httpx.Response, Deadline]:
        """Send with retries; return an open (streamed) 200 response, with the
        deadline its body must meet, or raise."""
        if self._http.is_closed:
            raise client_closed(call)
        policy = self._proto.retry
        started = time.monotonic()
        attempt = 0
        while True:
            request = self._http.build_request(
                call.method, call.path, params=call.params or None, headers=call.headers, content=call.content)
            deadline = self._proto.deadline(call)
            try:
                with head_deadline(deadline.seconds):  # httpx's per-operation timeouts would let a trickle run on
                    response = self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                delay = policy.delay_after_exception(exc, attempt, time.monotonic() - started)
                if delay is None:
                    raise transport_error(exc, call) from exc
            else:
                if response.status_code < 400:
                    odd = not_an_answer(call, response)
                    if odd is not None:
                        response.close()
                        raise odd
                    deadline.responded()
                    return response, deadline
                body: bytes | None = None
                # the head came within its time: the problem document gets a window of its
                # own, as a 200's body does. Read against the attempt's clock, an error
                # that came late in it (the server's 504 at the X-Request-Timeout this
                # client sent, after a long upload) lost its body: "504: Gateway Timeout",
                # without its code, detail or request id
                deadline.responded()
                try:
                    body = self._read(call, response, deadline, MAX_ERROR_BODY)
                except (httpx.HTTPError, TransportError):
                    pass  # the status alone says enough
                finally:
                    response.close()
                if body is not None:
                    response = with_body(response, body)
                delay = policy.delay_after_status(
                    response.status_code, response.headers, attempt, time.monotonic() - started)
                if delay is None:
                    raise error_from_response(response)
            time.sleep(delay)
            attempt += 1


def _path(out: PathLike | None) -> str | None:
    return None if out is None else os.fspath(out)
