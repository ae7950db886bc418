"""The request/response layer shared by :class:`Client` and :class:`AsyncClient`, with no I/O.

Why sans-I/O: the sync and async clients must agree exactly on URLs, headers, bodies,
content negotiation, result shapes and retry decisions. Keeping all of that here, in
plain functions of values, leaves each client a thin loop that only sends, reads and
sleeps, and lets the rules be unit-tested without a socket.

Wire choices (SPEC 3.1-3.3):

* Request body: with the default binary transport, inputs that are all arrays go as one
  ``.npy`` (one input) or an ``.npz`` (entries ``"0"``, ``"1"``, ...; cotangents or
  tangents as ``cotangents``, ``cotangents/0``, ...) with the options in the query string.
  A pytree parameter (a dict, or a tuple/list holding arrays) is one member per leaf,
  named by its path (``0/w``, ``0/b``), or nested in a JSON body; never an ``.npy``.
  A list whose items are all scalars (Python numbers, numpy scalars, 0-d arrays or
  tensors), as ``list(x)`` gives, is one array of plain numbers like ``x.tolist()``; a
  tuple holding arrays, even 0-d ones, stays a tree node (a tuple of 0-d leaves).
  Inputs given as plain numbers (lists, Python floats) must take the function's declared
  dtype, so those calls go as a JSON body whose arrays are base64: still exact and
  compact. ``transport="json"`` sends readable JSON both ways.
* Response: ``Accept: application/x-npy, application/x-npz;q=0.9`` when the result is
  probably one bare array (int ``argnums``, no ``return_output``, no aux known): the
  server answers npy when it can (streamed into a preallocated array, or into a file for
  ``out=``) and npz otherwise; ``application/x-npz`` when more is certainly due. A
  server that answers 406 instead of negotiating gets the call again with npz, and the
  function is remembered.
* ``sparsity`` other than ``dense`` (SPEC 7): the Jacobian or Hessian is one 2-D sparse
  matrix (output elements x input elements), asked for as ``.npz`` (the members
  ``scipy.sparse.save_npz`` writes) or JSON, and returned as a ``scipy.sparse`` array
  when scipy is installed, else a :class:`~jacobian_client.wire.SparseCOO`.
* Results are numpy arrays shaped like ``torch.func`` returns them; an aux (and an
  output when ``return_output=True``) come after the main result in a tuple:
  ``J``, ``(J, aux)``, ``(J, output)`` or ``(J, output, aux)``.
"""

from __future__ import annotations

import email.utils
import inspect
import io
import math
import random
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import quote

import httpx
import numpy as np

from . import wire
from ._arrays import Plain, as_plain_node, as_wire_value, is_torch_tensor, json_array
from ._decoding import ACCEPT_ENCODING, is_identity, too_large
from ._errors import IncompleteResponse, InvalidInput, JacobianServiceError, NotAcceptable, ServiceUnreachable, TransportError
from ._models import FunctionInfo
from ._npystream import FileSink, MemorySink, NpyHeader, NpyReceiver, Sink, check_out_path
from ._progress import Progress

__all__ = [
    "BINARY",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "JSON_TRANSPORT",
    "MAX_ERROR_BODY",
    "Call",
    "Deadline",
    "Protocol",
    "RetryPolicy",
    "bind_inputs",
    "check_api_key",
    "check_option_clash",
    "client_closed",
    "input_leaves",
    "in_sdk_terms",
    "inputs_in_one_dict",
    "input_tree",
    "is_input_node",
    "not_an_answer",
    "out_refused",
    "parse_retry_after",
    "shapes_of",
    "shown_url",
    "transport_error",
    "with_body",
    "looks_like_input",
    "own_options",
]

BINARY = "binary"
JSON_TRANSPORT = "json"
TRANSPORTS = (BINARY, JSON_TRANSPORT)
COMPUTE_KINDS = tuple(wire.RESULT_KEY)
#: result key of each endpoint in JSON and npz responses

#: Accept for a result that is probably one bare array: npy, else whatever else it is
NPY_OR_NPZ = f"{wire.NPY}, {wire.NPZ};q=0.9"

#: connection pool: enough parallel calls for a notebook or a row-split, keep-alive reuse
DEFAULT_LIMITS = httpx.Limits(max_connections=32, max_keepalive_connections=16, keepalive_expiry=30.0)

#: the default of the clients' ``max_response_bytes``: the most bytes of one response
#: held in memory (decoded; an .npy or .npz as it declares itself). Twice the server's
#: default MAX_RESULT_BYTES; a larger Jacobian streams to a file with ``out=``.
DEFAULT_MAX_RESPONSE_BYTES = 1 << 30

#: metadata answers (``functions()``, ``function()``, ``info()``) are small documents: at
#: most this much of one is read, whatever ``max_response_bytes`` allows (JSON takes
#: several times its size once parsed, so a gigabyte of it would take many)
MAX_METADATA_BYTES = 64 << 20
_METADATA_KINDS = ("functions", "function", "info")

try:
    from importlib.metadata import version as _pkg_version

    _VERSION = _pkg_version("jacobian-service")
except Exception:  # not installed (running from a checkout)
    _VERSION = "0"
USER_AGENT = f"jacobian-client/{_VERSION} httpx/{httpx.__version__}"


# --------------------------------------------------------------------------- retries


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):  # a year past C's int: OverflowError out of the call
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying an idempotent call again.

    Retried: 429 and 503 answers, and transport failures that happen before any response
    arrived (refused or reset connections, a keep-alive connection the server had just
    closed). Not retried: read timeouts (the server may still be computing; a repeat would
    double its load) and anything that broke after a response began (a half-written file
    is reported, not silently redone).

    The wait is exponential with full jitter (``uniform(0, base * 2**attempt)``, capped at
    ``backoff_max``) so that many clients do not come back in step; a ``Retry-After`` from
    the server is honoured as the minimum (plus up to 10% jitter). Every retry ends within
    ``max_retry_time`` seconds of the first try: a wait that would end past it is not
    started, and the last error is raised instead. ``max_retries`` bounds the retries the
    client decides on (a failure without a ``Retry-After``, or with ``Retry-After: 0``);
    past it, an answer that asks for a wait (the server up, saying when to come back) is
    still retried, until that time is spent, each wait at least half the backoff's cap
    too, as budgets of time in production SDKs do (Google's, with no count at all): one
    client's 40 concurrent streamed Jacobians, refused 429 ``Retry-After: 1`` past the
    client's share of streams while the first were sent, raised ``Overloaded`` after
    three retries in 4 s of a 15 s batch. ``max_retries=0`` retries nothing.
    """

    max_retries: int = 3
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    max_retry_time: float = 60.0
    retry_statuses: frozenset[int] = frozenset({429, 503})
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, elapsed: float, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None to give up."""
        if attempt >= self.max_retries and not (retry_after and self.max_retries > 0):
            return None
        cap = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt, 64))
        # past the count, at least half the cap: a server saying Retry-After: 0.001 at each
        # try is not asked again at once, over and over, until the time is spent
        backoff = self.rng.uniform(cap / 2 if attempt >= self.max_retries else 0.0, cap)
        if retry_after is not None:
            backoff = max(backoff, retry_after * self.rng.uniform(1.0, 1.1))
        if elapsed + backoff > self.max_retry_time:
            return None
        return backoff

    def delay_after_status(self, status: int, headers: Mapping[str, str], attempt: int, elapsed: float) -> float | None:
        if status not in self.retry_statuses:
            return None
        return self.delay(attempt, elapsed, parse_retry_after(headers.get("retry-after")))

    def delay_after_exception(self, exc: BaseException, attempt: int, elapsed: float) -> float | None:
        if not is_retryable_exception(exc):
            return None
        return self.delay(attempt, elapsed)


_RETRYABLE_EXCEPTIONS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,  # e.g. "Server disconnected without sending a response"
    httpx.ReadError,
    httpx.WriteError,
)


def is_retryable_exception(exc: BaseException) -> bool:
    return isinstance(exc, _RETRYABLE_EXCEPTIONS) and not _malformed_answer(exc)


def _malformed_answer(exc: BaseException) -> bool:
    """A protocol error raised by h11 reading what the server sent (a garbled status line,
    conflicting Content-Lengths): the server answered, wrongly, and would again. A
    RemoteProtocolError of httpcore's own ("Server disconnected without sending a
    response", a keep-alive connection closed under the request) has no such cause and
    is retried. A malformed answer was retried as that was, each retry running the
    computation again."""
    seen = 0
    cause = exc.__cause__ or exc.__context__
    while cause is not None and seen < 8:
        if type(cause).__module__.split(".")[0] == "h11" and "RemoteProtocolError" in type(cause).__name__:
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1  # httpcore raises it in the except
    return False


def shown_url(url: httpx.URL) -> str:
    """A URL as messages show it: scheme, host, port and path, never the credentials of a
    ``user:password@`` base URL or the query (messages end up in logs)."""
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"


def transport_error(exc: BaseException, call: Call) -> TransportError:
    kind = type(exc).__name__
    try:  # which server: "Connection refused" alone does not say a URL was wrong (httpx's errors carry it)
        where = shown_url(exc.request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # not httpx's, or one made before any request
        where = call.path
    message = f"{call.method} {where}: {kind}: {exc or 'no detail'}"
    proxy = _environment_proxy(exc)
    if proxy is not None:  # what failed to connect was the proxy, not (or not yet) the service
        return ServiceUnreachable(
            f"{message}; sent through the proxy {proxy} that the environment names (HTTP_PROXY, HTTPS_PROXY or "
            "ALL_PROXY, as httpx reads them): is that proxy up and able to reach the service, or should NO_PROXY "
            "name this host?")
    if isinstance(exc, httpx.ConnectError):  # not a timeout: nothing answered at all
        return ServiceUnreachable(f"{message}; is the service running, and is the client's base_url its address?")
    return TransportError(message)


def _environment_proxy(exc: BaseException) -> str | None:
    """The proxy (shown without credentials) that the environment's HTTP_PROXY /
    HTTPS_PROXY / ALL_PROXY route a failed connection's request through, NO_PROXY
    considered, as the clients' httpx (``trust_env``) does; None when none does or it
    cannot be told. A proxy that was down read "Connection refused; is the service
    running, and is the client's base_url its address?", with the service up at that
    address and the proxy named nowhere."""
    if not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return None
    try:
        url = exc.request.url
        from httpx._utils import URLPattern, get_environment_proxies  # httpx's own reading of the variables

        for pattern, proxy in sorted((URLPattern(k), v) for k, v in get_environment_proxies().items()):
            if pattern.matches(url):
                return None if proxy is None else shown_url(httpx.URL(proxy))
    except Exception:  # another httpx, no request: the hint is only a hint
        return None
    return None


def not_an_answer(call: Call, response: httpx.Response) -> TransportError | None:
    """The error for a status that is neither an answer nor an error, or None for 200.

    Every answer of the API is a 200 (SPEC); the SDK read any status under 400 as one: a
    307 redirect whose body held an ``.npy`` was returned as the Jacobian, and a proxy's
    302 to a login page raised "unexpected response Content-Type 'text/html'". Redirects
    are not followed (they would take the inputs and the API key to wherever they point)."""
    status = response.status_code
    if status == 200:
        return None
    what = f"{call.method} {call.path}: the server answered {status} {response.reason_phrase}".rstrip()
    location = response.headers.get("location", "")
    if 300 <= status < 400 and location:
        return TransportError(f"{what} to {location[:200]!r}; redirects are not followed (they could take the request and its API key "
                              "to another host): give the client the base URL it should use")
    return TransportError(f"{what}, not 200 with a result; is base_url this service's?")


def client_closed(call: Call) -> JacobianServiceError:
    """A call on a closed client (httpx's own answer is a bare RuntimeError)."""
    return JacobianServiceError(f"{call.method} {call.path}: this client is closed; make a new one")


def with_body(response: httpx.Response, body: bytes) -> httpx.Response:
    """A streamed response whose body was read piece by piece (under a deadline), as
    ``response.read()`` would have left it: for the error types, which read ``.json()``."""
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() != "content-encoding"]  # body is decoded
    extensions = {k: v for k, v in response.extensions.items() if k in ("http_version", "reason_phrase")}
    return httpx.Response(response.status_code, headers=headers, content=body, request=response.request,
                          extensions=extensions)


# --------------------------------------------------------------------------- deadlines

#: with ``out=`` (or a row-split sink) the deadline restarts each time this many bytes arrive
STREAM_PROGRESS_BYTES = 1 << 20

#: the most of an error's body (or a health probe's) that is read. A problem document is
#: small (the server cuts its detail at 2,000 characters); a server sending an endless
#: one, fast, grew the caller by gigabytes (each MiB came within the timeout) before
#: anything was raised. The rest is left unread and its connection closed.
MAX_ERROR_BODY = 1 << 20


class Deadline:
    """How long one attempt of a call may take: ``timeout`` seconds from its start,
    response body included.

    httpx's timeouts are per operation (one connect, one read of the socket), so a server
    that trickles a byte at a time never trips them: a 288-byte result took 144 s under
    ``timeout=2``. The clients therefore :meth:`check` this deadline as each piece of a
    body arrives, and bound each read of the socket by it meanwhile (``body_deadline``):
    a body that stops, or whose bytes make no piece (a chunked size line trickled
    forever), ends at the deadline too.

    A response may be far larger than any one timeout covers (a streamed Jacobian, to a
    file or to memory): the deadline covers the wait for the response, then restarts with
    every ``progress_bytes`` (1 MiB) that arrive, so a result of any size streams while it
    keeps coming, and a trickle still ends (a small answer within one timeout).
    """

    def __init__(self, seconds: float | None, *, progress_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.progress_bytes = progress_bytes
        self._clock = clock
        self._ends = None if seconds is None else clock() + seconds
        self._mark = 0  # bytes received when a streamed transfer's clock last restarted

    @property
    def ends(self) -> float | None:
        """When this attempt's time (or, streaming, the current MiB's) runs out
        (``time.monotonic()``; None: no deadline)."""
        return None if self.seconds is None else self._ends

    def responded(self) -> None:
        """The response's headers are in: a streamed transfer's clock starts over."""
        if self.seconds is not None and self.progress_bytes is not None:
            self._ends = self._clock() + self.seconds

    def check(self, call: Call, received: int) -> None:
        """After each piece of the body (``received`` bytes so far): TransportError if late."""
        if self._ends is None or self.seconds is None:
            return
        now = self._clock()
        if self.progress_bytes is not None and received - self._mark >= self.progress_bytes:
            self._mark = received
            self._ends = now + self.seconds
        elif now > self._ends:
            if self.progress_bytes is not None:
                what = f"less than {self.progress_bytes >> 20} MiB of the response arrived in"
            else:
                what = "the response took longer than"
            raise TransportError(f"{call.method} {call.path}: ReadTimeout: {what} timeout={self.seconds:g} s "
                                 f"({received} bytes received)")


def server_deadline(timeout: float | None) -> str | None:
    """The ``X-Request-Timeout`` a client with this ``timeout`` sends (None: none): a
    tenth less, at most half a second less, for the server's answer to travel and the
    client's clock to have started first (it starts before the upload ends, the server's
    once the body is read). Spelled as the header's decimal number, to nine digits
    ("59.5", "0.18": not 0.18000000000000002)."""
    if timeout is None or not math.isfinite(timeout) or timeout <= 0:
        return None
    return format(float(timeout) - min(0.5, float(timeout) / 10), ".9g")


# --------------------------------------------------------------------------- calls


@dataclass(frozen=True)
class Expected:
    """What the inputs sent say about a result's value, checked before it is returned.

    A server (or a proxy) answering another call's result, or a buggy one, is not to be
    trusted blindly: a Jacobian of a 3-vector answered as a 2x2 matrix, or as integers,
    was returned as it came. These rules hold for every right answer (torch.func's
    shapes): a Jacobian, Hessian, vjp or hvp ends with the shape of an input it
    differentiates (per example, when batched), and is floating (jacrev refuses integer
    outputs); a batched result starts with the batch size; a derivative is sparse exactly
    when a sparse one was asked for.
    """

    kind: str
    suffixes: tuple[tuple[int, ...], ...] | None  # one must end the value's shape; None: not checked
    batch: int | None  # the value's first dimension; None: not checked
    floating: bool
    sparse: bool | None = None  # a sparse matrix (True) or dense arrays (False) asked for; None: either
    columns: int | None = None  # a sparsity= answer's columns: the differentiated elements; None: not checked

    def check(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """TransportError if an array of the value, shaped and typed so, cannot be right."""
        what = f"the {self.kind} response's value"
        if self.sparse:
            raise TransportError(f"{what} is a dense array; a sparse matrix was asked for (sparsity=...)")
        self._check_matrix(shape)
        if self.floating and dtype.kind not in "fc":
            raise TransportError(f"{what} is {dtype}; a {self.kind} is floating")
        if self.batch is not None and (not shape or shape[0] != self.batch):
            raise TransportError(f"{what} is shaped {shape}; a batch of {self.batch} examples was sent")
        if self.suffixes is not None and not any(
                len(shape) >= len(s) and shape[len(shape) - len(s):] == s for s in self.suffixes):
            ends = " or ".join(str(s) for s in self.suffixes)
            raise TransportError(f"{what} is shaped {shape}; a right one ends with the shape of an input it "
                                 f"differentiates: {ends}")

    def _check_matrix(self, shape: tuple[int, ...]) -> None:
        """A sparsity= answer is one (outputs x n) matrix, n x n for a Hessian."""
        if self.columns is None:
            return
        n = self.columns
        if len(shape) != 2 or shape[1] != n or (self.kind == "hessian" and shape[0] != n):
            want = f"({n}, {n})" if self.kind == "hessian" else f"(m, {n})"
            raise TransportError(f"the {self.kind} response's matrix is shaped {shape}; the inputs sent make it {want}")

    def check_tree(self, tree: Any) -> None:
        if wire.is_sparse(tree):  # before tuple: SparseCOO is one
            if self.sparse is False:
                raise TransportError(f"the {self.kind} response's value is a sparse matrix; a dense one was asked for")
            self._check_matrix(tuple(int(d) for d in tree.shape))
        elif isinstance(tree, np.ndarray):
            self.check(tree.shape, tree.dtype)
        elif isinstance(tree, (tuple, list)):
            for t in tree:
                self.check_tree(t)
        elif isinstance(tree, dict):
            for t in tree.values():
                self.check_tree(t)


def _leaf_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, Plain):
        try:
            return tuple(np.shape(value.value))
        except ValueError:  # ragged: the server refuses it
            return None
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def _expected(kind: str, fields: Mapping[str, Any], values: Sequence[Any]) -> Expected | None:
    """The :class:`Expected` of a compute call with these fields and inputs."""
    shapes = [_leaf_shape(v) for i, tree in enumerate(values) for _, v in input_leaves(tree, str(i))]
    batch = None
    moved = any(k in fields for k in _DIMS)  # the batch is where in_dims / out_dims say: not checked
    if (fields.get("batched") and not moved and not fields.get("batched_vectors") and "sparsity" not in fields and shapes
            and all(shapes) and len({s[0] for s in shapes}) == 1):  # type: ignore[index]
        batch = shapes[0][0]  # type: ignore[index]
    suffixes = None
    if kind in ("jacobian", "hessian", "vjp", "hvp") and "sparsity" not in fields:
        argnums = fields.get("argnums", 0)
        picked = argnums if isinstance(argnums, list) else [argnums]
        if all(isinstance(a, int) and -len(values) <= a < len(values) for a in picked):
            chosen = [_leaf_shape(v) for a in picked for _, v in input_leaves(values[a], "")]
        else:  # a parameter's name: its position is the server's to know; any input's shape will do
            chosen = shapes
        if fields.get("batched"):
            chosen = [s[1:] if s else None for s in chosen]
        if chosen and all(s is not None for s in chosen) and not moved:
            suffixes = tuple(dict.fromkeys(chosen))  # type: ignore[arg-type]
    # jvp is not: torch.func.jvp gives an integer output an integer (zero) tangent
    floating = kind in ("jacobian", "hessian", "vjp", "hvp")
    sparse = None
    if kind != "evaluate":  # sparse_format="dense": the sparse path's matrix, as a dense array
        sparse = "sparsity" in fields and fields.get("sparse_format") != "dense"
    columns = None
    if kind in ("jacobian", "hessian") and "sparsity" in fields and not fields.get("batched"):
        argnums = fields.get("argnums", 0)
        picked = argnums if isinstance(argnums, list) else [argnums]
        if all(isinstance(a, int) and -len(values) <= a < len(values) for a in picked):
            sizes = [_leaf_shape(v) for a in picked for _, v in input_leaves(values[a], "")]
            if all(s is not None for s in sizes):
                columns = sum(math.prod(s) for s in sizes)  # type: ignore[arg-type]
    return Expected(kind, suffixes, batch, floating, sparse, columns)


@dataclass
class Call:
    """One logical API call: what to send, and how to read what comes back.

    ``fallback`` is the same call asking for npz, used after a 406 to an npy ``Accept``.
    """

    method: str
    path: str
    kind: str  # a COMPUTE_KINDS entry, or "functions" / "function" / "info" / "sparsity"
    name: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    return_output: bool = False
    out: str | None = None
    sink: Sink | None = None  # where a streamed npy goes, when not memory or ``out``
    progress: bool = False
    parts: bool = False  # return every part by name ({"value", "output", "aux"}), not a tuple
    fallback: Call | None = None
    expect: Expected | None = None  # what the result's value must look like, from the inputs sent
    follow: Any = None  # the differentiated inputs' structure as the caller gave it (_caller_structure)
    wrap: int = 0  # tuples put back around a streamed array: argnums=(i,) asked as i for out= (_one_array_for_out)
    maps: tuple[tuple[int, tuple[str, ...]], ...] = ()  # positional dict inputs' keys (inputs_in_one_dict)

    @property
    def accept(self) -> str:
        return self.headers.get("Accept", wire.JSON)


def _function_path(name: str, action: str | None = None) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError("a function name is a non-empty string")
    base = f"/v1/functions/{quote(name, safe='')}"
    return f"{base}/{action}" if action else base


def _is_array_like(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic)) or is_torch_tensor(value) or (
        hasattr(value, "__array__") and not isinstance(value, (list, tuple))
    )


def _is_scalar(value: Any) -> bool:
    """A Python number, a numpy scalar, or a 0-d array or tensor: in a list, one element
    of an array (``list(x)`` holds numpy scalars, or 0-d tensors, where ``x.tolist()``
    holds floats; both are one array)."""
    return isinstance(value, (bool, int, float, complex, np.generic)) or (
        _is_array_like(value) and getattr(value, "ndim", None) == 0)


def _is_subtree(value: Any) -> bool:
    """An item that makes the list holding it a tree node: an array of rank >= 1 or a dict."""
    return isinstance(value, dict) or (_is_array_like(value) and not _is_scalar(value))


def _is_node(tree: Any) -> bool:
    """A tuple, or a list holding arrays (rank >= 1) or trees, is a tree node; a list of
    numbers or scalars is one array."""
    return isinstance(tree, tuple) or (
        isinstance(tree, list) and any(_is_subtree(t) or isinstance(t, tuple) for t in tree)
    )


def _vector_tree(tree: Any, *, binary: bool) -> Any:
    """Cotangents / tangents as a JSON tree: a tuple (or a list holding arrays) is a
    tree node, one per output (cotangents) or per differentiated input (tangents); a
    list of numbers is one array."""
    if _is_node(tree):
        return [_vector_tree(t, binary=binary) for t in tree]
    if isinstance(tree, dict):
        return {str(k): _vector_tree(v, binary=binary) for k, v in tree.items()}
    return json_array(as_wire_value(tree), binary=binary)


_DIMS = ("in_dims", "out_dims")


def _dims_json(key: str, value: Any) -> Any:
    """torch's in_dims / out_dims (ints, None, tuples, lists and dicts of them) as JSON."""
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))):
        return None if value is None else int(value)
    if isinstance(value, (list, tuple)):
        return [_dims_json(key, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _dims_json(key, v) for k, v in value.items()}
    raise ValueError(f"{key} holds ints, None, and tuples, lists or dicts of them (torch.func.vmap's), not {value!r}")


def _query_value(value: Any) -> str:
    """Query form of an option (the server's parsing.py reads these): booleans as
    ``true``/``false``, lists comma-joined with a trailing comma for one item (so that
    ``argnums=(0,)`` stays a tuple)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) + ("," if len(value) == 1 else "")
    return str(value)


def _vector_leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """Cotangents / tangents as ``(member path, wire value)`` pairs for an ``.npz``:
    ``""`` for one array, ``"/0"``, ``"/1"`` for a tuple, ``"/key"`` for a dict (the
    server's parsing.py reads ``cotangents``, ``cotangents/0``, ...)."""
    if _is_node(tree):
        return [leaf for i, t in enumerate(tree) for leaf in _vector_leaves(t, f"{path}/{i}")]
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _vector_leaves(v, f"{path}/{k}")]
    return [(path, as_wire_value(tree))]


def _npz_can_name(tree: Any) -> bool:
    """Whether every dict key of a cotangent / tangent tree can be one segment of an
    ``.npz`` member's path. Keyed like an output ``{"a/b": y, "a": {"c": z}}``, the member
    ``cotangents/a/b`` was read as two levels and ``cotangents/`` (key ``""``) as no
    name: the default transport's vjp and hvp were a 422 where JSON's answered. Such
    vectors go as JSON, whose objects key them as they are."""
    if _is_node(tree):
        return all(_npz_can_name(t) for t in tree)
    if isinstance(tree, dict):
        return all(str(k) and "/" not in str(k) and _npz_can_name(v) for k, v in tree.items())
    return True


def is_input_node(value: Any) -> bool:
    """A pytree parameter: a dict, a list holding arrays of rank >= 1, dicts or such
    lists, or a tuple holding any arrays (0-d too: a tuple of 0-d leaves). A list (or
    tuple) of plain numbers, and a list of scalars of any kind, stays one array. Other
    mappings and torch's parameter containers are read as the dict or tuple they stand
    for (``as_plain_node``)."""
    value = as_plain_node(value)
    if isinstance(value, dict):
        return True
    if isinstance(value, tuple):
        return any(_is_array_like(v) or isinstance(v, dict) or is_input_node(v) for v in value)
    return isinstance(value, list) and any(_is_subtree(v) or is_input_node(v) for v in value)


def input_tree(value: Any) -> Any:
    """One caller input -> a wire value, or (a pytree parameter) lists and dicts of them."""
    value = as_plain_node(value)
    if isinstance(value, dict):
        return {str(k): input_tree(v) for k, v in value.items()}
    if is_input_node(value):
        return [input_tree(v) for v in value]
    return as_wire_value(value)


def exact_python_floats(values: list[Any]) -> list[Any]:
    """The inputs (wire trees) with each bare Python float that float32 would round sent
    as a float64 array, where another input holds a float64 array; as they were otherwise.

    A plain JSON number takes its input's declared dtype on the service, float32 for a
    ``floating`` one (SPEC). In the caller's torch or numpy a Python float is a double
    that takes the dtype of the arrays beside it: ``f(t, y)`` in-process, ``-t * y`` of a
    float64 ``y`` computes with ``t`` exact, where remote ``t = 0.0287...`` was rounded
    to float32 first, every value and derivative off by ~1e-8 relative, silently (torch's
    ``remote(client, "rhs")(t, y)``, SciPy's ``fun(y, t)`` under ``solve_ivp``, whose
    ``t`` is a float). Beside float64 arrays it goes as float64 now, which torch's
    promotion then treats as the Python number (a 0-d tensor takes no part beside arrays
    of the same kind). Only a float that float32 would change: a whole number such as
    ``3.0`` stays a plain number, which an integer input takes (a float64 array it would
    refuse), and beside float32 arrays float32 is what the caller's torch computes in."""
    leaves = [leaf for tree in values for _, leaf in input_leaves(tree, "")]
    if not any(isinstance(leaf, np.ndarray) and leaf.dtype == np.float64 for leaf in leaves):
        return values

    def exact(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: exact(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [exact(v) for v in tree]
        value = tree.value if isinstance(tree, Plain) else None
        if type(value) is float and not math.isnan(value):
            with np.errstate(over="ignore"):  # past float32's range: rounded to inf, so sent exact
                rounded = float(np.float32(value))
            if rounded != value:
                return np.array(value, dtype=np.float64)
        return tree

    return [exact(tree) for tree in values]


def input_leaves(tree: Any, path: str) -> list[tuple[str, Any]]:
    """``(.npz member path, wire value)`` per leaf: ``0``, or ``0/w``, ``0/1/0`` below a
    pytree parameter (the server's parsing.py reads them by the declared tree)."""
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in input_leaves(v, f"{path}/{k}")]
    if isinstance(tree, list):
        return [leaf for i, v in enumerate(tree) for leaf in input_leaves(v, f"{path}/{i}")]
    return [(path, tree)]


def _json_input(tree: Any, *, binary: bool) -> Any:
    if isinstance(tree, dict):
        return {k: _json_input(v, binary=binary) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_json_input(v, binary=binary) for v in tree]
    return json_array(tree, binary=binary)


def _one_array_for_out(kind: str, fields: dict[str, Any]) -> int:
    """Make a Jacobian or Hessian asked with ``out=`` one array on the wire, or refuse it
    before anything is sent; returns how many tuples to put back around the streamed array.

    A bare ``.npy`` holds one array. ``argnums=(0,)`` is a tuple of one Jacobian (of one
    tuple, a Hessian): the server refused it with a 406 telling the caller to "ask for
    application/x-npz", which an SDK caller cannot; it is asked as ``argnums=0`` and the
    tuple put back. Several argnums, or ``return_output``, cannot fit one file: a
    ValueError here, after no upload, rather than the server's 406 after one. (A sparse
    result's dense form is one matrix whatever argnums is: left as it is.)"""
    if fields.get("return_output"):
        raise ValueError(f"out= streams the {kind} alone into one .npy file; return_output=True asks for the "
                         "function's output beside it: call evaluate() for the output, or leave out= off to have "
                         "both in memory")
    argnums = fields.get("argnums")
    if not isinstance(argnums, list) or "sparsity" in fields:
        return 0
    if len(argnums) > 1:
        instead = (f"ask for each with its own file (argnums={argnums[0]!r}, out=...)" if kind == "jacobian"
                   else "differentiate one input (its block's own file)")
        raise ValueError(f"out= streams one array into one .npy file; argnums={tuple(argnums)!r} asks for "
                         f"{len(argnums)} {kind}s' blocks: {instead}, or leave out= off to have them in memory")
    if argnums[0] == 0:
        del fields["argnums"]  # the default, as _fields leaves it out
    else:
        fields["argnums"] = argnums[0]
    return 2 if kind == "hessian" else 1


def out_refused(call: Call, exc: NotAcceptable) -> NotAcceptable:
    """The server's 406 to an ``out=`` call (a function with aux, several outputs, a pytree
    parameter: only the server knows), said in the SDK's terms: the server's advice,
    "ask for application/x-npz", is for a raw HTTP caller; what it could not carry stays.
    What it could not carry is read from the problem's ``reason`` member (beside
    ``not_one_array``, its code), not from the detail's words: a reworded detail had the
    SDK quote the server's whole advice. A server older than the members: its detail,
    read as it was worded then."""
    reason = exc.problem.get("reason")
    if not (isinstance(reason, str) and isinstance(exc.problem.get("not_one_array"), str)):
        reason = exc.detail.split("; ask for ", 1)[0]
        head = "this result is not one bare array ("
        if reason.startswith(head) and reason.endswith(")"):
            reason = reason[len(head):-1]
    problem = dict(exc.problem)
    problem["detail"] = (f"out= streams one array into one .npy file; the {call.kind} of {call.name!r} is not one "
                         f"({reason}): leave out= off to have it in memory")
    return type(exc)(exc.response, problem)


def in_sdk_terms(call: Call, exc: InvalidInput) -> InvalidInput | None:
    """A 422 for inputs left out of the one-array ``.npy`` body the SDK chose, said to its
    caller (None: the server's words stand). The server advises a raw HTTP caller to
    "send them all as application/x-npz or JSON", a format the SDK chose, not the caller;
    from the problem's ``missing`` and ``inputs`` members the caller is told which inputs
    the function takes and how to pass them. (A JSON or ``.npz`` body's 422 names what was
    missing, and what it sent instead, with no such advice.)"""
    problem = exc.problem
    missing, inputs = problem.get("missing"), problem.get("inputs")
    if call.headers.get("Content-Type") != wire.NPY or not (
            isinstance(missing, list) and missing and isinstance(inputs, list)
            and all(isinstance(n, str) for n in (*missing, *inputs))):
        return None
    problem = dict(problem)
    problem["detail"] = (f"missing input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                         f"{call.name} takes {inputs}: pass each input, in order or by name")
    return type(exc)(exc.response, problem)


def inputs_in_one_dict(call: Call, exc: InvalidInput, info: FunctionInfo | None) -> InvalidInput | None:
    """A 422 for a dict given by position whose keys are the function's own input names
    (``client.evaluate("f", {"x": x, "w": w})``: the HTTP body's ``inputs`` object), said
    to its caller (None: the server's words stand). The SDK sends such a dict as a
    pytree input, as it must for a function that takes one, and the server's refusal
    spoke of the wire ("missing input 'w'", "send it as the member '0', not ['0/x']",
    "unknown array keys ['x']"). ``info``: the function's description (its input names,
    and which inputs are pytrees, whose dicts are not this), where the SDK has it; else
    the names the 422 lists."""
    if not call.maps:
        return None
    listed = exc.problem.get("inputs")
    if info is not None:
        names = [i.name for i in info.inputs]
        trees = {n for n, i in zip(names, info.inputs) if i.tree is not None}
    elif isinstance(listed, list) and all(isinstance(n, str) for n in listed):
        names, trees = list(listed), set()
    else:
        return None
    for i, keys in call.maps:
        if i < len(names) and names[i] not in trees and set(keys) <= set(names):
            problem = dict(exc.problem)
            problem["detail"] = (
                f"input {names[i]!r} was given a dict keyed by {call.name}'s input names ({', '.join(keys)}){_as_arguments(names)}"
                f" (the service said: {exc.problem.get('detail')})")
            return type(exc)(exc.response, problem)
    return None


_UNBOUND = object()  # an input not given (bind_inputs)

# The HTTP body carries inputs as one "inputs" list or object; a caller who knows it wrote
# inputs={"x": x, "w": w} (or inputs=[x, w]) and read only that no input is so named. The
# SDK's calls take inputs as the local function does (torch.func's way): as arguments.
_BODY_KEYS = ("inputs", "input")


def _as_arguments(names: Sequence[str]) -> str:
    shown = ", ".join(f"{n}=..." for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return (f": inputs go as the call's own arguments, in order or by name ({shown}), as the function is "
            "called in-process (a dict of them as **inputs), not in one list or dict as the HTTP body's 'inputs'")


def own_options(method: Any) -> dict[str, Any]:
    """A method's keyword-only options and their defaults (``mode``, ``out``, ...)."""
    key = getattr(method, "__func__", method)
    found = _OWN_OPTIONS.get(key)
    if found is None:
        found = _OWN_OPTIONS[key] = {p.name: p.default for p in inspect.signature(key).parameters.values()
                                     if p.kind is p.KEYWORD_ONLY}
    return found


_OWN_OPTIONS: dict[Any, dict[str, Any]] = {}


def _set(value: Any, default: Any) -> bool:
    """Whether an option's value is other than its default (an array never is one)."""
    return not (value is default or (type(value) is type(default) and value == default))


def looks_like_input(value: Any) -> bool:
    """An option's value that is an array (numpy's, torch's, JAX's): an input given by a
    name the method takes as an option (``mode=M`` of a function of ``(x, mode)``)."""
    return hasattr(value, "shape") or hasattr(value, "__array__")


def check_option_clash(label: str, fn: str, options: Mapping[str, Any], values: Mapping[str, Any],
                       names: Sequence[str], inputs: Sequence[Any], named: Mapping[str, Any]) -> None:
    """A ``TypeError`` where an input of the function is named as one of the method's own
    options (``options``: its keyword-only parameters and their defaults; ``values``: the
    call's), the input is not given otherwise (by position or by name), and the option
    is: ``client.jacobian("f", x, mode=M)`` of ``f(x, mode)`` set the option (a wrong
    ``mode`` error, or ``rows=`` read as rows) and left the input out. Python cannot say
    which was meant; the caller is told to pass the input by position. An option given
    beside the input (by position) is that option, as Python would bind it."""
    listed = ", ".join(names)
    for i, n in enumerate(names):
        if n not in options or i < len(inputs) or n in named:
            continue
        if n in values and _set(values[n], options[n]):
            raise TypeError(
                f"{label}: {n}= sets its own option {n!r}, and {fn} also takes an input {n!r}, which this call "
                f"leaves out; pass input {n!r} by position ({fn}'s inputs, in order: {listed}), and {n}= "
                f"beside it stays the option")
        if named:
            raise TypeError(f"{label} is missing input {n!r} (its inputs are {listed}); {n!r} is also its own "
                            f"option, so {n}= cannot pass it: pass input {n!r} by position")


def bind_inputs(label: str, names: Sequence[str], inputs: Sequence[Any], named: Mapping[str, Any]) -> tuple[Any, ...]:
    """``inputs`` then ``named`` (keyword inputs) in the order of ``names`` (the function's
    declared inputs), checked as Python checks a call: a ``TypeError`` for more
    positional inputs than names, a name the function does not take (the names listed),
    an input given twice (by position and by name) and inputs left out. ``label`` says
    whose call (``remote('f')``, ``client.jacobian('f')``)."""
    listed = ", ".join(names)
    if len(inputs) > len(names):
        raise TypeError(f"{label} takes {len(names)} input{'s' if len(names) != 1 else ''} ({listed}) but "
                        f"{len(inputs)} positional ones were given")
    bound: list[Any] = [*inputs, *[_UNBOUND] * (len(names) - len(inputs))]
    for key, value in named.items():
        if key not in names:
            raise TypeError(f"{label} got an unexpected keyword argument {key!r}; its inputs are {listed}"
                            + (_as_arguments(names) if key in _BODY_KEYS and not label.endswith("'s args") else ""))
        i = list(names).index(key)
        if bound[i] is not _UNBOUND:
            raise TypeError(f"{label} got multiple values for input {key!r} (by position and by name)")
        bound[i] = value
    missing = [n for n, v in zip(names, bound) if v is _UNBOUND]
    if missing:
        raise TypeError(f"{label} is missing input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                        f"(its inputs are {listed})")
    return tuple(bound)


def _check_argnums(argnums: Any) -> Any:
    def ok(a: Any) -> bool:
        return isinstance(a, str) or (isinstance(a, (int, np.integer)) and not isinstance(a, bool))

    if isinstance(argnums, (tuple, list)):
        if not argnums or not all(ok(a) for a in argnums):
            raise TypeError("argnums is an int, a parameter name, or a non-empty tuple of them")
        return [a if isinstance(a, str) else int(a) for a in argnums]
    if not ok(argnums):
        raise TypeError("argnums is an int, a parameter name, or a non-empty tuple of them")
    return argnums if isinstance(argnums, str) else int(argnums)


def shapes_of(items: Sequence[Any]) -> tuple[list[tuple[int, ...]], list[str] | None]:
    """Shapes for ``GET .../sparsity``: a tuple (or list) of ints is a shape, anything
    with a ``shape`` an array (its dtype goes too, when every item is an array)."""
    shapes: list[tuple[int, ...]] = []
    dtypes: list[str] = []
    for item in items:
        if hasattr(item, "shape"):
            shapes.append(tuple(int(d) for d in item.shape))
            dtype = str(getattr(item, "dtype", "")).removeprefix("torch.")  # numpy, torch, jax
            if dtype in wire.DTYPES:
                dtypes.append(dtype)
        elif isinstance(item, (tuple, list)) and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in item):
            shapes.append(tuple(int(d) for d in item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            shapes.append((int(item),))
        else:
            raise TypeError(f"a shape is a tuple of ints (or an array), not {type(item).__name__}")
    return shapes, dtypes if len(dtypes) == len(shapes) and shapes else None


def _check_rows(rows: Any) -> list[int]:
    try:
        start, stop = (int(r) for r in rows)
    except (TypeError, ValueError):
        raise TypeError("rows is a (start, stop) pair of ints") from None
    if not 0 <= start <= stop:
        raise ValueError(f"rows=({start}, {stop}) needs 0 <= start <= stop")
    return [start, stop]


# The results nested like the differentiated inputs: a vjp / hvp is shaped like them, a
# Jacobian holds them at each output leaf, a Hessian them within them.
_FOLLOWING = ("vjp", "hvp", "jacobian", "hessian")


def _caller_structure(kind: str, inputs: Sequence[Any], argnums: Any, names: Sequence[str] | None = None) -> Any:
    """The structure the caller gave the differentiated inputs (``None`` for a leaf;
    tuples, lists and dicts as given), as ``torch.func.jacrev`` nests its result; ``None``
    where there is nothing to follow (plain arrays) or the inputs are named (their position
    is the service's to know).

    The service nests a result by the parameter's *declared* tree, and JSON and ``.npz``
    carry one kind of sequence: a tuple the caller sent where a list is declared came back
    a list (and a dict in the declared key order), where in-process ``jacrev`` follows the
    caller's pytree. ``argnums`` by name: placed by ``names`` (the function's inputs, where
    the client has described it: ``client.function(name)``), else one name by the one pytree
    parameter the caller sent (several names, or pytrees of different structures, are not
    guessed: the declared tree's nesting stands)."""
    def skeleton(x: Any) -> Any:
        x = as_plain_node(x)
        if isinstance(x, dict):
            return {str(k): skeleton(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)) and is_input_node(x):
            return type(x)(skeleton(v) for v in x)
        return None

    picked = argnums if isinstance(argnums, (list, tuple)) else [argnums]
    if any(isinstance(a, str) for a in picked):
        if names is None and len(picked) > 1:
            return None  # which name is the pytree parameter? (client.function(name) tells)
        trees = {repr(t): t for t in (skeleton(x) for x in inputs) if t is not None}
        by_name = {n: i for i, n in enumerate(names or ()) if i < len(inputs)}

        def place(a: Any) -> Any:
            if not isinstance(a, str) or a in by_name or names is not None:
                return by_name.get(a, a)
            return next(i for i, x in enumerate(inputs) if skeleton(x) is not None) if len(trees) == 1 else None

        placed = [place(a) for a in picked]
        if any(a is None for a in placed):
            return None
        argnums = tuple(placed) if isinstance(argnums, (list, tuple)) else placed[0]
        picked = placed
    if not all(isinstance(a, int) and not isinstance(a, bool) and -len(inputs) <= a < len(inputs) for a in picked):
        return None
    if isinstance(argnums, (list, tuple)):
        structure: Any = tuple(skeleton(inputs[a]) for a in argnums)
    else:
        structure = skeleton(inputs[argnums])
        if structure is None:
            return None
    if kind == "hessian":  # jacfwd of jacrev: the structure again at each of its leaves
        structure = _substitute(structure, structure)
    return structure


def _substitute(tree: Any, leaf: Any) -> Any:
    """``tree`` with ``leaf`` at each of its leaves."""
    if isinstance(tree, dict):
        return {k: _substitute(v, leaf) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_substitute(v, leaf) for v in tree)
    return leaf


def _fits(node: Any, structure: Any) -> bool:
    """``node`` is ``structure`` up to the kind of sequence and the order of keys."""
    if structure is None:
        return isinstance(node, np.ndarray)
    if isinstance(structure, dict):
        return isinstance(node, dict) and node.keys() == structure.keys() and all(
            _fits(node[k], v) for k, v in structure.items())
    return (isinstance(node, (list, tuple)) and not wire.is_sparse(node) and len(node) == len(structure)
            and all(_fits(n, s) for n, s in zip(node, structure)))


def _shaped(node: Any, structure: Any) -> Any:
    if structure is None:
        return node
    if isinstance(structure, dict):
        return {k: _shaped(node[k], v) for k, v in structure.items()}
    return type(structure)(_shaped(n, s) for n, s in zip(node, structure))


def _follow_caller(tree: Any, structure: Any, *, whole: bool) -> Any:
    """``tree`` (a result) with its input-shaped parts nested as ``structure``: the whole
    tree (``whole``: a vjp), else the first nodes from the root that fit it (a Jacobian's
    at its output's leaves: a node above one has more levels than ``structure``). A tree
    that does not fit is returned as it came."""
    if _fits(tree, structure):
        return _shaped(tree, structure)
    if whole:
        return tree
    if isinstance(tree, dict):
        return {k: _follow_caller(v, structure, whole=False) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not wire.is_sparse(tree):
        return type(tree)(_follow_caller(v, structure, whole=False) for v in tree)
    return tree


def _writable(tree: Any) -> Any:
    """Arrays decoded from a response buffer are read-only views; hand out writable ones."""
    if isinstance(tree, np.ndarray):
        return tree if tree.flags.writeable else tree.copy()
    if isinstance(tree, tuple):
        return tuple(_writable(t) for t in tree)
    if isinstance(tree, list):
        return [_writable(t) for t in tree]
    if isinstance(tree, dict):
        return {k: _writable(v) for k, v in tree.items()}
    return tree


class Protocol:
    """Builds :class:`Call` objects and reads responses; remembers per-function facts.

    One instance per client. Its caches (function descriptions, which functions refuse
    npy) only ever change a request's ``Accept``, never a result. ``timeout``: seconds
    each attempt of a call may take, response included (see :class:`Deadline`); None: no
    such limit. ``max_response_bytes``: the most bytes of one response held in memory
    (see :meth:`body_cap`); None: no limit.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        transport: str = BINARY,
        headers: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport is one of {TRANSPORTS}, not {transport!r}")
        if max_response_bytes is not None and (
                isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, (int, np.integer))
                or max_response_bytes < 1):
            raise ValueError(f"max_response_bytes is None or a positive int, not {max_response_bytes!r}")
        self.transport = transport
        self.retry = retry if retry is not None else RetryPolicy()
        self.timeout = timeout
        self.max_response_bytes = None if max_response_bytes is None else int(max_response_bytes)
        # Results are decoded with no bound of the server's own (wire.Limits' defaults are the
        # server's request limits); only their size in bytes is bounded, by max_response_bytes:
        # an .npz's deflated members by the sizes its directory declares, before any is expanded.
        self._limits = wire.Limits(max_elements=1 << 62, max_rank=64, max_members=1 << 20,
                                   max_bytes=self.max_response_bytes or 1 << 62, complex=True)
        # the codings the clients decode themselves, piece by bounded piece (see _decoding)
        self.base_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING, **(headers or {})}
        check_api_key(api_key)
        if api_key:
            self.base_headers["Authorization"] = f"Bearer {api_key}"
        self.functions_cache: dict[str, FunctionInfo] = {}
        # wrong keyword calls (function, positional count, keyword names, the names they
        # were checked against): the names are asked again where kept ones do not fit a
        # call (the registry may have changed), once per such call, not at each retry
        self.misfits: set[tuple[Any, ...]] = set()
        self._npy_refused: set[tuple[str, str]] = set()
        # the seconds computing requests carry (see _computing_headers): repr spells a
        # positive finite float as the header's decimal number ("60.0", "1e-05")
        own = any(k.lower() == "x-request-timeout" for k in (headers or {}))
        self._send_timeout = None if own else server_deadline(timeout)

    # ----------------------------------------------------------------- metadata calls

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"X-Request-ID": uuid.uuid4().hex, **extra}

    def _computing_headers(self, **extra: str) -> dict[str, str]:
        """A request that runs the function: this client's ``timeout`` goes with it as
        ``X-Request-Timeout``, the server's deadline over queue and compute (it only ever
        shortens the server's ``REQUEST_TIMEOUT_S``). Without it a call the client had
        given up on (its ``timeout`` past, the connection closed) ran on in the engine:
        an engine looks for a cancel between row chunks and products, but one long call
        of the function held it to the server's own deadline (60 s by default) plus the
        hang grace, every other request waiting behind it; now the engine is stopped (and
        restarted, if the call will not return) at the caller's deadline plus that grace.
        Not sent where the caller's own ``headers=`` name one, or for no timeout
        (``None``, an ``httpx.Timeout``).

        A little less than the timeout (see :func:`server_deadline`): the server's 504
        ``timeout``, typed and naming the request, then reaches the caller before its own
        clock runs out. Sent as the timeout itself, which of the two ended the call was a
        race (a ``Timeout`` one time, a ``TransportError`` the next)."""
        headers = self._headers(**extra)
        if self._send_timeout is not None:
            headers["X-Request-Timeout"] = self._send_timeout
        return headers

    def functions_call(self) -> Call:
        return Call("GET", "/v1/functions", "functions", headers=self._headers(Accept=wire.JSON))

    def function_call(self, name: str) -> Call:
        return Call("GET", _function_path(name), "function", name=name, headers=self._headers(Accept=wire.JSON))

    def sparsity_call(
        self, name: str, shapes: Sequence[Sequence[int]], *, kind: str = "jacobian", sparsity: str = "auto",
        argnums: Any = 0, mode: str | None = None, dtypes: Sequence[str] | None = None, format: str = "csr",
    ) -> Call:
        """``GET /v1/functions/{name}/sparsity``: shapes as ``3,4;5`` (``;`` between inputs)."""
        params = {"shapes": ";".join(",".join(str(int(d)) for d in shape) for shape in shapes), "kind": kind,
                  "sparsity": sparsity, "format": format}
        argnums = _check_argnums(argnums)
        if argnums != 0:
            params["argnums"] = _query_value(argnums)
        if mode is not None:
            params["mode"] = mode
        if dtypes is not None:
            params["dtypes"] = ";".join(dtypes)
        return Call("GET", _function_path(name, "sparsity"), "sparsity", name=name, params=params,
                    headers=self._computing_headers(Accept=wire.JSON))

    def info_call(self) -> Call:
        return Call("GET", "/v1/info", "info", headers=self._headers(Accept=wire.JSON))

    # ----------------------------------------------------------------- compute calls

    def compute_call(
        self,
        kind: str,
        name: str,
        inputs: Sequence[Any],
        options: Mapping[str, Any],
        *,
        vectors: tuple[str, Any] | list[tuple[str, Any]] | None = None,
        transport: str | None = None,
        out: str | None = None,
        sink: Sink | None = None,
        progress: bool = False,
        parts: bool = False,
        names: Sequence[str] | None = None,
    ) -> Call:
        """A POST to ``/v1/functions/{name}/{kind}``.

        ``options`` hold the request fields (``argnums``, ``chunk_size``, ...); ``None``
        values and defaults are left out. ``vectors`` is ``("cotangents", tree)`` or
        ``("tangents", tree)``, or a list of such pairs (an hvp's tangents and cotangents). ``parts=True`` reads the result as a dict
        ``{"value": ..., "output": ..., "aux": ...}`` (only the parts the server sent),
        so that callers need not know whether the function has aux (the autodiff
        adapters in :mod:`jacobian_client.torch` / ``.jax`` / ``.scipy`` use it).
        ``names``: the inputs go by these parameter names, not by position (a JSON object,
        ``.npz`` members named so), for the server to place (an adapter's keyword call).
        """
        transport = transport or self.transport
        if transport not in TRANSPORTS:
            raise ValueError(f"transport is one of {TRANSPORTS}, not {transport!r}")
        if out is not None and transport == JSON_TRANSPORT:
            raise ValueError("out= streams a binary .npy into the file; it cannot be used with transport='json'")
        fields = self._fields(options)
        wrap = 0
        if out is not None:
            wrap = _one_array_for_out(kind, fields)
            check_out_path(out)
        values = exact_python_floats([input_tree(x) for x in inputs])
        keys = [str(i) for i in range(len(values))] if names is None else [str(n) for n in names]
        leaves = [leaf for key, v in zip(keys, values) for leaf in input_leaves(v, key)]
        binary = transport == BINARY
        if parts and (out is not None or sink is not None):
            raise ValueError("parts=True reads the whole result; it cannot stream into out=")
        call = Call("POST", _function_path(name, kind), kind, name=name, out=None if out is None else str(out),
                    sink=sink, progress=progress, return_output=bool(fields.get("return_output")), parts=parts,
                    wrap=wrap)

        # one (key, tree) or a list of them (an hvp's tangents and cotangents)
        groups = [] if vectors is None else [vectors] if isinstance(vectors[0], str) else list(vectors)
        vector_leaves = [(f"{key}{path}", v) for key, tree in groups for path, v in _vector_leaves(tree)]
        all_arrays = all(isinstance(v, np.ndarray) for _, v in leaves) and all(
            isinstance(v, np.ndarray) for _, v in vector_leaves)
        if binary and all_arrays and values and all(_npz_can_name(tree) for _, tree in groups):
            call.params = {k: wire.dumps(v).decode() if k in _DIMS else _query_value(v) for k, v in fields.items()}
            buf = io.BytesIO()
            if len(values) == 1 and vectors is None and isinstance(values[0], np.ndarray) and names is None:
                np.save(buf, values[0], allow_pickle=False)
                content_type = wire.NPY
            else:
                members = dict(leaves)
                members.update(vector_leaves)
                np.savez(buf, **members)
                content_type = wire.NPZ
            call.content = buf.getvalue()
        else:
            json_inputs = [_json_input(v, binary=binary) for v in values]
            body: dict[str, Any] = {"inputs": json_inputs if names is None else dict(zip(keys, json_inputs)), **fields}
            for key, tree in groups:
                body[key] = _vector_tree(tree, binary=binary)
            call.content = wire.dumps(body)
            content_type = wire.JSON

        call.expect = _expected(kind, fields, values)
        if names is None:  # a dict given by position: a pytree input, or every input in one (inputs_in_one_dict)
            call.maps = tuple((i, tuple(v)) for i, v in enumerate(inputs)
                              if isinstance(v, Mapping) and v and all(isinstance(k, str) for k in v))
        # (named inputs follow the caller too where they come in the function's order,
        # ``names`` all of its inputs: a client method's keyword call; an adapter's
        # parts are its own to nest)
        if kind in _FOLLOWING and (names is None or not parts) and "sparsity" not in fields:
            info = self.functions_cache.get(name)
            call.follow = _caller_structure(kind, inputs, fields.get("argnums", 0),
                                            list(names) if names is not None
                                            else None if info is None else [i.name for i in info.inputs])
        sparse = "sparsity" in fields and fields.get("sparse_format") != "dense"
        if sparse and (out is not None or sink is not None):
            raise ValueError("a sparse result is not streamed into out=; use sparse_format='dense' or no out=")
        if not binary:
            accept = wire.JSON
        elif sparse:
            accept = wire.NPZ  # the members scipy.sparse.save_npz writes
        elif out is not None or sink is not None:
            accept = wire.NPY
        elif not parts and not any(isinstance(v, (dict, list)) for v in values) and self._single_array_expected(kind, name, fields):
            accept = NPY_OR_NPZ  # the server picks npz itself when the result is more
        else:
            accept = wire.NPZ
        call.headers = self._computing_headers(**{"Content-Type": content_type, "Accept": accept})
        if accept == NPY_OR_NPZ:  # for a server that does not negotiate: 406, then npz
            call.fallback = replace(call, headers={**call.headers, "Accept": wire.NPZ})
        return call

    @staticmethod
    def _fields(options: Mapping[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for key, value in options.items():
            if key in _DIMS:  # vmap's in_dims / out_dims: None is a dim (shared), 0 the default
                if isinstance(value, int) and not isinstance(value, bool) and value == 0:
                    continue
                fields[key] = _dims_json(key, value)
                continue
            if value is None or value is False:
                continue
            if key == "argnums":
                value = _check_argnums(value)
                if value == 0:
                    continue
            elif key == "rows":
                value = _check_rows(value)
            elif key == "chunk_size":
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                    raise ValueError("chunk_size is None or a positive int")
                value = int(value)
            elif key == "mode" and value not in ("rev", "fwd", "auto"):
                raise ValueError("mode is 'rev', 'fwd' or 'auto'")
            elif key == "sparsity":
                if not isinstance(value, str) or not value:
                    raise ValueError("sparsity is 'dense', 'auto' or a declared pattern's name")
                if value == "dense":
                    continue
            elif key == "sparse_format" and value not in (*wire.SPARSE_FIELDS, "dense"):
                raise ValueError("sparse_format is 'csr', 'csc', 'coo' or 'dense'")
            fields[key] = value
        return fields

    def _single_array_expected(self, kind: str, name: str, fields: Mapping[str, Any]) -> bool:
        if fields.get("return_output"):
            return False
        # a sparse derivative's dense form is one 2-D matrix whatever argnums is (columns
        # concatenated): asked as .npz, a large one was held to the result limit, not streamed
        if isinstance(fields.get("argnums"), list) and fields.get("sparsity") in (None, "dense"):
            return False
        if (name, kind) in self._npy_refused:
            return False
        info = self.functions_cache.get(name)
        return not (info is not None and info.has_aux)

    def learn_npy_refused(self, call: Call) -> None:
        """A 406 to an npy Accept: this function's results are not one bare array."""
        if call.name is not None:
            self._npy_refused.add((call.name, call.kind))

    # ----------------------------------------------------------------- responses

    def deadline(self, call: Call) -> Deadline:
        """The deadline of one attempt of ``call``, started now. Every response gets the
        progress rule: a streamed Jacobian larger than one timeout covers keeps coming a
        chunk at a time whether it goes to a file or to memory (the server gives each
        chunk its own deadline too), and a trickle still ends."""
        return Deadline(self.timeout, progress_bytes=STREAM_PROGRESS_BYTES)

    def body_cap(self, call: Call) -> int | None:
        """The most bytes of ``call``'s (200) response body that are read into memory
        (decoded: a gzip body counts as what it expands to); one past it raises
        :class:`ResponseTooLarge`. A streamed ``.npy`` is held to it by the size its header
        declares, unless it goes to a file (``out=``) or a row-split's sink."""
        cap = self.max_response_bytes
        if call.kind in _METADATA_KINDS:
            return MAX_METADATA_BYTES if cap is None else min(cap, MAX_METADATA_BYTES)
        return cap

    def too_large(self, call: Call, size: int, *, declared: bool = False) -> JacobianServiceError:
        return too_large(f"{call.method} {call.path}", size, self.body_cap(call) or 0, declared=declared)

    def wants_stream(self, call: Call, response: httpx.Response) -> bool:
        """Read this response incrementally (an npy) rather than whole?"""
        streamed = _content_type(response) == wire.NPY and call.kind in COMPUTE_KINDS
        if (call.out is not None or call.sink is not None) and not streamed:
            raise TransportError(f"expected an application/x-npy response; got {_content_type(response) or 'none'}")
        return streamed

    def receiver(self, call: Call, response: httpx.Response) -> tuple[NpyReceiver, Progress | None]:
        progress = Progress(f"{call.name} {call.kind}") if call.progress else None
        sink: Sink
        if call.sink is not None:
            sink = call.sink
        elif call.out is not None:
            sink = FileSink(call.out)
        else:
            sink = MemorySink()
        cap = self.body_cap(call) if isinstance(sink, MemorySink) else None

        def check(header: NpyHeader) -> None:  # before the sink takes anything
            if cap is not None and header.total_nbytes > cap:
                raise self.too_large(call, header.total_nbytes, declared=True)
            if call.expect is not None:
                call.expect.check(header.shape, header.dtype)

        return NpyReceiver(sink, on_progress=progress, expected_length=_content_length(response),
                           check=check), progress

    def read_stream_result(self, call: Call, receiver: NpyReceiver, response: httpx.Response) -> Any:
        expected = _content_length(response)  # None for a compressed body (a proxy's gzip): not the .npy's
        if expected is not None and receiver.header is not None and receiver.received != expected:
            receiver.abort()
            raise IncompleteResponse(f"response body ended after {receiver.received} of {expected} bytes")
        if call.return_output and wire.RESULT_KEY[call.kind] != "output":
            receiver.abort()
            raise TransportError(f"the {call.kind} response is one bare array; return_output=True asked for the output too")
        value = receiver.close()  # one bare array: nothing else was due
        for _ in range(call.wrap):  # argnums=(i,)'s tuple (a Hessian's tuple of tuples), as jacrev gives it
            value = (value,)
        return {"value": value} if call.parts else value

    def read_result(self, call: Call, response: httpx.Response, body: bytes) -> Any:
        """A whole (non-streamed) success body -> the method's return value."""
        try:
            return self._read_result(call, response, body)
        except RecursionError:
            # orjson reads 1,024 levels of nesting; the trees built from them are walked
            # recursively, and a JSON result (or meta.json) nested ~900 deep ended the call
            # in a bare RecursionError
            raise TransportError(f"unreadable {call.kind} response: nested too deeply") from None

    def _read_result(self, call: Call, response: httpx.Response, body: bytes) -> Any:
        ctype = _content_type(response)
        cap = self.body_cap(call)
        if cap is not None and ctype == wire.NPZ:  # deflated members: the size they expand to, unexpanded
            size = wire.expanded_size(body, wire.NPZ, self._limits)
            if size > cap:
                raise self.too_large(call, size, declared=True)
        try:
            if call.kind == "functions":
                doc = wire.loads(body)
                items = doc.get("functions", []) if isinstance(doc, dict) else doc
                if not isinstance(items, list):
                    raise TypeError("the function list is a JSON list")
                infos = [FunctionInfo.from_json(d) for d in items]
                self.functions_cache.update((i.name, i) for i in infos)
                return infos
            if call.kind == "function":
                info = FunctionInfo.from_json(wire.loads(body))
                self.functions_cache[info.name] = info
                return info
            if call.kind == "sparsity":
                doc = wire.loads(body)
                doc["matrix"] = wire.decode_sparse_json(doc["matrix"], self._limits)
                return doc
            if call.kind not in COMPUTE_KINDS:
                doc = wire.loads(body)
                if not isinstance(doc, dict):
                    raise TypeError(f"expected a JSON object as the {call.kind} response")
                return doc
            key = wire.RESULT_KEY[call.kind]
            meta: Any = {}
            if ctype == wire.NPY:
                trees = {key: wire.read_npy(body, self._limits)}
            elif ctype == wire.NPZ and wire.is_sparse_npz(body, self._limits):
                matrix, trees, meta = wire.read_sparse_result_npz(body, self._limits)
                trees[key] = matrix
            elif ctype == wire.NPZ:
                trees, meta = wire.read_result_npz(body, self._limits)
            elif ctype in (wire.JSON, ""):
                doc = wire.loads(body)
                if not isinstance(doc, dict):
                    raise wire.WireError("a JSON result is an object")
                trees = {k: wire.decode_tree(doc[k], tuple, self._limits) for k in (key, "output", "aux") if k in doc}
                meta = doc.get("meta", {})
            else:
                raise TransportError(f"unexpected response Content-Type {ctype!r}")
            lists = meta.get("lists") if isinstance(meta, dict) else None
            if lists is not None:  # which sequences were lists (an older service: all tuples)
                if not isinstance(lists, dict):
                    raise wire.WireError("meta.lists is an object")
                trees = {k: wire.with_lists(v, lists[k]) if k in lists else v for k, v in trees.items()}
        except (wire.WireError, KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"unreadable {call.kind} response: {exc}") from None
        if key not in trees:
            raise TransportError(f"the {call.kind} response has no {key!r}")
        if call.return_output and key != "output" and "output" not in trees:
            raise TransportError(f"the {call.kind} response has no 'output', though return_output=True asked for it")
        for part in (key, "output"):  # aux may hold plain values; these are arrays
            if part in trees:
                _check_arrays(trees[part], f"the {call.kind} response's {part!r}")
        if call.expect is not None:
            call.expect.check_tree(trees[key])
        if call.follow is not None:
            trees[key] = _follow_caller(trees[key], call.follow, whole=call.kind in ("vjp", "hvp"))
        return self._assemble(call, _writable(trees), meta if isinstance(meta, dict) else {})

    @staticmethod
    def _assemble(call: Call, trees: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Any:
        key = wire.RESULT_KEY[call.kind]
        if call.parts:
            # meta too, for the adapters: a per-example evaluate's "unbatched" (torch's vmap rule)
            named = {"value": trees[key], "aux": trees.get("aux"), "meta": meta or None}
            if key != "output" and "output" in trees:
                named["output"] = trees["output"]
            return {k: v for k, v in named.items() if k == "value" or v is not None}
        extras = []
        if call.return_output and key != "output":
            extras.append(trees.get("output"))
        if "aux" in trees:
            extras.append(trees["aux"])
        return (trees[key], *extras) if extras else trees[key]


def check_api_key(api_key: Any) -> None:
    """An API key goes in a header: printable ASCII only. Checked up front, in words that
    never echo the key (httpx's own errors quote the header, secret and all)."""
    if api_key is None:
        return
    if not isinstance(api_key, str):
        raise TypeError(f"api_key is a string, not {type(api_key).__name__}")
    if not all(" " <= ch <= "~" for ch in api_key):
        raise ValueError("api_key holds a control or non-ASCII character; an HTTP header carries printable "
                         "ASCII only (the key is not shown here)")


def _check_arrays(tree: Any, what: str) -> None:
    """Every leaf of a result tree is an array (or a sparse matrix): a server that answers
    ``{"output": "hello"}`` is not describing an array, and the caller must not get "hello"."""
    if isinstance(tree, np.ndarray) or wire.is_sparse(tree):  # before tuple: SparseCOO is one
        return
    if isinstance(tree, (tuple, list)):
        for t in tree:
            _check_arrays(t, what)
    elif isinstance(tree, dict):
        for t in tree.values():
            _check_arrays(t, what)
    else:
        raise TransportError(f"{what} holds a {type(tree).__name__} where an array belongs")


def _content_length(response: httpx.Response) -> int | None:
    try:
        length = int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None
    # a compressed body's length is not the .npy's (the clients decode it); "identity" is no coding
    return length if length >= 0 and is_identity(response.headers.get("content-encoding", "")) else None


def _content_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip().lower()

